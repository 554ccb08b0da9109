"""Whatever bytes arrive: structured random requests (hypothesis) and byte-level mutations of valid ones on the
wire. Every reply is a defined status, the server neither crashes nor hangs, its memory stays flat, and a valid
request is still answered correctly afterwards. `make fuzz` runs many more (FUZZ_EXAMPLES)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Server, outputs, request

from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "5000"))
MUTATIONS = int(os.environ.get("FUZZ_MUTATIONS", "5000"))
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
WIRE = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64",
        "BYTES", "BF16", "", "fp32", "STRING"]
NAMES = ["x", "y", "tokens", "in_FP32", "in_BYTES", "in_INT8", "in_BOOL", "in_FP16", "z", ""]
dims = st.one_of(st.integers(-3, 9), st.sampled_from([2**31, 2**40, 2**63 - 1, -(2**63)]))
param = st.one_of(st.builds(pb.InferParameter, bool_param=st.booleans()),
                  st.builds(pb.InferParameter, int64_param=st.integers(-(2**63), 2**63 - 1)),
                  st.builds(pb.InferParameter, string_param=st.text(max_size=8)),
                  st.builds(pb.InferParameter, double_param=st.floats(allow_nan=True)),
                  st.builds(pb.InferParameter, uint64_param=st.integers(0, 2**64 - 1)))


@st.composite
def infer_requests(draw):
    req = pb.ModelInferRequest(model_name=draw(st.sampled_from(["add_sub", "identity", "seq", "nobatch", "broken",
                                                                 "nope", ""])),
                               model_version=draw(st.sampled_from(["", "", "1", "2", "0", "-1", "x", "99999999999"])),
                               id=draw(st.text(max_size=4)))
    for key in draw(st.lists(st.sampled_from(["timeout", "sequence_id", "priority", "x"]), max_size=2)):
        req.parameters[key].CopyFrom(draw(param))
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        t = req.inputs.add(name=draw(st.sampled_from(NAMES)), datatype=draw(st.sampled_from(WIRE)),
                           shape=draw(st.lists(dims, max_size=4)))
        if raw:
            req.raw_input_contents.append(draw(st.binary(max_size=64)))
        elif draw(st.booleans()):
            kind = draw(st.sampled_from(["fp32_contents", "int_contents", "bytes_contents", "bool_contents",
                                         "int64_contents", "uint64_contents"]))
            values = {"fp32_contents": st.floats(width=32), "int_contents": st.integers(-(2**31), 2**31 - 1),
                      "bytes_contents": st.binary(max_size=8), "bool_contents": st.booleans(),
                      "int64_contents": st.integers(-(2**63), 2**63 - 1),
                      "uint64_contents": st.integers(0, 2**64 - 1)}[kind]
            getattr(t.contents, kind).extend(draw(st.lists(values, max_size=10)))
        if draw(st.integers(0, 9)) == 0:
            t.parameters["binary_data_size"].CopyFrom(draw(param))
    if draw(st.booleans()):
        req.raw_input_contents.append(draw(st.binary(max_size=16)))  # sometimes a stray extra entry
    for _ in range(draw(st.integers(0, 2))):
        o = req.outputs.add(name=draw(st.sampled_from(["sum", "diff", "total", "out_FP32", "nope"])))
        if draw(st.booleans()):
            o.parameters["classification"].CopyFrom(draw(param))
    return req


def valid_requests() -> list[pb.ModelInferRequest]:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    reqs = [request("add_sub", x=x, y=x), request("seq", tokens=np.ones((2, 3), np.int64)),
            request("identity", **{f"in_{t}": np.ones((1, 2), dt) for t, dt in (
                ("FP32", np.float32), ("INT8", np.int8), ("BOOL", np.bool_), ("FP16", np.float16))},
                    in_BYTES=np.array([[b"ab", b"c"]], dtype=object))]
    return reqs


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def fuzz_server(repository):
    s = Server(repository, "--no-strict-readiness")
    yield s
    s.stop()


def test_structured_fuzz(fuzz_server):
    channel = fuzz_server.channel()
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    seen: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(infer_requests())
    def one(req):
        try:
            stub.ModelInfer(req, timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert code in ALLOWED, f"{code.name}: {exc.details()}\n{req}"
        seen[code.name] = seen.get(code.name, 0) + 1

    one()
    assert sum(seen.values()) == EXAMPLES and seen.get("INVALID_ARGUMENT", 0) > EXAMPLES // 4, seen
    _still_correct(stub)
    channel.close()


def test_mutated_bytes_on_the_wire(fuzz_server):
    channel = fuzz_server.channel()
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    rng = random.Random(1234)
    seeds = [r.SerializeToString() for r in valid_requests()]
    rss = []
    for i in range(MUTATIONS):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            if not data:
                break
            op, pos = rng.random(), rng.randrange(len(data))
            if op < 0.5:
                data[pos] = rng.randrange(256)
            elif op < 0.7:
                del data[pos:pos + rng.randint(1, 8)]
            elif op < 0.9:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            else:
                data = data[:pos]
        try:
            call(bytes(data), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() in ALLOWED, f"{exc.code().name}: {exc.details()} for {bytes(data)!r}"
        if i in (MUTATIONS // 4, MUTATIONS - 1):
            rss.append(rss_kib(fuzz_server.proc.pid))
    assert rss[1] <= rss[0] * 1.15 + 8192, rss  # memory flat after warming up
    _still_correct(inference_pb2_grpc.GRPCInferenceServiceStub(channel))
    channel.close()
    assert fuzz_server.proc.poll() is None


def _still_correct(stub):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(outputs(stub.ModelInfer(request("add_sub", x=x, y=x), timeout=10))["sum"], 2 * x)
