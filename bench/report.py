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
    protocol: str = "grpc"


@dataclass
class Results:
    meta: dict[str, str]
    digits_model: str
    resnet_model: str
    sweep: list[tuple[Measurement, Measurement]] = field(default_factory=list)  # (server, transport ceiling)
    # (server, raw onnxruntime at the request batch beside it in time, transport ceiling at the same point)
    resnet: list[tuple[Measurement, float, Measurement | None]] = field(default_factory=list)
    # (server with perf_analyzer --shared-memory system, raw onnxruntime beside it, the same point over the wire)
    resnet_shm: list[tuple[Measurement, float, Measurement]] = field(default_factory=list)
    compute: list[ComputeCeiling] = field(default_factory=list)  # every run, in order
    batching: tuple[Measurement, Measurement] | None = None  # (on, off)
    workers: list[tuple[int, Measurement, Measurement]] = field(default_factory=list)  # (N, one process, N)
    leak: list[tuple[int, int]] = field(default_factory=list)  # (requests served since start, RSS bytes)
    cpu: list[CpuCost] = field(default_factory=list)
    profile: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    max_batch: dict[str, int] = field(default_factory=dict)  # model -> the largest batch it forms (0: no batching)
    mlserver: list[tuple[Measurement, Measurement, Measurement]] = field(default_factory=list)  # ours bin, JSON, ML
    mlserver_note: str = "not measured"


@dataclass
class Limit:
    """A point's limit in requests/s: the lower of its protocol's transport ceiling and raw onnxruntime at the
    batch the server could have formed from the requests in flight, both measured in the same run."""

    transport: float | None
    compute: float | None
    formed: int  # the batch size the compute side was measured at

    @property
    def value(self) -> float | None:
        known = [x for x in (self.transport, self.compute) if x]
        return min(known) if known else None

    @property
    def by(self) -> str:
        if not self.value:
            return "-"
        return "transport" if self.value == self.transport else f"compute (batch {self.formed})"


def formable(r: Results, model: str, batch: int, concurrency: int) -> int:
    """The largest batch the server could form: every request in flight merged, up to the model's
    max_batch_size, when the model batches dynamically; else the request's own batch."""
    cap = r.max_batch.get(model, 0)
    return max(batch, min(batch * concurrency, cap)) if cap else batch


def compute_rate(r: Results, model: str, batch: int) -> float | None:
    rates = [c.samples_per_s for c in r.compute if c.model == model and c.batch == batch]
    return sum(rates) / len(rates) if rates else None


def limit(r: Results, server: Measurement, transport: Measurement | None) -> Limit:
    formed = formable(r, server.model, server.batch, server.concurrency)
    rate = compute_rate(r, server.model, formed)
    return Limit(transport.requests_per_s if transport else None, rate / server.batch if rate else None, formed)


def points(r: Results) -> list[tuple[Measurement, Limit]]:
    """Every server point of the sweep and the resnet with its limit."""
    return [(s, limit(r, s, c)) for s, c in r.sweep] + [(m, limit(r, m, t)) for m, _, t in r.resnet]


@dataclass
class Verdict:
    target: str
    goal: str
    measured: str
    passed: bool | None  # None: not measured in this run

    @property
    def mark(self) -> str:
        return {True: "PASS", False: "**FAIL**", None: "not measured"}[self.passed]


