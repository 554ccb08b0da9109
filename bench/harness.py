"""`deepserve bench` (and `make bench`): the server and its ceilings, measured side by side in one run.

Order of work, and why:
1. A work copy of the repository: the published digits_cnn (or a stand-in) served twice, batching on and off, and
   the compute-heavy bench_resnet. The user's repository is never touched.
2. The server and one transport-ceiling process per model and batch size run at the same time (each serves the
   gRPC ceiling and, on the same loop, the HTTP one); each (batch, concurrency) point measures server and ceiling
   of both protocols in one ABBA sequence, so a drift in the machine's load hits both sides of a ratio alike.
   Idle servers cost nothing measurable.
3. CPU per request of server and ceiling at the target points, from kernel counters: the ratio that other
   processes on a shared machine disturb least.
4. Raw onnxruntime in-process right before and after each resnet point at the same batch size, and at every
   batch size the server could form from the requests in flight: with the transport ceilings, each point's limit.
   MLServer's REST (its own virtualenv, bench/mlserver.py) beside our HTTP path.
5. When a server-vs-ceiling target is missed, per-thread CPU and a py-spy profile of the request path under
   that load go into the report.
6. The leak check runs on a fresh server so that "after 20k requests" means exactly that.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata as pkg
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from bench import compute, mlserver, profile, report
from bench.loadgen import BenchError, Generator, Measurement, PythonLoad, cores, measure, merge, pick_generator
from bench.models import DIGITS, DIGITS_NOBATCH, RESNET, BenchRepository, prepare_repository, read_config
from bench.procs import ROOT, Target, ceiling, deepserve, model_info
from service._proto import model_config_pb2

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclass
class Plan:
    """How much to measure. `--quick` scales every count and duration down; flags override single knobs."""

    concurrency: list[int]
    batches: list[int]
    resnet_concurrency: list[int]
    seconds: float
    compute_seconds: float
    leak_requests: int
    leak_rounds: int
    resnet_widths: tuple[int, ...]
    profile: str
    label: str
    repeats: int
    protocols: list[str]
    http_concurrency: list[int]
    mlserver: str

    @property
    def leak_high(self) -> int:
        return self.leak_requests * self.leak_rounds


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse(argv: list[str]) -> tuple[argparse.Namespace, Plan]:
    p = argparse.ArgumentParser(prog="deepserve bench", description="Benchmark the server against its transport "
                                "ceiling (bare grpc.aio, fixed reply) and compute ceiling (raw onnxruntime); "
                                "writes results.md, results.json and throughput.png.")
    p.add_argument("--repository", type=Path, default=Path("models"),
                   help="repository with the published digits_cnn (a stand-in is built when it has none)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the report goes (default bench/results)")
    p.add_argument("--quick", action="store_true", help="scale every count down (about 2 minutes)")
    p.add_argument("--readme", type=Path, help="also write the report into this README's performance section "
                   "(between <!-- BENCH-TABLE --> and <!-- /BENCH-TABLE -->) and the plot beside it in docs/")
    p.add_argument("--generator", choices=["auto", "perf_analyzer", "python"], default="auto",
                   help="load generator; auto = perf_analyzer when it runs, else the Python one")
    p.add_argument("--concurrency", type=_ints, help="digits_cnn concurrency levels (default 1,4,16,32,64)")
    p.add_argument("--batches", type=_ints, help="request batch sizes (default 1,32)")
    p.add_argument("--resnet-concurrency", type=_ints, help="bench_resnet concurrency levels (default 1,4,16)")
    p.add_argument("--seconds", type=float, help="length of each measured point (default 3, quick 1)")
    p.add_argument("--compute-seconds", type=float, help="length of each compute-ceiling run (default 2, quick 1)")
    p.add_argument("--repeats", type=int, help="runs of each server/ceiling pair, in ABBA order (default 2, quick 1)")
    p.add_argument("--leak-requests", type=int, help="requests per leak-check round (default 20000, quick 2000)")
    p.add_argument("--leak-rounds", type=int, default=10, help="rounds; RSS is read after each (default 10)")
    p.add_argument("--resnet-widths", type=_ints, default=[32, 64, 128], help=argparse.SUPPRESS)
    p.add_argument("--profile", choices=["auto", "on", "off"], default="auto",
                   help="py-spy profile of the request path: auto = when a server-vs-ceiling target is missed")
    p.add_argument("--protocols", type=lambda t: [x for x in t.split(",") if x], default=["grpc", "http"],
                   help="wire protocols to measure (default grpc,http)")
    p.add_argument("--http-concurrency", type=_ints,
                   help="digits_cnn concurrency levels measured over HTTP too (default 1,4,32 of --concurrency)")
    p.add_argument("--mlserver", choices=["auto", "off"], default="auto",
                   help="MLServer's REST beside ours (its own virtualenv, installed on first use); off skips it")
    a = p.parse_args(argv)
    quick = a.quick
    knobs = ("concurrency", "batches", "resnet_concurrency", "seconds", "compute_seconds", "leak_requests", "repeats")
    custom = [k for k in knobs if getattr(a, k) is not None] + (["leak_rounds"] if a.leak_rounds != 10 else [])
    label = ("quick" if quick else "full") + (f", overridden: {', '.join(custom)}" if custom else "")
    plan = Plan(a.concurrency or [1, 4, 16, 32, 64], a.batches or [1, 32],
                a.resnet_concurrency or ([1, 4] if quick else [1, 4, 16]),
                a.seconds or (1.0 if quick else 3.0), a.compute_seconds or (1.0 if quick else 2.0),
                a.leak_requests or (2000 if quick else 20000), a.leak_rounds, tuple(a.resnet_widths), a.profile,
                label, a.repeats or (1 if quick else 2), a.protocols, [], a.mlserver)
    wanted = a.http_concurrency or [1, 4, 32]
    plan.http_concurrency = [c for c in plan.concurrency if c in wanted] or plan.concurrency[-1:]
    return a, plan


class Run:
    """One benchmark run: owns the results, the log folder and the progress lines on stderr."""

    def __init__(self, plan: Plan, gen: Generator, out: Path, repo: BenchRepository, meta: dict[str, str]) -> None:
        self.plan, self.gen, self.out, self.repo = plan, gen, out, repo
        self.logs = out / "logs"
        self.t0 = time.monotonic()
        self.results = report.Results(meta, DIGITS, RESNET)
        self.warmer = PythonLoad()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.0f}s] {text}", file=sys.stderr, flush=True)

    def point(self, target: Target, model: str, version: str, batch: int, concurrency: int,
              label: str, latency_ms: float = 0.0, protocol: str = "grpc",
              extra: tuple[str, ...] = ()) -> Measurement | None:
        try:
            return measure(self.gen, target.url_for(protocol), model, version, batch, concurrency,
                           self.plan.seconds, label, latency_ms, protocol, extra)
        except BenchError as exc:
            self.results.errors.append(f"{label} {model} ({protocol}) batch {batch} concurrency {concurrency}: {exc}")
            self.say(f"FAILED {label} {model} ({protocol}) b{batch} c{concurrency}: {str(exc)[:200]}")
            return None

    def warm(self, target: Target, model: str, version: str, batch: int, requests: int,
             protocols: list[str] | None = None) -> None:
        """A few requests before the first point, over each protocol the target serves and the plan measures:
        first onnxruntime runs, arenas, lazy imports, each front end's first requests. Sent from this process (no
        perf_analyzer start-up, whose count mode also rounds up to whole seconds)."""
        for proto in protocols or [p for p in self.plan.protocols if p == "grpc" or target.http_port]:
            try:
                self.warmer.run(target.url_for(proto), model, version, batch, 4, requests, "warm-up", proto)
            except BenchError as exc:
                self.say(f"warm-up of {target.name} {model} ({proto}) failed: {str(exc)[:200]}")

    def abba(self, *sides: Callable[[], Measurement | None]) -> list[Measurement] | None:
        """Each side `repeats` times in ABBA order (A B, B A, A B, ...), each side's runs averaged: a drift in the
        machine's load during the point hits both sides of the ratio alike, and the noise shrinks."""
        runs: list[list[Measurement]] = [[] for _ in sides]
        for r in range(self.plan.repeats):
            for i in (range(len(sides)) if r % 2 == 0 else reversed(range(len(sides)))):
                m = sides[i]()
                if m is None:
                    return None
                runs[i].append(m)
        return [merge(ms) for ms in runs]

    def sweep(self, server: Target, ceilings: dict[tuple[str, int], Target], version: str) -> None:
        """Each (batch, concurrency) point: server and transport ceiling of every protocol measured there, all
        four in one ABBA sequence, so that both the server-vs-ceiling and the HTTP-vs-gRPC ratios are of runs
        side by side in time."""
        for batch in self.plan.batches:
            self.warm(server, DIGITS, version, batch, 200)
            self.warm(ceilings[(DIGITS, batch)], DIGITS, version, batch, 200)
            for conc in self.plan.concurrency:
                protos = [p for p in self.plan.protocols if p == "grpc" or conc in self.plan.http_concurrency]
                sides: list[Callable[[], Measurement | None]] = []
                for proto in protos:
                    sides += [lambda b=batch, c=conc, p=proto: self.point(server, DIGITS, version, b, c, "server",
                                                                          protocol=p),
                              lambda b=batch, c=conc, p=proto: self.point(ceilings[(DIGITS, b)], DIGITS, version, b,
                                                                          c, "transport ceiling", protocol=p)]
                ms = self.abba(*sides)
                for i, proto in enumerate(protos if ms else []):
                    s, c = ms[2 * i], ms[2 * i + 1]
                    self.results.sweep.append((s, c))
                    self.say(f"{DIGITS} {proto} b{batch} c{conc}: server {s.requests_per_s:,.0f} req/s, ceiling "
                             f"{c.requests_per_s:,.0f} req/s ({s.requests_per_s / c.requests_per_s:.2f}x); p50 "
                             f"{s.p50_ms:.2f} vs {c.p50_ms:.2f} ms")

    def batching(self, server: Target, version: str) -> None:
        conc = 32
        self.warm(server, DIGITS_NOBATCH, version, 1, 200, ["grpc"])
        pair = self.abba(lambda: self.point(server, DIGITS, version, 1, conc, "server"),
                         lambda: self.point(server, DIGITS_NOBATCH, version, 1, conc, "server"))
        if pair:
            on, off = pair
            self.results.batching = (on, off)
            self.say(f"batching on {on.requests_per_s:,.0f} req/s, off {off.requests_per_s:,.0f} req/s "
                     f"({on.requests_per_s / off.requests_per_s:.2f}x)")

    def workers(self, server: Target, version: str) -> None:
        """`--workers N` (N = the cores) against the one-process server, digits_cnn batch 1, ABBA. SO_REUSEPORT
        spreads connections, not requests, over the workers: perf_analyzer opens several connections."""
        n = max(2, cores())
        with deepserve(self.repo.root, self.logs, f"server_workers{n}", "--workers", str(n)).start() as many:
            self.warm(many, DIGITS, version, 1, 400, ["grpc"])
            for conc in [c for c in self.plan.concurrency if c >= 32] or self.plan.concurrency[-1:]:
                pair = self.abba(lambda c=conc: self.point(server, DIGITS, version, 1, c, "server"),
                                 lambda c=conc: self.point(many, DIGITS, version, 1, c, f"server --workers {n}"))
                if pair:
                    self.results.workers.append((n, *pair))
                    one, more = pair
                    self.say(f"--workers {n} c{conc}: {more.requests_per_s:,.0f} req/s vs one process "
                             f"{one.requests_per_s:,.0f} ({more.requests_per_s / one.requests_per_s:.2f}x)")

    def compute_and_resnet(self, server: Target, ceilings: dict[tuple[str, int], Target]) -> None:
        """Compute ceilings for both models; for the resnet, one before and one after each server point, and the
        point's ratio against the mean of the two (the ceiling right beside it in time); the resnet's transport
        ceiling of each protocol right after the server's point. Then raw onnxruntime at every batch size the
        server could have formed from the requests in flight (the compute side of each point's limit)."""
        models = self.repo.root
        for name in (DIGITS, RESNET):
            cfg = read_config(models / name / "config.pbtxt")
            model_file = next((models / name).glob("*/model.onnx"))
            sess = compute.session(model_file, cfg)
            version = model_file.parent.name
            self.results.max_batch[name] = cfg.max_batch_size if cfg.HasField("dynamic_batching") else 0

            def ceiling(batch: int, name: str = name, cfg: model_config_pb2.ModelConfig = cfg,
                        model_file: Path = model_file, sess: tuple = sess) -> compute.ComputeCeiling:
                cc = compute.measure(model_file, cfg, batch, self.plan.compute_seconds, sess)
                self.results.compute.append(cc)
                return cc

            for batch in self.plan.batches:
                before = ceiling(batch)
                self.say(f"compute ceiling {name} b{batch}: {before.samples_per_s:,.0f} samples/s")
                if name != RESNET:
                    continue
                self.warm(server, RESNET, version, batch, 8)
                shm = _shm_flags(cfg, batch) if batch == max(self.plan.batches) and self.gen.takes_flags else ()
                for conc in self.plan.resnet_concurrency:
                    guess_ms = conc * batch / before.samples_per_s * 1e3  # queueing behind the others in flight
                    for proto in self.plan.protocols:
                        m = self.point(server, RESNET, version, batch, conc, "server", guess_ms, proto)
                        t = self.point(ceilings[(RESNET, batch)], RESNET, version, batch, conc, "transport ceiling",
                                       protocol=proto) if m else None
                        s = self.point(server, RESNET, version, batch, conc, "server, shared memory", guess_ms, proto,
                                       shm) if m and shm else None
                        after = ceiling(batch)
                        beside = (before.samples_per_s + after.samples_per_s) / 2
                        before = after
                        if m:
                            self.results.resnet.append((m, beside, t))
                            self.say(f"{RESNET} {proto} b{batch} c{conc}: server {m.infer_per_s:,.0f} samples/s, raw "
                                     f"onnxruntime {beside:,.0f} ({m.infer_per_s / beside:.2f}x)")
                        if s:
                            self.results.resnet_shm.append((s, beside, m))
                            self.say(f"{RESNET} {proto} b{batch} c{conc} shared memory: {s.infer_per_s:,.0f} "
                                     f"samples/s ({s.infer_per_s / beside:.2f}x raw onnxruntime)")
            conc = self.plan.resnet_concurrency if name == RESNET else self.plan.concurrency
            for formed in sorted({report.formable(self.results, name, b, c) for b in self.plan.batches for c in conc}
                                 - {c.batch for c in self.results.compute if c.model == name}):
                cc = ceiling(formed)
                self.say(f"compute ceiling {name} b{formed} (a batch the server could form): "
                         f"{cc.samples_per_s:,.0f} samples/s")

    def cpu_costs(self, server: Target, ceilings: dict[int, Target], version: str) -> None:
        """CPU per request of the server and of the ceiling at the target points: an exact count of requests
        against the kernel's CPU counters for the target process. Unlike requests/s, this hardly moves when
        other processes take cores away, so it is the steadier ratio on a shared machine."""
        if (DIGITS, 1) not in ceilings:
            return
        count = max(200, int(1000 * self.plan.seconds))
        one = ceilings[(DIGITS, 1)]
        loads = [(server, DIGITS, 1, "grpc"), (one, DIGITS, 1, "grpc"), (server, DIGITS, 32, "grpc"),
                 (one, DIGITS, 32, "grpc"), (server, DIGITS_NOBATCH, 32, "grpc")]
        if "http" in self.plan.protocols:
            loads += [(server, DIGITS, 32, "http"), (one, DIGITS, 32, "http")]
        for target, model, conc, proto in loads:
            try:
                for _ in range(2):  # a run that stalled and was sent again served requests the count leaves out
                    stalls = len(self.gen.stalls)
                    before = target.cpu_seconds()
                    self.gen.run(target.url_for(proto), model, version, 1, conc, count, target.name, proto)
                    if len(self.gen.stalls) == stalls:
                        break
            except BenchError as exc:
                self.results.errors.append(f"CPU cost {target.name} {model} ({proto}) c{conc}: {exc}")
                continue
            after = target.cpu_seconds()
            label = "transport ceiling" if target is not server else f"server ({model})"
            self.results.cpu.append(report.CpuCost(label, 1, conc, count, (after[0] - before[0]) / count * 1e3,
                                                   (after[1] - before[1]) / count * 1e3, proto))
            self.say(f"CPU per request, {label} {proto} c{conc}: {self.results.cpu[-1].ms_per_request:.3f} ms")

    def leak(self) -> None:
        """A fresh server, then rounds of batch-1 requests at 32 in flight, RSS read after each round."""
        with deepserve(self.repo.root, self.logs, "server_leak").start() as server:
            version, _ = model_info(server.url, DIGITS)
            served = 0
            for _ in range(self.plan.leak_rounds):
                try:
                    self.gen.run(server.url, DIGITS, version, 1, 32, self.plan.leak_requests, "server")
                except BenchError as exc:
                    self.results.errors.append(f"leak check after {served:,} requests: {exc}")
                    return
                served += self.plan.leak_requests
                self.results.leak.append((served, server.rss_bytes()))
            first, last = self.results.leak[0][1], self.results.leak[-1][1]
            self.say(f"leak check: RSS {first / 2**20:.0f} MiB after {self.plan.leak_requests:,}, "
                     f"{last / 2**20:.0f} MiB after {served:,} ({last / first - 1:+.1%})")

    def profiles(self, server: Target, version: str) -> None:
        """py-spy on the server under the load of each missed server-vs-ceiling target."""
        v = report.verdicts(self.results, 0, 0)  # order: throughput, c=1 p50, resnet, batching, leak
        wanted = {(DIGITS, 1, 32): v[0].passed is False or v[1].passed is False,
                  (RESNET, 32, 4): v[2].passed is False}
        loads = [k for k, missed in wanted.items() if self.plan.profile == "on" or missed]
        for model, batch, conc in loads:
            seconds = max(2.0, self.plan.seconds * 2)
            measured = [m for m, *_ in self.results.sweep + self.results.resnet if m.protocol == "grpc"]
            rate = next((m.requests_per_s for m in measured if (m.model, m.batch, m.concurrency) == (model, batch,
                                                                                                    conc)), 50.0)
            count = max(4 * conc, int(rate * seconds * 1.3))
            self.say(f"profiling the server under {model} b{batch} c{conc} with py-spy")

            def load(model: str = model, batch: int = batch, conc: int = conc, count: int = count) -> None:
                try:
                    self.gen.run(server.url, model, version, batch, conc, count, "server")
                except BenchError as exc:
                    self.results.errors.append(f"profile load {model}: {exc}")

            stem = f"profile_{model}_b{batch}_c{conc}"
            lines = profile.record(server.pid, seconds, self.out, stem, load)
            self.results.profile += [f"### {model}, batch {batch}, {conc} in flight", "", *lines, ""]


