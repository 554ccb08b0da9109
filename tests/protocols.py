"""One small client per wire protocol with the same call, so a protocol test has one body that runs over gRPC and
HTTP/REST (uvicorn's tests/protocols style): `client.infer(model, inputs, outputs, params) -> Answer`.

Inputs are neutral `Tensor`s: `raw` bytes (gRPC raw_input_contents; HTTP binary tensor data with binary_data_size)
or typed `values` (gRPC typed contents; HTTP JSON `data`). An Answer holds the error kind (the neutral name,
found by inverting the front end's own status table), the wire status itself (a grpc.StatusCode or an HTTP
status), the message and the decoded outputs. The HTTP client is written from Triton's protocol, with the standard
library, not from service.http_codec, so the codec is checked against an independent reading."""

from __future__ import annotations

import http.client
import json
import struct
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import grpc
import numpy as np
from support import outputs as grpc_outputs

from service import grpc_api, http_api
from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc
from service.tensors import BY_WIRE, to_raw

NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
         "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
         "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}
WIRE = {np.dtype(v): k for k, v in NUMPY.items() if k != "BYTES"}
PROTOCOLS = ["grpc", "http"]


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    raw: bytes | None = None
    values: list | None = None


def datatype_of(arr: np.ndarray) -> str:
    return "BYTES" if arr.dtype == object else WIRE[arr.dtype]


def raw(name: str, arr, datatype: str | None = None) -> Tensor:
    """An input from a numpy array, as raw little-endian bytes (BYTES: 4-byte length, then the bytes)."""
    arr = np.asarray(arr)
    dt = datatype or datatype_of(arr)
    return Tensor(name, dt, list(arr.shape), raw=to_raw(arr, BY_WIRE[datatype_of(arr)]))


def typed(name: str, arr, datatype: str | None = None) -> Tensor:
    """An input from a numpy array, as typed values (BYTES as str when UTF-8, as gRPC and JSON take them)."""
    arr = np.asarray(arr)
    values = [v.decode() if isinstance(v, bytes) else v for v in arr.reshape(-1).tolist()]
    return Tensor(name, datatype or datatype_of(arr), list(arr.shape), values=values)


@dataclass
class Answer:
    kind: str  # "OK" or the neutral error kind (service.errors)
    status: Any  # grpc.StatusCode or an HTTP status
    message: str = ""
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    datatypes: dict[str, str] = field(default_factory=dict)
    model_version: str = ""
    id: str = ""


def _pb_param(p: pb.InferParameter, v) -> None:
    if isinstance(v, bool):
        p.bool_param = v
    elif isinstance(v, int):
        if v >= 2**63:
            p.uint64_param = v
        else:
            p.int64_param = v
    elif isinstance(v, float):
        p.double_param = v
    elif isinstance(v, bytes):
        p.bytes_param = v
    else:
        p.string_param = v


def _outputs_dict(outputs) -> dict[str, dict]:
    if outputs is None:
        return {}
    if isinstance(outputs, dict):
        return outputs
    return {name: {} for name in outputs}


class GrpcClient:
    protocol = "grpc"

    def __init__(self, url: str, token: str | None = None) -> None:
        self.channel = grpc.insecure_channel(url)
        self.stub = inference_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else None

    @staticmethod
    def status_of(kind: str):
        return grpc.StatusCode.OK if kind == "OK" else grpc_api.ERROR_STATUS[kind]

    def request(self, model: str, inputs: list[Tensor], outputs=None, params: dict | None = None, version: str = "",
                id: str = "") -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name=model, model_version=version, id=id)
        for t in inputs:
            m = req.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            if t.raw is not None:
                req.raw_input_contents.append(t.raw)
            elif t.values is not None:
                dt = BY_WIRE[t.datatype]
                values = [v.encode() if isinstance(v, str) else v for v in t.values] if t.datatype == "BYTES" \
                    else t.values
                getattr(m.contents, dt.typed_field).extend(values)
        for name, p in _outputs_dict(outputs).items():
            o = req.outputs.add(name=name)
            for k, v in p.items():
                _pb_param(o.parameters[k], v)
        for k, v in (params or {}).items():
            _pb_param(req.parameters[k], v)
        return req

    def infer(self, model: str, inputs: list[Tensor], outputs=None, params: dict | None = None, version: str = "",
              id: str = "") -> Answer:
        req = self.request(model, inputs, outputs, params, version, id)
        try:
            reply = self.stub.ModelInfer(req, timeout=60, metadata=self.metadata)
        except grpc.RpcError as exc:
            return Answer(exc.code().name, exc.code(), exc.details() or "")
        return Answer("OK", grpc.StatusCode.OK, "", grpc_outputs(reply), {o.name: o.datatype for o in reply.outputs},
                      reply.model_version, reply.id)

    def server_metadata(self) -> Answer:
        try:
            md = self.stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=30, metadata=self.metadata)
        except grpc.RpcError as exc:
            return Answer(exc.code().name, exc.code(), exc.details() or "")
        return Answer("OK", grpc.StatusCode.OK, md.name)

    def close(self) -> None:
        self.channel.close()


