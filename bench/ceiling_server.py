"""The transport ceiling: a bare grpc.aio server that answers ModelInfer with a fixed, pre-serialized reply.

It never decodes the request (identity (de)serializers, bytes in, bytes out), so what it measures is the cost of
Python grpc.aio itself: HTTP/2, the event loop and one coroutine per call. No server written on grpc.aio can beat it
with the same options, which makes it the right denominator for the real server's request rate and latency.

It also answers ServerLive, ServerReady, ServerMetadata, ModelMetadata, ModelConfig and ModelStatistics from the
model's config, because perf_analyzer asks for them before (and between) measurements and must run unchanged.
The reply is sized for one batch size (`--batch-size`): same outputs, same bytes on the wire as the real reply.

With `--http-port` the same process also serves the HTTP transport ceiling (bench/http_ceiling.py) on the same
event loop, as deepserve serves both protocols on one loop.

    python -m bench.ceiling_server --config digits_cnn.pbtxt --batch-size 1 --port 8101 --http-port 8102
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import text_format
from google.protobuf.message import Message

from service import eventloop, settings
from service._proto import inference_pb2 as pb
from service._proto import model_config_pb2

SERVICE = "inference.GRPCInferenceService"
# The options `deepserve serve` runs with (service/server.py): its message size limit, no port sharing. Read from
# its settings so that the ceiling and the server never differ in anything but the work they do per call.
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", settings.parser().get_default("max_message_bytes")),
    ("grpc.max_send_message_length", settings.parser().get_default("max_message_bytes")),
    ("grpc.so_reuseport", 0),
]
_ITEMSIZE = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
             "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}


def datatype(dtype: int) -> str:
    """Config enum -> protocol datatype name (TYPE_FP32 -> FP32; TYPE_STRING travels as BYTES)."""
    name = model_config_pb2.DataType.Name(dtype).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def metadata(cfg: model_config_pb2.ModelConfig, version: str) -> pb.ModelMetadataResponse:
    """ModelMetadata as the protocol derives it from a config: the batch axis, when there is one, is -1."""
    batch = [-1] if cfg.max_batch_size > 0 else []
    reply = pb.ModelMetadataResponse(name=cfg.name, versions=[version], platform="onnxruntime_onnx")
    for tensors, field in ((cfg.input, reply.inputs), (cfg.output, reply.outputs)):
        for t in tensors:
            field.add(name=t.name, datatype=datatype(t.data_type), shape=[*batch, *t.dims])
    return reply


def fixed_reply(cfg: model_config_pb2.ModelConfig, batch_size: int, version: str = "1") -> bytes:
    """The serialized ModelInferResponse the real server would send for `batch_size` rows of zeros."""
    reply = pb.ModelInferResponse(model_name=cfg.name, model_version=version)
    batch = [batch_size] if cfg.max_batch_size > 0 else []
    for out in cfg.output:
        shape = [*batch, *(d if d > 0 else 1 for d in out.dims)]
        name = datatype(out.data_type)
        reply.outputs.add(name=out.name, datatype=name, shape=shape)
        reply.raw_output_contents.append(bytes(int(np.prod(shape)) * _ITEMSIZE.get(name, 4)))
    return reply.SerializeToString()


def _unary(fn: Callable[[Message], Message], request_type: type[Message]) -> grpc.RpcMethodHandler:
    async def call(request: Message, context: grpc.aio.ServicerContext) -> Message:
        return fn(request)

    return grpc.unary_unary_rpc_method_handler(call, request_deserializer=request_type.FromString,
                                               response_serializer=lambda m: m.SerializeToString())


def handlers(cfg: model_config_pb2.ModelConfig, batch_size: int, version: str = "1") -> grpc.GenericRpcHandler:
    """The method table. ModelInfer has no (de)serializers: grpc hands the raw bytes over and sends ours back.

    Statistics stay at zero (counting would be work the ceiling must not do), so perf_analyzer must be told the
    version with `-x`: unversioned, it looks for the version whose counters moved and finds none.
    """
    reply = fixed_reply(cfg, batch_size, version)
    meta = metadata(cfg, version)
    stats = pb.ModelStatisticsResponse(model_stats=[pb.ModelStatistics(name=cfg.name, version=version)])

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return reply

    methods = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
        "ServerLive": _unary(lambda r: pb.ServerLiveResponse(live=True), pb.ServerLiveRequest),
        "ServerReady": _unary(lambda r: pb.ServerReadyResponse(ready=True), pb.ServerReadyRequest),
        "ModelReady": _unary(lambda r: pb.ModelReadyResponse(ready=True), pb.ModelReadyRequest),
        "ServerMetadata": _unary(lambda r: pb.ServerMetadataResponse(name="ceiling", version="0",
                                                                     extensions=["statistics"]),
                                 pb.ServerMetadataRequest),
        "ModelMetadata": _unary(lambda r: meta, pb.ModelMetadataRequest),
        "ModelConfig": _unary(lambda r: pb.ModelConfigResponse(config=cfg), pb.ModelConfigRequest),
        "ModelStatistics": _unary(lambda r: stats, pb.ModelStatisticsRequest),
    }
    return grpc.method_handlers_generic_handler(SERVICE, methods)


async def start(cfg: model_config_pb2.ModelConfig, batch_size: int, port: int, host: str = "127.0.0.1",
                version: str = "1") -> tuple[grpc.aio.Server, int]:
    """Start serving; returns the server and the bound port (pass port 0 for a free one)."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((handlers(cfg, batch_size, version),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


async def _serve(cfg: model_config_pb2.ModelConfig, batch_size: int, port: int, host: str, version: str,
                 http_port: int | None) -> None:
    from bench import http_ceiling  # uvicorn only when asked for

    http = await http_ceiling.start(cfg, batch_size, http_port, host, version) if http_port is not None else None
    server, bound = await start(cfg, batch_size, port, host, version)
    print(f"ceiling server for {cfg.name} batch {batch_size} on {host}:{bound} (gRPC)"
          + (f", {host}:{http[2]} (HTTP)" if http else ""), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)
    if http:
        await http_ceiling.stop(*http[:2])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling_server", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="a complete config.pbtxt (inputs and outputs)")
    parser.add_argument("--batch-size", type=int, default=1, help="rows in the fixed reply")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--http-port", type=int, help="also serve the HTTP ceiling on this port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--version", default="1", help="the model version to report (the real model's)")
    args = parser.parse_args(argv)
    cfg = text_format.Parse(args.config.read_text(), model_config_pb2.ModelConfig())
    with contextlib.suppress(KeyboardInterrupt):
        # the server's own loop, so that the ceiling measures what the server runs on
        eventloop.run(_serve(cfg, args.batch_size, args.port, args.host, args.version, args.http_port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
