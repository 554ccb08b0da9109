"""The HTTP/REST API byte for byte, as curl would send it: JSON and binary inference bodies, compressed bodies both
ways, each kind of malformed body, the body limit, unknown and unimplemented endpoints. Every error is a JSON
`{"error": "..."}` with Triton's status, and after each the server still serves."""

from __future__ import annotations

import gzip
import json
import socket
import struct
import zlib

import numpy as np
import pytest
from protocols import HttpClient, parse_reply

from service.settings import Settings

X = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
XB = np.array(X, np.float32).tobytes()
LIMIT = Settings().max_message_bytes  # the shared server runs with the default


@pytest.fixture
def http(server):
    c = HttpClient(server.http_url)
    yield c
    c.close()


def _json_infer(**extra) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": X},
                                  {"name": "y", "datatype": "FP32", "shape": [2, 4], "data": sum(X, [])}],
                       **extra}).encode()


def _binary_infer(sizes=(32, 32), tail: bytes = XB + XB, outputs=None) -> tuple[bytes, dict]:
    doc = {"inputs": [{"name": n, "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": s}}
                      for n, s in zip("xy", sizes, strict=True)]}
    if outputs is not None:
        doc["outputs"] = outputs
    head = json.dumps(doc).encode()
    return head + tail, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def _error(http, method: str, path: str, body: bytes = b"", headers=None) -> tuple[int, str]:
    status, reply_headers, data = http.send(method, path, body, headers)
    assert reply_headers["content-type"] == "application/json", reply_headers
    doc = json.loads(data)
    assert status >= 400 and list(doc) == ["error"] and isinstance(doc["error"], str), (status, data)
    _still_serves(http)
    return status, doc["error"]


