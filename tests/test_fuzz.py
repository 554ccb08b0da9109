"""Whatever bytes arrive: structured random requests (hypothesis) and byte-level mutations of valid ones on the
wire, each both as unary ModelInfer calls and as messages on one ModelStreamInfer stream, against stateless,
stateful (sequence) and raw-text models. Every reply is a defined status (on the stream: a defined status in
error_message, and the stream goes on), the server neither crashes nor hangs, its memory stays flat, and valid
requests are still answered correctly afterwards. `make fuzz` runs many more (FUZZ_EXAMPLES, FUZZ_MUTATIONS); the
stream takes STREAM_SHARE of each."""

from __future__ import annotations

import os
import queue
import random
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import build_repository
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import SEQUENCE_CONFIG, Server, outputs, request, rnn_cell_model, save, seq_model
from test_sequences import reference
from test_text import TEXT_CONFIG

from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "5000"))
MUTATIONS = int(os.environ.get("FUZZ_MUTATIONS", "5000"))
STREAM_SHARE = 0.4
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
STREAM_ALLOWED = {c.name for c in ALLOWED if c != grpc.StatusCode.OK}  # prefixes of a stream reply's error_message
WIRE = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64",
        "BYTES", "BF16", "", "fp32", "STRING"]
NAMES = ["x", "y", "tokens", "in_FP32", "in_BYTES", "in_INT8", "in_BOOL", "in_FP16", "x_t", "h_in", "text", "z", ""]
MODELS = ["add_sub", "identity", "seq", "nobatch", "broken", "cell", "bytesum", "nope", ""]
SEQUENCE_KEYS = ["sequence_id", "sequence_start", "sequence_end"]
dims = st.one_of(st.integers(-3, 9), st.sampled_from([2**31, 2**40, 2**63 - 1, -(2**63)]))
param = st.one_of(st.builds(pb.InferParameter, bool_param=st.booleans()),
                  st.builds(pb.InferParameter, int64_param=st.integers(-(2**63), 2**63 - 1)),
                  st.builds(pb.InferParameter, string_param=st.text(max_size=8)),
                  st.builds(pb.InferParameter, double_param=st.floats(allow_nan=True)),
                  st.builds(pb.InferParameter, uint64_param=st.integers(0, 2**64 - 1)))


@st.composite
def infer_requests(draw):
    req = pb.ModelInferRequest(model_name=draw(st.sampled_from(MODELS)),
                               model_version=draw(st.sampled_from(["", "", "1", "2", "0", "-1", "x", "99999999999"])),
                               id=draw(st.text(max_size=4)))
    for key in draw(st.lists(st.sampled_from(["timeout", "priority", "x", *SEQUENCE_KEYS]), max_size=3)):
        req.parameters[key].CopyFrom(draw(param))
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        t = req.inputs.add(name=draw(st.sampled_from(NAMES)), datatype=draw(st.sampled_from(WIRE)),
                           shape=draw(st.lists(dims, max_size=4)))
        if raw and t.datatype == "BYTES" and draw(st.booleans()):
            req.raw_input_contents.append(framed(draw(st.lists(st.binary(max_size=12), max_size=4))))
        elif raw:
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


def framed(items: list[bytes]) -> bytes:
    """BYTES raw layout: each element a 4-byte little-endian length, then its bytes."""
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


@st.composite
def sequence_steps(draw):
    """Well-formed steps of the stateful model with random sequence control: starts, ends, unknown and reused
    ids, string ids, the live-sequence cap."""
    req = request("cell", x_t=np.array([[draw(st.floats(-2, 2, width=32))]], np.float32))
    sid = draw(st.one_of(st.builds(pb.InferParameter, uint64_param=st.integers(0, 6)),
                         st.builds(pb.InferParameter, string_param=st.sampled_from(["", "a", "b"])),
                         st.builds(pb.InferParameter, int64_param=st.integers(-2, 6))))
    req.parameters["sequence_id"].CopyFrom(sid)
    for key in ("sequence_start", "sequence_end"):
        if draw(st.booleans()):
            req.parameters[key].bool_param = draw(st.booleans())
    return req


