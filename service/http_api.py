"""The HTTP/REST front end: Triton's HTTP API (KServe V2 REST plus Triton's extensions), on the same event loop as
gRPC. Each endpoint converts (http_codec for inference bodies, plain JSON elsewhere), calls the data plane and
converts back; ERROR_STATUS is the one table from neutral error kinds to HTTP statuses, as Triton's HTTP server
maps them, and errors answer `{"error": "..."}` with the same message the gRPC path gives.

The routing table (ROUTES) is shared by the transport adapter (http_server) and the OpenAPI document (openapi), so
the served paths and the documented ones cannot drift apart."""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import orjson
from google.protobuf import json_format

from service import http_codec, openapi
from service.console import ARTIFACTS, ASSET_NAMES, SECURITY_HEADERS, Console
from service.dataplane import DataPlane
from service.errors import InvalidArgument, NotFound, ServingError, describe
from service.metrics import Metrics
from service.security import Tokens

log = logging.getLogger("deepserve.http")
ERROR_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "UNAVAILABLE": 503, "UNIMPLEMENTED": 501,
                "UNAUTHENTICATED": 401, "RESOURCE_EXHAUSTED": 429, "INTERNAL": 500, "ALREADY_EXISTS": 400}
JSON = "application/json"


class PayloadTooLarge(ServingError):
    """A body over --max-message-bytes (also once inflated): 413, an HTTP-only status."""

    kind = "INVALID_ARGUMENT"


@dataclass(slots=True)
class Request:
    """What an endpoint sees of an HTTP request, whatever library carried it."""

    method: str
    path: str
    params: dict[str, str]  # path parameters: model, version
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass(slots=True)
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)
    stream: AsyncIterator[bytes] | None = None  # server-sent events: sent after `body`, chunk by chunk


def json_reply(doc, status: int = 200) -> Reply:
    return Reply(status, orjson.dumps(doc))


def error_reply(kind: str, message: str) -> Reply:
    return Reply(ERROR_STATUS[kind], orjson.dumps({"error": message}))


Handler = Callable[["HttpApi", Request], Awaitable[Reply]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # {model} and {version} are path parameters
    endpoint: str  # the metric label and OpenAPI operationId
    summary: str
    handler: Handler
    open: bool = False  # answered without a token (health, with --open-health)
    public: bool = False  # always answered without a token: the console's static files (its data calls carry one)
    console: bool = False  # gone with --no-console


def _body_json(req: Request, what: str, allow_empty: bool = True) -> dict:
    if not req.body:
        if allow_empty:
            return {}
        raise InvalidArgument(f"{what}: the request needs a JSON body")
    doc = http_codec.loads(req.body, what)
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what}: the body must be a JSON object")
    return doc