def _still_serves(http) -> None:
    status, headers, data = http.send("POST", "/v2/models/add_sub/infer", _json_infer())
    assert status == 200, data
    assert json.loads(data)["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0]


def test_json_infer(http):
    status, headers, data = http.send("POST", "/v2/models/add_sub/infer", _json_infer(id="curl-1"),
                                      {"Content-Type": "application/json"})
    assert status == 200 and headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in headers
    doc = json.loads(data)
    assert doc == {"model_name": "add_sub", "model_version": "1", "id": "curl-1", "outputs": [
        {"name": "sum", "datatype": "FP32", "shape": [2, 4], "data": [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0]},
        {"name": "diff", "datatype": "FP32", "shape": [2, 4], "data": [0.0] * 8}]}


def test_binary_infer_with_header_length(http):
    body, headers = _binary_infer(outputs=[{"name": "diff", "parameters": {"binary_data": False}},
                                           {"name": "sum", "parameters": {"binary_data": True}}])
    status, reply_headers, data = http.send("POST", "/v2/models/add_sub/infer", body, headers)
    assert status == 200 and reply_headers["content-type"] == "application/octet-stream"
    n = int(reply_headers["inference-header-content-length"])
    doc = json.loads(data[:n])
    assert doc["outputs"] == [{"name": "diff", "datatype": "FP32", "shape": [2, 4], "data": [0.0] * 8},
                              {"name": "sum", "datatype": "FP32", "shape": [2, 4],
                               "parameters": {"binary_data_size": 32}}]
    assert np.frombuffer(data[n:], np.float32).tolist() == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0]
    # binary_data_output: every output the request does not name comes binary
    body, headers = _binary_infer()
    doc = json.loads(body[:int(headers["Inference-Header-Content-Length"])])
    doc["parameters"] = {"binary_data_output": True}
    head = json.dumps(doc).encode()
    answer = parse_reply(*http.send("POST", "/v2/models/add_sub/infer", head + XB + XB,
                                    {"Inference-Header-Content-Length": str(len(head))}))
    assert answer.outputs["sum"].tolist() == (2 * np.array(X, np.float32)).tolist()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_request_body(http, encoding):
    raw = _json_infer()
    packed = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    status, _, data = http.send("POST", "/v2/models/add_sub/infer", packed, {"Content-Encoding": encoding})
    assert status == 200, data
    assert json.loads(data)["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0]
    body, headers = _binary_infer()  # binary: the header length counts the inflated body
    status, _, data = http.send("POST", "/v2/models/add_sub/infer", gzip.compress(body) if encoding == "gzip"
                                else zlib.compress(body), {**headers, "Content-Encoding": encoding})
    assert status == 200, data


@pytest.mark.parametrize("accept", ["gzip", "deflate", "br;q=1.0, gzip;q=0.5"])
def test_compressed_reply_on_accept_encoding(http, accept):
    status, headers, data = http.send("POST", "/v2/models/add_sub/infer", _json_infer(),
                                      {"Accept-Encoding": accept})
    encoding = "deflate" if accept == "deflate" else "gzip"
    assert status == 200 and headers["content-encoding"] == encoding
    plain = gzip.decompress(data) if encoding == "gzip" else zlib.decompress(data)
    assert json.loads(plain)["outputs"][0]["data"][:2] == [2.0, 4.0]
    for refused in ("identity", "gzip;q=0, deflate;q=0.0", "gzip; q=0"):  # q=0: not acceptable
        status, headers, data = http.send("GET", "/v2/models/add_sub", headers={"Accept-Encoding": refused})
        assert status == 200 and "content-encoding" not in headers, refused
        assert json.loads(data)["name"] == "add_sub"


MALFORMED = {  # name: (body, headers, status, fragment)
    "not JSON": (b"{not json", {}, 400, "the body is not valid JSON"),
    "JSON, not an object": (b"[1, 2]", {}, 400, "must be a JSON object, got list"),
    "no inputs list": (b'{"inputs": 3}', {}, 400, "needs an 'inputs' list"),
    "shape not integers": (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": ["2"]}]}', {}, 400,
                           "'shape' (list of integers)"),
    "header length past the body": (XB, {"Inference-Header-Content-Length": "100000"}, 400,
                                    "Inference-Header-Content-Length 100000 is outside the body of 32 bytes"),
    "header length not a number": (b"{}", {"Inference-Header-Content-Length": "ten"}, 400,
                                   "Inference-Header-Content-Length 'ten' is not an integer"),
    "header length negative": (b"{}", {"Inference-Header-Content-Length": "-1"}, 400, "is outside the body"),
    "binary_data_size disagrees with shape x datatype": (*_binary_infer((12, 32), XB[:12] + XB), 400,
                                                         "shape [2,4] of FP32 needs 32 bytes of raw contents, got 12"),
    "binary tail too short": (*_binary_infer((32, 32), XB + XB[:16]), 400,
                              "binary_data_size 32 goes past the binary data (16 bytes left of 48)"),
    "binary tail too long": (*_binary_infer((32, 32), XB + XB + b"12345678"), 400,
                             "8 bytes of binary data follow the inputs' binary_data_size total of 64"),
    "binary_data_size negative": (*_binary_infer((-1, 32), XB), 400, "binary_data_size must be a non-negative"),
    "binary_data_size and data": (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                                                          "data": [1], "parameters": {"binary_data_size": 4}}]})
                                  .encode() + b"\0" * 4, None, 400, "both binary_data_size and data are set"),
    "unknown content encoding": (b"{}", {"Content-Encoding": "br"}, 400, "Content-Encoding 'br' is not supported"),
    "corrupt gzip": (b"\x1f\x8b\x08\x00garbage", {"Content-Encoding": "gzip"}, 400, "cannot be decompressed"),
    "truncated gzip": (gzip.compress(_json_infer())[:60], {"Content-Encoding": "gzip"}, 400, "(truncated)"),
    "truncated deflate": (zlib.compress(_json_infer())[:60], {"Content-Encoding": "deflate"}, 400, "(truncated)"),
    "nested data of the wrong length": (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4],
                                                                "data": [[1, 2], [3]]},
                                                               {"name": "y", "datatype": "FP32", "shape": [2, 4],
                                                                "data": [0] * 8}]}).encode(), {}, 400,
                                        "model 'add_sub' input 'x'"),
    "strings for FP32": (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                                 "data": ["a", "b", "c", "d"]},
                                                {"name": "y", "datatype": "FP32", "shape": [1, 4],
                                                 "data": [0] * 4}]}).encode(), {}, 400, "input 'x'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_body_is_a_clear_4xx(http, case):
    body, headers, status, fragment = MALFORMED[case]
    if case == "binary_data_size and data":
        headers = {"Inference-Header-Content-Length": str(len(body) - 4)}
    got, message = _error(http, "POST", "/v2/models/add_sub/infer", body, headers)
    assert (got, fragment in message) == (status, True), message