def _point(r: Results, batch: int, concurrency: int, protocol: str = "grpc") -> tuple[Measurement, Measurement] | None:
    return next(((s, c) for s, c in r.sweep if s.batch == batch and s.concurrency == concurrency
                 and s.protocol == protocol), None)


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
    best = max(((m, c) for m, c, _ in r.resnet if m.batch == 32 and m.protocol == "grpc"),
               key=lambda mc: mc[0].infer_per_s, default=None)
    ratio = best[0].infer_per_s / best[1] if best else 0.0
    out.append(Verdict(f"{r.resnet_model} batch-32: samples/s vs raw onnxruntime (busiest concurrency)", ">= 0.85x",
                       f"{ratio:.2f}x (at concurrency {best[0].concurrency})" if best else "-",
                       ratio >= 0.85 if best else None))
    best = max(r.resnet_shm, key=lambda sc: sc[0].infer_per_s / sc[1], default=None)
    ratio = best[0].infer_per_s / best[1] if best else 0.0
    out.append(Verdict(f"{r.resnet_model} batch-{best[0].batch if best else 32} with system shared memory: "
                       "samples/s vs raw onnxruntime (best point)", ">= 0.95x",
                       f"{ratio:.2f}x ({best[0].protocol}, concurrency {best[0].concurrency})" if best else "-",
                       ratio >= 0.95 if best else None))
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
    g, h = _point(r, 1, 32), _point(r, 1, 32, "http")
    ratio = h[0].requests_per_s / g[0].requests_per_s if g and h else 0.0
    out.append(Verdict(f"{r.digits_model} batch-1, 32 in flight: binary HTTP vs our own gRPC", ">= 0.80x",
                       f"{ratio:.2f}x" if g and h else "-", ratio >= 0.8 if g and h else None))
    ml = next((m for m in r.mlserver if m[0].concurrency == 32), None)
    ratio = ml[0].requests_per_s / ml[2].requests_per_s if ml else 0.0
    out.append(Verdict(f"{r.digits_model} batch-1, 32 in flight: binary HTTP vs MLServer's REST", ">= 2.00x",
                       f"{ratio:.2f}x" if ml else r.mlserver_note, ratio >= 2.0 if ml else None))
    busy = [(s, lim) for s, lim in points(r) if s.concurrency >= 4 and lim.value]
    worst = min(busy, key=lambda sl: sl[0].requests_per_s / sl[1].value, default=None)
    ratio = worst[0].requests_per_s / worst[1].value if worst else 0.0
    where = f" ({worst[0].model} {worst[0].protocol} b{worst[0].batch} c{worst[0].concurrency})" if worst else ""
    out.append(Verdict("every point at concurrency >= 4: server vs its limit (the lowest)", ">= 0.80x",
                       f"{ratio:.2f}x{where}" if worst else "-", ratio >= 0.8 if worst else None))
    return out


def _lat(m: Measurement) -> str:
    return f"{m.p50_ms:.2f} / {m.p90_ms:.2f} / {m.p99_ms:.2f}"


