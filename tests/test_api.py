"""Every RPC of the Open Inference Protocol through a real server process and our own stubs; the datatype and
classification tests over both front ends (tests/protocols.py)."""

from __future__ import annotations

import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import ALL_TYPES, TYPED_TYPES
from protocols import encode, raw
from support import outputs, request

from service._proto import inference_pb2 as pb


def test_liveness_readiness_and_metadata(stub):
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    md = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert md.name == "deepserve" and {"statistics", "model_configuration", "classification"} <= set(md.extensions)
    assert stub.ModelReady(pb.ModelReadyRequest(name="add_sub")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="broken")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready


def test_model_metadata_marks_batch_and_dynamic_dims(stub):
    md = stub.ModelMetadata(pb.ModelMetadataRequest(name="add_sub"))
    assert md.platform == "onnxruntime_onnx" and list(md.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("x", "FP32", [-1, 4]), ("y", "FP32", [-1, 4])]
    seq = stub.ModelMetadata(pb.ModelMetadataRequest(name="seq"))
    assert list(seq.inputs[0].shape) == [-1, -1]
    nob = stub.ModelMetadata(pb.ModelMetadataRequest(name="nobatch"))
    assert list(nob.inputs[0].shape) == [-1, 4]


def test_model_config_is_completed_from_the_graph(stub):
    cfg = stub.ModelConfig(pb.ModelConfigRequest(name="identity")).config
    assert cfg.max_batch_size == 64 and cfg.HasField("dynamic_batching")
    assert [i.name for i in cfg.input] == [f"in_{t}" for t in ALL_TYPES]
    assert cfg.parameters["execution_providers"].string_value.startswith("CPUExecutionProvider")
    add = stub.ModelConfig(pb.ModelConfigRequest(name="add_sub")).config
    assert add.instance_group[0].count == 2 and add.dynamic_batching.max_queue_delay_microseconds == 2000


