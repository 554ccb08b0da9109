"""The HTTP transport ceiling: uvicorn with httptools and a bare ASGI app, answering infer with a fixed reply.

The same library and settings as deepserve's HTTP front end (service/http_server.py: uvicorn driven below
`serve()`, loop "none" so it runs on the already running asyncio loop, httptools, no lifespan, no access log, no
server header), on the same loop as the gRPC ceiling, as in the server. The app reads the whole body (as ours
does) and never parses it; the reply is the one our codec writes for zeros of the model's outputs at one batch
size, binary outputs after the JSON header (Triton's binary tensor extension, perf_analyzer's default), so the
bytes on the wire are the real server's. What it measures is uvicorn + httptools + asyncio per request: no server
built on them does less.

It also answers what perf_analyzer -i http asks before measuring: health, server and model metadata, config, and
statistics (zero counters, complete in form: perf_analyzer reads every field).
"""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import orjson
import uvicorn
from google.protobuf import json_format

from bench.ceiling_server import datatype
from service import http_codec
from service._proto import model_config_pb2
from service.protocol import InferResponse, OutputTensor

_STAT_KINDS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit",
               "cache_miss")


def fixed_reply(cfg: model_config_pb2.ModelConfig, batch_size: int, version: str = "1") -> tuple[bytes, int | None]:
    """The infer reply body (and its JSON header length) our server sends for `batch_size` rows, binary outputs."""
    batch = (batch_size,) if cfg.max_batch_size > 0 else ()
    outputs = []
    for out in cfg.output:
        shape = (*batch, *(d if d > 0 else 1 for d in out.dims))
        name = datatype(out.data_type)
        dtype = np.dtype(np.float32) if name in ("BYTES", "BF16") else np.dtype(name.lower().replace("fp", "float"))
        outputs.append(OutputTensor(out.name, name, shape, np.zeros(shape, dtype), True))
    return http_codec.from_response(InferResponse(cfg.name, version, "", outputs))


def _metadata(cfg: model_config_pb2.ModelConfig, version: str) -> dict:
    batch = [-1] if cfg.max_batch_size > 0 else []
    return {"name": cfg.name, "versions": [version], "platform": "onnxruntime_onnx",
            **{side: [{"name": t.name, "datatype": datatype(t.data_type), "shape": [*batch, *t.dims]} for t in ts]
               for side, ts in (("inputs", cfg.input), ("outputs", cfg.output))}}


class App:
    """The ASGI callable: a dict from path to a ready reply, the infer path a fixed one."""

    def __init__(self, cfg: model_config_pb2.ModelConfig, batch_size: int, version: str) -> None:
        body, header_length = fixed_reply(cfg, batch_size, version)
        infer_headers = [(b"content-type", b"application/octet-stream"),
                         (b"content-length", str(len(body)).encode())]
        if header_length is not None:
            infer_headers.append((b"inference-header-content-length", str(header_length).encode()))
        self.infer = (infer_headers, body)
        stats = {"model_stats": [{"name": cfg.name, "version": version, "last_inference": 0, "inference_count": 0,
                                  "execution_count": 0, "batch_stats": [],
                                  "inference_stats": {k: {"count": 0, "ns": 0} for k in _STAT_KINDS}}]}
        meta = _metadata(cfg, version)
        config = json_format.MessageToDict(cfg, preserving_proto_field_name=True)
        base = f"/v2/models/{cfg.name}"
        docs = {"/v2/health/live": {"live": True}, "/v2/health/ready": {"ready": True},
                "/v2": {"name": "ceiling", "version": "0", "extensions": ["statistics", "binary_tensor_data"]}}
        for b in (base, f"{base}/versions/{version}"):
            docs |= {b: meta, f"{b}/ready": {"name": cfg.name, "ready": True}, f"{b}/config": config,
                     f"{b}/stats": stats}
        self.infer_paths = {f"{base}/infer", f"{base}/versions/{version}/infer"}
        self.docs = {path: orjson.dumps(doc) for path, doc in docs.items()}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:  # the whole body, as the server reads it; never looked at
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            more = message.get("more_body", False)
        path = scope["path"]
        if path in self.infer_paths:
            headers, body = self.infer
            status = 200
        else:
            body = self.docs.get(path, b'{"error": "not found"}')
            status = 200 if path in self.docs else 404
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def start(cfg: model_config_pb2.ModelConfig, batch_size: int, port: int, host: str = "127.0.0.1",
                version: str = "1") -> tuple[uvicorn.Server, asyncio.Task, int]:
    """Serve on the running loop; returns the server, its tick task (the Date header) and the bound port."""
    config = uvicorn.Config(App(cfg, batch_size, version), host=host, port=port, loop="none", http="httptools",
                            lifespan="off", log_config=None, access_log=False, server_header=False)
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without it the
    # reply's two writes (head, body) meet the client's delayed ACK: ~40 ms a request (measured 44 ms p50 vs 0.32)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    await server.startup(sockets=[sock])
    return server, asyncio.get_running_loop().create_task(server.main_loop()), sock.getsockname()[1]


async def stop(server: uvicorn.Server, ticker: asyncio.Task) -> None:
    server.should_exit = True
    await ticker
    await server.shutdown()