def test_gzip_bomb_is_413(http):
    """A small gzip body that inflates past --max-message-bytes: 413, without inflating all of it."""
    bomb = gzip.compress(b"\0" * (LIMIT + (1 << 20)), 9)
    assert len(bomb) < LIMIT // 100
    status, message = _error(http, "POST", "/v2/models/add_sub/infer", bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "decompressed body is over the server's limit" in message


def test_body_over_the_limit_is_413_at_once(server, http):
    """A Content-Length over --max-message-bytes is answered 413 before the body is sent: the reply comes while
    the client has sent only its first kilobyte."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as s:
        s.sendall(b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (LIMIT + 1) + b"{" * 1024)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply[:300]
    assert json.loads(body) == {"error": f"the body is over the server's limit of {LIMIT} bytes "
                                         "(--max-message-bytes)"}
    _still_serves(http)


def test_chunked_body_over_the_limit_is_413(server, http):
    """No Content-Length (chunked): the limit holds as the body arrives."""
    chunk = b"x" * (1 << 20)
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=60) as s:
        s.sendall(b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        reply = b""
        try:
            for _ in range(LIMIT // len(chunk) + 2):
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        s.settimeout(30)
        try:
            while chunk := s.recv(65536):
                reply += chunk
                if b"}" in reply:
                    break
        except ConnectionResetError:
            pass
    assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
    _still_serves(http)


def test_unknown_endpoint_is_404_json(http):
    for method, path in (("GET", "/v2/nope"), ("POST", "/v2/models/add_sub/nope"),  # GET /: the console
                         ("GET", "/v2/models/add_sub/infer"), ("DELETE", "/v2/models/add_sub"),
                         ("GET", "/v2/models/add_sub/versions/1/ready/extra")):
        status, message = _error(http, method, path)
        assert status == 404 and "no such endpoint" in message, (method, path, message)
    status, message = _error(http, "GET", "/v2/models/nope")
    assert status == 404 and "unknown model 'nope'" in message


def test_triton_extensions_answer_over_http(http):
    """Every Triton extension endpoint is routed: CUDA shared memory registration is the one unsupported call (501,
    as gRPC answers UNIMPLEMENTED); the status, trace and log settings endpoints answer."""
    status, message = _error(http, "POST", "/v2/cudasharedmemory/region/r/register", b'{"byte_size": 8}')
    assert status == 501 and "CUDA shared memory is not supported" in message, message
    for path, key in (("/v2/cudasharedmemory/status", None), ("/v2/trace/setting", "trace_level"),
                      ("/v2/models/add_sub/trace/setting", "trace_level"), ("/v2/logging", "log_info")):
        status, _, data = http.send("GET", path, b"")
        assert status == 200, (path, data)
        doc = json.loads(data)
        assert doc == [] if key is None else key in doc, (path, doc)


def test_metadata_endpoints(http):
    def get(path: str, method: str = "GET", body: bytes = b""):
        status, headers, data = http.send(method, path, body)
        return status, json.loads(data) if data else None

    assert get("/v2/health/live") == (200, {"live": True})
    assert get("/v2/health/ready") == (200, {"ready": True})
    assert get("/v2/models/add_sub/ready") == (200, {"name": "add_sub", "ready": True})
    assert get("/v2/models/broken/ready") == (400, {"name": "broken", "ready": False})
    assert get("/v2/models/versioned/versions/1/ready")[0] == 200
    status, md = get("/v2")
    assert status == 200 and md["name"] == "deepserve" and "binary_tensor_data" in md["extensions"]
    status, md = get("/v2/models/versioned")
    assert status == 200 and md["versions"] == ["1", "2"] and md["platform"] == "onnxruntime_onnx"
    assert md["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]},
                            {"name": "y", "datatype": "FP32", "shape": [-1, 4]}]
    status, cfg = get("/v2/models/add_sub/config")
    assert status == 200 and cfg["max_batch_size"] == 8 and cfg["instance_group"][0]["count"] == 2
    status, stats = get("/v2/models/add_sub/versions/1/stats")
    assert status == 200 and [(s["name"], s["version"]) for s in stats["model_stats"]] == [("add_sub", "1")]
    status, index = get("/v2/repository/index", "POST")
    assert status == 200 and {"name": "add_sub", "version": "1", "state": "READY"} in index
    status, index = get("/v2/repository/index", "POST", b'{"ready": true}')
    assert status == 200 and "broken" not in {e["name"] for e in index}
    status, err = get("/v2/repository/models/add_sub/load", "POST")
    assert status == 503 and "--model-control-mode explicit" in err["error"]


def test_huge_declared_json_shape_allocates_nothing(edge_server):
    """JSON `data` of two values for a declared 2^40 elements, on a server with no element limit: refused by
    counting, not by building the array; RSS stays flat over many such requests."""
    from support import proc_status

    http = HttpClient(edge_server.http_url)
    body = json.dumps({"inputs": [{"name": "in_FP32", "datatype": "FP32", "shape": [1, 2**40],
                                   "data": [1.0, 2.0]}]}).encode()
    http.send("POST", "/v2/models/typed_identity/infer", body)
    before = proc_status(edge_server.proc.pid)
    for _ in range(50):
        status, _, data = http.send("POST", "/v2/models/typed_identity/infer", body)
        assert status == 400 and f"needs {2**40} values in data, got 2".encode() in data, data
    after = proc_status(edge_server.proc.pid)
    assert after["VmHWM"] - before["VmHWM"] < 64 << 20, (before, after)
    http.close()


def test_bytes_in_binary_and_json(http):
    """BYTES: strings in JSON, 4-byte-length-prefixed in binary, both ways."""
    raw = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", "\u00e9".encode()))
    head = json.dumps({"inputs": [{"name": "in_BYTES", "datatype": "BYTES", "shape": [1, 2],
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "out_BYTES", "parameters": {"binary_data": True}}]}).encode()
    # identity needs every input: ask its metadata for them and send zeros
    status, _, md = http.send("GET", "/v2/models/identity")
    others = [{"name": t["name"], "datatype": t["datatype"], "shape": [1, 2],
               "data": [False, True] if t["datatype"] == "BOOL" else [0, 1]}
              for t in json.loads(md)["inputs"] if t["datatype"] != "BYTES"]
    doc = json.loads(head)
    doc["inputs"] += others
    head = json.dumps(doc).encode()
    answer = parse_reply(*http.send("POST", "/v2/models/identity/infer", head + raw,
                                    {"Inference-Header-Content-Length": str(len(head))}))
    assert answer.outputs["out_BYTES"].tolist() == [[b"ab", "\u00e9".encode()]]
    doc["inputs"][0] = {"name": "in_BYTES", "datatype": "BYTES", "shape": [1, 2], "data": ["ab", "\u00e9"]}
    doc["outputs"][0]["parameters"]["binary_data"] = False
    status, _, data = http.send("POST", "/v2/models/identity/infer", json.dumps(doc).encode())
    out = next(o for o in json.loads(data)["outputs"] if o["name"] == "out_BYTES")
    assert status == 200 and out["data"] == ["ab", "\u00e9"]


def test_connections_are_tcp_nodelay(tmp_path):
    """Each accepted connection has TCP_NODELAY: a reply is two writes (head, body), and with Nagle on the second
    waits for the client's delayed ACK (~40 ms a request on a kept-alive connection). In-process, to read the
    server side's socket option."""
    import asyncio

    from prometheus_client import CollectorRegistry
    from support import free_port

    from service.dataplane import DataPlane
    from service.http_api import HttpApi
    from service.http_server import HttpFrontEnd
    from service.metrics import Metrics
    from service.registry import Registry
    from service.state import ServerState

    async def main() -> list[int]:
        metrics = Metrics(CollectorRegistry())
        registry = Registry(tmp_path, metrics)
        s = Settings(host="127.0.0.1", http_port=free_port())
        front = HttpFrontEnd(HttpApi(DataPlane(registry, ServerState(registry)), metrics, None, LIMIT), s)
        await front.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.http_port)
            writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.readuntil(b'{"live":true}')
            flags = [c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                     for c in front.server.server_state.connections]
            writer.close()
            return flags
        finally:
            await front.stop()

    assert asyncio.run(main()) == [1]
