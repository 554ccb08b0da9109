"""Turns one run's measurements into `results.md` (tables, ratios, the issue's five targets marked), `results.json`
(every number, for diffing runs) and `throughput.png` (throughput and p99 vs concurrency, server vs ceiling).

Ratios are the headline because both sides of each ratio were measured minutes apart on the same machine with the
same load generator; absolute numbers appear only as the ingredients of those ratios.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bench.compute import ComputeCeiling
from bench.loadgen import Measurement

MIB = 1024 * 1024


@dataclass
class CpuCost:
    """CPU time one target process spent per request, over an exact count of requests."""

    target: str
    batch: int
    concurrency: int
    requests: int
    ms_per_request: float  # all threads
    main_ms_per_request: float  # the main thread: the event loop, which holds the GIL for the Python work


@dataclass
class Results:
    meta: dict[str, str]
    digits_model: str
    resnet_model: str
    sweep: list[tuple[Measurement, Measurement]] = field(default_factory=list)  # (server, transport ceiling)
    resnet: list[tuple[Measurement, float]] = field(default_factory=list)  # (server, compute ceiling beside it)
    compute: list[ComputeCeiling] = field(default_factory=list)  # every run, in order
    batching: tuple[Measurement, Measurement] | None = None  # (on, off)
    workers: list[tuple[int, Measurement, Measurement]] = field(default_factory=list)  # (N, one process, N)
    leak: list[tuple[int, int]] = field(default_factory=list)  # (requests served since start, RSS bytes)
    cpu: list[CpuCost] = field(default_factory=list)
    profile: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    target: str
    goal: str
    measured: str
    passed: bool | None  # None: not measured in this run

    @property
    def mark(self) -> str:
        return {True: "PASS", False: "**FAIL**", None: "not measured"}[self.passed]


def _point(r: Results, batch: int, concurrency: int) -> tuple[Measurement, Measurement] | None:
    return next(((s, c) for s, c in r.sweep if s.batch == batch and s.concurrency == concurrency), None)


def _ceilings(r: Results) -> dict[tuple[str, int], list[ComputeCeiling]]:
    runs: dict[tuple[str, int], list[ComputeCeiling]] = {}
    for c in r.compute:
        runs.setdefault((c.model, c.batch), []).append(c)
    return runs


def verdicts(r: Results, leak_low: int, leak_high: int) -> list[Verdict]:
    """The issue's five targets, each from the measurements it names."""
    out = []
    p = _point(r, 1, 32)
    ratio = p[0].requests_per_s / p[1].requests_per_s if p else 0.0
    out.append(Verdict(f"{r.digits_model} batch-1, 32 in flight: requests/s vs the transport ceiling", ">= 0.70x",
                       f"{ratio:.2f}x" if p else "-", ratio >= 0.7 if p else None))
    p = _point(r, 1, 1)
    extra = p[0].p50_ms - p[1].p50_ms if p else 0.0
    out.append(Verdict(f"{r.digits_model} batch-1, concurrency 1: p50 vs the transport ceiling's p50",
                       "<= +0.30 ms", f"{extra:+.2f} ms ({p[0].p50_ms / p[1].p50_ms:.2f}x)" if p else "-",
                       extra <= 0.3 if p else None))
    best = max(((m, c) for m, c in r.resnet if m.batch == 32), key=lambda mc: mc[0].infer_per_s, default=None)
    ratio = best[0].infer_per_s / best[1] if best else 0.0
    out.append(Verdict(f"{r.resnet_model} batch-32: samples/s vs raw onnxruntime (busiest concurrency)", ">= 0.85x",
                       f"{ratio:.2f}x (at concurrency {best[0].concurrency})" if best else "-",
                       ratio >= 0.85 if best else None))
    b = r.batching
    ratio = b[0].requests_per_s / b[1].requests_per_s if b else 0.0
    out.append(Verdict(f"{r.digits_model} batch-1, 32 in flight: dynamic batching on vs off", ">= 2.00x",
                       f"{ratio:.2f}x" if b else "-", ratio >= 2.0 if b else None))
    low = next((rss for n, rss in r.leak if n >= leak_low), None)
    high = next((rss for n, rss in r.leak if n >= leak_high), None)
    growth = high / low - 1 if low and high else 0.0
    out.append(Verdict(f"no leak: server RSS after {leak_high:,} requests vs after {leak_low:,}", "within 10%",
                       f"{growth:+.1%} ({low / MIB:.0f} -> {high / MIB:.0f} MiB)" if low and high else "-",
                       abs(growth) <= 0.10 if low and high else None))
    return out


def _lat(m: Measurement) -> str:
    return f"{m.p50_ms:.2f} / {m.p90_ms:.2f} / {m.p99_ms:.2f}"


