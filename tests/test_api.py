"""Every RPC of the Open Inference Protocol through a real server process and our own stubs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import ALL_TYPES
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


@pytest.mark.parametrize("raw", [True, False])
def test_every_datatype_round_trips(stub, raw):
    rng = np.random.default_rng(0)
    arrays = {}
    for t in ALL_TYPES:
        if t == "BYTES":
            a = np.array([[b"", b"tab\tnul\x00"], [b"hello", "h\u00e9llo \u65e5\u672c".encode()]], dtype=object)
        elif t == "BOOL":
            a = rng.random((2, 2)) > 0.5
        else:
            dt = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.get(t) or np.dtype(t.lower())
            a = (rng.random((2, 2)) * 100).astype(dt)
        if raw or t != "FP16":  # FP16 has no typed field
            arrays[f"in_{t}"] = a
    if not raw:
        with pytest.raises(Exception) as e:
            stub.ModelInfer(request("identity", raw=False, **arrays))
        assert "missing input" in e.value.details() and "in_FP16" in e.value.details()
        return
    reply = stub.ModelInfer(request("identity", raw=raw, **arrays))
    got = outputs(reply)
    assert reply.raw_output_contents and not any(o.HasField("contents") for o in reply.outputs)
    for t in ALL_TYPES:
        np.testing.assert_array_equal(got[f"out_{t}"], arrays[f"in_{t}"])
        assert got[f"out_{t}"].shape == (2, 2)


def test_typed_contents(stub):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    got = outputs(stub.ModelInfer(request("add_sub", raw=False, x=x, y=x)))
    np.testing.assert_allclose(got["sum"], 2 * x)


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


def test_classification_extension(stub):
    x = np.array([[0.1, 0.9, 0.3, 0.2]], np.float32)
    req = request("add_sub", x=x, y=np.zeros_like(x))
    req.outputs.add(name="sum").parameters["classification"].int64_param = 2
    reply = stub.ModelInfer(req)
    assert reply.outputs[0].datatype == "BYTES" and list(reply.outputs[0].shape) == [1, 2]
    assert [c.decode() for c in outputs(reply)["sum"][0]] == ["0.900000:1:b", "0.300000:2:c"]


def test_statistics_count_requests_samples_and_executions(stub):
    before = stub.ModelStatistics(pb.ModelStatisticsRequest(name="seq")).model_stats[0]
    for n in (1, 3):
        stub.ModelInfer(request("seq", tokens=np.ones((n, 5), np.int64)))
    st = stub.ModelStatistics(pb.ModelStatisticsRequest(name="seq", version="1")).model_stats[0]
    assert st.inference_count - before.inference_count == 4
    assert st.execution_count - before.execution_count == 2
    assert st.inference_stats.success.count - before.inference_stats.success.count == 2
    assert st.inference_stats.compute_infer.ns > 0 and st.inference_stats.queue.count >= 2
    assert st.last_inference > 0 and {b.batch_size for b in st.batch_stats} >= {1, 3}
    names = {s.name for s in stub.ModelStatistics(pb.ModelStatisticsRequest()).model_stats}
    assert {"add_sub", "seq", "identity"} <= names


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
