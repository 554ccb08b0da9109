"""The client side of both protocols, as the CLI needs it: metadata, infer (raw / binary tensors, optional
classification) and health. gRPC goes through our own stubs; HTTP through the standard library (no client
dependency), with Triton's binary tensor data extension both ways."""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from service.tensors import BY_WIRE, BYTES, decode_bytes, to_raw


class RequestFailed(Exception):
    """What the server answered instead (status and message), ready to print."""


def _as_wire(arr: np.ndarray, datatype: str) -> tuple[np.ndarray, bytes]:
    dt = BY_WIRE[datatype]
    arr = np.asarray(arr, dtype=dt.numpy) if dt is not BYTES else np.asarray(arr, dtype=object)
    return arr, to_raw(arr, dt)


def _decode(datatype: str, shape: list[int], raw: bytes | memoryview, name: str) -> np.ndarray:
    dt = BY_WIRE[datatype]
    if dt is BYTES:
        return decode_bytes(raw, int(np.prod(shape)), name).reshape(shape)
    return np.frombuffer(raw, dtype=dt.numpy).reshape(shape)


class Transport:
    def metadata(self, model: str, version: str = "") -> dict:
        raise NotImplementedError

    def infer(self, model: str, version: str, feeds: dict[str, np.ndarray], metadata: dict,
              classification: dict[str, int] | None = None) -> tuple[str, dict[str, np.ndarray]]:
        """(the version that served, outputs by name)."""
        raise NotImplementedError

    def health(self, service: str = "") -> tuple[str, bool]:
        raise NotImplementedError

    def generate(self, model: str, version: str, prompt: str, params: dict) -> Iterator[str]:
        """Text chunks as the server streams them."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _inputs(model: str, feeds: dict[str, np.ndarray], metadata: dict) -> list[tuple[str, str, np.ndarray, bytes]]:
    specs = {t["name"]: t for t in metadata["inputs"]}
    out = []
    for name, arr in feeds.items():
        if name not in specs:
            raise SystemExit(f"model {model} has no input {name!r}; inputs: {', '.join(specs)}")
        arr, raw = _as_wire(arr, specs[name]["datatype"])
        out.append((name, specs[name]["datatype"], arr, raw))
    return out


class GrpcTransport(Transport):
    def __init__(self, url: str, token: str = "", tls_ca: str = "", timeout: float = 30.0) -> None:
        import grpc

        from service._proto import inference_pb2_grpc

        self.grpc = grpc
        self.channel = grpc.secure_channel(url, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())) \
            if tls_ca else grpc.insecure_channel(url)
        self.stub = inference_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.meta = [("authorization", f"Bearer {token}")] if token else None
        self.timeout = timeout

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self.meta)
        except self.grpc.RpcError as exc:
            raise RequestFailed(f"{exc.code().name}: {exc.details()}") from None

    def metadata(self, model: str, version: str = "") -> dict:
        from google.protobuf import json_format

        from service._proto import inference_pb2 as pb

        md = self._call(self.stub.ModelMetadata, pb.ModelMetadataRequest(name=model, version=version))
        return json_format.MessageToDict(md, preserving_proto_field_name=True)

    def infer(self, model, version, feeds, metadata, classification=None):
        from service._proto import inference_pb2 as pb

        req = pb.ModelInferRequest(model_name=model, model_version=version)
        for name, datatype, arr, raw in _inputs(model, feeds, metadata):
            req.inputs.add(name=name, datatype=datatype, shape=arr.shape)
            req.raw_input_contents.append(raw)
        for name, k in (classification or {}).items():
            req.outputs.add(name=name).parameters["classification"].int64_param = k
        reply = self._call(self.stub.ModelInfer, req)
        return reply.model_version, {t.name: _decode(t.datatype, list(t.shape), raw, t.name)
                                     for t, raw in zip(reply.outputs, reply.raw_output_contents, strict=True)}

    def health(self, service: str = "") -> tuple[str, bool]:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                   timeout=self.timeout)
        except self.grpc.RpcError as exc:
            raise RequestFailed(f"{exc.code().name}: {exc.details()}") from None
        return (health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status),
                reply.status == health_pb2.HealthCheckResponse.SERVING)

    def generate(self, model, version, prompt, params):
        from service._proto import inference_pb2 as pb
        from service.grpc_codec import set_parameters

        req = pb.ModelInferRequest(model_name=model, model_version=version)
        req.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(prompt.encode())
        set_parameters(req.parameters, params)
        try:
            for reply in self.stub.ModelStreamInfer(iter([req]), timeout=self.timeout, metadata=self.meta):
                if reply.error_message:
                    raise RequestFailed(reply.error_message)
                r = reply.infer_response
                for t, raw in zip(r.outputs, r.raw_output_contents, strict=True):
                    yield _decode(t.datatype, list(t.shape), raw, t.name)[0].decode("utf-8", "replace")
                if r.parameters["triton_final_response"].bool_param:
                    return
        except self.grpc.RpcError as exc:
            raise RequestFailed(f"{exc.code().name}: {exc.details()}") from None

    def close(self) -> None:
        self.channel.close()


class HttpTransport(Transport):
    def __init__(self, url: str, token: str = "", tls_ca: str = "", timeout: float = 30.0) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme == "https":
            ctx = ssl.create_default_context(cafile=tls_ca or None)
            self.conn: http.client.HTTPConnection = http.client.HTTPSConnection(u.hostname, u.port or 443,
                                                                                timeout=timeout, context=ctx)
        else:
            self.conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
                ) -> tuple[int, dict, bytes]:
        try:
            self.conn.request(method, path, body=body, headers={**self.headers, **(headers or {})})
            r = self.conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        except OSError as exc:
            raise RequestFailed(f"UNAVAILABLE: {exc}") from None

    def _json(self, method: str, path: str, doc=None) -> dict:
        status, _, body = self.request(method, path, json.dumps(doc).encode() if doc is not None else None,
                                       {"Content-Type": "application/json"})
        if status != 200:
            raise RequestFailed(f"HTTP {status}: {_error(body)}")
        return json.loads(body) if body else {}

    def metadata(self, model: str, version: str = "") -> dict:
        return self._json("GET", _model_path(model, version))

    def infer(self, model, version, feeds, metadata, classification=None):
        inputs, tail = [], []
        for name, datatype, arr, raw in _inputs(model, feeds, metadata):
            inputs.append({"name": name, "datatype": datatype, "shape": list(arr.shape),
                           "parameters": {"binary_data_size": len(raw)}})
            tail.append(raw)
        doc: dict = {"inputs": inputs, "parameters": {"binary_data_output": True}}
        if classification:
            doc["outputs"] = [{"name": n, "parameters": {"classification": k, "binary_data": True}}
                              for n, k in classification.items()]
        head = json.dumps(doc).encode()
        status, headers, body = self.request("POST", _model_path(model, version) + "/infer", b"".join([head, *tail]),
                                             {"Inference-Header-Content-Length": str(len(head)),
                                              "Content-Type": "application/octet-stream"})
        if status != 200:
            raise RequestFailed(f"HTTP {status}: {_error(body)}")
        n = int(headers.get("inference-header-content-length", len(body)))
        reply = json.loads(body[:n])
        view, pos, out = memoryview(body)[n:], 0, {}
        for o in reply["outputs"]:
            if "data" in o:
                out[o["name"]] = np.array(o["data"]).reshape(o["shape"])
                continue
            size = o["parameters"]["binary_data_size"]
            out[o["name"]] = _decode(o["datatype"], o["shape"], view[pos:pos + size], o["name"])
            pos += size
        return reply.get("model_version", ""), out

    def health(self, service: str = "") -> tuple[str, bool]:
        path = {"": "/v2/health/ready", "liveness": "/v2/health/live"}.get(service) or \
            _model_path(service, "") + "/ready"
        status, _, body = self.request("GET", path)
        if status in (401, 404, 500, 503):
            raise RequestFailed(f"HTTP {status}: {_error(body)}")
        return ("SERVING" if status == 200 else "NOT_SERVING"), status == 200

    def generate(self, model, version, prompt, params):
        body = json.dumps({"text_input": prompt, "parameters": params}).encode()
        try:
            self.conn.request("POST", _model_path(model, version) + "/generate_stream", body=body,
                              headers={**self.headers, "Content-Type": "application/json"})
            r = self.conn.getresponse()
            if r.status != 200:
                raise RequestFailed(f"HTTP {r.status}: {_error(r.read())}")
            for line in r:
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RequestFailed(event["error"])
                    yield event["text_output"]
        except OSError as exc:
            raise RequestFailed(f"UNAVAILABLE: {exc}") from None

    def close(self) -> None:
        self.conn.close()


def _model_path(model: str, version: str) -> str:
    m = urllib.parse.quote(model, safe="")
    return f"/v2/models/{m}" + (f"/versions/{urllib.parse.quote(version, safe='')}" if version else "")


def _error(body: bytes) -> str:
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")
