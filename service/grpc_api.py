"""The thin gRPC servicer. Each method is wrapped once by `rpc`, the single place where exceptions become gRPC
statuses and where per-method metrics are recorded; the methods themselves only translate messages."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from service import __version__
from service._proto import inference_pb2 as pb
from service.config import parse_json
from service.dataplane import DataPlane
from service.errors import InvalidArgument, ModelLoadError, NotFound, ServingError, Unavailable, status_of
from service.metrics import Metrics
from service.registry import READY, Registry
from service.workers import SharedStats, merge

log = logging.getLogger("deepserve.grpc")
EXTENSIONS = ["classification", "sequence", "model_repository", "schedule_policy", "model_configuration",
              "statistics", "parameters"]


class BadMessage:
    """What the deserializer hands over for bytes that are not the expected protobuf: grpc.aio would answer
    UNKNOWN, but undecodable input is the client's error, INVALID_ARGUMENT."""

    __slots__ = ("error", "id")

    def __init__(self, error: str) -> None:
        self.error, self.id = error, ""


def add_to_server(servicer: Servicer, server: grpc.aio.Server) -> None:
    """Register every RPC of our proto's service with a tolerant deserializer (see BadMessage)."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        req_cls, resp_cls = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)

        def deserialize(data: bytes, cls=req_cls, name=method.input_type.name):
            try:
                return cls.FromString(data)
            except DecodeError as exc:
                return BadMessage(f"the request is not a valid {name} protobuf: {exc}")

        kind = grpc.stream_stream_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = kind(getattr(servicer, method.name), request_deserializer=deserialize,
                                     response_serializer=resp_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def failure(method: str, request, exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The one exception -> (status, message) mapping. A client error says what was wrong; a server-side failure
    (INTERNAL) gets a short message and the request id, and its trace goes to the log under that id."""
    status = status_of(exc)
    if status != grpc.StatusCode.INTERNAL:
        return status, str(exc)
    rid = getattr(request, "id", "") or uuid.uuid4().hex[:12]
    log.error("%s failed (request id %s): %s", method, rid, exc, exc_info=exc)
    what = str(exc).splitlines()[0][:240] if isinstance(exc, ServingError) else f"internal error in {method}"
    return grpc.StatusCode.INTERNAL, f"{what} (request id {rid}); the server log has the details"


def rpc(fn: Callable) -> Callable:
    method = fn.__name__
    bound: list = []  # (OK counter, duration histogram) of this method, bound on the first call

    @functools.wraps(fn)
    async def wrapper(self: Servicer, request, context: grpc.aio.ServicerContext):
        t0 = time.perf_counter()
        code = "OK"
        try:
            if type(request) is BadMessage:
                raise InvalidArgument(request.error)
            return await fn(self, request, context)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:
            status, message = failure(method, request, exc)
            code = status.name
            await context.abort(status, message)
        finally:
            if not bound:
                bound[:] = self.metrics.grpc_requests.labels(method, "OK"), self.metrics.grpc_duration.labels(method)
            (bound[0] if code == "OK" else self.metrics.grpc_requests.labels(method, code)).inc()
            bound[1].observe(time.perf_counter() - t0)

    return wrapper


