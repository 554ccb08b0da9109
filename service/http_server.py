"""The HTTP transport: uvicorn (httptools parser) serving a bare ASGI callable on the event loop gRPC runs on.

Chosen by measurement (see the README's performance section): on this 2-core machine, with grpc.aio on the same
loop, uvicorn+httptools with a bare ASGI app cost the least server CPU per request of aiohttp, uvicorn+starlette
and hypercorn for JSON and binary inference bodies; granian could not share the loop. No framework sits on the
tensor path: the app reads the body, finds the route in a dict, and hands http_api a plain Request.

uvicorn is driven below its `serve()` (which would take over SIGTERM/SIGINT from the server's own drain): startup on
a socket we bind ourselves (SO_REUSEPORT with --workers), its once-a-second tick for the Date header, shutdown."""

from __future__ import annotations

import asyncio
import logging
import socket

import orjson
import uvicorn

from service.http_api import ROUTES, UNIMPLEMENTED_PREFIXES, HttpApi, Reply, Request, Route
from service.settings import Settings

log = logging.getLogger("deepserve.http")
_STATIC: dict[tuple[str, str], Route] = {}  # paths without parameters: one dict lookup
_PATTERNS: dict[tuple[str, int], list[tuple[list[str], Route]]] = {}  # (method, segments) -> [(segments, route)]
for _r in ROUTES:
    if "{" not in _r.path:
        _STATIC[(_r.method, _r.path)] = _r
    else:
        _parts = _r.path.split("/")
        _PATTERNS.setdefault((_r.method, len(_parts)), []).append((_parts, _r))
_FALLBACK = Route("*", "", "unknown", "", HttpApi.not_found)
_UNIMPLEMENTED = Route("*", "", "unimplemented", "", HttpApi.unimplemented)


def route(method: str, path: str) -> tuple[Route, dict[str, str]]:
    """The route and path parameters ({model}, {version}, {region}: one non-empty segment each) for a request;
    unknown paths get the 404 route, Triton extensions we do not implement the 501 one."""
    r = _STATIC.get((method, path))
    if r is not None:
        return r, {}
    parts = path.split("/")
    for pattern, r in _PATTERNS.get((method, len(parts)), ()):
        params = {}
        for want, got in zip(pattern, parts, strict=True):
            if want.startswith("{"):
                if not got:
                    break
                params[want[1:-1]] = got
            elif want != got:
                break
        else:
            return r, params
    if path.startswith(UNIMPLEMENTED_PREFIXES) or "/trace/" in path:
        return _UNIMPLEMENTED, {}
    return _FALLBACK, {}


class App:
    """The ASGI callable."""

    def __init__(self, api: HttpApi, max_body: int) -> None:
        self.api = api
        self.max_body = max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        r, params = route(scope["method"], scope["path"])
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await _send(send, _too_large(self.max_body))
            return
        chunks, size = [], 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body:
                    await _send(send, _too_large(self.max_body))
                    return
                chunks.append(chunk)
            more = message.get("more_body", False)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        reply = await self.api.dispatch(r, Request(scope["method"], scope["path"], params, headers, body))
        await _send(send, reply)


def _too_large(limit: int) -> Reply:
    return Reply(413, orjson.dumps({"error": f"the body is over the server's limit of {limit} bytes "
                                             "(--max-message-bytes)"}))


async def _send(send, reply: Reply) -> None:
    headers = [(b"content-type", reply.content_type.encode()), (b"content-length", str(len(reply.body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in reply.headers.items()]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


class HttpFrontEnd:
    def __init__(self, api: HttpApi, s: Settings, ssl_context=None) -> None:
        self.settings = s
        config = uvicorn.Config(App(api, s.max_message_bytes), host=s.host, port=s.http_port, loop="none",
                                http="httptools", lifespan="off", log_config=None, access_log=False,
                                server_header=False, timeout_graceful_shutdown=max(1, int(s.drain_secs)))
        config.load()
        config.ssl = ssl_context
        self.server = uvicorn.Server(config)
        self.server.lifespan = config.lifespan_class(config)
        self.sock: socket.socket | None = None
        self._ticker: asyncio.Task | None = None

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # else asyncio leaves Nagle on
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.settings.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.settings.host, self.settings.http_port))
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock = sock
        await self.server.startup(sockets=[sock])
        self._ticker = asyncio.get_running_loop().create_task(self.server.main_loop())

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._ticker:
            await self._ticker
        await self.server.shutdown(sockets=[self.sock] if self.sock else None)
