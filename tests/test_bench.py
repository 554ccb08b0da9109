"""The benchmark harness: a smoke run end to end (real server, tiny counts, onnx.helper models: no training), and
the transport ceiling answering real clients. No assertion here is about speed: speed is what `make bench`
reports, as ratios; these tests only prove the harness produces a well-formed report and its ceiling is honest."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import orjson
import pytest
from google.protobuf import text_format

from bench import models
from bench.ceiling_server import fixed_reply
from bench.compute import ComputeCeiling
from bench.harness import bench_main
from bench.http_ceiling import fixed_reply as http_fixed_reply
from bench.loadgen import Measurement, PythonLoad
from bench.procs import ceiling
from bench.report import Results, limit
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


def test_http_ceiling_answers_tritonclient_with_the_fixed_reply_of_our_codec(ceiling_server):
    """The HTTP ceiling, on the same process and loop as the gRPC one, answers a real client with the bytes our
    codec writes for zeros (binary outputs), and what perf_analyzer -i http asks first."""
    import tritonclient.http as httpclient

    target, cfg = ceiling_server
    client = httpclient.InferenceServerClient(target.url_for("http"))
    image = httpclient.InferInput("image", [4, 1, 8, 8], "FP32")
    image.set_data_from_numpy(np.ones((4, 1, 8, 8), np.float32), binary_data=True)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("logits", "probabilities")]
    result = client.infer(models.DIGITS, [image], model_version="3", outputs=outputs)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(models.DIGITS, "3")
    meta = client.get_model_metadata(models.DIGITS, "3")
    config = client.get_model_config(models.DIGITS)
    stats = client.get_inference_statistics(models.DIGITS, "3")
    client.close()
    for name in ("logits", "probabilities"):
        assert result.as_numpy(name).tolist() == np.zeros((4, 10), np.float32).tolist()
    body, header_length = http_fixed_reply(cfg, 4, "3")
    assert header_length == len(body) - 2 * 160 and orjson.loads(body[:header_length]) == {
        "model_name": models.DIGITS, "model_version": "3", "outputs": [
            {"name": n, "datatype": "FP32", "shape": [4, 10], "parameters": {"binary_data_size": 160}}
            for n in ("logits", "probabilities")]}
    assert meta["versions"] == ["3"] and meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
    assert config["name"] == models.DIGITS and config["max_batch_size"] == 256
    assert stats["model_stats"][0]["inference_stats"]["success"] == {"count": 0, "ns": 0}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_python_load_generator_measures_the_ceiling(ceiling_server, protocol):
    target, _ = ceiling_server
    m = PythonLoad().run(target.url_for(protocol), models.DIGITS, "3", 4, 2, 50, "transport ceiling", protocol)
    assert m.requests == 50 and m.protocol == protocol
    assert m.infer_per_s > 0 and 0 < m.p50_ms <= m.p90_ms <= m.p99_ms


def test_limit_is_the_lower_of_the_transport_and_the_compute_ceiling_at_the_batch_formed():
    r = Results({}, models.DIGITS, models.RESNET, max_batch={models.DIGITS: 256, models.RESNET: 0})
    r.compute = [ComputeCeiling(models.DIGITS, b, 10, rate, 1.0, 1) for b, rate in ((1, 4000.0), (32, 64000.0),
                                                                                    (256, 80000.0))]
    r.compute += [ComputeCeiling(models.RESNET, 1, 10, 900.0, 1.0, 2), ComputeCeiling(models.RESNET, 1, 10, 1100.0,
                                                                                      1.0, 2)]

    def m(model: str, batch: int, conc: int, rate: float) -> Measurement:
        return Measurement("x", model, batch, conc, 0, rate * batch, 1.0, 1.0, 1.0, "test")

    one = limit(r, m(models.DIGITS, 1, 1, 1000.0), m(models.DIGITS, 1, 1, 2000.0))
    assert (one.transport, one.compute, one.formed, one.value, one.by) == (2000.0, 4000.0, 1, 2000.0, "transport")
    merged = limit(r, m(models.DIGITS, 1, 32, 1000.0), m(models.DIGITS, 1, 32, 70000.0))
    assert (merged.formed, merged.compute, merged.by) == (32, 64000.0, "compute (batch 32)")
    capped = limit(r, m(models.DIGITS, 32, 64, 100.0), m(models.DIGITS, 32, 64, 5000.0))
    assert (capped.formed, capped.compute, capped.value) == (256, 2500.0, 2500.0)  # max_batch_size caps the merge
    heavy = limit(r, m(models.RESNET, 1, 16, 100.0), None)  # no dynamic batching: the request's own batch
    assert (heavy.formed, heavy.compute, heavy.value, heavy.by) == (1, 1000.0, 1000.0, "compute (batch 1)")


@pytest.mark.slow
def test_bench_smoke_run_writes_a_well_formed_report(tmp_path):
    out = tmp_path / "results"
    rc = bench_main(["--repository", str(_published(tmp_path / "models")), "--out", str(out),
                     "--concurrency", "2", "--batches", "1,2", "--resnet-concurrency", "1", "--seconds", "0.5",
                     "--compute-seconds", "0.2", "--leak-requests", "100", "--leak-rounds", "2",
                     "--resnet-widths", "4,8", "--profile", "off", "--repeats", "2", "--http-concurrency", "2",
                     "--mlserver", "off"])
    assert rc == 0, (out / "results.md").read_text()
    md = (out / "results.md").read_text()
    data = json.loads((out / "results.json").read_text())

    targets = md.split("## Targets", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in targets.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 9 and all(r.rstrip().endswith(("PASS |", "**FAIL** |", "not measured |")) for r in rows)
    assert "published" in md and "digits_cnn_nobatch" in md

    assert sorted((p["server"]["protocol"], p["server"]["batch"], p["server"]["concurrency"]) for p in data["sweep"]) \
        == [("grpc", 1, 2), ("grpc", 2, 2), ("http", 1, 2), ("http", 2, 2)]
    for p in data["sweep"]:
        for side in ("server", "ceiling"):
            assert p[side]["infer_per_s"] > 0 and 0 < p[side]["p50_ms"] <= p[side]["p99_ms"]
            assert p[side]["runs"] == 2  # ABBA: each side measured twice
            assert p[side]["protocol"] == p["server"]["protocol"]
    # the request batches, and every batch the server could form (2 in flight; 1 for the resnet points)
    assert {(c["model"], c["batch"]) for c in data["compute"]} == {("digits_cnn", b) for b in (1, 2, 4)} | {
        ("bench_resnet", b) for b in (1, 2)}
    assert [(m["server"]["batch"], m["server"]["protocol"]) for m in data["resnet"]] == [
        (1, "grpc"), (1, "http"), (2, "grpc"), (2, "http")]
    assert all(m["ceiling_samples_per_s"] > 0 and m["transport_ceiling"]["infer_per_s"] > 0 for m in data["resnet"])
    # the largest request batch again with perf_analyzer --shared-memory system, over both protocols
    assert [(m["server"]["batch"], m["server"]["protocol"]) for m in data["resnet_shared_memory"]] == [
        (2, "grpc"), (2, "http")]
    assert all(m["server"]["infer_per_s"] > 0 and m["wire"]["batch"] == 2 for m in data["resnet_shared_memory"])
    assert "Shared memory: the same points" in md
    assert len(data["limits"]) == len(data["sweep"]) + len(data["resnet"])
    assert all(p["ratio"] > 0 and p["limited_by"] != "-" for p in data["limits"])
    assert data["mlserver"] == {"note": "not measured: --mlserver off", "points": []}
    assert data["batching"]["on"]["model"] == "digits_cnn" and data["batching"]["off"]["model"] == "digits_cnn_nobatch"
    assert [p["requests"] for p in data["leak"]] == [100, 200] and all(p["rss_bytes"] > 0 for p in data["leak"])
    assert [(w["workers"] >= 2, w["one"]["concurrency"]) for w in data["workers"]] == [(True, 2)]
    assert all(w[side]["infer_per_s"] > 0 for w in data["workers"] for side in ("one", "many"))
    assert len(data["targets"]) == 9 and not data["errors"]
    assert [(c["target"], c["protocol"]) for c in data["cpu_per_request"]] == [
        ("server (digits_cnn)", "grpc"), ("transport ceiling", "grpc")] * 2 + [
        ("server (digits_cnn_nobatch)", "grpc"), ("server (digits_cnn)", "http"), ("transport ceiling", "http")]
    assert all(c["ms_per_request"] > 0 for c in data["cpu_per_request"])
    # the table rows: one per measured point, each with a ratio
    assert md.count("x** |") >= len(data["sweep"]) + len(data["resnet"])
    assert "### HTTP beside gRPC" in md and "MLServer: not measured: --mlserver off" in md

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