@st.composite
def text_requests(draw):
    """Raw text for the text model: valid and invalid UTF-8, empty and over-long strings, odd shapes."""
    texts = draw(st.lists(st.one_of(st.text(max_size=10).map(str.encode), st.binary(max_size=10)), min_size=1,
                          max_size=4))
    shape = draw(st.sampled_from([[len(texts)], [len(texts), 1], [1, len(texts)], [], [len(texts), 1, 1]]))
    req = pb.ModelInferRequest(model_name="bytesum")
    req.inputs.add(name="text", datatype="BYTES", shape=shape)
    req.raw_input_contents.append(framed(texts))
    return req


fuzz_requests = st.one_of(infer_requests(), sequence_steps(), text_requests())


def valid_requests() -> list[pb.ModelInferRequest]:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    reqs = [request("add_sub", x=x, y=x), request("seq", tokens=np.ones((2, 3), np.int64)),
            request("identity", **{f"in_{t}": np.ones((1, 2), dt) for t, dt in (
                ("FP32", np.float32), ("INT8", np.int8), ("BOOL", np.bool_), ("FP16", np.float16))},
                    in_BYTES=np.array([[b"ab", b"c"]], dtype=object)),
            request("bytesum", text=np.array([b"ab", "\u00e9".encode()], dtype=object))]
    start = request("cell", x_t=np.array([[0.5]], np.float32))
    start.parameters["sequence_id"].uint64_param = 3
    start.parameters["sequence_start"].bool_param = True
    return [*reqs, start]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    """The shared test models plus a stateful one (16 live sequences, freed after 0.4 s idle) and a text one."""
    repo = build_repository(tmp_path_factory.mktemp("fuzz") / "models")
    cell, weights = rnn_cell_model()
    # no batch delay: a valid step would wait for partners that a one-at-a-time fuzzer never sends
    save(cell, repo, "cell", config=SEQUENCE_CONFIG.replace("max_queue_delay_microseconds: 2000",
                                                            "max_queue_delay_microseconds: 0") % (400_000, 16))
    save(seq_model(), repo, "bytesum", config=TEXT_CONFIG % "error")
    s = Server(repo, "--no-strict-readiness")
    s.weights = weights
    yield s
    s.stop()


class Stream:
    """One ModelStreamInfer call kept open: send a message, wait (bounded) for its reply."""

    def __init__(self, channel: grpc.Channel, raw: bool = False) -> None:
        self.requests: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()
        serialize = (lambda b: b) if raw else pb.ModelInferRequest.SerializeToString
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=serialize,
                                     response_deserializer=pb.ModelStreamInferResponse.FromString)
        self.call = call(iter(self.requests.get, None), timeout=900)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for reply in self.call:
                self.replies.put(reply)
            self.replies.put(RuntimeError("the stream ended"))
        except grpc.RpcError as exc:
            self.replies.put(exc)

    def send(self, message) -> pb.ModelStreamInferResponse:
        self.requests.put(message)
        reply = self.replies.get(timeout=30)  # a hang fails here
        if isinstance(reply, BaseException):
            raise AssertionError(f"the stream broke: {reply}")
        return reply

    def close(self) -> None:
        self.requests.put(None)


def _check_stream_reply(reply: pb.ModelStreamInferResponse, what) -> str:
    if not reply.error_message:
        return "OK"
    code = reply.error_message.split(":", 1)[0]
    assert code in STREAM_ALLOWED, f"{reply.error_message}\n{what!r}"
    return code


def _rss_flat(rss: list[int]) -> None:
    assert rss[1] <= rss[0] * 1.15 + 8192, rss  # memory flat after warming up (KiB)