def markdown(r: Results, leak_low: int, leak_high: int) -> str:
    lines = ["# deepserve benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in r.meta.items()]
    lines += ["", "## Targets (issue 4)", "", "| target | goal | measured | result |", "| --- | --- | --- | --- |"]
    lines += [f"| {v.target} | {v.goal} | {v.measured} | {v.mark} |" for v in verdicts(r, leak_low, leak_high)]
    if r.sweep:
        lines += ["", f"## {r.digits_model}: server vs transport ceiling (bare grpc.aio, fixed reply)", "",
                  "Latencies are per request, in ms (p50 / p90 / p99). Ratios: server over ceiling.", "",
                  "| batch | concurrency | server req/s | ceiling req/s | throughput ratio | server latency | "
                  "ceiling latency | p50 extra ms | p99 ratio |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for s, c in r.sweep:
            lines.append(f"| {s.batch} | {s.concurrency} | {s.requests_per_s:,.0f} | {c.requests_per_s:,.0f} | "
                         f"**{s.requests_per_s / c.requests_per_s:.2f}x** | {_lat(s)} | {_lat(c)} | "
                         f"{s.p50_ms - c.p50_ms:+.2f} | {s.p99_ms / c.p99_ms:.2f}x |")
    if r.cpu:
        lines += ["", f"## CPU per request ({r.digits_model}, batch 1)", "",
                  "CPU seconds the target process used (kernel counters) over an exact number of requests. The "
                  "other processes on the machine slow a target down but hardly change what each request costs "
                  "it, so these ratios are the steadier ones here.", "",
                  "| target | concurrency | CPU ms per request, all threads | main thread (event loop) | "
                  "vs ceiling, all threads |", "| --- | ---: | ---: | ---: | ---: |"]
        for c in r.cpu:
            base = next((b for b in r.cpu if b.target == "transport ceiling" and b.concurrency == c.concurrency),
                        None)
            ratio = f"{c.ms_per_request / base.ms_per_request:.2f}x" if base else "-"
            lines.append(f"| {c.target} | {c.concurrency} | {c.ms_per_request:.3f} | {c.main_ms_per_request:.3f} | "
                         f"{ratio} |")
    if r.resnet or r.compute:
        lines += ["", f"## {r.resnet_model}: server vs compute ceiling (raw onnxruntime in-process)", "",
                  "Each point's ceiling is the mean of the runs right before and right after it.", "",
                  "| batch | concurrency | server samples/s | compute ceiling samples/s | ratio | server latency |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {m.batch} | {m.concurrency} | {m.infer_per_s:,.0f} | {c:,.0f} | **{m.infer_per_s / c:.2f}x** | "
                  f"{_lat(m)} |" for m, c in r.resnet]
        lines += ["", "Compute ceilings (one session, back-to-back runs, the server's default thread settings):", "",
                  "| model | batch | samples/s (mean) | min - max | ms per run (p50) | intra-op threads | runs |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for (model, batch), cs in _ceilings(r).items():
            rates = [c.samples_per_s for c in cs]
            lines.append(f"| {model} | {batch} | {sum(rates) / len(rates):,.0f} | {min(rates):,.0f} - "
                         f"{max(rates):,.0f} | {cs[0].p50_ms:.2f} | {cs[0].intra_threads} | {len(cs)} |")
    if r.batching:
        on, off = r.batching
        lines += ["", f"## Dynamic batching on vs off ({r.digits_model}, batch-1, {on.concurrency} in flight)", "",
                  "| config | req/s | latency p50 / p90 / p99 ms |", "| --- | ---: | ---: |",
                  f"| on ({on.model}) | {on.requests_per_s:,.0f} | {_lat(on)} |",
                  f"| off ({off.model}) | {off.requests_per_s:,.0f} | {_lat(off)} |",
                  "", f"On / off: **{on.requests_per_s / off.requests_per_s:.2f}x** requests/s, "
                  f"{on.p99_ms / off.p99_ms:.2f}x p99."]
    if r.workers:
        n = r.workers[0][0]
        lines += ["", f"## --workers {n} vs one process ({r.digits_model}, batch 1)", "",
                  f"{n} server processes share the port (SO_REUSEPORT), each with its own event loop; the kernel "
                  "spreads connections, not requests, over them, and the load generator runs on the same cores.",
                  "", "| concurrency | one process req/s | workers req/s | ratio | p99 one / workers ms |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {one.concurrency} | {one.requests_per_s:,.0f} | {many.requests_per_s:,.0f} | "
                  f"**{many.requests_per_s / one.requests_per_s:.2f}x** | {one.p99_ms:.2f} / {many.p99_ms:.2f} |"
                  for _, one, many in r.workers]
    if r.leak:
        base = next((rss for n, rss in r.leak if n >= leak_low), r.leak[0][1])
        lines += ["", "## Server memory under load (leak check, fresh server)", "",
                  "| requests served | RSS MiB | vs first |", "| ---: | ---: | ---: |"]
        lines += [f"| {n:,} | {rss / MIB:.1f} | {rss / base - 1:+.1%} |" for n, rss in r.leak]
    if r.profile:
        lines += ["", "## Profile of the server's request path (py-spy)", "", *r.profile]
    if r.errors:
        lines += ["", "## Measurements that failed", "", *[f"- {e}" for e in r.errors]]
    return "\n".join(lines) + "\n"


def plot(r: Results, path: Path) -> None:
    """Throughput (top) and p99 (bottom) vs concurrency: one column per digits batch size, one for the resnet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({s.batch for s, _ in r.sweep})
    cols = len(batches) + (1 if r.resnet else 0) or 1
    fig, axes = plt.subplots(2, cols, figsize=(4.6 * cols, 7.5), squeeze=False)
    for col, batch in enumerate(batches):
        pts = [(s, c) for s, c in r.sweep if s.batch == batch]
        conc = [s.concurrency for s, _ in pts]
        top, bottom = axes[0][col], axes[1][col]
        top.plot(conc, [s.requests_per_s for s, _ in pts], "o-", label="deepserve")
        top.plot(conc, [c.requests_per_s for _, c in pts], "s--", label="transport ceiling")
        bottom.plot(conc, [s.p99_ms for s, _ in pts], "o-", label="deepserve")
        bottom.plot(conc, [c.p99_ms for _, c in pts], "s--", label="transport ceiling")
        top.set_title(f"{r.digits_model}, batch {batch}")
        top.set_ylabel("requests/s")
        bottom.set_ylabel("p99 latency (ms)")
    if r.resnet:
        top, bottom = axes[0][-1], axes[1][-1]
        for batch in sorted({m.batch for m, _ in r.resnet}):
            pts = [(m, c) for m, c in r.resnet if m.batch == batch]
            conc = [m.concurrency for m, _ in pts]
            line = top.plot(conc, [m.infer_per_s for m, _ in pts], "o-", label=f"deepserve, batch {batch}")[0]
            color = line.get_color()
            top.plot(conc, [c for _, c in pts], "s--", color=color, label=f"raw onnxruntime, batch {batch}")
            bottom.plot(conc, [m.p99_ms for m, _ in pts], "o-", color=color, label=f"deepserve, batch {batch}")
        top.set_title(f"{r.resnet_model} vs compute ceiling")
        top.set_ylabel("samples/s")
        bottom.set_ylabel("p99 latency (ms)")
    ticks = sorted({s.concurrency for s, _ in r.sweep} | {m.concurrency for m, _ in r.resnet})
    for ax in axes[1]:
        ax.set_yscale("log")  # p99 spans two decades between concurrency 1 and 64
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrency (requests in flight)")
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    generator = r.meta.get("load generator", "").split(" (")[0]
    fig.suptitle(f"deepserve vs its ceilings, same machine, same run ({generator})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(r: Results, out: Path, leak_low: int, leak_high: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js, png = out / "results.md", out / "results.json", out / "throughput.png"
    md.write_text(markdown(r, leak_low, leak_high))
    data = {"meta": r.meta, "sweep": [{"server": s.to_dict(), "ceiling": c.to_dict()} for s, c in r.sweep],
            "resnet": [{"server": m.to_dict(), "ceiling_samples_per_s": c} for m, c in r.resnet],
            "compute": [c.to_dict() for c in r.compute],
            "batching": {"on": r.batching[0].to_dict(), "off": r.batching[1].to_dict()} if r.batching else None,
            "workers": [{"workers": n, "one": one.to_dict(), "many": many.to_dict()} for n, one, many in r.workers],
            "leak": [{"requests": n, "rss_bytes": rss} for n, rss in r.leak],
            "cpu_per_request": [c.__dict__ for c in r.cpu],
            "targets": [v.__dict__ for v in verdicts(r, leak_low, leak_high)], "errors": r.errors}
    js.write_text(json.dumps(data, indent=1))
    plot(r, png)
    return [md, js, png]


README_START, README_END = "<!-- BENCH-TABLE -->", "<!-- /BENCH-TABLE -->"


def into_readme(readme: Path, results_md: Path, plot_png: Path) -> list[Path]:
    """Put this run's report in the README between the markers (headings one level down) and its plot in docs/,
    so the committed README shows the numbers of the committed code."""
    text = readme.read_text()
    if README_START not in text:
        raise SystemExit(f"{readme} has no {README_START} marker")
    docs = readme.parent / "docs"
    docs.mkdir(exist_ok=True)
    png = docs / "bench-throughput.png"
    png.write_bytes(plot_png.read_bytes())
    body = "\n".join("#" + line if line.startswith("#") else line for line in results_md.read_text().splitlines())
    block = f"{README_START}\n![throughput and p99 vs concurrency](docs/{png.name})\n\n{body.strip()}\n{README_END}"
    head, _, rest = text.partition(README_START)
    tail = rest.partition(README_END)[2] if README_END in rest else rest
    readme.write_text(head + block + tail)
    return [readme, png]