class HttpApi:
    """The endpoints; a library adapter calls `dispatch` with a Request and sends the Reply."""

    def __init__(self, dataplane: DataPlane, metrics: Metrics, tokens: Tokens | None, max_body: int,
                 console: Console | None = None) -> None:
        self.dataplane = dataplane
        self.console = console
        self.metrics = metrics
        self.tokens = tokens
        self.max_body = max_body
        self._bound: dict[str, tuple] = {}  # endpoint -> (OK counter, duration histogram), bound on first use
        self._openapi: bytes | None = None

    async def dispatch(self, route: Route, req: Request) -> Reply:
        t0 = time.perf_counter()
        if route.console and self.console is None:
            route = NO_ROUTE
        try:
            if self.tokens is not None and not route.public and not (route.open and self.tokens.open_health) and \
                    not self.tokens.accepts(req.headers.get("authorization")):
                reply = Reply(401, orjson.dumps({"error": "missing or invalid bearer token (header 'Authorization: "
                                                          "Bearer <token>')"}),
                              headers={"www-authenticate": "Bearer"})
            else:
                self._decompress(req)
                reply = await route.handler(self, req)
                reply = self._compress(req, reply)
        except PayloadTooLarge as exc:
            reply = Reply(413, orjson.dumps({"error": str(exc)}))
        except Exception as exc:
            kind, message = describe(exc, route.endpoint, req.headers.get("x-request-id", ""))
            reply = error_reply(kind, message)
        bound = self._bound.get(route.endpoint)
        if bound is None:
            bound = self._bound[route.endpoint] = (self.metrics.http_requests.labels(route.endpoint, "200"),
                                                   self.metrics.http_duration.labels(route.endpoint))
        self.metrics.tally.add(bound[0] if reply.status == 200 else
                               self.metrics.http_requests.labels(route.endpoint, str(reply.status)))
        bound[1].observe(time.perf_counter() - t0)
        return reply

    def _decompress(self, req: Request) -> None:
        """gzip and deflate request bodies, as Triton takes them; the inflated size is bounded like a body."""
        encoding = req.headers.get("content-encoding", "identity").lower()
        if encoding in ("identity", ""):
            return
        if encoding not in ("gzip", "deflate"):
            raise InvalidArgument(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 16 if encoding == "gzip" else zlib.MAX_WBITS)
        try:
            out = inflater.decompress(req.body, self.max_body + 1)
        except zlib.error as exc:
            raise InvalidArgument(f"the {encoding} body cannot be decompressed: {exc}") from None
        if len(out) > self.max_body or inflater.unconsumed_tail:
            raise PayloadTooLarge(f"the decompressed body is over the server's limit of {self.max_body} bytes "
                                  "(--max-message-bytes)")
        if not inflater.eof:  # zlib hands back what it could of a cut-off stream without an error
            raise InvalidArgument(f"the {encoding} body cannot be decompressed: it ends before the compressed "
                                  "stream does (truncated)")
        req.body = out

    @staticmethod
    def _compress(req: Request, reply: Reply) -> Reply:
        """Compressed replies on Accept-Encoding, as Triton does (gzip preferred). Never a streamed reply: only its
        first chunk is in `body`, and a gzip header over that one chunk with the events after it raw left browsers
        (and curl --compressed) with the first event only."""
        accept = req.headers.get("accept-encoding", "")
        if not accept or reply.stream is not None or len(reply.body) < 64:
            return reply
        offered = {a.split(";")[0].strip().lower() for a in accept.split(",")
                   if not re.search(r";\s*q\s*=\s*0(\.0*)?\s*$", a)}  # q=0: "not acceptable" (RFC 9110)
        if "gzip" in offered:
            zc = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS | 16)
            encoding = "gzip"
        elif "deflate" in offered:
            zc = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS)
            encoding = "deflate"
        else:
            return reply
        reply.body = zc.compress(reply.body) + zc.flush()
        reply.headers["content-encoding"] = encoding
        return reply

    # --- health and metadata ------------------------------------------------------------------------------------
    async def live(self, req: Request) -> Reply:
        ok = self.dataplane.live()
        return Reply(200 if ok else 400, orjson.dumps({"live": ok}))

    async def ready(self, req: Request) -> Reply:
        ok = self.dataplane.ready()
        return Reply(200 if ok else 400, orjson.dumps({"ready": ok}))

    async def server_metadata(self, req: Request) -> Reply:
        return json_reply(self.dataplane.server_metadata())

    async def model_ready(self, req: Request) -> Reply:
        ok = self.dataplane.model_ready(req.params["model"], req.params.get("version", ""))
        return Reply(200 if ok else 400, orjson.dumps({"name": req.params["model"], "ready": ok}))

    async def model_metadata(self, req: Request) -> Reply:
        return json_reply(self.dataplane.model_metadata(req.params["model"], req.params.get("version", "")))

    async def model_config(self, req: Request) -> Reply:
        config = self.dataplane.model_config(req.params["model"], req.params.get("version", ""))
        return json_reply(json_format.MessageToDict(config, preserving_proto_field_name=True))

    async def statistics(self, req: Request) -> Reply:
        stats = self.dataplane.statistics(req.params.get("model", ""), req.params.get("version", ""))
        return json_reply({"model_stats": stats})

    # --- inference ----------------------------------------------------------------------------------------------
    @staticmethod
    def _infer_request(req: Request):
        request = http_codec.to_request(req.params["model"], req.params.get("version", ""), req.body,
                                        req.headers.get(http_codec.HEADER_LENGTH))
        if request.id:  # an INTERNAL answer names the request's own id, as on gRPC (dispatch reads it here)
            req.headers.setdefault("x-request-id", request.id)
        return request

    async def infer(self, req: Request) -> Reply:
        tracing = self.dataplane.tracing
        trace = tracing.begin(req.params["model"], req.headers, "http") if tracing.on else None
        if trace is None:
            request = self._infer_request(req)
            body, header_length = http_codec.from_response(await self.dataplane.infer(request))
        else:
            with trace:  # ends the span with the status, also when decoding fails
                request = self._infer_request(req)
                response = await self.dataplane.infer(request, trace)
                with trace.encoding():
                    body, header_length = http_codec.from_response(response)
        if header_length is None:
            return Reply(200, body)
        return Reply(200, body, "application/octet-stream",
                     {"inference-header-content-length": str(header_length)})

    # --- generation (Triton's generate extension) -------------------------------------------------------------
    def _generation(self, req: Request) -> AsyncIterator[str]:
        name = req.params["model"]
        doc = _body_json(req, f"model {name!r} generate", allow_empty=False)
        extra = sorted(set(doc) - {"text_input", "parameters", "id"})
        if extra:
            raise InvalidArgument(f"model {name!r} generate: unknown field{'s' * (len(extra) > 1)} {extra}; the body "
                                  "is {\"text_input\": \"...\", \"parameters\": {...}}")
        text = doc.get("text_input")
        if not isinstance(text, str):
            raise InvalidArgument(f"model {name!r} generate: 'text_input' must be a string")
        params = doc.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidArgument(f"model {name!r} generate: 'parameters' must be a JSON object")
        return self.dataplane.generate(name, req.params.get("version", ""), text, params)

    def _event_head(self, req: Request) -> dict:
        mv = self.dataplane.registry.lookup(req.params["model"], req.params.get("version", ""))
        return {"model_name": mv.name, "model_version": mv.version_str}

    async def generate(self, req: Request) -> Reply:
        chunks = [c async for c in self._generation(req)]
        return json_reply({**self._event_head(req), "text_output": "".join(chunks)})

    async def generate_stream(self, req: Request) -> Reply:
        """Server-sent events, one `data: {...}` per chunk. Errors before the first chunk answer a status as any
        request does; an error after it is sent as an event, `data: {"error": ...}`. A closed connection stops
        the generation (http_server cancels the stream), which frees its slot at once."""
        chunks = self._generation(req)
        head = self._event_head(req)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = None

        async def events() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield b"data: " + orjson.dumps({**head, "text_output": chunk}) + b"\n\n"
            except Exception as exc:
                _, message = describe(exc, "generate_stream")
                yield b"data: " + orjson.dumps({"error": message}) + b"\n\n"
            finally:
                await chunks.aclose()

        body = b"" if first is None else b"data: " + orjson.dumps({**head, "text_output": first}) + b"\n\n"
        return Reply(200, body, "text/event-stream", {"cache-control": "no-cache"}, events())

    # --- repository ---------------------------------------------------------------------------------------------
    async def repository_index(self, req: Request) -> Reply:
        doc = _body_json(req, "repository index")
        ready = doc.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument("repository index: 'ready' must be a boolean")
        entries = [{k: v for k, v in e.items() if v or k == "name"} for e in self.dataplane.repository_index(ready)]
        return json_reply(entries)

    async def load(self, req: Request) -> Reply:
        name = req.params["model"]
        doc = _body_json(req, f"load of {name!r}")
        params = doc.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidArgument(f"load of {name!r}: 'parameters' must be a JSON object")
        config = params.get("config")
        if config is not None and not isinstance(config, str):
            config = orjson.dumps(config).decode()  # a config object instead of its JSON text: take it too
        files = {}
        for key, value in params.items():
            if key.startswith("file:"):
                if not isinstance(value, str):
                    raise InvalidArgument(f"load of {name!r}: parameter {key!r} must be base64 text")
                files[key[5:]] = _b64(value, name, key)
        await self.dataplane.load(name, config, files)
        return Reply(200)

    async def unload(self, req: Request) -> Reply:
        await self.dataplane.unload(req.params["model"])
        return Reply(200)

    # --- shared memory (Triton's extension; the rules and the safety checks are the data plane's) ---------------
    async def shm_status(self, req: Request) -> Reply:
        return json_reply(self.dataplane.system_shared_memory_status(req.params.get("region", "")))

    async def shm_register(self, req: Request) -> Reply:
        name = req.params["region"]
        doc = _body_json(req, f"shared memory region {name!r}", allow_empty=False)
        key, offset, size = doc.get("key"), doc.get("offset", 0), doc.get("byte_size")
        if not isinstance(key, str) or not _is_int(offset) or not _is_int(size):
            raise InvalidArgument(f"shared memory region {name!r}: register needs 'key' (string), 'offset' and "
                                  "'byte_size' (integers)")
        self.dataplane.system_shared_memory_register(name, key, offset, size)
        return Reply(200)

    async def shm_unregister(self, req: Request) -> Reply:
        self.dataplane.system_shared_memory_unregister(req.params.get("region", ""))
        return Reply(200)

    async def cuda_shm_status(self, req: Request) -> Reply:
        return json_reply(self.dataplane.cuda_shared_memory_status(req.params.get("region", "")))

    async def cuda_shm_register(self, req: Request) -> Reply:
        name = req.params["region"]
        doc = _body_json(req, f"CUDA shared memory region {name!r}")
        self.dataplane.cuda_shared_memory_register(name, b"", doc.get("device_id", 0), doc.get("byte_size", 0))
        return Reply(200)

    async def cuda_shm_unregister(self, req: Request) -> Reply:
        self.dataplane.cuda_shared_memory_unregister(req.params.get("region", ""))
        return Reply(200)

    # --- trace and log settings (Triton's trace and logging extensions) ---------------------------------------
    async def trace_settings(self, req: Request) -> Reply:
        update = _body_json(req, "trace settings") if req.method == "POST" else None
        return json_reply(self.dataplane.trace_settings(req.params.get("model", ""), update or None))

    async def log_settings(self, req: Request) -> Reply:
        update = _body_json(req, "log settings") if req.method == "POST" else None
        return json_reply(self.dataplane.log_settings(update or None))

    async def not_found(self, req: Request) -> Reply:
        raise NotFound(f"{req.method} {req.path}: no such endpoint; see /v2/openapi.json")

    # --- the web console (service/console.py): static files, and the training artifacts beside a version ------
    async def console_file(self, req: Request) -> Reply:
        asset = self.console.asset("index.html" if req.path == "/" else req.path.rsplit("/", 1)[1])
        headers = {"etag": asset.etag, "cache-control": "no-cache", **SECURITY_HEADERS}
        if req.headers.get("if-none-match") == asset.etag:
            return Reply(304, b"", asset.content_type, headers)
        return Reply(200, asset.body, asset.content_type, headers)

    async def console_artifact(self, req: Request) -> Reply:
        found = self.console.artifact(req.params["model"], req.params["version"], req.path.rsplit("/", 1)[1])
        if found is None:
            return Reply(204, b"", "text/plain")
        return Reply(200, found[0], found[1], {"cache-control": "no-cache", "x-content-type-options": "nosniff"})

    async def openapi(self, req: Request) -> Reply:
        if self._openapi is None:
            self._openapi = orjson.dumps(openapi.document(ROUTES))
        return Reply(200, self._openapi)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _b64(value: str, model: str, key: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"load of {model!r}: parameter {key!r} is not valid base64") from None