def _fuzz(n: int, send, pid: int) -> dict[str, int]:
    """Run n hypothesis examples through `send` (request -> status name); RSS checked from a quarter on."""
    seen: dict[str, int] = {}
    rss: list[int] = []

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(fuzz_requests)
    def one(req):
        code = send(req)
        seen[code] = seen.get(code, 0) + 1
        if sum(seen.values()) in (max(n // 4, 1), n):
            rss.append(rss_kib(pid))

    one()
    assert sum(seen.values()) == n and seen.get("INVALID_ARGUMENT", 0) > n // 4 and seen.get("OK", 0), seen
    _rss_flat(rss)
    return seen


def _successes(stub) -> dict[str, int]:
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest()).model_stats
    return {m.name: m.inference_stats.success.count for m in stats}


def test_structured_fuzz(fuzz_server):
    channel = fuzz_server.channel()
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    before = _successes(stub)

    def send(req) -> str:
        try:
            stub.ModelInfer(req, timeout=10)
            return "OK"
        except grpc.RpcError as exc:
            assert exc.code() in ALLOWED, f"{exc.code().name}: {exc.details()}\n{req}"
            return exc.code().name

    _fuzz(EXAMPLES - int(EXAMPLES * STREAM_SHARE), send, fuzz_server.proc.pid)
    after = _successes(stub)
    assert all(after[m] > before.get(m, 0) for m in ("cell", "bytesum")), after  # really reached
    _still_correct(stub, fuzz_server)
    channel.close()


def test_structured_fuzz_over_a_stream(fuzz_server):
    channel = fuzz_server.channel()
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    before = _successes(stub)
    stream = Stream(channel)

    def send(req) -> str:
        return _check_stream_reply(stream.send(req), req)

    _fuzz(int(EXAMPLES * STREAM_SHARE), send, fuzz_server.proc.pid)
    stream.close()
    after = _successes(stub)
    assert all(after[m] > before.get(m, 0) for m in ("cell", "bytesum")), after
    _still_correct(stub, fuzz_server)
    channel.close()


def _mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
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
    return bytes(data)


def test_mutated_bytes_on_the_wire(fuzz_server):
    channel = fuzz_server.channel()
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    stream = Stream(channel, raw=True)
    rng = random.Random(1234)
    seeds = [r.SerializeToString() for r in valid_requests()]
    on_stream = int(MUTATIONS * STREAM_SHARE)
    for half, n in (("unary", MUTATIONS - on_stream), ("stream", on_stream)):
        rss = []
        for i in range(n):
            data = _mutate(rng, seeds)
            if half == "stream":
                _check_stream_reply(stream.send(data), data)
            else:
                try:
                    call(data, timeout=10)
                except grpc.RpcError as exc:
                    assert exc.code() in ALLOWED, f"{exc.code().name}: {exc.details()} for {data!r}"
            if i in (n // 4, n - 1):
                rss.append(rss_kib(fuzz_server.proc.pid))
        _rss_flat(rss)
    stream.close()
    _still_correct(inference_pb2_grpc.GRPCInferenceServiceStub(channel), fuzz_server)
    channel.close()
    assert fuzz_server.proc.poll() is None


def _still_correct(stub, server):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(outputs(stub.ModelInfer(request("add_sub", x=x, y=x), timeout=10))["sum"], 2 * x)
    text = outputs(stub.ModelInfer(request("bytesum", text=np.array([b"ab"], dtype=object)), timeout=10))
    assert text["total"][0, 0] == (ord("a") + 1) + (ord("b") + 1)
    xs = [0.5, -1.0, 0.25]
    for i, x_t in enumerate(xs):  # a fresh sequence id (fuzzing used 1..6 and a, b)
        step = request("cell", x_t=np.array([[x_t]], np.float32))
        step.parameters["sequence_id"].string_param = "still-correct"
        step.parameters["sequence_start"].bool_param = i == 0
        step.parameters["sequence_end"].bool_param = i == len(xs) - 1
        y = outputs(stub.ModelInfer(step, timeout=10))["y"][0]
    np.testing.assert_allclose(y, reference(np.array(xs, np.float32), server.weights), atol=1e-5)
