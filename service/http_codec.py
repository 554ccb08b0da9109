"""Triton's HTTP/REST inference body <-> the neutral types: JSON tensors and the binary tensor data extension.

A request body is a JSON header, optionally followed by binary tensor data: `Inference-Header-Content-Length`
gives the JSON's length, and each input with `parameters.binary_data_size` takes the next that many bytes of the
tail, in input order. The tail is sliced as memoryviews (no copy), and every length is checked against the body
before anything is sliced: the tail must be used exactly. A reply puts each output whose `binary_data` is set
(per output, or `binary_data_output` for all) after its JSON header the same way; the others travel as JSON
`data`. BYTES travel as strings in JSON and 4-byte-length-prefixed in binary, as over gRPC."""

from __future__ import annotations

from collections.abc import Callable

import orjson

from service.errors import InvalidArgument
from service.protocol import REGION, InferRequest, InferResponse, InputTensor, RequestedOutput
from service.tensors import BY_WIRE, to_raw

HEADER_LENGTH = "inference-header-content-length"


def loads(body: bytes | memoryview, what: str) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"{what}: the body is not valid JSON: {exc}") from None


def _object(value, what: str) -> dict:
    if type(value) is not dict:
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


_SCALARS = (bool, int, float, str)


def _parameters(value, what: Callable[[], str]) -> dict:
    """A parameters object of scalars. `what` names it, called only for an error message (this runs per
    tensor: formatting the name every time cost more than the checks)."""
    if value is None:
        return {}
    if type(value) is not dict:
        _object(value, f"{what()} parameters")
    for k, v in value.items():
        if not isinstance(v, _SCALARS):
            raise InvalidArgument(f"{what()} parameter {k!r} must be a bool, number or string, got "
                                  f"{type(v).__name__}")
    return value


def _is_shape(shape) -> bool:
    """A list of JSON integers: exactly int (true and false are bool)."""
    return type(shape) is list and all(type(d) is int for d in shape)


def to_request(model: str, version: str, body: bytes | memoryview, header_length: str | None) -> InferRequest:
    """Parse an infer body; raises InvalidArgument with what was wrong, before anything large is allocated."""
    view = memoryview(body)
    if header_length is None:
        head, tail = view, view[len(view):]
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidArgument(f"model {model!r}: Inference-Header-Content-Length {header_length!r} is not an "
                                  "integer") from None
        if not 0 <= n <= len(view):
            raise InvalidArgument(f"model {model!r}: Inference-Header-Content-Length {n} is outside the body of "
                                  f"{len(view)} bytes")
        head, tail = view[:n], view[n:]
    doc = loads(head, f"model {model!r}")
    if type(doc) is not dict:
        _object(doc, f"model {model!r}: the request")
    params = _parameters(doc.get("parameters"), lambda: f"model {model!r}: request")
    binary_default = params.pop("binary_data_output", False) is True
    inputs_json = doc.get("inputs")
    if type(inputs_json) is not list:
        raise InvalidArgument(f"model {model!r}: the request needs an 'inputs' list")
    pos = 0
    inputs = []
    shm = False  # an input or output names a shared memory region
    for i, t in enumerate(inputs_json):
        if type(t) is not dict:
            _object(t, f"model {model!r}: inputs[{i}]")
        name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
        if type(name) is not str or type(datatype) is not str or not _is_shape(shape):
            raise InvalidArgument(f"model {model!r}: inputs[{i}] needs 'name' (string), 'datatype' (string) and "
                                  "'shape' (list of integers)")
        tensor = InputTensor(name, datatype, tuple(shape))
        tparams = _parameters(t.get("parameters"), lambda name=name: f"model {model!r} input {name!r}")
        size = tparams.pop("binary_data_size", None)
        if size is not None:
            if type(size) is not int or size < 0:
                raise InvalidArgument(f"model {model!r} input {name!r}: binary_data_size must be a non-negative "
                                      "integer")
            if "data" in t:
                raise InvalidArgument(f"model {model!r} input {name!r}: both binary_data_size and data are set; use "
                                      "one")
            if pos + size > len(tail):
                raise InvalidArgument(f"model {model!r} input {name!r}: binary_data_size {size} goes past the binary "
                                      f"data ({len(tail) - pos} bytes left of {len(tail)})")
            tensor.raw = tail[pos:pos + size]
            pos += size
        elif "data" in t:
            data = t["data"]
            tensor.values = data if type(data) is list else [data]
        elif any(d != 0 for d in shape) and REGION not in tparams:
            raise InvalidArgument(f"model {model!r} input {name!r}: no data (neither 'data' nor "
                                  "parameters.binary_data_size)")
        if tparams:
            tensor.parameters = tparams
            shm = shm or REGION in tparams
        inputs.append(tensor)
    if pos != len(tail):
        raise InvalidArgument(f"model {model!r}: {len(tail) - pos} bytes of binary data follow the inputs' "
                              f"binary_data_size total of {pos}; the body must hold exactly what the inputs declare")
    outputs = []
    outputs_json = doc.get("outputs") or []
    if type(outputs_json) is not list:
        raise InvalidArgument(f"model {model!r}: 'outputs' must be a list")
    for i, o in enumerate(outputs_json):
        if type(o) is not dict:
            _object(o, f"model {model!r}: outputs[{i}]")
        name = o.get("name")
        if type(name) is not str:
            raise InvalidArgument(f"model {model!r}: outputs[{i}] needs a 'name' string")
        oparams = _parameters(o.get("parameters"), lambda name=name: f"model {model!r} output {name!r}")
        binary = oparams.pop("binary_data", binary_default)
        shm = shm or REGION in oparams
        outputs.append(RequestedOutput(name, oparams.get("classification", 0), binary is True, oparams))
    rid = doc.get("id", "")
    if type(rid) is not str:
        raise InvalidArgument(f"model {model!r}: 'id' must be a string")
    request = InferRequest(model, version, rid, inputs, outputs, params, binary_default)
    request.shared_memory = shm
    return request


