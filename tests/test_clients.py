"""Real third-party clients against a real server: tritonclient.grpc (its own process, see DESIGN.md on the
protobuf clash), Triton's perf_analyzer, grpc health and server reflection."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conftest import ALL_TYPES
from support import ROOT

TRITON_SCRIPT = r"""
import json, sys
import numpy as np
import onnxruntime as ort
import tritonclient.grpc as tc
url, repo, TYPES = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
c = tc.InferenceServerClient(url)
assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("add_sub")
md = c.get_server_metadata(as_json=True)
meta = c.get_model_metadata("add_sub", as_json=True)
cfg = c.get_model_config("add_sub", as_json=True)["config"]
sess = ort.InferenceSession(f"{repo}/add_sub/1/model.onnx")
rng = np.random.default_rng(0)
worst = 0.0
for batch in (1, 3, 8):
    x, y = rng.random((batch, 4), dtype=np.float32), rng.random((batch, 4), dtype=np.float32)
    inputs = [tc.InferInput("x", [batch, 4], "FP32"), tc.InferInput("y", [batch, 4], "FP32")]
    inputs[0].set_data_from_numpy(x); inputs[1].set_data_from_numpy(y)
    r = c.infer("add_sub", inputs, request_id=f"b{batch}")
    want = sess.run(None, {"x": x, "y": y})
    for name, w in zip(("sum", "diff"), want):
        worst = max(worst, float(np.abs(r.as_numpy(name) - w).max()))
    assert r.get_response().id == f"b{batch}"
# classification (class_count)
inputs = [tc.InferInput("x", [1, 4], "FP32"), tc.InferInput("y", [1, 4], "FP32")]
inputs[0].set_data_from_numpy(np.array([[0.1, 0.9, 0.3, 0.2]], np.float32))
inputs[1].set_data_from_numpy(np.zeros((1, 4), np.float32))
top = c.infer("add_sub", inputs, outputs=[tc.InferRequestedOutput("sum", class_count=2)]).as_numpy("sum")
# every datatype, BYTES included, through tritonclient's own encoders (set_data_from_numpy) and decoders (as_numpy)
rng = np.random.default_rng(1)
sent, ins = {}, []
for t in TYPES:
    if t == "BYTES":
        a = np.array([["h\u00e9llo".encode(), b""], [b"tab\tnul\x00", b"x" * 300]], dtype=np.object_)
    elif t == "BOOL":
        a = np.array([[True, False], [False, True]])
    elif t.startswith("FP"):
        a = (rng.standard_normal((2, 2)) * 1e3).astype({"FP16": np.float16, "FP32": np.float32}.get(t, np.float64))
    else:
        info = np.iinfo(np.dtype(t.lower()))
        a = np.array([[info.min, info.max], [0, 1]], dtype=info.dtype)
    i = tc.InferInput(f"in_{t}", [2, 2], t); i.set_data_from_numpy(a); ins.append(i); sent[t] = a
r = c.infer("identity", ins)
round_trip = {}
for t, a in sent.items():
    got = r.as_numpy(f"out_{t}")
    round_trip[t] = bool(got is not None and got.dtype == a.dtype and got.shape == a.shape
                         and np.array_equal(got, a)) or f"sent {a!r}, got {got!r}"
try:
    c.infer("identity", ins[:3])
    partial = "ok"
except tc.InferenceServerException as e:
    partial = [e.status(), e.message()]
stats = c.get_inference_statistics("add_sub", as_json=True)["model_stats"][0]
try:
    c.infer("nope", inputs)
    nf = None
except tc.InferenceServerException as e:
    nf = e.status()
print(json.dumps({"ext": md["extensions"], "platform": meta["platform"], "max_batch": cfg["max_batch_size"],
                  "worst": worst, "top": [t.decode() for t in top[0]], "partial": partial,
                  "round_trip": round_trip,
                  "inference_count": int(stats["inference_count"]), "not_found": nf}))