_M, _V = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
ROUTES: list[Route] = [
    Route("GET", "/v2/health/live", "health_live", "Server liveness", HttpApi.live, open=True),
    Route("GET", "/v2/health/ready", "health_ready", "Server readiness", HttpApi.ready, open=True),
    Route("GET", "/v2", "server_metadata", "Server metadata", HttpApi.server_metadata),
    Route("GET", "/v2/openapi.json", "openapi", "This API as an OpenAPI 3 document", HttpApi.openapi, open=True),
    Route("GET", "/v2/models/stats", "statistics", "Statistics of every model", HttpApi.statistics),
    Route("POST", "/v2/repository/index", "repository_index", "Models in the repository and their state",
          HttpApi.repository_index),
    Route("POST", "/v2/repository/models/{model}/load", "repository_load", "Load or reload a model",
          HttpApi.load),
    Route("POST", "/v2/repository/models/{model}/unload", "repository_unload", "Unload a model", HttpApi.unload),
]
for method in ("GET", "POST"):
    verb = "get" if method == "GET" else "update"
    ROUTES += [
        Route(method, "/v2/trace/setting", f"trace_setting_{verb}", f"{verb.title()} the global trace settings",
              HttpApi.trace_settings),
        Route(method, "/v2/models/{model}/trace/setting", f"model_trace_setting_{verb}",
              f"{verb.title()} a model's trace settings", HttpApi.trace_settings),
        Route(method, "/v2/logging", f"logging_{verb}", f"{verb.title()} the log settings", HttpApi.log_settings),
    ]
