"""Triton's HTTP/REST inference body <-> the neutral types: JSON tensors and the binary tensor data extension.

A request body is a JSON header, optionally followed by binary tensor data: `Inference-Header-Content-Length`
gives the JSON's length, and each input with `parameters.binary_data_size` takes the next that many bytes of the
tail, in input order. The tail is sliced as memoryviews (no copy), and every length is checked against the body
before anything is sliced: the tail must be used exactly. A reply puts each output whose `binary_data` is set
(per output, or `binary_data_output` for all) after its JSON header the same way; the others travel as JSON
`data`. BYTES travel as strings in JSON and 4-byte-length-prefixed in binary, as over gRPC."""

from __future__ import annotations

import orjson

from service.errors import InvalidArgument
from service.protocol import InferRequest, InferResponse, InputTensor, RequestedOutput
from service.tensors import BY_WIRE, to_raw

HEADER_LENGTH = "inference-header-content-length"


def _where(model: str) -> str:
    return f"model {model!r}"


def loads(body: bytes | memoryview, what: str) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"{what}: the body is not valid JSON: {exc}") from None


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _parameters(value, what: str) -> dict:
    if value is None:
        return {}
    params = _object(value, f"{what} parameters")
    for k, v in params.items():
        if not isinstance(v, bool | int | float | str):
            raise InvalidArgument(f"{what} parameter {k!r} must be a bool, number or string, got "
                                  f"{type(v).__name__}")
    return params


def to_request(model: str, version: str, body: bytes | memoryview, header_length: str | None) -> InferRequest:
    """Parse an infer body; raises InvalidArgument with what was wrong, before anything large is allocated."""
    where = _where(model)
    view = memoryview(body)
    if header_length is None:
        head, tail = view, view[len(view):]
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidArgument(f"{where}: Inference-Header-Content-Length {header_length!r} is not an integer") \
                from None
        if not 0 <= n <= len(view):
            raise InvalidArgument(f"{where}: Inference-Header-Content-Length {n} is outside the body of "
                                  f"{len(view)} bytes")
        head, tail = view[:n], view[n:]
    doc = _object(loads(head, where), f"{where}: the request")
    params = _parameters(doc.get("parameters"), f"{where}: request")
    binary_default = params.pop("binary_data_output", False) is True
    inputs_json = doc.get("inputs")
    if not isinstance(inputs_json, list):
        raise InvalidArgument(f"{where}: the request needs an 'inputs' list")
    pos = 0
    inputs = []
    for i, t in enumerate(inputs_json):
        t = _object(t, f"{where}: inputs[{i}]")
        name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list) or \
                not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidArgument(f"{where}: inputs[{i}] needs 'name' (string), 'datatype' (string) and 'shape' "
                                  "(list of integers)")
        tensor = InputTensor(name, datatype, tuple(shape))
        tparams = _parameters(t.get("parameters"), f"{where} input {name!r}")
        size = tparams.pop("binary_data_size", None)
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidArgument(f"{where} input {name!r}: binary_data_size must be a non-negative integer")
            if "data" in t:
                raise InvalidArgument(f"{where} input {name!r}: both binary_data_size and data are set; use one")
            if pos + size > len(tail):
                raise InvalidArgument(f"{where} input {name!r}: binary_data_size {size} goes past the binary data "
                                      f"({len(tail) - pos} bytes left of {len(tail)})")
            tensor.raw = tail[pos:pos + size]
            pos += size
        elif "data" in t:
            data = t["data"]
            tensor.values = data if isinstance(data, list) else [data]
        elif any(d != 0 for d in shape) and "shared_memory_region" not in tparams:
            raise InvalidArgument(f"{where} input {name!r}: no data (neither 'data' nor "
                                  "parameters.binary_data_size)")
        tensor.parameters = tparams
        inputs.append(tensor)
    if pos != len(tail):
        raise InvalidArgument(f"{where}: {len(tail) - pos} bytes of binary data follow the inputs' binary_data_size "
                              f"total of {pos}; the body must hold exactly what the inputs declare")
    outputs = []
    outputs_json = doc.get("outputs") or []
    if not isinstance(outputs_json, list):
        raise InvalidArgument(f"{where}: 'outputs' must be a list")
    for i, o in enumerate(outputs_json):
        o = _object(o, f"{where}: outputs[{i}]")
        name = o.get("name")
        if not isinstance(name, str):
            raise InvalidArgument(f"{where}: outputs[{i}] needs a 'name' string")
        oparams = _parameters(o.get("parameters"), f"{where} output {name!r}")
        binary = oparams.pop("binary_data", binary_default)
        outputs.append(RequestedOutput(name, oparams.get("classification", 0), binary is True, oparams))
    rid = doc.get("id", "")
    if not isinstance(rid, str):
        raise InvalidArgument(f"{where}: 'id' must be a string")
    return InferRequest(model, version, rid, inputs, outputs, params, binary_default)


def _json_data(arr, datatype: str) -> list:
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.reshape(-1)]
    return arr.reshape(-1).tolist()


def from_response(response: InferResponse) -> tuple[bytes, int | None]:
    """The reply body and, when binary outputs follow the JSON, the JSON's length (for the header)."""
    outs, tail = [], []
    for o in response.outputs:
        entry = {"name": o.name, "datatype": o.datatype, "shape": list(o.shape)}
        if o.parameters:  # written to a shared memory region: its parameters, no data
            entry["parameters"] = dict(o.parameters)
        elif o.binary:
            raw = to_raw(o.data, BY_WIRE[o.datatype])
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = _json_data(o.data, o.datatype)
        outs.append(entry)
    doc = {"model_name": response.model, "model_version": response.version, "outputs": outs}
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    head = orjson.dumps(doc)
    if not tail:
        return head, None
    return b"".join([head, *tail]), len(head)
