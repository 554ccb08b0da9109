"""Triton's gRPC inference messages <-> the neutral types (service.protocol): ModelInferRequest to InferRequest,
InferResponse to ModelInferResponse, and the framed reply that serializes a model's constant head once. The gRPC
twin of http_codec; grpc_api holds the servicer and the transport's rules."""

from __future__ import annotations

from service._proto import inference_pb2 as pb
from service.errors import InvalidArgument
from service.protocol import REGION, InferRequest, InferResponse, InputTensor, RequestedOutput
from service.tensors import BY_WIRE, to_raw


def parameters(params) -> dict:
    """InferParameter map -> plain values; a message with no parameters costs one truth test."""
    return {k: getattr(v, v.WhichOneof("parameter_choice") or "string_param") for k, v in params.items()} \
        if params else {}


def to_request(msg: pb.ModelInferRequest) -> InferRequest:
    """The neutral request. Every protobuf field read costs ~0.5-1 us (upb builds the Python object on first
    access), so each is read once, and the common shape (every input raw, no parameters) reads nothing else."""
    raws = msg.raw_input_contents
    tensors = msg.inputs
    shm = False
    if raws and len(raws) == len(tensors):  # every input raw (tritonclient's and perf_analyzer's way)
        inputs = []
        for t, raw in zip(tensors, raws, strict=True):
            tensor = InputTensor(t.name, t.datatype, tuple(t.shape), raw)
            if t.HasField("contents") and t.contents.ByteSize() > 0:
                raise InvalidArgument(f"model {msg.model_name!r} input {t.name!r}: both raw_input_contents and "
                                      "typed contents are set; use one")
            params = t.parameters
            if params:
                tensor.parameters = parameters(params)
                shm = shm or REGION in params
            inputs.append(tensor)
        if shm:  # a raw entry for an input in shared memory too: the general path says what is wrong
            return _to_request(msg)
    else:
        return _to_request(msg)
    outputs = []
    for o in msg.outputs:
        p = parameters(o.parameters)
        shm = shm or REGION in p
        outputs.append(RequestedOutput(o.name, p.get("classification", 0), True, p))
    request = InferRequest(msg.model_name, msg.model_version, msg.id, inputs, outputs, parameters(msg.parameters))
    request.shared_memory = shm
    return request


def _to_request(msg: pb.ModelInferRequest) -> InferRequest:
    """Any mix of raw, typed, empty and shared memory inputs."""
    raws = msg.raw_input_contents
    where = f"model {msg.model_name!r}"
    # an input in shared memory has no raw entry (tritonclient sends raw ones only for the others, in order)
    in_shm = [REGION in t.parameters for t in msg.inputs]
    if raws and len(raws) != len(msg.inputs) - sum(in_shm):
        raise InvalidArgument(f"{where}: {len(raws)} raw_input_contents for {len(msg.inputs) - sum(in_shm)} inputs "
                              "not in shared memory; send one raw entry per such input, in order")
    inputs = []
    raw_index = 0
    for i, t in enumerate(msg.inputs):
        has_typed = t.HasField("contents") and t.contents.ByteSize() > 0
        tensor = InputTensor(t.name, t.datatype, tuple(t.shape))
        if raws and not in_shm[i]:
            if has_typed:
                raise InvalidArgument(f"{where} input {t.name!r}: both raw_input_contents and typed contents are "
                                      "set; use one")
            tensor.raw = raws[raw_index]
            raw_index += 1
        elif has_typed:
            dt = BY_WIRE.get(t.datatype)
            if dt is not None and dt.typed_field is None:
                raise InvalidArgument(f"{where} input {t.name!r}: {dt.wire} has no typed contents field; send it in "
                                      "raw_input_contents")
            if dt is not None:
                tensor.values = getattr(t.contents, dt.typed_field)
                tensor.values_from = f"contents.{dt.typed_field}"
        elif any(d != 0 for d in t.shape) and not in_shm[i]:
            raise InvalidArgument(f"{where} input {t.name!r}: no contents (neither raw_input_contents nor typed "
                                  "contents)")
        if t.parameters:
            tensor.parameters = parameters(t.parameters)
        inputs.append(tensor)
    outputs = []
    for o in msg.outputs:
        p = parameters(o.parameters)
        outputs.append(RequestedOutput(o.name, p.get("classification", 0), True, p))
    request = InferRequest(msg.model_name, msg.model_version, msg.id, inputs, outputs, parameters(msg.parameters))
    request.shared_memory = any(in_shm) or any(REGION in o.parameters for o in outputs)
    return request


def set_parameters(target, params: dict) -> None:
    """Plain values -> an InferParameter map."""
    for key, value in params.items():
        field = "bool_param" if isinstance(value, bool) else "int64_param" if isinstance(value, int) else \
            "double_param" if isinstance(value, float) else "string_param"
        setattr(target[key], field, value)


def from_response(response: InferResponse) -> pb.ModelInferResponse:
    msg = pb.ModelInferResponse(model_name=response.model, model_version=response.version, id=response.id)
    if response.parameters:
        set_parameters(msg.parameters, response.parameters)
    for out in response.outputs:
        tensor = msg.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        if REGION in out.parameters:
            # written to shared memory: an empty raw entry, as Triton sends, since clients pair outputs[i] with
            # raw_output_contents[i] (perf_analyzer's C++ client reads that entry unchecked and crashes without it)
            set_parameters(tensor.parameters, out.parameters)
            msg.raw_output_contents.append(b"")
            continue
        msg.raw_output_contents.append(to_raw(out.data, BY_WIRE[out.datatype]))
    return msg


FRAMED_MAX_BYTES = 64 * 1024  # replies up to this much tensor data are framed (below); bigger: one copy fewer
FRAMES_KEPT = 512
_frames: dict[tuple, bytes] = {}  # (model, version, outputs' names, datatypes, shapes) -> the serialized head


def encode_response(response: InferResponse) -> bytes | pb.ModelInferResponse:
    """A ModelInfer reply for the wire. Replies of one model, version and output shapes differ only in their id and
    tensor bytes, so the rest is serialized once and kept: the reply is that head followed by a message holding
    only id and raw_output_contents (protobuf parses concatenated messages as one, merged). Building the whole
    message costs twice as much. Replies with parameters (shared memory) or much tensor data take the message."""
    outs = response.outputs
    if response.parameters or any(o.parameters for o in outs):
        return from_response(response)
    raws = [to_raw(o.data, BY_WIRE[o.datatype]) for o in outs]
    if sum(len(r) for r in raws) > FRAMED_MAX_BYTES:
        return from_response(response)
    key = (response.model, response.version, tuple([(o.name, o.datatype, o.shape) for o in outs]))
    head = _frames.get(key)
    if head is None:
        msg = pb.ModelInferResponse(model_name=response.model, model_version=response.version)
        for o in outs:
            msg.outputs.add(name=o.name, datatype=o.datatype, shape=o.shape)
        if len(_frames) >= FRAMES_KEPT:
            _frames.clear()
        head = _frames[key] = msg.SerializeToString()
    return head + pb.ModelInferResponse(id=response.id, raw_output_contents=raws).SerializeToString()


def serialize(reply: bytes | pb.ModelInferResponse) -> bytes:
    return reply if type(reply) is bytes else reply.SerializeToString()