for kind, api in (("system", ""), ("cuda", "cuda_")):
    base = f"/v2/{kind}sharedmemory"
    ROUTES += [
        Route("GET", base + "/status", f"{api}shm_status", f"Every {kind} shared memory region",
              getattr(HttpApi, f"{api}shm_status")),
        Route("GET", base + "/region/{region}/status", f"{api}shm_status_region", f"One {kind} shared memory region",
              getattr(HttpApi, f"{api}shm_status")),
        Route("POST", base + "/region/{region}/register", f"{api}shm_register", f"Register a {kind} shared memory "
              "region", getattr(HttpApi, f"{api}shm_register")),
        Route("POST", base + "/unregister", f"{api}shm_unregister", f"Unregister every {kind} shared memory region",
              getattr(HttpApi, f"{api}shm_unregister")),
        Route("POST", base + "/region/{region}/unregister", f"{api}shm_unregister_region",
              f"Unregister a {kind} shared memory region", getattr(HttpApi, f"{api}shm_unregister")),
    ]
for prefix, suffix in ((_M, ""), (_V, "_version")):
    ROUTES += [
        Route("GET", prefix, "model_metadata" + suffix, "Model metadata", HttpApi.model_metadata),
        Route("GET", prefix + "/ready", "model_ready" + suffix, "Model readiness", HttpApi.model_ready, open=True),
        Route("GET", prefix + "/config", "model_config" + suffix, "Model configuration", HttpApi.model_config),
        Route("GET", prefix + "/stats", "model_statistics" + suffix, "Model statistics", HttpApi.statistics),
        Route("POST", prefix + "/infer", "infer" + suffix, "Inference", HttpApi.infer),
        Route("POST", prefix + "/generate", "generate" + suffix, "Generate text (one reply)", HttpApi.generate),
        Route("POST", prefix + "/generate_stream", "generate_stream" + suffix, "Generate text, streamed as "
              "server-sent events", HttpApi.generate_stream),
    ]
NO_ROUTE = Route("*", "", "unknown", "", HttpApi.not_found)
# The web console: not part of the API (so not in the OpenAPI document), and off with --no-console.
CONSOLE_ROUTES = [Route("GET", "/", "console", "Web console", HttpApi.console_file, public=True, console=True)]
CONSOLE_ROUTES += [Route("GET", "/console/" + name, "console", "Web console", HttpApi.console_file, public=True,
                         console=True) for name in ASSET_NAMES]
CONSOLE_ROUTES += [Route("GET", "/console/models/{model}/versions/{version}/" + kind, "console_" + kind,
                         f"Training {kind} of a model version", HttpApi.console_artifact, console=True)
                   for kind in ARTIFACTS]