def markdown(r: Results, leak_low: int, leak_high: int) -> str:
    lines = ["# deepserve benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in r.meta.items()]
    lines += ["", "## Targets (issues 4, 13, 14)", "", "| target | goal | measured | result |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {v.target} | {v.goal} | {v.measured} | {v.mark} |" for v in verdicts(r, leak_low, leak_high)]
    if r.sweep:
        lines += ["", f"## {r.digits_model}: server vs its limit", "",
                  "The limit of a point is the lower of its protocol's transport ceiling (a bare server of the same "
                  "library answering a fixed reply of the real size: grpc.aio; uvicorn + httptools + a bare ASGI "
                  "app) and the compute ceiling (raw onnxruntime in-process at the batch the server could form from "
                  "the requests in flight, up to max_batch_size), both measured in this run. HTTP is perf_analyzer "
                  "`-i http` with binary tensors. Latencies per request, ms (p50 / p90 / p99).", "",
                  "| protocol | batch | concurrency | server req/s | transport ceiling req/s | compute ceiling req/s "
                  "(batch) | limited by | **server / limit** | server / transport | server latency | "
                  "ceiling latency | p50 extra ms |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for s, c in sorted(r.sweep, key=lambda sc: (sc[0].protocol, sc[0].batch, sc[0].concurrency)):
            lim = limit(r, s, c)
            comp = f"{lim.compute:,.0f} ({lim.formed})" if lim.compute else "-"
            lines.append(f"| {s.protocol} | {s.batch} | {s.concurrency} | {s.requests_per_s:,.0f} | "
                         f"{c.requests_per_s:,.0f} | {comp} | {lim.by} | **{s.requests_per_s / lim.value:.2f}x** | "
                         f"{s.requests_per_s / c.requests_per_s:.2f}x | {_lat(s)} | {_lat(c)} | "
                         f"{s.p50_ms - c.p50_ms:+.2f} |")
        pairs = [(g, h) for g, _ in r.sweep for h, _ in r.sweep if g.protocol == "grpc" and h.protocol == "http"
                 and (g.batch, g.concurrency) == (h.batch, h.concurrency)]
        if pairs:
            lines += ["", f"### HTTP beside gRPC ({r.digits_model}, same points, one ABBA sequence)", "",
                      "| batch | concurrency | gRPC req/s | binary HTTP req/s | **HTTP / gRPC** | transport ceilings "
                      "HTTP / gRPC |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
            for g, h in pairs:
                cg = next(c for s, c in r.sweep if s is g)
                ch = next(c for s, c in r.sweep if s is h)
                lines.append(f"| {g.batch} | {g.concurrency} | {g.requests_per_s:,.0f} | {h.requests_per_s:,.0f} | "
                             f"**{h.requests_per_s / g.requests_per_s:.2f}x** | "
                             f"{ch.requests_per_s / cg.requests_per_s:.2f}x |")
    if r.mlserver or r.mlserver_note != "not measured":
        lines += ["", f"## HTTP/REST: deepserve vs MLServer ({r.digits_model}, batch 1)", "",
                  f"MLServer: {r.mlserver_note}. MLServer has no binary tensor extension, so it gets JSON tensors "
                  "(perf_analyzer `--input-tensor-format json --output-tensor-format json`), and ours is measured "
                  "both ways in the same ABBA sequence.", ""]
        if r.mlserver:
            lines += ["| concurrency | ours, binary req/s | ours, JSON req/s | MLServer, JSON req/s | "
                      "**ours binary / MLServer** | ours JSON / MLServer | p50 ms ours binary / MLServer |",
                      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            lines += [f"| {b.concurrency} | {b.requests_per_s:,.0f} | {j.requests_per_s:,.0f} | "
                      f"{m.requests_per_s:,.0f} | **{b.requests_per_s / m.requests_per_s:.2f}x** | "
                      f"{j.requests_per_s / m.requests_per_s:.2f}x | {b.p50_ms:.2f} / {m.p50_ms:.2f} |"
                      for b, j, m in r.mlserver]
    if r.cpu:
        lines += ["", f"## CPU per request ({r.digits_model}, batch 1)", "",
                  "CPU seconds the target process used (kernel counters) over an exact number of requests. The "
                  "other processes on the machine slow a target down but hardly change what each request costs "
                  "it, so these ratios are the steadier ones here.", "",
                  "| target | protocol | concurrency | CPU ms per request, all threads | main thread (event loop) | "
                  "vs ceiling, all threads |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        for c in r.cpu:
            base = next((b for b in r.cpu if b.target == "transport ceiling" and b.concurrency == c.concurrency
                         and b.protocol == c.protocol), None)
            ratio = f"{c.ms_per_request / base.ms_per_request:.2f}x" if base else "-"
            lines.append(f"| {c.target} | {c.protocol} | {c.concurrency} | {c.ms_per_request:.3f} | "
                         f"{c.main_ms_per_request:.3f} | {ratio} |")
    if r.resnet or r.compute:
        lines += ["", f"## {r.resnet_model}: server vs its limit", "",
                  "Raw onnxruntime at the request's batch is the mean of the runs right before and right after the "
                  "point; the limit takes raw onnxruntime at the batch the server could form and the transport "
                  "ceiling at the same point, in samples/s.", "",
                  "| protocol | batch | concurrency | server samples/s | raw ort, request batch | raw ort, batch "
                  "formed | transport ceiling | limited by | **server / limit** | server / raw ort, request batch "
                  "| server latency |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
        for m, c, t in r.resnet:
            lim = limit(r, m, t)
            lim_value = (lim.value or 0.0) * m.batch
            comp = f"{lim.compute * m.batch:,.0f} ({lim.formed})" if lim.compute else "-"
            lines.append(f"| {m.protocol} | {m.batch} | {m.concurrency} | {m.infer_per_s:,.0f} | {c:,.0f} | {comp} | "
                         f"{t.infer_per_s if t else 0:,.0f} | {lim.by} | "
                         f"**{m.infer_per_s / lim_value if lim_value else 0:.2f}x** | {m.infer_per_s / c:.2f}x | "
                         f"{_lat(m)} |")
        if r.resnet_shm:
            lines += ["", "Shared memory: the same points with perf_analyzer `--shared-memory system` (inputs and "
                      "outputs in POSIX shared memory regions it registers; the server reads and writes them in "
                      "place), right after the point over the wire; raw onnxruntime as above.", "",
                      "| protocol | batch | concurrency | over the wire samples/s | shared memory samples/s | raw ort "
                      "| **shared memory / raw ort** | p50 ms wire / shared memory |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for sm, c, m in r.resnet_shm:
                lines.append(f"| {sm.protocol} | {sm.batch} | {sm.concurrency} | {m.infer_per_s:,.0f} | "
                             f"{sm.infer_per_s:,.0f} | {c:,.0f} | **{sm.infer_per_s / c:.2f}x** | "
                             f"{m.p50_ms:.2f} / {sm.p50_ms:.2f} |")
        lines += ["", "Compute ceilings (one session, back-to-back runs, the server's default thread settings):", "",
                  "| model | batch | samples/s (mean) | min - max | ms per run (p50) | intra-op threads | runs |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for (model, batch), cs in sorted(_ceilings(r).items()):
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
        top, bottom = axes[0][col], axes[1][col]
        for proto in sorted({s.protocol for s, _ in r.sweep}):
            pts = sorted(((s, c) for s, c in r.sweep if s.batch == batch and s.protocol == proto),
                         key=lambda sc: sc[0].concurrency)
            conc = [s.concurrency for s, _ in pts]
            line = top.plot(conc, [s.requests_per_s for s, _ in pts], "o-", label=f"deepserve {proto}")[0]
            color = line.get_color()
            top.plot(conc, [c.requests_per_s for _, c in pts], "s--", color=color, label=f"{proto} transport ceiling")
            bottom.plot(conc, [s.p99_ms for s, _ in pts], "o-", color=color, label=f"deepserve {proto}")
            bottom.plot(conc, [c.p99_ms for _, c in pts], "s--", color=color, label=f"{proto} transport ceiling")
        top.set_title(f"{r.digits_model}, batch {batch}")
        top.set_ylabel("requests/s")
        bottom.set_ylabel("p99 latency (ms)")
    if r.resnet:
        top, bottom = axes[0][-1], axes[1][-1]
        for batch in sorted({m.batch for m, *_ in r.resnet}):
            pts = [(m, c) for m, c, _ in r.resnet if m.batch == batch and m.protocol == "grpc"]
            conc = [m.concurrency for m, _ in pts]
            line = top.plot(conc, [m.infer_per_s for m, _ in pts], "o-", label=f"deepserve, batch {batch}")[0]
            color = line.get_color()
            top.plot(conc, [c for _, c in pts], "s--", color=color, label=f"raw onnxruntime, batch {batch}")
            bottom.plot(conc, [m.p99_ms for m, _ in pts], "o-", color=color, label=f"deepserve, batch {batch}")
        top.set_title(f"{r.resnet_model} vs compute ceiling")
        top.set_ylabel("samples/s")
        bottom.set_ylabel("p99 latency (ms)")
    ticks = sorted({s.concurrency for s, _ in r.sweep} | {m.concurrency for m, *_ in r.resnet})
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
            "resnet": [{"server": m.to_dict(), "ceiling_samples_per_s": c,
                        "transport_ceiling": t.to_dict() if t else None} for m, c, t in r.resnet],
            "resnet_shared_memory": [{"server": sm.to_dict(), "ceiling_samples_per_s": c, "wire": m.to_dict()}
                                     for sm, c, m in r.resnet_shm],
            "limits": [{"model": s.model, "protocol": s.protocol, "batch": s.batch, "concurrency": s.concurrency,
                        "server_requests_per_s": s.requests_per_s, "transport_requests_per_s": lim.transport,
                        "compute_requests_per_s": lim.compute, "formed_batch": lim.formed, "limited_by": lim.by,
                        "ratio": s.requests_per_s / lim.value if lim.value else None} for s, lim in points(r)],
            "mlserver": {"note": r.mlserver_note, "points": [{"ours_binary": b.to_dict(), "ours_json": j.to_dict(),
                                                               "mlserver": m.to_dict()} for b, j, m in r.mlserver]},
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