def _json_data(arr, datatype: str) -> list:
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.reshape(-1)]
    return arr.reshape(-1).tolist()


HEADS_KEPT = 512
_heads: dict[tuple, bytes] = {}  # (model, version, outputs' names, datatypes, shapes, sizes) -> JSON header, no id


def from_response(response: InferResponse) -> tuple[bytes, int | None]:
    """The reply body and, when binary outputs follow the JSON, the JSON's length (for the header).

    A reply of binary outputs only has a JSON header that differs between replies of one model, version and output
    shapes only by its id: it is serialized once and kept, and the id (JSON-encoded) is put in per reply."""
    outs = response.outputs
    if not response.parameters and all(o.binary and not o.parameters for o in outs):
        raws = [to_raw(o.data, BY_WIRE[o.datatype]) for o in outs]
        key = (response.model, response.version,
               tuple([(o.name, o.datatype, o.shape, len(r)) for o, r in zip(outs, raws, strict=True)]))
        head = _heads.get(key)
        if head is None:
            if len(_heads) >= HEADS_KEPT:
                _heads.clear()
            head = _heads[key] = orjson.dumps({
                "model_name": response.model, "model_version": response.version,
                "outputs": [{"name": o.name, "datatype": o.datatype, "shape": list(o.shape),
                             "parameters": {"binary_data_size": len(r)}} for o, r in zip(outs, raws, strict=True)]})
        if response.id:
            head = b"".join([head[:-1], b',"id":', orjson.dumps(response.id), b"}"])
        if not raws:
            return head, None
        return b"".join([head, *raws]), len(head)
    tail = []
    outs = []
    for o in response.outputs:
        entry = {"name": o.name, "datatype": o.datatype, "shape": list(o.shape)}
        # An output written to a shared memory region (it has parameters) is name, datatype and shape only, as
        # Triton answers: tritonclient's C++ client (perf_analyzer's) reads binary_data_size from any parameters.
        if o.parameters:
            outs.append(entry)
            continue
        if o.binary:
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
