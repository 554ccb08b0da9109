"""The HTTP transport in-process, on a real (empty) data plane: what a socket-level regression would break without
any message changing. Accepted connections must have TCP_NODELAY, or each reply's header and body writes wait for
the client's delayed ACK (~40 ms a request, measured before the fix); the router finds parameters in any segment."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from prometheus_client import CollectorRegistry
from support import free_port

from service import settings
from service.dataplane import DataPlane
from service.http_api import HttpApi
from service.http_server import HttpFrontEnd, route
from service.metrics import Metrics
from service.registry import Registry
from service.state import ServerState


def test_accepted_connections_have_tcp_nodelay(tmp_path: Path):
    async def body() -> int:
        metrics = Metrics(CollectorRegistry())
        registry = Registry(tmp_path, metrics)
        state = ServerState(registry, loaded=True)
        s = settings.parse(["--host", "127.0.0.1", "--http-port", str(free_port())])
        front = HttpFrontEnd(HttpApi(DataPlane(registry, state), metrics, None, s.max_message_bytes), s)
        await front.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.http_port)
            writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            [conn] = list(front.server.server_state.connections)
            nodelay = conn.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            writer.close()
            return nodelay
        finally:
            await front.stop()

    assert asyncio.run(body()) == 1


def test_routes_take_parameters_from_any_segment():
    assert route("GET", "/v2/models/m/versions/3/ready")[1] == {"model": "m", "version": "3"}
    assert route("POST", "/v2/systemsharedmemory/region/r/register")[1] == {"region": "r"}
    assert route("POST", "/v2/repository/models/m/load")[0].endpoint == "repository_load"
    assert route("GET", "/v2/models//ready")[0].endpoint == "unknown"  # an empty segment is no model name
    assert route("DELETE", "/v2/models/m")[0].endpoint == "unknown"
