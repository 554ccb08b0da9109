"""The HTTP router in-process: parameters from any {segment}, unknown paths to the 404 route (TCP_NODELAY on
accepted connections is tests/test_http_raw.py's)."""

from __future__ import annotations

from service.http_server import route


def test_routes_take_parameters_from_any_segment():
    assert route("GET", "/v2/models/m/versions/3/ready")[1] == {"model": "m", "version": "3"}
    assert route("POST", "/v2/systemsharedmemory/region/r/register")[1] == {"region": "r"}
    assert route("POST", "/v2/repository/models/m/load")[0].endpoint == "repository_load"
    assert route("GET", "/v2/models//ready")[0].endpoint == "unknown"  # an empty segment is no model name
    assert route("DELETE", "/v2/models/m")[0].endpoint == "unknown"