"""


def test_tritonclient_unchanged(server, repository):
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, server.url, str(repository), json.dumps(ALL_TYPES)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["platform"] == "onnxruntime_onnx" and got["max_batch"] == 8 and "statistics" in got["ext"]
    assert got["worst"] <= 1e-6
    assert got["top"] == ["0.900000:1:b", "0.300000:2:c"]
    assert got["round_trip"] == {t: True for t in ALL_TYPES}
    # the identity model needs all its inputs, and says which are missing
    assert got["partial"][0] == "StatusCode.INVALID_ARGUMENT" and "missing inputs ['in_UINT32'" in got["partial"][1]
    assert got["inference_count"] >= 1 + 3 + 8
    assert got["not_found"] == "StatusCode.NOT_FOUND"


PERF_ANALYZER = ROOT.parent / "shared" / "tools" / "perf_analyzer"


@pytest.mark.slow
@pytest.mark.skipif(not PERF_ANALYZER.exists(), reason="../shared/tools/perf_analyzer is not beside the repository")
@pytest.mark.parametrize("concurrency", [1, 4])
def test_perf_analyzer_runs_without_errors(server, tmp_path, concurrency):
    csv = tmp_path / "pa.csv"
    r = subprocess.run([str(PERF_ANALYZER), "-m", "add_sub", "-u", server.url, "-i", "grpc",
                        "--concurrency-range", str(concurrency), "--measurement-interval", "500",
                        # stability is not what this test is about: a shared machine's latency varies a lot
                        "-f", str(csv), "-b", "2", "--max-trials", "6", "--stability-percentage", "10000"],
                       capture_output=True, text=True, timeout=300, env={**os.environ})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = csv.read_text().splitlines()
    header, values = rows[0].split(","), rows[1].split(",")
    assert float(values[header.index("Inferences/Second")]) > 0


def test_health_per_server_and_model(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with server.channel() as ch:
        h = health_pb2_grpc.HealthStub(ch)

        def status(name: str) -> str:
            return health_pb2.HealthCheckResponse.ServingStatus.Name(
                h.Check(health_pb2.HealthCheckRequest(service=name)).status)

        assert status("") == "SERVING" and status("liveness") == "SERVING"
        assert status("inference.GRPCInferenceService") == "SERVING"  # the service's own name, as gRPC expects
        assert status("add_sub") == "SERVING" and status("broken") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as err:
            status("no-such-model")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    cli = subprocess.run([sys.executable, "-m", "service.cli", "health", "--url", server.url], cwd=ROOT,
                         capture_output=True, text=True)
    assert cli.returncode == 0 and "SERVING" in cli.stdout
    cli = subprocess.run([sys.executable, "-m", "service.cli", "health", "--url", server.url, "--service",
                          "broken"], cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 1


def test_reflection_lists_and_describes_the_service(server):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with server.channel() as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(db)
        svc = pool.FindServiceByName("inference.GRPCInferenceService")
        assert "ModelInfer" in [m.name for m in svc.methods]
        assert pool.FindMessageTypeByName("inference.ModelConfig").fields_by_name["max_batch_size"].number == 4


def test_infer_cli_prints_outputs(server, tmp_path):
    import numpy as np

    x = tmp_path / "x.npy"
    np.save(x, np.ones((2, 4), np.float32))
    r = subprocess.run([sys.executable, "-m", "service.cli", "infer", "add_sub", "--url", server.url,
                        "--input", f"x={x}", "--input", f"y={x}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "sum float32 [2, 4]" in r.stdout and "2." in r.stdout
    bad = subprocess.run([sys.executable, "-m", "service.cli", "infer", "nope", "--url", server.url, "--input",
                          f"x={x}"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr



def _grpcurl(server, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "grpcurl"
    return subprocess.run([str(exe), "-plaintext", server.url, *args], capture_output=True, text=True, timeout=60)


def _grpcurl_call(server, method: str, body: dict) -> dict:
    exe = Path(sys.executable).parent / "grpcurl"
    r = subprocess.run([str(exe), "-plaintext", "-d", json.dumps(body), server.url, method], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_grpcurl_through_reflection(server):
    """The README's grpcurl commands: list, metadata, an inference with typed JSON contents, a health check."""
    listed = _grpcurl(server, "list")
    assert listed.returncode == 0 and "inference.GRPCInferenceService" in listed.stdout.split()
    md = _grpcurl_call(server, "inference.GRPCInferenceService/ModelMetadata", {"name": "add_sub"})
    assert md["platform"] == "onnxruntime_onnx"
    reply = _grpcurl_call(server, "inference.GRPCInferenceService/ModelInfer", {
        "model_name": "add_sub",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "contents": {"fp32_contents": [1, 2, 3, 4]}},
                   {"name": "y", "datatype": "FP32", "shape": [1, 4], "contents": {"fp32_contents": [1, 1, 1, 1]}}],
        "outputs": [{"name": "sum", "parameters": {"classification": {"int64_param": 1}}}]})
    raw = base64.b64decode(reply["raw_output_contents"][0])
    assert raw[4:] == b"5.000000:3:d"  # one BYTES element: 4-byte length, then "score:index:label"
    health = _grpcurl_call(server, "grpc.health.v1.Health/Check", {"service": "add_sub"})
    assert health["status"] == "SERVING"
