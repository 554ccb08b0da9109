"""Stateful sequences (Triton's sequence batcher with implicit state) and streaming, through the real server, our
stubs and tritonclient."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from protocols import connect, raw
from support import SEQUENCE_CONFIG, Server, outputs, request, rnn_cell_model, save

from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc


def reference(seq: np.ndarray, weights) -> np.ndarray:
    w, u, v = weights
    h = np.zeros((1, u.shape[0]), np.float32)
    for x in seq:
        h = np.tanh(np.array([[x]], np.float32) @ w + h @ u)
    return (h @ v)[0]


def step(sid, x, start=False, end=False, model="cell"):
    req = request(model, x_t=np.array([[x]], np.float32))
    req.parameters["sequence_id"].CopyFrom(pb.InferParameter(**({"string_param": sid} if isinstance(sid, str)
                                                                 else {"uint64_param": sid})))
    req.parameters["sequence_start"].bool_param = start
    req.parameters["sequence_end"].bool_param = end
    return req


def run_sequence(stub, sid, seq):
    y = None
    for i, x in enumerate(seq):
        y = outputs(stub.ModelInfer(step(sid, float(x), i == 0, i == len(seq) - 1)))["y"][0]
    return y


def test_state_is_hidden_from_the_client(seq_server):
    server, _ = seq_server
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(server.channel())
    md = stub.ModelMetadata(pb.ModelMetadataRequest(name="cell"))
    assert [t.name for t in md.inputs] == ["x_t"] and [t.name for t in md.outputs] == ["y"]
    assert "sequence" in stub.ServerMetadata(pb.ServerMetadataRequest()).extensions


def test_interleaved_sequences_match_the_whole_sequence_computation(seq_server):
    server, weights = seq_server
    rng = np.random.default_rng(3)
    seqs = {i + 1: rng.standard_normal(int(rng.integers(3, 30))).astype(np.float32) for i in range(48)}
    seqs["text-id"] = rng.standard_normal(10).astype(np.float32)
    with server.channel() as ch, ThreadPoolExecutor(24) as pool:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
        before = stub.ModelStatistics(pb.ModelStatisticsRequest(name="cell")).model_stats[0]  # a shared server
        finals = dict(zip(seqs, pool.map(lambda k: run_sequence(stub, k, seqs[k]), seqs), strict=True))
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="cell")).model_stats[0]
    worst = max(float(np.abs(finals[k] - reference(seqs[k], weights)).max()) for k in seqs)
    assert worst <= 1e-5
    steps = sum(len(s) for s in seqs.values())
    assert stats.inference_count - before.inference_count == steps
    assert stats.execution_count - before.execution_count < steps  # steps of different sequences merged


def _step(sid, x: float, start: bool = False, end: bool = False) -> dict:
    """One step as protocol-neutral arguments: sequence control as request parameters on both protocols."""
    return {"model": "cell", "inputs": [raw("x_t", np.array([[x]], np.float32))],
            "params": {"sequence_id": sid, "sequence_start": start, "sequence_end": end}}


def test_sequences_and_their_errors(seq_server, protocol):
    server, weights = seq_server
    client = connect(server, protocol)
    base = 1000 if protocol == "grpc" else 2000  # the two runs share the server: their ids must not meet
    try:
        seqs = {base + 1: [0.5, -1.0, 0.25], f"text-{protocol}": [0.1, 0.2, 0.3, -0.4]}
        for t in range(4):  # interleaved step by step
            for sid, seq in seqs.items():
                if t < len(seq):
                    answer = client.infer(**_step(sid, seq[t], t == 0, t == len(seq) - 1))
                    assert answer.kind == "OK", answer
                    if t == len(seq) - 1:
                        np.testing.assert_allclose(answer.outputs["y"][0], reference(np.array(seq, np.float32),
                                                                                     weights), atol=1e-5)

        def refused(request: dict) -> str:
            answer = client.infer(**request)
            assert answer.status == client.status_of("INVALID_ARGUMENT"), answer
            return answer.message

        assert "sequence_id" in refused({"model": "cell", "inputs": [raw("x_t", np.ones((1, 1), np.float32))]})
        assert "not live" in refused(_step(base + 987654, 0.5))
        assert client.infer(**_step(base + 555, 0.1, start=True)).kind == "OK"
        assert client.infer(**_step(base + 555, 0.2, end=True)).kind == "OK"
        assert "not live" in refused(_step(base + 555, 0.3))  # ended
        assert client.infer(**_step(base + 556, 0.1, start=True)).kind == "OK"
        time.sleep(1.2)  # idle past max_sequence_idle_microseconds (0.4 s): freed
        assert "idle" in refused(_step(base + 556, 0.2))
        refused(_step("", 0.1, start=True))
        two = _step(base + 9, 0.0, start=True)
        two["inputs"] = [raw("x_t", np.ones((2, 1), np.float32))]
        assert "batch size 1" in refused(two)
    finally:
        client.close()


def test_live_sequence_cap(tmp_path):
    repo = tmp_path / "models"
    model, _ = rnn_cell_model()
    save(model, repo, "cell", config=SEQUENCE_CONFIG % (10_000_000, 3))
    server = Server(repo)
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(server.channel())
    try:
        for sid in (1, 2, 3):
            stub.ModelInfer(step(sid, 0.0, start=True))
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(step(4, 0.0, start=True))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "cap" in err.value.details()
        stub.ModelInfer(step(1, 0.0, end=True))
        stub.ModelInfer(step(4, 0.0, start=True))
    finally:
        server.stop()


TRITON_STREAM = r"""
import json, queue, sys
import numpy as np
import tritonclient.grpc as tc
url = sys.argv[1]
seqs = json.loads(sys.argv[2])
c = tc.InferenceServerClient(url)
# unary calls with tritonclient's own sequence arguments
finals = {}
for sid, seq in list(seqs.items())[:2]:
    for i, x in enumerate(seq):
        inp = tc.InferInput("x_t", [1, 1], "FP32"); inp.set_data_from_numpy(np.array([[x]], np.float32))
        r = c.infer("cell", [inp], sequence_id=int(sid), sequence_start=i == 0, sequence_end=i == len(seq) - 1)
    finals[sid] = r.as_numpy("y")[0].tolist()