def _shm_flags(cfg: model_config_pb2.ModelConfig, batch: int) -> tuple[str, ...]:
    """perf_analyzer's system shared memory: inputs and outputs in regions it creates and registers; each output's
    region sized for `batch` rows (FP32)."""
    size = max(batch * int(np.prod([max(d, 1) for d in o.dims])) * 4 for o in cfg.output)
    return ("--shared-memory", "system", "--output-shared-memory-size", str(size))


def _meta(plan: Plan, gen_note: str, repo: BenchRepository) -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    versions = ", ".join(f"{p} {pkg.version(p)}" for p in ("grpcio", "onnxruntime", "numpy", "protobuf"))
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        head = "unknown"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "code": f"git {head} (dirty: uncommitted changes in the tree, possibly other engineers' work in progress)"
                if head.endswith("-dirty") else f"git {head}",
        "mode": f"{plan.label} ({plan.seconds:g} s per run, {plan.repeats} run(s) per point in ABBA order, leak "
                f"check {plan.leak_requests:,} x {plan.leak_rounds} requests)",
        "machine": f"{cores()} cores ({cpu}), {platform.system()} {platform.release()}; load average at start "
                   f"{os.getloadavg()[0]:.2f}",
        "software": f"Python {platform.python_version()}, {versions}",
        "load generator": gen_note,
        "digits_cnn": repo.digits_source,
        "digits_cnn batching on": repo.digits_batching + "; off = the same model without the block "
                                  f"(`{DIGITS_NOBATCH}`)",
        "bench_resnet": "ResNet-style CNN (onnx.helper, untrained), FP32 [B,3,64,64], max_batch_size 128, "
                        "dynamic_batching {}",
        "server": "`deepserve serve` with its defaults and `--allow-shared-memory` (which only lets clients "
                  "register regions: the shared-memory points use it); no instance_group in a config means 1 "
                  "instance with intra-op threads = cores (1 for a model whose batch-1 run is under 250 us)",
    }


