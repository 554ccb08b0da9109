"""The generation benchmark (issue 15): generated tokens/s of a byte GPT at 1, 8 and 32 concurrent generations,
four ways in one run, so the ratios are between figures taken on the same machine minutes apart:

  server          a real `deepserve serve` process, HTTP /generate_stream clients (one thread each), continuous
                  batching up to 32 generations;
  ceiling         the server's own engine (service.generation.Generator) on the server's own loader's Instance,
                  in-process: the same decode loop at the same batch, no server, no protocol, no client threads;
  raw             a bare prefill-then-decode loop on that same onnxruntime session, each step's present cache fed
                  straight back as the next past: what onnxruntime itself costs at the batch;
  one-at-a-time   the same server and model with max_generations = 1: the clients still concurrent, they queue.

Every request asks for `max_tokens` at temperature 0 from a fixed prompt; the model's end token is switched off in
the benchmark's copy of its config, so each generation runs to max_tokens and the tokens counted (the server's
deepserve_generated_tokens_total, the engine's own counter for the ceiling, the steps run for raw) must equal what
was asked. Time to first token and inter-token latency are client timestamps: request sent to first event, and
between events. Quality does not matter for speed: the model is trained for a few steps only, by the text_gpt job's
own code."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson

from bench import procs

ROOT = Path(__file__).resolve().parents[1]
MODEL, ONE = "gen_bench", "gen_bench_one"
WAYS = ("server", "ceiling", "raw", "one-at-a-time")
README_START, README_END = "<!-- GENERATE-TABLE -->", "<!-- /GENERATE-TABLE -->"
PROMPTS = ["Hello", "What is your name?\n", "Tell me a joke.\n", "Do you", "I", "Who are you?\n", "Good morning",
           "What is AI?\n", "Do you like music?\n", "hi", "How are you?\n", "Can you", "What", "Are you a robot?\n",
           "Yes", "I like"]
# GPT sizes: "bench" is what `make bench-generate` measures, "tiny" what the smoke test runs.
SIZES = {"bench": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 256, "steps": 30},
         "tiny": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64, "steps": 2}}


@dataclass
class Point:
    """One measured (way, concurrency): tokens counted by the server or engine, and the clients' timings."""

    way: str
    concurrency: int
    requests: int
    tokens: int
    asked: int
    seconds: float
    ttft_ms: list[float] = field(default_factory=list, repr=False)
    itl_ms: list[float] = field(default_factory=list, repr=False)
    run_s: float = 0.0  # in onnxruntime runs (ceiling and raw: measured in-process)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def p50(self, which: str) -> float:
        values = self.ttft_ms if which == "ttft" else self.itl_ms
        return float(np.median(values)) if values else float("nan")


@dataclass
class Run:
    points: list[Point]
    header: dict[str, str]

    def point(self, way: str, concurrency: int) -> Point:
        return next(p for p in self.points if p.way == way and p.concurrency == concurrency)


