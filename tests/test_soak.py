"""Soak: concurrency 64 over every model of a repository for a while; zero errors, p99 reported, RSS growth under
10%. Generation (decoupled) models are driven through ModelStreamInfer, four tokens a call. CI runs a few seconds
over the test models; `make soak` runs 10 minutes over the example models."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from support import Server, build_request_for

from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc
from service.decoupled import FINAL


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_soak(request, repository, capsys):
    seconds = request.config.getoption("--soak-seconds")
    repo = Path(request.config.getoption("--soak-repository") or repository)
    server = Server(repo, "--no-strict-readiness")
    channel = server.channel()
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    ready = [m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models]
    makers = [build_request_for(stub, name) for name in sorted(set(ready))]
    assert makers
    latencies: list[float] = []
    errors: list[str] = []
    stop = threading.Event()
    counter = itertools.count(1)
    lock = threading.Lock()

    def client(i: int) -> None:
        make = makers[i % len(makers)]
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                if getattr(make, "decoupled", False):
                    replies = list(stub.ModelStreamInfer(iter([make(next(counter))]), timeout=30))
                    wrong = [r.error_message for r in replies if r.error_message]
                    if wrong or not replies or not replies[-1].infer_response.parameters[FINAL].bool_param:
                        with lock:
                            errors.append(f"stream: {wrong or 'no final response'}")
                else:
                    stub.ModelInfer(make(next(counter)), timeout=30)
            except grpc.RpcError as exc:
                with lock:
                    errors.append(f"{exc.code().name}: {exc.details()}")
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(64)]
    for t in threads:
        t.start()
    time.sleep(seconds / 4)
    rss_early = _rss_kib(server.proc.pid)
    time.sleep(seconds * 3 / 4)
    rss_late = _rss_kib(server.proc.pid)
    stop.set()
    for t in threads:
        t.join(60)
    channel.close()
    server.stop()
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    with capsys.disabled():
        print(f"\nsoak: {len(latencies)} requests over {len(makers)} models in {seconds:.0f}s, p50 {p50:.2f} ms, "
              f"p99 {p99:.2f} ms, RSS {rss_early / 1024:.0f} -> {rss_late / 1024:.0f} MiB, {len(errors)} errors")
    assert not errors, errors[:5]
    assert rss_late <= rss_early * 1.10, (rss_early, rss_late)