def _cpu_mark() -> tuple[float, float, float]:
    """(machine busy core-seconds, total core-seconds, this process and its waited-for children's CPU seconds)."""
    busy, total = profile.machine_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    own = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                resource.getrusage(resource.RUSAGE_CHILDREN)))
    return busy / hz, total / hz, own


def bench_main(argv: list[str]) -> int:
    args, plan = parse(argv)
    mark = _cpu_mark()
    out: Path = args.out
    logs = out / "logs"
    if logs.exists():
        shutil.rmtree(logs)
    logs.mkdir(parents=True)
    for stale in out.glob("profile_*"):
        stale.unlink()
    try:
        gen, gen_note = pick_generator(args.generator, logs)
    except BenchError as exc:
        print(f"deepserve bench: {exc}", file=sys.stderr)
        return 2
    source = args.repository if args.repository.is_dir() else None
    with tempfile.TemporaryDirectory(prefix="deepserve-bench-") as tmp:
        repo = prepare_repository(Path(tmp) / "models", source, plan.resnet_widths)
        run = Run(plan, gen, out, repo, _meta(plan, gen_note, repo))
        run.say(f"work repository {repo.root}; digits_cnn: {repo.digits_source}; generator: {gen_note}")
        with deepserve(repo.root, logs, "server", "--allow-shared-memory").start() as server:
            version = ""
            ceilings: dict[tuple[str, int], Target] = {}
            for model in (DIGITS, RESNET):  # the transport ceilings, each from the config as the server completed it
                v, cfg_bytes = model_info(server.url, model)
                version = version or v
                cfg_path = Path(tmp) / f"{model}_served.pbtxt"
                cfg_path.write_text(text_format.MessageToString(model_config_pb2.ModelConfig.FromString(cfg_bytes)))
                ceilings |= {(model, b): ceiling(cfg_path, b, v, logs, "http" in plan.protocols)
                             for b in plan.batches}
            try:
                for c in ceilings.values():
                    c.spawn()
                for c in ceilings.values():
                    c.wait_ready()
                run.sweep(server, ceilings, version)
                run.cpu_costs(server, ceilings, version)
                run.batching(server, version)
                run.workers(server, version)
                run.compute_and_resnet(server, ceilings)
            finally:
                for c in ceilings.values():
                    c.stop()
            if "http" in plan.protocols:
                mlserver.compare(run, server, version, Path(tmp))
            if plan.profile != "off":
                run.profiles(server, version)
        run.leak()
    if gen.stalls:
        run.results.meta["perf_analyzer stalls (run again, once)"] = "; ".join(gen.stalls)
    end = _cpu_mark()
    others = max(0.0, (end[0] - mark[0]) - (end[2] - mark[2])) / (end[1] - mark[1]) * (os.cpu_count() or 1)
    run.results.meta["duration"] = (f"{time.monotonic() - run.t0:.0f} s; load average at end "
                                    f"{os.getloadavg()[0]:.2f}; processes outside this benchmark used {others:.2f} "
                                    f"of the {os.cpu_count()} cores on average during the run")
    files = report.write(run.results, out, plan.leak_requests, plan.leak_high)
    for v in report.verdicts(run.results, plan.leak_requests, plan.leak_high):
        run.say(f"{v.mark:>12}  {v.target}: {v.measured} (goal {v.goal})")
    if args.readme:
        files += report.into_readme(args.readme, out / "results.md", out / "throughput.png")
    run.say("wrote " + ", ".join(str(f) for f in files))
    return 1 if run.results.errors else 0