def publish(repo: Path, size: str) -> dict[str, str]:
    """Train (a few steps), export and publish the GPT twice: MODEL (32 generations at once) and ONE (capped at 1),
    both with a queue that holds every client. Imports torch, so only here (the server never does)."""
    import torch
    from google.protobuf import text_format

    from service._proto import model_config_pb2
    from training.gpt import GPT, GPTConfig
    from training.gpt_export import export_decoder
    from training.gpt_job import generation_config, load_corpus, train
    from training.spec import resolve

    s = SIZES[size]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = GPT(GPTConfig(block_size=s["block_size"], n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"],
                          dropout=0.0))
    t = {"seed": 0, "lr": 3e-3, "weight_decay": 0.0, "epochs": 1, "steps_per_epoch": s["steps"], "batch_size": 8,
         "warmup_steps": 1, "min_lr_fraction": 0.1, "clip_norm": 1.0}
    train(model, load_corpus(resolve("text_gpt")["data"]), t, lambda line: None)
    model.eval()
    onnx = repo / MODEL / "1" / "model.onnx"
    onnx.parent.mkdir(parents=True)
    export_decoder(model, onnx)
    for name, cap in ((MODEL, 32), (ONE, 1)):
        cfg = text_format.Parse(generation_config(name, model.config, {
            "max_generations": cap, "max_queue": 64, "default_max_tokens": 16}), model_config_pb2.ModelConfig())
        cfg.parameters["generation_end_token"].string_value = ""  # every generation runs to max_tokens
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        if name != MODEL:
            (repo / name / "1" / "model.onnx").write_bytes(onnx.read_bytes())
        (repo / name / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    params = sum(p.numel() for p in model.parameters())
    return {"model": f"byte GPT {s['n_layer']} layers, {s['n_head']} heads, n_embd {s['n_embd']}, context "
                     f"{s['block_size']}, {params / 1e6:.2f} M parameters ({s['steps']} training steps: speed only), "
                     f"ONNX {onnx.stat().st_size / 1e6:.1f} MB, FP32, CPU"}


def _prompt(client: int, round_: int, concurrency: int) -> str:
    return PROMPTS[(client + round_ * concurrency) % len(PROMPTS)]


def _loaded(repo: Path):
    """MODEL as the server's own loader loads it (same session options, same warm-up), in this process."""
    from prometheus_client import CollectorRegistry

    from service.config import read_config
    from service.metrics import Metrics
    from service.models import load_version

    folder = repo / MODEL
    return load_version(folder, 1, read_config(folder, (folder / "config.pbtxt").read_bytes()), True,
                        Metrics(CollectorRegistry()))


def _ceiling(loaded, levels: list[int], rounds: dict[int, int], max_tokens: int) -> list[Point]:
    """The engine in-process on that Instance, then the raw loop on it."""
    from service.generation import Finished, Generator

    params = {"max_tokens": max_tokens, "temperature": 0.0}

    async def client(engine: Generator, i: int, c: int, ttft: list[float], itl: list[float]) -> None:
        for r in range(rounds[c]):
            t0 = last = time.perf_counter()
            async for item in engine.generate(_prompt(i, r, c), params):
                if isinstance(item, Finished):
                    break
                now = time.perf_counter()
                (itl if last > t0 else ttft).append((now - (last if last > t0 else t0)) * 1e3)
                last = now

    async def measure() -> list[Point]:
        run_ns = [0]
        engine = Generator(loaded.name, loaded.config, loaded.instances[0],
                           on_step=lambda batch, ns: run_ns.__setitem__(0, run_ns[0] + ns))
        engine.start()
        try:
            async for _ in engine.generate("warm", {"max_tokens": 4}):
                pass
            points = []
            for c in levels:
                before, ttft, itl, run_ns[0] = engine.tokens_generated, [], [], 0
                t0 = time.perf_counter()
                await asyncio.gather(*(client(engine, i, c, ttft, itl) for i in range(c)))
                seconds = time.perf_counter() - t0
                points.append(Point("ceiling", c, c * rounds[c], engine.tokens_generated - before,
                                    c * rounds[c] * max_tokens, seconds, ttft, itl, run_ns[0] / 1e9))
            return points
        finally:
            await engine.stop()

    points = asyncio.run(measure())
    return points + _raw(loaded.instances[0], loaded.config, levels, rounds, max_tokens)


def _raw(instance, config, levels: list[int], rounds: dict[int, int], max_tokens: int) -> list[Point]:
    """The bare loop over the same graph and session: prefill the batch once (prompts right-padded, the padding
    masked), then decode steps feeding each step's present cache straight back as the next past: no per-generation
    cache buffers, no event loop, no sampling beyond argmax. What onnxruntime itself costs at this batch."""
    from service.generation_spec import DecodeSpec

    s = DecodeSpec.from_config(config)
    points = []
    for c in levels:
        ttft, itl, tokens, run_s, t0 = [], [], 0, 0.0, time.perf_counter()
        for r in range(rounds[c]):
            t_req = time.perf_counter()
            prompts = [[*s.prefix, *(b + s.offset for b in _prompt(i, r, c).encode())] for i in range(c)]
            lengths = np.array([len(x) for x in prompts], np.int64)
            ids = np.zeros((c, lengths.max()), np.int64)
            mask = np.zeros(ids.shape, s.mask_dtype)
            for i, x in enumerate(prompts):
                ids[i, :len(x)], mask[i, :len(x)] = x, 1
            feeds = {s.ids: ids, s.positions: np.arange(ids.shape[1], dtype=np.int64)[None, :].repeat(c, 0),
                     s.mask: mask}
            for name, dims in zip(s.cache_in, s.cache_dims, strict=True):
                feeds[name] = np.zeros((c, *(0 if d == -1 else d for d in dims)), np.float32)
            t_run = time.perf_counter()
            out = instance.run(feeds)
            run_s += time.perf_counter() - t_run
            token = out[s.logits][np.arange(c), lengths - 1].argmax(-1)
            tokens += c
            last = time.perf_counter()
            ttft += [(last - t_req) * 1e3] * c
            for step in range(max_tokens - 1):
                mask = np.concatenate([mask, np.ones((c, 1), s.mask_dtype)], 1)
                feeds = {s.ids: token[:, None].astype(np.int64), s.positions: (lengths + step)[:, None],
                         s.mask: mask, **{i: out[o] for i, o in zip(s.cache_in, s.cache_out, strict=True)}}
                t_run = time.perf_counter()
                out = instance.run(feeds)
                run_s += time.perf_counter() - t_run
                token = out[s.logits][:, 0].argmax(-1)
                tokens += c
                now = time.perf_counter()
                itl += [(now - last) * 1e3] * c
                last = now
        points.append(Point("raw", c, c * rounds[c], tokens, c * rounds[c] * max_tokens, time.perf_counter() - t0,
                            ttft, itl, run_s))
    return points


def _stream(port: int, model: str, prompt: str, max_tokens: int) -> tuple[list[float], list[float]]:
    """One /generate_stream request: (time to first event, gaps between events), ms."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = orjson.dumps({"text_input": prompt, "parameters": {"max_tokens": max_tokens, "temperature": 0.0}})
    t0 = time.perf_counter()
    conn.request("POST", f"/v2/models/{model}/generate_stream", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"{model}: HTTP {r.status}: {r.read()[:500]!r}")
    times = []
    while line := r.readline():
        if line.startswith(b"data: "):
            times.append(time.perf_counter())
            if b'"error"' in line and "error" in orjson.loads(line[6:]):
                raise RuntimeError(f"{model}: {line.decode()}")
    conn.close()
    gaps = np.diff(times) * 1e3
    return ([(times[0] - t0) * 1e3] if times else []), gaps.tolist()


def _generated(metrics_port: int, model: str) -> int:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
    return int(sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "deepserve_generated_tokens_total" and s.labels.get("model") == model))


def _serve(server: procs.Target, model: str, way: str, levels: list[int], rounds: dict[int, int], max_tokens: int,
           metrics_port: int) -> list[Point]:
    assert server.http_port is not None
    _stream(server.http_port, model, "warm", 4)
    points = []
    for c in levels:
        def client(i: int, c: int = c) -> tuple[list[float], list[float]]:
            ttft, itl = [], []
            for r in range(rounds[c]):
                a, b = _stream(server.http_port, model, _prompt(i, r, c), max_tokens)
                ttft += a
                itl += b
            return ttft, itl

        before = _generated(metrics_port, model)
        with ThreadPoolExecutor(c) as pool:
            t0 = time.perf_counter()
            results = list(pool.map(client, range(c)))
            seconds = time.perf_counter() - t0
        tokens = _generated(metrics_port, model) - before
        points.append(Point(way, c, c * rounds[c], tokens, c * rounds[c] * max_tokens, seconds,
                            [x for a, _ in results for x in a], [x for _, b in results for x in b]))
    return points


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run(work: Path, levels: list[int], rounds: int, max_tokens: int, size: str, min_tokens: int = 0) -> Run:
    """Publish the model into `work`, then per concurrency: the ceiling and the raw loop in this process, the
    server and one-at-a-time (both models in one server process, started once). Each
    client runs `rounds` generations, more at low concurrency so that every point generates `min_tokens`."""
    per = {c: max(rounds, -(-min_tokens // (c * max_tokens))) for c in levels}
    began, load_start = time.time(), _load()
    repo = work / "models"
    header = publish(repo, size)
    loaded, points = _loaded(repo), []
    server = procs.deepserve(repo, work)
    metrics_port = int(server.argv[server.argv.index("--metrics-port") + 1])
    with server.start(120):
        for c in levels:  # the four ways of one concurrency side by side in time: the machine's load drifts
            points += _ceiling(loaded, [c], per, max_tokens)  # the server idles meanwhile
            points += _serve(server, MODEL, "server", [c], per, max_tokens, metrics_port)
            points += _serve(server, ONE, "one-at-a-time", [c], per, max_tokens, metrics_port)
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=False).stdout.strip()
    except OSError:
        rev = "?"
    import onnxruntime

    header |= {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(began)), "code": f"git {rev or '?'}",
        "machine": f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}); load average (1, 5, "
                   f"15 min) at start {load_start}, at end {_load()}",
        "software": f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}",
        "load": f"{max_tokens} new tokens per generation, temperature 0, fixed prompts; generations per client, "
                "back to back: " + ", ".join(f"{n} at concurrency {c}" for c, n in per.items()) +
                "; server clients: one thread each, HTTP /generate_stream",
        "duration": f"{time.time() - began:.0f} s"}
    return Run(points, header)


def markdown(run: Run) -> str:
    levels = sorted({p.concurrency for p in run.points})
    lines = ["### Generation: tokens/s, server vs ceiling vs one-at-a-time", ""]
    lines += [f"- {k}: {v}" for k, v in run.header.items()]
    lines += ["", "Ceiling: the server's engine (`Generator`) in-process on the loader's onnxruntime Instance at the "
              "same batch, no server, no protocol. Raw: a bare prefill-then-decode loop on the same session, each "
              "step's present cache fed straight back (what onnxruntime itself costs). One-at-a-time: the same "
              "server, the model's max_generations = 1 (the clients queue). Latencies are p50, ms, client-side: time "
              "to first token (TTFT) and inter-token (ITL, between stream events; per step for raw).", "",
              "| concurrent generations | server tok/s | ceiling tok/s | raw onnxruntime tok/s | one-at-a-time tok/s | "
              "**server / ceiling** | server / raw | server / one-at-a-time | TTFT p50 server / ceiling / raw / one | "
              "ITL p50 server / ceiling / raw / one | tokens counted / asked |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in levels:
        ways = [run.point(w, c) for w in WAYS]
        s, ce, raw, one = ways
        lines.append(
            f"| {c} | " + " | ".join(f"{p.tokens_per_s:,.0f}" for p in ways) + " | "
            f"**{s.tokens_per_s / ce.tokens_per_s:.2f}x** | {s.tokens_per_s / raw.tokens_per_s:.2f}x | "
            f"{s.tokens_per_s / one.tokens_per_s:.2f}x | " + " / ".join(f"{p.p50('ttft'):.1f}" for p in ways) +
            " | " + " / ".join(f"{p.p50('itl'):.2f}" for p in ways) +
            f" | {sum(p.tokens for p in ways):,} / {sum(p.asked for p in ways):,} |")
    lines += ["", "Share of the in-process ways' wall time spent inside onnxruntime runs (the rest is the loop around "
              "them: cache gathering and scattering, sampling, the event loop): " + "; ".join(
                  f"concurrency {c}: ceiling {run.point('ceiling', c).run_s / run.point('ceiling', c).seconds:.0%}, "
                  f"raw {run.point('raw', c).run_s / run.point('raw', c).seconds:.0%}" for c in levels) + "."]
    return "\n".join(lines) + "\n"


def into_readme(readme: Path, md: str) -> None:
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} markers")
    head, rest = text.split(README_START, 1)
    readme.write_text(head + README_START + "\n" + md.replace("### ", "#### ") + README_END +
                      rest.split(README_END, 1)[1])


def main(argv: list[str] | None = None) -> Run:
    p = argparse.ArgumentParser(prog="bench.generation", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,8,32", help="concurrent generations (default 1,8,32)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per generation (default 64)")
    p.add_argument("--rounds", type=int, default=4, help="generations per client, back to back (default 4)")
    p.add_argument("--min-tokens", type=int, default=1024, help="tokens every point generates at least: more "
                   "rounds at low concurrency (default 1024)")
    p.add_argument("--size", choices=sorted(SIZES), default="bench", help="GPT size (default bench)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="report folder")
    p.add_argument("--readme", type=Path, help="also write the table into this README (between "
                   f"{README_START} and {README_END})")
    a = p.parse_args(argv)
    import tempfile

    levels = [int(x) for x in a.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="genbench-") as tmp:
        result = run(Path(tmp), levels, a.rounds, a.max_tokens, a.size, a.min_tokens)
    md = markdown(result)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "generation.md").write_text(md)
    (a.out / "generation.json").write_text(json.dumps({"header": result.header, "points": [
        {**{k: v for k, v in asdict(x).items() if not k.endswith("_ms")}, "tokens_per_s": x.tokens_per_s,
         "ttft_p50_ms": x.p50("ttft"), "itl_p50_ms": x.p50("itl")} for x in result.points]}, indent=1))
    if a.readme:
        into_readme(a.readme, md)
    sys.stdout.write(md)
    return result


if __name__ == "__main__":
    main()
