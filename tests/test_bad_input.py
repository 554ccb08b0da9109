"""Each bad request gets the right status and a message that names what was wrong, fast, and the server keeps
serving afterwards."""

from __future__ import annotations

import struct
import time

import grpc
import numpy as np
import pytest
from support import outputs, request

from service._proto import inference_pb2 as pb

X = np.ones((2, 4), np.float32)


def _good():
    return request("add_sub", x=X, y=X)


def _mutate(fn):
    req = _good()
    fn(req)
    return req


def _set_shape(req, shape):
    del req.inputs[0].shape[:]
    req.inputs[0].shape.extend(shape)


def _bytes_req(payload: bytes, shape=(1, 1)):
    req = pb.ModelInferRequest(model_name="identity")
    req.inputs.add(name="in_BYTES", datatype="BYTES", shape=shape)
    req.raw_input_contents.append(payload)
    return req


CASES = {
    "unknown model": (lambda: request("nope", x=X), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    "unknown version": (lambda: request("add_sub", "7", x=X, y=X), grpc.StatusCode.NOT_FOUND, "no version 7"),
    "non-integer version": (lambda: request("add_sub", "v1", x=X, y=X), grpc.StatusCode.INVALID_ARGUMENT,
                            "not an integer"),
    "missing input": (lambda: request("add_sub", x=X), grpc.StatusCode.INVALID_ARGUMENT, "missing input ['y']"),
    "unknown input": (lambda: request("add_sub", x=X, y=X, z=X), grpc.StatusCode.INVALID_ARGUMENT,
                      "unknown input 'z'"),
    "wrong datatype": (lambda: request("add_sub", x=X.astype(np.float64), y=X), grpc.StatusCode.INVALID_ARGUMENT,
                       "expected datatype FP32, got FP64"),
    "wrong rank": (lambda: request("add_sub", x=X.reshape(2, 2, 2), y=X), grpc.StatusCode.INVALID_ARGUMENT,
                   "expected rank 2"),
    "wrong non-batch dim": (lambda: request("add_sub", x=np.ones((2, 5), np.float32), y=X),
                            grpc.StatusCode.INVALID_ARGUMENT, "expected shape [-1,4], got [2,5]"),
    "negative dim": (lambda: _mutate(lambda r: _set_shape(r, [-2, 4])), grpc.StatusCode.INVALID_ARGUMENT,
                     "negative dimension"),
    "raw size mismatch": (lambda: _mutate(lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12)),
                          grpc.StatusCode.INVALID_ARGUMENT, "needs 32 bytes of raw contents, got 12"),
    "raw and typed both": (lambda: _mutate(lambda r: r.inputs[0].contents.fp32_contents.extend([1.0] * 8)),
                           grpc.StatusCode.INVALID_ARGUMENT, "both raw_input_contents and typed contents"),
    "2^40 elements, small body": (lambda: _mutate(lambda r: _set_shape(r, [1, 2**40])),
                                  grpc.StatusCode.INVALID_ARGUMENT, "expected shape [-1,4]"),
    "2^40 elements on a dynamic dim": (lambda: _bytes_req(b"\0" * 8, shape=(1, 2**40)),
                                       grpc.StatusCode.INVALID_ARGUMENT, "over the server's limit of 67108864"),
    "2^40 FP32 elements declared": (lambda: _mutate_identity_fp32(2**40), grpc.StatusCode.INVALID_ARGUMENT,
                                    "1099511627776 elements, over the server's limit"),
    "BYTES shape larger than body": (lambda: _bytes_req(b"\0" * 8, shape=(1, 2**20)),
                                     grpc.StatusCode.INVALID_ARGUMENT, "needs at least 4194304 bytes"),
    "raw FP32 shape larger than body": (lambda: _mutate_identity_fp32(2**20), grpc.StatusCode.INVALID_ARGUMENT,
                                        "needs 4194304 bytes of raw contents, got 16"),
    "batch over max_batch_size": (lambda: request("add_sub", x=np.ones((9, 4), np.float32),
                                                  y=np.ones((9, 4), np.float32)),
                                  grpc.StatusCode.INVALID_ARGUMENT, "exceeds the model's max_batch_size 8"),
    "inputs disagree on batch": (lambda: request("add_sub", x=np.ones((3, 4), np.float32), y=X),
                                 grpc.StatusCode.INVALID_ARGUMENT, "disagree on the batch size"),
    "malformed BYTES length": (lambda: _bytes_req(struct.pack("<I", 100) + b"abc"),
                               grpc.StatusCode.INVALID_ARGUMENT, "declares 100 bytes"),
    "BYTES trailing garbage": (lambda: _bytes_req(struct.pack("<I", 1) + b"a" + b"zz"),
                               grpc.StatusCode.INVALID_ARGUMENT, "left over"),
    "BYTES not UTF-8": (lambda: _bytes_req(struct.pack("<I", 2) + b"\xff\xfe"), grpc.StatusCode.INVALID_ARGUMENT,
                        "not valid UTF-8"),
    "empty request": (lambda: pb.ModelInferRequest(model_name="add_sub"), grpc.StatusCode.INVALID_ARGUMENT,
                      "has no inputs"),
    "raw count mismatch": (lambda: _mutate(lambda r: r.raw_input_contents.append(b"")),
                           grpc.StatusCode.INVALID_ARGUMENT, "3 raw_input_contents for 2 inputs"),
    "duplicate input": (lambda: _mutate(lambda r: (r.inputs.add().CopyFrom(r.inputs[0]),
                                                   r.raw_input_contents.append(r.raw_input_contents[0]))),
                        grpc.StatusCode.INVALID_ARGUMENT, "appears twice"),
    "unknown output": (lambda: _mutate(lambda r: r.outputs.add(name="nope")), grpc.StatusCode.INVALID_ARGUMENT,
                       "unknown output 'nope'"),
    "typed count mismatch": (lambda: _typed_short(), grpc.StatusCode.INVALID_ARGUMENT, "needs 8 values"),
    "model not ready": (lambda: request("broken", x=X), grpc.StatusCode.UNAVAILABLE, "not ready"),
    "batch size 0": (lambda: request("add_sub", x=np.ones((0, 4), np.float32), y=np.ones((0, 4), np.float32)),
                     grpc.StatusCode.INVALID_ARGUMENT, "batch size 0"),
    "bad timeout parameter": (lambda: _mutate(lambda r: r.parameters["timeout"].__setattr__("int64_param", -5)),
                              grpc.StatusCode.INVALID_ARGUMENT, "timeout must be >= 0"),
}