# a bidirectional stream, sequences interleaved step by step, plus one bad request that must not end the stream
results = queue.Queue()
c.start_stream(callback=lambda result, error: results.put((result, error)))
stream_ids = list(seqs)[2:]
sent = 0
for t in range(max(len(seqs[s]) for s in stream_ids)):
    for sid in stream_ids:
        seq = seqs[sid]
        if t < len(seq):
            inp = tc.InferInput("x_t", [1, 1], "FP32"); inp.set_data_from_numpy(np.array([[seq[t]]], np.float32))
            c.async_stream_infer("cell", [inp], request_id=f"{sid}:{t}", sequence_id=int(sid),
                                 sequence_start=t == 0, sequence_end=t == len(seq) - 1)
            sent += 1
    if t == 1:
        c.async_stream_infer("no_such_model", [inp], request_id="bad"); sent += 1
errors, last = [], {}
for _ in range(sent):
    result, error = results.get(timeout=30)
    if error is not None:
        errors.append(str(error)); continue
    sid, t = result.get_response().id.split(":")
    if int(t) == len(seqs[sid]) - 1:
        last[sid] = result.as_numpy("y")[0].tolist()
c.stop_stream()
print(json.dumps({"unary": finals, "stream": last, "errors": errors}))
"""


def test_tritonclient_sequences_unary_and_streaming(seq_server):
    server, weights = seq_server
    rng = np.random.default_rng(11)
    seqs = {str(100 + i): rng.standard_normal(int(rng.integers(2, 12))).astype(np.float32).tolist() for i in range(8)}
    r = subprocess.run([sys.executable, "-c", TRITON_STREAM, server.url, json.dumps(seqs)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    assert len(got["errors"]) == 1 and "no_such_model" in got["errors"][0]
    finals = {**got["unary"], **got["stream"]}
    assert set(finals) == set(seqs)
    for sid, y in finals.items():
        np.testing.assert_allclose(y, reference(np.array(seqs[sid], np.float32), weights), atol=1e-5)


def _stream(stub, requests, replies: list, timeout: float = 60):
    """Send `requests` on one ModelStreamInfer call from a thread, appending replies as they come."""
    import threading

    def run():
        for r in stub.ModelStreamInfer(iter(requests), timeout=timeout):
            replies.append(r)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _explicit_cell_server(tmp_path):
    """The stateful cell under explicit model control, few sequences and a 5 ms batch delay: streamed steps take
    long enough that a reload or unload lands among them."""
    repo = tmp_path / "models"
    model, weights = rnn_cell_model()
    config = SEQUENCE_CONFIG.replace("max_queue_delay_microseconds: 2000", "max_queue_delay_microseconds: 5000")
    save(model, repo, "cell", config=config % (60_000_000, 64))
    return repo, Server(repo, "--model-control-mode", "explicit", "--load-model", "cell"), weights


def test_version_swaps_under_interleaved_sequences_lose_nothing(tmp_path):
    """Two reloads while sequences are live: the first while hundreds of streamed steps wait behind their
    sequences' locks, the second between unary steps. Every step is answered and every sequence ends with the
    whole-sequence result: the live sequences (their state) went over to the new version."""
    import shutil

    repo, server, weights = _explicit_cell_server(tmp_path)
    rng = np.random.default_rng(5)
    n_seq, n_stream, n_unary = 6, 300, 60
    seqs = {1000 + i: rng.standard_normal(n_stream + n_unary).astype(np.float32) for i in range(n_seq)}

    def swap_to(version: int) -> None:
        (repo / "cell" / str(version)).mkdir()
        shutil.copy(repo / "cell" / "1" / "model.onnx", repo / "cell" / str(version) / "model.onnx")
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="cell"))
        assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="cell")).versions) == [str(version)]

    try:
        with server.channel() as ch, ThreadPoolExecutor(n_seq) as pool:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
            streamed = [step(sid, float(seq[t]), start=t == 0) for t in range(n_stream) for sid, seq in seqs.items()]
            replies: list = []
            reader = _stream(stub, streamed, replies)
            deadline = time.monotonic() + 60
            while len(replies) < 2 * n_seq and time.monotonic() < deadline:
                time.sleep(0.005)
            swap_to(2)
            answered_at_swap = len(replies)
            reader.join(90)
            assert not reader.is_alive(), f"the stream hung: {len(replies)} of {len(streamed)} replies"
            assert [r.error_message for r in replies if r.error_message] == []
            assert len(replies) == len(streamed)
            assert answered_at_swap < len(streamed)  # the reload really happened while steps were waiting

            def rest(sid, lo, hi, end):
                seq, out = seqs[sid], []
                for t in range(lo, hi):
                    reply = stub.ModelInfer(step(sid, float(seq[t]), end=end and t == hi - 1))
                    out.append((reply.model_version, outputs(reply)["y"][0]))
                return out

            half = n_stream + n_unary // 2
            before = list(pool.map(lambda sid: rest(sid, n_stream, half, False), seqs))
            swap_to(3)
            after = list(pool.map(lambda sid: rest(sid, half, n_stream + n_unary, True), seqs))
        assert {v for part in before for v, _ in part} == {"2"} and {v for part in after for v, _ in part} == {"3"}
        for (sid, seq), part in zip(seqs.items(), after, strict=True):
            np.testing.assert_allclose(part[-1][1], reference(seq, weights), atol=1e-5, err_msg=str(sid))
        assert "live sequences handed from version 1 to version 2" in server.log()
    finally:
        server.stop()


def test_max_candidate_sequences_keeps_a_backlog(tmp_path):
    """Triton's oldest strategy: beyond max_candidate_sequences, a new sequence waits until a candidate ends."""
    repo = tmp_path / "models"
    model, weights = rnn_cell_model()
    config = SEQUENCE_CONFIG.replace("max_candidate_sequences: 16", "max_candidate_sequences: 2")
    save(model, repo, "cell", config=config % (60_000_000, 8))
    server = Server(repo)
    try:
        with server.channel() as ch:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
            stub.ModelInfer(step(1, 0.5, start=True))
            stub.ModelInfer(step(2, 0.5, start=True))
            third = stub.ModelInfer.future(step(3, 0.25, start=True))
            time.sleep(0.5)
            assert not third.done()  # in the backlog: two candidates are live
            stub.ModelInfer(step(1, 0.5, end=True))
            y = outputs(third.result(timeout=30))["y"][0]
        np.testing.assert_allclose(y, reference(np.array([0.25], np.float32), weights), atol=1e-5)
    finally:
        server.stop()