HTTP_KIND = {status: kind for kind, status in reversed(http_api.ERROR_STATUS.items())}  # 400: INVALID_ARGUMENT


class HttpClient:
    """HTTP/1.1 on one kept-alive connection (reopened when the server closed it). `binary`: raw inputs travel as
    binary tensor data and outputs are asked for as binary; otherwise outputs come back as JSON `data`."""

    protocol = "http"

    def __init__(self, url: str, token: str | None = None, binary: bool = True) -> None:
        u = urlsplit(url)
        self.host, self.port = u.hostname, u.port
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        self.token = token
        self.binary = binary

    @staticmethod
    def status_of(kind: str) -> int:
        return 200 if kind == "OK" else http_api.ERROR_STATUS[kind]

    def send(self, method: str, path: str, body: bytes = b"", headers: dict | None = None
             ) -> tuple[int, dict[str, str], bytes]:
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=body, headers=headers)
                r = self.conn.getresponse()
                return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def body(self, inputs: list[Tensor], outputs=None, params: dict | None = None, id: str = ""
             ) -> tuple[bytes, int | None]:
        doc: dict[str, Any] = {"inputs": []}
        if id:
            doc["id"] = id
        tail = []
        for t in inputs:
            entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
            if t.raw is not None:
                entry["parameters"] = {"binary_data_size": len(t.raw)}
                tail.append(t.raw)
            elif t.values is not None:
                entry["data"] = t.values
            doc["inputs"].append(entry)
        outs = _outputs_dict(outputs)
        if outs:
            doc["outputs"] = [{"name": n, "parameters": {"binary_data": self.binary, **p}} for n, p in outs.items()]
        doc["parameters"] = {**(params or {}), "binary_data_output": self.binary}
        head = json.dumps(doc).encode()
        if not tail:
            return head, None
        return head + b"".join(tail), len(head)

    def infer(self, model: str, inputs: list[Tensor], outputs=None, params: dict | None = None, version: str = "",
              id: str = "") -> Answer:
        body, header_length = self.body(inputs, outputs, params, id)
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        headers = {"Content-Type": "application/json" if header_length is None else "application/octet-stream"}
        if header_length is not None:
            headers["Inference-Header-Content-Length"] = str(header_length)
        status, reply_headers, data = self.send("POST", path, body, headers)
        return parse_reply(status, reply_headers, data)

    def server_metadata(self) -> Answer:
        status, headers, data = self.send("GET", "/v2")
        if status != 200:
            return Answer(HTTP_KIND.get(status, str(status)), status, json.loads(data)["error"])
        return Answer("OK", 200, json.loads(data)["name"])

    def close(self) -> None:
        self.conn.close()


def parse_reply(status: int, headers: dict[str, str], data: bytes) -> Answer:
    """An infer reply: errors must be {"error": "..."}; outputs decoded from JSON data or the binary tail."""
    if status != 200:
        doc = json.loads(data)
        assert isinstance(doc, dict) and set(doc) == {"error"} and isinstance(doc["error"], str), data[:300]
        return Answer(HTTP_KIND.get(status, str(status)), status, doc["error"])
    n = int(headers.get("inference-header-content-length", len(data)))
    doc = json.loads(data[:n])
    pos, outs, types = n, {}, {}
    for o in doc["outputs"]:
        dt, shape = o["datatype"], tuple(o["shape"])
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            outs[o["name"]] = decode_raw(data[pos:pos + size], dt, shape)
            pos += size
        else:
            outs[o["name"]] = decode_json(o["data"], dt, shape)
        types[o["name"]] = dt
    assert pos == len(data), f"{len(data) - pos} bytes after the outputs"
    return Answer("OK", 200, "", outs, types, doc.get("model_version", ""), doc.get("id", ""))


def decode_raw(buf: bytes, datatype: str, shape: tuple) -> np.ndarray:
    if datatype != "BYTES":
        return np.frombuffer(buf, dtype=NUMPY[datatype]).reshape(shape)
    items, pos = [], 0
    while pos < len(buf):
        (n,) = struct.unpack_from("<I", buf, pos)
        items.append(buf[pos + 4:pos + 4 + n])
        pos += 4 + n
    return np.array(items, dtype=object).reshape(shape)


def decode_json(data: list, datatype: str, shape: tuple) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([s.encode() for s in data], dtype=object).reshape(shape)
    return np.array(data, dtype=NUMPY[datatype]).reshape(shape)


def connect(server, protocol: str, token: str | None = None):
    """A client of `server` (tests/support.Server) over `protocol`: grpc, http (binary) or http-json."""
    if protocol == "grpc":
        return GrpcClient(server.url, token)
    return HttpClient(server.http_url, token, binary=protocol != "http-json")


def encode(client, name: str, arr) -> Tensor:
    """An input the way this client's protocol carries numbers by default: raw, except HTTP's JSON mode."""
    if isinstance(client, HttpClient) and not client.binary:
        return typed(name, arr)
    return raw(name, arr)
