"""`deepserve serve --workers N`: N server processes share the gRPC port (SO_REUSEPORT) so that N event loops
decode requests on N cores. The parent supervises them (restarts one that dies, forwards SIGTERM) and serves
/metrics for all of them (prometheus-client's multiprocess mode). ModelStatistics stays whole: every worker
publishes its statistics as a JSON file and the worker that answers the RPC sums them with
its own; other workers' figures lag by at most PUBLISH_SECS. Statistics travel as Triton's JSON shape
(stats.Recorder.snapshot), so nothing here knows a wire format."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("deepserve.workers")
PUBLISH_SECS = 0.05
STATS_DIR = "DEEPSERVE_STATS_DIR"
WORKER = "DEEPSERVE_WORKER_INDEX"


def supervise(argv: list[str], args) -> int:
    """Run N workers with the same arguments; serve their merged metrics; stop them on SIGTERM/SIGINT."""
    shared = Path(tempfile.mkdtemp(prefix="deepserve-workers-"))
    (shared / "prometheus").mkdir()
    (shared / "stats").mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared / "prometheus"), STATS_DIR: str(shared / "stats")}
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    if args.metrics_port:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(shared / "prometheus"))
        start_http_server(args.metrics_port, addr=args.host, registry=registry)
    child_argv = [sys.executable, "-m", "service.cli", "serve", *argv, "--workers", "1", "--metrics-port", "0",
                  "--reuse-port"]
    stopping = False
    procs: dict[int, subprocess.Popen] = {}

    def spawn(i: int) -> None:
        procs[i] = subprocess.Popen(child_argv, env={**env, WORKER: str(i)})
        log.info("worker %d started (pid %d)", i, procs[i].pid)

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return _run(args.workers, procs, spawn, lambda: stopping, shared, multiprocess)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _run(workers: int, procs: dict[int, subprocess.Popen], spawn, stopping, shared: Path, multiprocess) -> int:
    for i in range(workers):
        spawn(i)
    codes: dict[int, int] = {}
    while len(codes) < len(procs):
        time.sleep(0.2)
        for i, p in procs.items():
            if i in codes or p.poll() is None:
                continue
            multiprocess.mark_process_dead(p.pid, path=str(shared / "prometheus"))
            if stopping():
                codes[i] = p.returncode
            else:
                log.error("worker %d exited %d unexpectedly; restarting it", i, p.returncode)
                (shared / "stats" / f"{i}.json").unlink(missing_ok=True)
                time.sleep(1.0)
                spawn(i)
    log.info("all workers stopped: %s", codes)
    return max(codes.values(), default=0)


class SharedStats:
    """This worker's side of the shared statistics."""

    def __init__(self, registry) -> None:
        self.dir = Path(os.environ[STATS_DIR])
        self.me = os.environ.get(WORKER, str(os.getpid()))
        self.registry = registry

    def snapshot(self) -> list[dict]:
        return [mv.recorder.snapshot() for mv in self.registry.versions()]

    async def publish(self) -> None:
        last = None
        while True:
            await asyncio.sleep(PUBLISH_SECS)
            state = tuple((mv.name, mv.version, mv.recorder.execution_count, mv.recorder.fail.count)
                          for mv in self.registry.versions())
            if state != last:
                tmp = self.dir / f".{self.me}.json"
                tmp.write_text(json.dumps(self.snapshot()))
                os.replace(tmp, self.dir / f"{self.me}.json")
                last = state

    def others(self) -> list[list[dict]]:
        out = []
        for f in self.dir.glob("*.json"):
            if f.stem != self.me:
                try:
                    out.append(json.loads(f.read_text()))
                except (OSError, ValueError):
                    continue  # a worker restarting: its figures come back with its next publish
        return out


def _add(a: dict, b: dict) -> None:
    a["count"] += b["count"]
    a["ns"] += b["ns"]


def merge(into: dict, other: dict) -> None:
    """Add another worker's statistics for the same model version."""
    into["last_inference"] = max(into["last_inference"], other["last_inference"])
    into["inference_count"] += other["inference_count"]
    into["execution_count"] += other["execution_count"]
    for name, d in other["inference_stats"].items():
        _add(into["inference_stats"][name], d)
    batches = {b["batch_size"]: b for b in into["batch_stats"]}
    for b in other["batch_stats"]:
        mine = batches.get(b["batch_size"])
        if mine is None:
            batches[b["batch_size"]] = b
            continue
        for name in ("compute_input", "compute_infer", "compute_output"):
            _add(mine[name], b[name])
    into["batch_stats"] = [batches[size] for size in sorted(batches)]
