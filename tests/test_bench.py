"""The benchmark harness: a smoke run end to end (real server, tiny counts, onnx.helper models: no training), and
the transport ceiling answering real clients. No assertion here is about speed: speed is what `make bench`
reports, as ratios; these tests only prove the harness produces a well-formed report and its ceiling is honest."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import text_format

from bench import models
from bench.ceiling_server import fixed_reply
from bench.harness import bench_main
from bench.loadgen import PythonLoad
from bench.procs import ceiling
from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc, model_config_pb2

PUBLISHED_BATCHING = "max_queue_delay_microseconds: 100"


def _published(repo: Path) -> Path:
    """A repository shaped like `deepserve train` publishes it: digits_cnn version 2, labels, its own batching."""
    model = models.build_digits_standin()
    cfg = models.model_config(models.DIGITS, model, 256, text_format.Parse(PUBLISHED_BATCHING,
                                                                           model_config_pb2.ModelDynamicBatching()))
    cfg.output[1].label_filename = "labels.txt"
    models.write_model(repo, cfg, model, version="2")
    (repo / models.DIGITS / "labels.txt").write_text("\n".join(str(i) for i in range(10)) + "\n")
    return repo


def test_work_repository_serves_published_model_with_and_without_batching(tmp_path):
    work = models.prepare_repository(tmp_path / "work", _published(tmp_path / "src"), (4, 8))
    on = models.read_config(work.root / models.DIGITS / "config.pbtxt")
    off = models.read_config(work.root / models.DIGITS_NOBATCH / "config.pbtxt")
    assert on.dynamic_batching.max_queue_delay_microseconds == 100
    assert not off.HasField("dynamic_batching") and off.name == models.DIGITS_NOBATCH
    assert (work.root / models.DIGITS_NOBATCH / "2" / "model.onnx").is_file()
    assert (work.root / models.DIGITS_NOBATCH / "labels.txt").is_file()
    assert "published" in work.digits_source
    resnet = models.read_config(work.root / models.RESNET / "config.pbtxt")
    assert resnet.max_batch_size == 128 and list(resnet.input[0].dims) == [3, 64, 64]
    assert not (tmp_path / "src" / models.DIGITS_NOBATCH).exists()  # the user's repository is left alone


def test_work_repository_builds_a_standin_without_a_published_model(tmp_path):
    work = models.prepare_repository(tmp_path / "work", tmp_path / "missing", (4, 8))
    assert "stand-in" in work.digits_source
    cfg = models.read_config(work.root / models.DIGITS / "config.pbtxt")
    assert cfg.HasField("dynamic_batching") and cfg.max_batch_size == 256
    assert [o.name for o in cfg.output] == ["logits", "probabilities"]


@pytest.fixture
def ceiling_server(tmp_path):
    model = models.build_digits_standin()
    cfg = models.model_config(models.DIGITS, model, 256, None)
    path = tmp_path / "digits.pbtxt"
    path.write_text(text_format.MessageToString(cfg))
    target = ceiling(path, 4, "3", tmp_path).start(60)
    yield target, cfg
    target.stop()


def test_ceiling_server_answers_model_infer_with_the_fixed_reply(ceiling_server):
    target, cfg = ceiling_server
    request = pb.ModelInferRequest(model_name=models.DIGITS, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="image", datatype="FP32", shape=[4, 1, 8, 8])])
    request.raw_input_contents.append(np.ones((4, 1, 8, 8), np.float32).tobytes())
    with grpc.insecure_channel(target.url) as ch:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerLive(pb.ServerLiveRequest()).live
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        reply = stub.ModelInfer(request)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=models.DIGITS))
        config = stub.ModelConfig(pb.ModelConfigRequest(name=models.DIGITS)).config
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=models.DIGITS))
        garbage = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\xff\x00 not a request")
    assert reply.model_name == models.DIGITS and reply.model_version == "3"
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [("logits", "FP32", [4, 10]),
                                                                           ("probabilities", "FP32", [4, 10])]
    assert [len(b) for b in reply.raw_output_contents] == [160, 160]
    assert reply.SerializeToString() == fixed_reply(cfg, 4, "3")
    assert garbage == fixed_reply(cfg, 4, "3")  # never decoded: any bytes get the same reply
    assert meta.versions == ["3"] and list(meta.inputs[0].shape) == [-1, 1, 8, 8]
    assert config == cfg
    assert stats.model_stats[0].version == "3"


def test_python_load_generator_measures_the_ceiling(ceiling_server):
    target, _ = ceiling_server
    m = PythonLoad().run(target.url, models.DIGITS, "3", 4, 2, 50, "transport ceiling")
    assert m.requests == 50 and m.infer_per_s > 0 and 0 < m.p50_ms <= m.p90_ms <= m.p99_ms


@pytest.mark.slow
def test_bench_smoke_run_writes_a_well_formed_report(tmp_path):
    out = tmp_path / "results"
    rc = bench_main(["--repository", str(_published(tmp_path / "models")), "--out", str(out),
                     "--concurrency", "2", "--batches", "1,2", "--resnet-concurrency", "1", "--seconds", "0.5",
                     "--compute-seconds", "0.2", "--leak-requests", "100", "--leak-rounds", "2",
                     "--resnet-widths", "4,8", "--profile", "off", "--repeats", "2"])
    assert rc == 0, (out / "results.md").read_text()
    md = (out / "results.md").read_text()
    data = json.loads((out / "results.json").read_text())

    targets = md.split("## Targets", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in targets.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 5 and all(r.rstrip().endswith(("PASS |", "**FAIL** |", "not measured |")) for r in rows)
    assert "published" in md and "digits_cnn_nobatch" in md

    assert {(p["server"]["batch"], p["server"]["concurrency"]) for p in data["sweep"]} == {(1, 2), (2, 2)}
    for p in data["sweep"]:
        for side in ("server", "ceiling"):
            assert p[side]["infer_per_s"] > 0 and 0 < p[side]["p50_ms"] <= p[side]["p99_ms"]
            assert p[side]["runs"] == 2  # ABBA: each side measured twice
    assert {(c["model"], c["batch"]) for c in data["compute"]} == {(m, b) for m in ("digits_cnn", "bench_resnet")
                                                                   for b in (1, 2)}
    assert [m["server"]["batch"] for m in data["resnet"]] == [1, 2]
    assert all(m["ceiling_samples_per_s"] > 0 for m in data["resnet"])
    assert data["batching"]["on"]["model"] == "digits_cnn" and data["batching"]["off"]["model"] == "digits_cnn_nobatch"
    assert [p["requests"] for p in data["leak"]] == [100, 200] and all(p["rss_bytes"] > 0 for p in data["leak"])
    assert [(w["workers"] >= 2, w["one"]["concurrency"]) for w in data["workers"]] == [(True, 2)]
    assert all(w[side]["infer_per_s"] > 0 for w in data["workers"] for side in ("one", "many"))
    assert len(data["targets"]) == 5 and not data["errors"]
    assert [c["target"] for c in data["cpu_per_request"]] == ["server (digits_cnn)", "transport ceiling"] * 2 + [
        "server (digits_cnn_nobatch)"] and all(c["ms_per_request"] > 0 for c in data["cpu_per_request"])
    # the table rows: one per measured point, each with a ratio
    assert md.count("x** |") >= len(data["sweep"]) + len(data["resnet"])

    png = (out / "throughput.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    assert matplotlib.image.imread(str(out / "throughput.png")).shape[0] > 200


def test_profile_summary_attributes_gil_samples_to_frames_and_our_functions():
    from bench.profile import summarize

    main = "thread (7): MainThread;<module> (service/cli.py:49);serve_main (service/server.py:199);Handle._run " \
           "(asyncio/events.py:80)"
    collapsed = "\n".join([f"{main} 6", f"{main};Servicer.ModelInfer (service/grpc_api.py:135);decode_input "
                           "(service/tensors.py:40) 3", "thread (9): ort-m:1_0;Session.run (/x/site-packages/"
                           "onnxruntime/capi/onnxruntime_inference_collection.py:266) 1"])
    text = "\n".join(summarize(collapsed))
    assert "10 samples" in text
    assert "| `Handle._run (asyncio/events.py)` | 60.0% |" in text  # line numbers merged per function
    assert "| `decode_input (service/tensors.py)` | 30.0% |" in text
    assert "`Session.run (onnxruntime/capi/onnxruntime_inference_collection.py)`" in text  # paths shortened
    ours = text.split("deepserve functions, inclusive", 1)[1]
    assert "Servicer.ModelInfer (service/grpc_api.py)` | 30.0%" in ours and "serve_main" not in ours


def test_report_goes_into_the_readme_between_markers(tmp_path):
    from bench.report import into_readme

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Performance\n\n<!-- BENCH-TABLE -->\nold\n<!-- /BENCH-TABLE -->\n\n## GPU\nkept\n")
    md, png = tmp_path / "results.md", tmp_path / "throughput.png"
    png.write_bytes(b"\x89PNG fake")
    for run in ("first", "second"):  # twice: the block is replaced, not appended
        md.write_text(f"# deepserve bench\n\n## targets\n\n| a |\n| - |\n| {run} |\n")
        into_readme(readme, md, png)
    text = readme.read_text()
    assert text.count("<!-- BENCH-TABLE -->") == 1 and "| second |" in text and "first" not in text
    assert "### targets" in text and "## GPU\nkept" in text and "old" not in text
    assert (tmp_path / "docs" / "bench-throughput.png").read_bytes() == b"\x89PNG fake"