def _mutate_identity_fp32(n):
    req = pb.ModelInferRequest(model_name="identity")
    req.inputs.add(name="in_FP32", datatype="FP32", shape=[1, n])
    req.raw_input_contents.append(b"\0" * 16)
    return req


def _typed_short():
    req = request("add_sub", raw=False, x=X, y=X)
    del req.inputs[0].contents.fp32_contents[-1]
    return req


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_request_gets_the_right_status(stub, case):
    make, code, words = CASES[case]
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(make(), timeout=10)
    assert err.value.code() == code, err.value.details()
    assert words in err.value.details()
    assert time.perf_counter() - t0 < 2.0  # nothing allocated, nothing run
    # ...and the server still answers a good request correctly.
    np.testing.assert_array_equal(outputs(stub.ModelInfer(_good()))["sum"], 2 * X)


def test_unknown_model_in_other_rpcs(stub):
    for call, req in ((stub.ModelMetadata, pb.ModelMetadataRequest(name="nope")),
                      (stub.ModelConfig, pb.ModelConfigRequest(name="nope")),
                      (stub.ModelStatistics, pb.ModelStatisticsRequest(name="nope"))):
        with pytest.raises(grpc.RpcError) as err:
            call(req)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_unimplemented_triton_rpcs_answer_unimplemented(server):
    with server.channel() as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/SystemSharedMemoryStatus",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            call(b"")
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_garbage_bytes_on_the_wire(server):
    """Not a protobuf at all: INVALID_ARGUMENT, and the server lives on."""
    with server.channel() as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xff\xff\xff garbage")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid ModelInferRequest" in err.value.details()
        from service._proto import inference_pb2_grpc

        assert inference_pb2_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest()).live
