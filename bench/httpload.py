"""The Python fallback's HTTP side: Triton's binary tensor extension over keep-alive HTTP/1.1 connections, one
stdlib `http.client` connection per request in flight, each on its own thread (the GIL serializes them; like the
gRPC fallback, its numbers are only comparable with each other). The body is built once from the target's own
metadata and sent as bytes."""

from __future__ import annotations

import http.client
import json
import threading
import time

import numpy as np

_NUMPY = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32,
          "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


class HttpLoadError(RuntimeError):
    pass


def _split(url: str) -> tuple[str, int]:
    host, _, port = url.rpartition(":")
    return host, int(port)


def build_body(url: str, model: str, version: str, batch: int, seed: int = 0) -> tuple[bytes, int]:
    """A binary-tensor infer body of random data shaped from the target's metadata, and its JSON header length."""
    conn = http.client.HTTPConnection(*_split(url), timeout=30)
    try:
        conn.request("GET", f"/v2/models/{model}/versions/{version}")
        reply = conn.getresponse()
        meta = json.loads(reply.read())
        if reply.status != 200:
            raise HttpLoadError(f"metadata of {model}: HTTP {reply.status} {meta}")
    finally:
        conn.close()
    rng = np.random.default_rng(seed)
    inputs, raws = [], []
    for t in meta["inputs"]:
        shape = [batch if (j == 0 and d == -1) else max(d, 1) for j, d in enumerate(t["shape"])]
        raw = rng.random(shape).astype(_NUMPY[t["datatype"]]).tobytes()
        inputs.append({"name": t["name"], "datatype": t["datatype"], "shape": shape,
                       "parameters": {"binary_data_size": len(raw)}})
        raws.append(raw)
    outputs = [{"name": t["name"], "parameters": {"binary_data": True}} for t in meta["outputs"]]
    head = json.dumps({"inputs": inputs, "outputs": outputs}).encode()
    return b"".join([head, *raws]), len(head)


def drive(url: str, model: str, version: str, body: bytes, header_length: int, concurrency: int,
          count: int) -> tuple[float, list[float]]:
    """`count` requests, `concurrency` connections each sending its next as soon as its last is answered; returns
    the elapsed seconds and every request's latency."""
    path = f"/v2/models/{model}/versions/{version}/infer"
    headers = {"Inference-Header-Content-Length": str(header_length), "Content-Type": "application/octet-stream"}
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    remaining = [count]

    def worker() -> None:
        conn = http.client.HTTPConnection(*_split(url), timeout=120)
        try:
            while True:
                with lock:
                    if remaining[0] <= 0 or errors:
                        return
                    remaining[0] -= 1
                t = time.perf_counter()
                conn.request("POST", path, body, headers)
                reply = conn.getresponse()
                data = reply.read()
                if reply.status != 200:
                    errors.append(f"HTTP {reply.status}: {data[:300]!r}")
                    return
                with lock:
                    latencies.append(time.perf_counter() - t)
        except OSError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise HttpLoadError(errors[0])
    return time.perf_counter() - t0, latencies