def _samples(types: list[str]) -> dict[str, np.ndarray]:
    """[2,2] per datatype, with each type's extremes where it has them (what a narrowing conversion would break)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for t in types:
        if t == "BYTES":
            a = np.array([[b"", b"tab\tnul\x00"], [b"hello", "h\u00e9llo \u65e5\u672c".encode()]], dtype=object)
        elif t == "BOOL":
            a = np.array([[True, False], [False, True]])
        elif t in ("FP16", "FP32", "FP64"):
            dt = np.dtype({"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}[t])
            a = np.array([[np.finfo(dt).max, np.finfo(dt).tiny], [-0.1, 0.0]], dtype=dt)
            a[1, 1] = dt.type(rng.random())
        else:
            info = np.iinfo(np.dtype(t.lower()))
            a = np.array([[info.min, info.max], [0, 1 + int(rng.integers(100))]], dtype=info.dtype)
        arrays[f"in_{t}"] = a
    return arrays


def _check_round_trip(reply, arrays: dict[str, np.ndarray]) -> None:
    got = outputs(reply)
    assert reply.raw_output_contents and not any(o.HasField("contents") for o in reply.outputs)
    assert sorted(got) == sorted(n.replace("in_", "out_") for n in arrays)
    for name, want in arrays.items():
        out = got[name.replace("in_", "out_")]
        assert out.dtype == want.dtype and out.shape == want.shape, (name, out.dtype, out.shape)
        np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("protocol", ["grpc", "http", "http-json"])
def test_every_datatype_round_trips(client):
    """Raw on gRPC, binary tensor data and JSON `data` on HTTP: every datatype comes back as it went."""
    arrays = _samples(ALL_TYPES)
    answer = client.infer("identity", [encode(client, name, a) for name, a in arrays.items()])
    assert answer.kind == "OK", answer
    assert sorted(answer.outputs) == sorted(n.replace("in_", "out_") for n in arrays)
    for name, want in arrays.items():
        out = answer.outputs[name.replace("in_", "out_")]
        assert answer.datatypes[name.replace("in_", "out_")] == name.removeprefix("in_")
        assert out.dtype == want.dtype and out.shape == want.shape, (name, out.dtype, out.shape)
        np.testing.assert_array_equal(out, want)


def test_replies_are_raw_on_grpc(stub):
    arrays = _samples(ALL_TYPES)
    _check_round_trip(stub.ModelInfer(request("identity", **arrays)), arrays)


def test_every_typed_datatype_round_trips_in_typed_contents(edge_stub):
    """Typed `contents` for each datatype that has a typed field (all but FP16), extremes included: UINT64 max in
    uint64_contents, INT8 min in int_contents, FP64 max in fp64_contents, non-ASCII BYTES."""
    arrays = _samples(TYPED_TYPES)
    req = request("typed_identity", raw=False, **arrays)
    assert not req.raw_input_contents and all(t.HasField("contents") for t in req.inputs)
    _check_round_trip(edge_stub.ModelInfer(req), arrays)


def test_fp16_in_typed_contents_is_refused_by_name(stub):
    """FP16 has no typed field: values put in another field get a message that says to send it raw."""
    req = pb.ModelInferRequest(model_name="identity")
    req.inputs.add(name="in_FP16", datatype="FP16", shape=[1, 2]).contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'identity' input 'in_FP16': FP16 has no typed contents field" in err.value.details()


def test_results_match_onnxruntime_and_echo_id_and_subset(stub, repository):
    rng = np.random.default_rng(1)
    x, y = rng.random((5, 4), dtype=np.float32), rng.random((5, 4), dtype=np.float32)
    req = request("add_sub", x=x, y=y)
    req.id = "req-42"
    req.outputs.add(name="diff")
    reply = stub.ModelInfer(req)
    assert reply.id == "req-42" and reply.model_version == "1" and [o.name for o in reply.outputs] == ["diff"]
    sess = ort.InferenceSession(str(repository / "add_sub" / "1" / "model.onnx"))
    np.testing.assert_array_equal(outputs(reply)["diff"], sess.run(["diff"], {"x": x, "y": y})[0])


def test_versions_and_policy(stub):
    x = np.ones((1, 4), np.float32)
    md = stub.ModelMetadata(pb.ModelMetadataRequest(name="versioned"))
    assert list(md.versions) == ["1", "2"]
    assert outputs(stub.ModelInfer(request("versioned", x=x, y=x)))["sum"][0, 0] == 4.0  # latest: scale 2
    assert outputs(stub.ModelInfer(request("versioned", "1", x=x, y=x)))["sum"][0, 0] == 2.0


def test_classification_extension(client):
    x = np.array([[0.1, 0.9, 0.3, 0.2]], np.float32)
    answer = client.infer("add_sub", [raw("x", x), raw("y", np.zeros_like(x))], {"sum": {"classification": 2}})
    assert answer.datatypes == {"sum": "BYTES"} and answer.outputs["sum"].shape == (1, 2), answer
    assert [c.decode() for c in answer.outputs["sum"][0]] == ["0.900000:1:b", "0.300000:2:c"]


def _stats(stub, name: str):
    return stub.ModelStatistics(pb.ModelStatisticsRequest(name=name, version="1")).model_stats[0]


def test_statistics_count_requests_samples_executions_and_phases(stub):
    """seq runs each request alone (dynamic batching without delay, sent one after another): two requests of
    1 and 3 samples are two executions, one per batch size, each with its input/infer/output phases timed."""
    before = _stats(stub, "seq")
    sent_ms = time.time_ns() // 1_000_000
    for n in (1, 3):
        stub.ModelInfer(request("seq", tokens=np.ones((n, 5), np.int64)))
    st = _stats(stub, "seq")
    done_ms = time.time_ns() // 1_000_000
    s0, s = before.inference_stats, st.inference_stats
    assert st.inference_count - before.inference_count == 4
    assert st.execution_count - before.execution_count == 2
    assert s.success.count - s0.success.count == 2 and s.success.ns > s0.success.ns
    assert s.queue.count - s0.queue.count == 2
    assert s.fail.count == s0.fail.count
    for phase in ("compute_input", "compute_infer", "compute_output"):
        now, then = getattr(s, phase), getattr(s0, phase)
        assert now.count - then.count == 2 and now.ns > then.ns, phase
    assert sent_ms <= st.last_inference <= done_ms  # milliseconds since the epoch, as Triton reports it
    old = {b.batch_size: b for b in before.batch_stats}
    new = {b.batch_size: b for b in st.batch_stats}
    for size in (1, 3):
        for phase in ("compute_input", "compute_infer", "compute_output"):
            now = getattr(new[size], phase)
            then = getattr(old[size], phase) if size in old else pb.StatisticDuration()
            assert now.count - then.count == 1 and now.ns > then.ns, (size, phase)
    names = {s.name for s in stub.ModelStatistics(pb.ModelStatisticsRequest()).model_stats}
    assert {"add_sub", "seq", "identity"} <= names


def test_statistics_count_a_failed_request(stub):
    before = _stats(stub, "add_sub").inference_stats
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(request("add_sub", x=np.ones((1, 5), np.float32), y=np.ones((1, 5), np.float32)))
    after = _stats(stub, "add_sub").inference_stats
    assert after.fail.count - before.fail.count == 1 and after.fail.ns > before.fail.ns
    assert after.success.count == before.success.count
    assert after.compute_infer.count == before.compute_infer.count  # refused before it reached the model


def test_repository_index_reports_the_broken_model(stub):
    index = {(m.name, m.version): m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert index[("add_sub", "1")].state == "READY"
    broken = index[("broken", "1")]
    assert broken.state == "UNAVAILABLE" and "onnxruntime could not load" in broken.reason
    ready = {m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models}
    assert "broken" not in ready and "add_sub" in ready


def test_stream_infer_reports_errors_and_goes_on(stub):
    x = np.ones((1, 4), np.float32)
    good = request("add_sub", x=x, y=x)
    good.id = "a"
    bad = request("nope", x=x)
    bad.id = "b"
    replies = list(stub.ModelStreamInfer(iter([good, bad, good])))
    assert len(replies) == 3
    errors = [r for r in replies if r.error_message]
    assert len(errors) == 1 and errors[0].error_message.startswith("NOT_FOUND") and errors[0].infer_response.id == "b"
    assert sum(1 for r in replies if not r.error_message and r.infer_response.id == "a") == 2
