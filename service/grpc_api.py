"""The gRPC front end: Triton's GRPCInferenceService on grpc.aio. Each method converts the protobuf message to the
neutral types (service.protocol), calls the data plane and converts back; `rpc` wraps every method once, the single
place where neutral errors become gRPC statuses (ERROR_STATUS) and where per-method metrics are recorded."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from service._proto import inference_pb2 as pb
from service.dataplane import DataPlane
from service.errors import KINDS, InvalidArgument, describe
from service.grpc_codec import encode_response, from_response, serialize, to_request
from service.metrics import Metrics

log = logging.getLogger("deepserve.grpc")
ERROR_STATUS = {kind: getattr(grpc.StatusCode, kind) for kind in KINDS}  # the names are gRPC's


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
        serializer = serialize if method.name == "ModelInfer" else resp_cls.SerializeToString  # see encode_response
        handlers[method.name] = kind(getattr(servicer, method.name), request_deserializer=deserialize,
                                     response_serializer=serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def failure(method: str, request, exc: Exception) -> tuple[grpc.StatusCode, str]:
    kind, message = describe(exc, method, getattr(request, "id", ""))
    return ERROR_STATUS[kind], message


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
            self.metrics.tally.add(bound[0] if code == "OK" else self.metrics.grpc_requests.labels(method, code))
            bound[1].observe(time.perf_counter() - t0)

    return wrapper


class Servicer:
    def __init__(self, dataplane: DataPlane, metrics: Metrics) -> None:
        self.dataplane = dataplane
        self.metrics = metrics
        self._stream_ok = metrics.grpc_requests.labels("ModelStreamInfer", "OK")  # bound once, as `rpc` does
        self._stream_s = metrics.grpc_duration.labels("ModelStreamInfer")

    @rpc
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.dataplane.live())

    @rpc
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    @rpc
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    @rpc
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**self.dataplane.server_metadata())

    @rpc
    async def ModelMetadata(self, request, context):
        return json_format.ParseDict(self.dataplane.model_metadata(request.name, request.version),
                                     pb.ModelMetadataResponse())

    @rpc
    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=self.dataplane.model_config(request.name, request.version))

    @rpc
    async def ModelInfer(self, request, context):
        tracing = self.dataplane.tracing
        trace = tracing.begin(request.model_name, context.invocation_metadata(), "grpc") if tracing.on else None
        if trace is None:
            return encode_response(await self.dataplane.infer(to_request(request)))
        with trace:
            response = await self.dataplane.infer(to_request(request), trace)
            with trace.encoding():
                return encode_response(response)

    async def ModelStreamInfer(self, requests: AsyncIterator, context) -> AsyncIterator:
        """Requests are served concurrently (so a stream batches); an error goes into that reply's error_message
        and the stream goes on."""
        replies: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        tracing = self.dataplane.tracing

        async def one(request: pb.ModelInferRequest) -> None:
            t0 = time.perf_counter()
            code = "OK"
            try:
                if type(request) is BadMessage:
                    raise InvalidArgument(request.error)
                trace = tracing.begin(request.model_name, context.invocation_metadata(), "grpc") if tracing.on \
                    else None
                if trace is None:
                    async for response in self.dataplane.stream_infer(to_request(request)):
                        await replies.put(pb.ModelStreamInferResponse(infer_response=from_response(response)))
                else:
                    with trace:
                        async for response in self.dataplane.stream_infer(to_request(request), trace):
                            with trace.encoding():
                                reply = pb.ModelStreamInferResponse(infer_response=from_response(response))
                            await replies.put(reply)
            except Exception as exc:
                status, message = failure("ModelStreamInfer", request, exc)
                code = status.name
                reply = pb.ModelStreamInferResponse(error_message=f"{code}: {message}")
                reply.infer_response.id = request.id
                await replies.put(reply)
            # per request, as unary calls count
            self.metrics.tally.add(self._stream_ok if code == "OK" else
                                   self.metrics.grpc_requests.labels("ModelStreamInfer", code))
            self._stream_s.observe(time.perf_counter() - t0)

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
        stats = self.dataplane.statistics(request.name, request.version)
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    @rpc
    async def RepositoryIndex(self, request, context):
        reply = pb.RepositoryIndexResponse()
        for entry in self.dataplane.repository_index(request.ready):
            reply.models.add(**entry)
        return reply

    @rpc
    async def RepositoryModelLoad(self, request, context):
        params = request.parameters
        config = params["config"].string_param if "config" in params else None
        files = {k[5:]: v.bytes_param for k, v in params.items() if k.startswith("file:")}
        await self.dataplane.load(request.model_name, config, files)
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request, context):
        await self.dataplane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @rpc
    async def SystemSharedMemoryStatus(self, request, context):
        reply = pb.SystemSharedMemoryStatusResponse()
        for region in self.dataplane.system_shared_memory_status(request.name):
            reply.regions[region["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**region))
        return reply

    @rpc
    async def SystemSharedMemoryRegister(self, request, context):
        self.dataplane.system_shared_memory_register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc
    async def SystemSharedMemoryUnregister(self, request, context):
        self.dataplane.system_shared_memory_unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @rpc
    async def CudaSharedMemoryStatus(self, request, context):
        reply = pb.CudaSharedMemoryStatusResponse()
        for region in self.dataplane.cuda_shared_memory_status(request.name):
            reply.regions[region["name"]].CopyFrom(pb.CudaSharedMemoryStatusResponse.RegionStatus(**region))
        return reply

    @rpc
    async def CudaSharedMemoryRegister(self, request, context):
        self.dataplane.cuda_shared_memory_register(request.name, request.raw_handle, request.device_id,
                                                   request.byte_size)
        return pb.CudaSharedMemoryRegisterResponse()

    @rpc
    async def CudaSharedMemoryUnregister(self, request, context):
        self.dataplane.cuda_shared_memory_unregister(request.name)
        return pb.CudaSharedMemoryUnregisterResponse()

    @rpc
    async def TraceSetting(self, request, context):
        update = {k: list(v.value) for k, v in request.settings.items()}  # no value: clear
        settings = self.dataplane.trace_settings(request.model_name, update)
        reply = pb.TraceSettingResponse()
        for key, value in settings.items():
            reply.settings[key].value.extend(value if isinstance(value, list) else [value])
        return reply

    @rpc
    async def LogSettings(self, request, context):
        update = {k: getattr(v, v.WhichOneof("parameter_choice")) if v.WhichOneof("parameter_choice") else None
                  for k, v in request.settings.items()}
        reply = pb.LogSettingsResponse()
        for key, value in self.dataplane.log_settings(update).items():
            kind = "bool_param" if isinstance(value, bool) else "uint32_param" if isinstance(value, int) \
                else "string_param"
            setattr(reply.settings[key], kind, value)
        return reply