class Servicer:
    def __init__(self, registry: Registry, metrics: Metrics, state, dataplane: DataPlane,
                 shared: SharedStats | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        self.dataplane = dataplane
        self.shared = shared  # --workers: the other workers' statistics
        self.state = state  # service.server.ServerState: live / ready / draining
        self._stream_ok = metrics.grpc_requests.labels("ModelStreamInfer", "OK")  # bound once, as `rpc` does
        self._stream_s = metrics.grpc_duration.labels("ModelStreamInfer")

    @rpc
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.state.live)

    @rpc
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state.ready)

    @rpc
    async def ModelReady(self, request, context):
        try:
            self.registry.lookup(request.name, request.version)
        except (NotFound, Unavailable, InvalidArgument):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.state.draining)

    @rpc
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="deepserve", version=__version__, extensions=EXTENSIONS)

    @rpc
    async def ModelMetadata(self, request, context):
        mv = self.registry.lookup(request.name, request.version)
        model = self.registry.models[mv.name]
        md = pb.ModelMetadataResponse()
        md.CopyFrom(mv.metadata)
        del md.versions[:]
        md.versions.extend(str(v) for v in sorted(model.ready))
        return md

    @rpc
    async def ModelConfig(self, request, context):
        mv = self.registry.lookup(request.name, request.version)
        return pb.ModelConfigResponse(config=mv.config)

    @rpc
    async def ModelInfer(self, request, context):
        if self.state.draining:
            raise Unavailable("the server is shutting down")
        return await self.dataplane.infer(request)

    async def ModelStreamInfer(self, requests: AsyncIterator, context) -> AsyncIterator:
        """Requests are served concurrently (so a stream batches); an error goes into that reply's error_message
        and the stream goes on."""
        replies: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def one(request: pb.ModelInferRequest) -> None:
            t0 = time.perf_counter()
            try:
                if type(request) is BadMessage:
                    raise InvalidArgument(request.error)
                if self.state.draining:
                    raise Unavailable("the server is shutting down")
                reply = pb.ModelStreamInferResponse(infer_response=await self.dataplane.infer(request))
                code = "OK"
            except Exception as exc:
                status, message = failure("ModelStreamInfer", request, exc)
                code = status.name
                reply = pb.ModelStreamInferResponse(error_message=f"{code}: {message}")
                reply.infer_response.id = request.id
            # per request, as unary calls count
            (self._stream_ok if code == "OK" else self.metrics.grpc_requests.labels("ModelStreamInfer", code)).inc()
            self._stream_s.observe(time.perf_counter() - t0)
            await replies.put(reply)

        async def pump() -> None:
            async for request in requests:
                task = asyncio.get_running_loop().create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks))
            await replies.put(None)

        reader = asyncio.get_running_loop().create_task(pump())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
        finally:
            reader.cancel()
            for t in tasks:
                t.cancel()

    @rpc
    async def ModelStatistics(self, request, context):
        reply = pb.ModelStatisticsResponse()
        if request.name:
            if request.name not in self.registry.models:
                raise NotFound(f"unknown model {request.name!r}")
            versions = [mv for mv in self.registry.versions() if mv.name == request.name]
            if request.version:
                versions = [self.registry.lookup(request.name, request.version)]
        else:
            versions = list(self.registry.versions())
        for mv in versions:
            mv.recorder.fill(reply.model_stats.add())
        if self.shared:
            mine = {(m.name, m.version): m for m in reply.model_stats}
            for other in self.shared.others():
                for m in other.model_stats:
                    if (m.name, m.version) in mine:
                        merge(mine[(m.name, m.version)], m)
        return reply

    @rpc
    async def RepositoryIndex(self, request, context):
        reply = pb.RepositoryIndexResponse()
        for name in sorted(set(self.registry.names_on_disk()) | set(self.registry.models)):
            model = self.registry.models.get(name)
            if model is None or not model.state:
                if not request.ready:
                    reply.models.add(name=name)
                continue
            for v, (state, reason) in sorted(model.state.items()):
                if request.ready and state != READY:
                    continue
                reply.models.add(name=name, version="" if v == 0 else str(v), state=state, reason=reason)
        return reply

    @rpc
    async def RepositoryModelLoad(self, request, context):
        if not self.state.explicit_control:
            raise Unavailable("explicit model load/unload is not allowed unless --model-control-mode explicit")
        try:
            override = None
            if "config" in request.parameters:
                override = parse_json(request.parameters["config"].string_param, "parameter config")
            result = await self.registry.load(request.model_name, override)
        except ModelLoadError as exc:
            raise InvalidArgument(f"failed to load {request.model_name!r}: {exc}") from None
        self.state.refresh_health()
        if result.failures:  # even when an older version still serves: the load asked for did not happen
            raise InvalidArgument(result.error())
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request, context):
        if not self.state.explicit_control:
            raise Unavailable("explicit model load/unload is not allowed unless --model-control-mode explicit")
        await self.registry.unload(request.model_name)
        self.state.refresh_health()
        return pb.RepositoryModelUnloadResponse()