def test_unload_answers_every_step_it_accepted(tmp_path):
    """Unloading a stateful model while streamed steps wait behind their sequences' locks: each step accepted
    before the unload is answered correctly; later ones are refused as not ready, none fails half-way."""
    repo, server, weights = _explicit_cell_server(tmp_path)
    rng = np.random.default_rng(6)
    seqs = {2000 + i: rng.standard_normal(200).astype(np.float32) for i in range(6)}
    try:
        with server.channel() as ch:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
            streamed = [step(sid, float(seq[t]), start=t == 0) for t in range(200) for sid, seq in seqs.items()]
            for i, r in enumerate(streamed):
                r.id = f"{r.parameters['sequence_id'].uint64_param}:{i // len(seqs)}"
            replies: list = []
            reader = _stream(stub, streamed, replies)
            deadline = time.monotonic() + 60
            while len(replies) < 2 * len(seqs) and time.monotonic() < deadline:
                time.sleep(0.005)
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="cell"))
            reader.join(90)
        assert not reader.is_alive() and len(replies) == len(streamed)
        errors = [r.error_message for r in replies if r.error_message]
        assert errors and all(e.startswith("UNAVAILABLE") and "is not ready" in e for e in errors), errors[:3]
        ok = [r.infer_response for r in replies if not r.error_message]
        last: dict[int, tuple[int, np.ndarray]] = {}
        for r in ok:
            sid, t = map(int, r.id.split(":"))
            last[sid] = max(last.get(sid, (-1, None)), (t, outputs(r)["y"][0]), key=lambda p: p[0])
        assert len(ok) > len(seqs) and last
        for sid, (t, y) in last.items():
            np.testing.assert_allclose(y, reference(seqs[sid][:t + 1], weights), atol=1e-5)
    finally:
        server.stop()
