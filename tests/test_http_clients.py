"""Real third-party HTTP clients against a real server: tritonclient.http (its own process: DESIGN.md on the
protobuf clash), Triton's perf_analyzer `-i http`, and repository load/unload with `config=` and `files=` through
both tritonclient.grpc and tritonclient.http."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ALL_TYPES
from support import Server, add_sub_model, save
from test_clients import PERF_ANALYZER
from test_sequences import reference

TRITON_HTTP = r"""
import json, sys
import numpy as np
import tritonclient.http as th
from tritonclient.utils import InferenceServerException
url, TYPES = sys.argv[1], json.loads(sys.argv[2])
c = th.InferenceServerClient(url)
out = {"live": c.is_server_live(), "ready": c.is_server_ready(), "model_ready": c.is_model_ready("add_sub"),
       "extensions": c.get_server_metadata()["extensions"],
       "platform": c.get_model_metadata("add_sub")["platform"],
       "max_batch": c.get_model_config("add_sub")["max_batch_size"]}
rng = np.random.default_rng(0)
x, y = rng.random((3, 4), dtype=np.float32), rng.random((3, 4), dtype=np.float32)
mixes = {}
for bx, by, bout in [(True, True, True), (False, False, False), (True, False, False), (False, True, True)]:
    inputs = [th.InferInput("x", [3, 4], "FP32"), th.InferInput("y", [3, 4], "FP32")]
    inputs[0].set_data_from_numpy(x, binary_data=bx); inputs[1].set_data_from_numpy(y, binary_data=by)
    outs = [th.InferRequestedOutput("sum", binary_data=bout), th.InferRequestedOutput("diff", binary_data=not bout)]
    r = c.infer("add_sub", inputs, outputs=outs, request_id=f"{bx}{by}{bout}")
    mixes[f"{bx}{by}{bout}"] = bool(np.array_equal(r.as_numpy("sum"), x + y)
                                    and np.array_equal(r.as_numpy("diff"), x - y)
                                    and r.get_response()["id"] == f"{bx}{by}{bout}")
out["mixes"] = mixes
# every datatype through tritonclient's own encoders and decoders, binary and JSON
sent = {}
for t in TYPES:
    if t == "BYTES":
        a = np.array([["h\u00e9llo".encode(), b""], [b"tab\tnul", b"x" * 300]], dtype=np.object_)
    elif t == "BOOL":
        a = np.array([[True, False], [False, True]])
    elif t.startswith("FP"):
        a = (rng.standard_normal((2, 2)) * 1e3).astype({"FP16": np.float16, "FP32": np.float32}.get(t, np.float64))
    else:
        info = np.iinfo(np.dtype(t.lower()))
        a = np.array([[info.min, info.max], [0, 1]], dtype=info.dtype)
    sent[t] = a
round_trip = {}
for binary in (True, False):
    ins = []
    for t, a in sent.items():
        i = th.InferInput(f"in_{t}", [2, 2], t); i.set_data_from_numpy(a, binary_data=binary); ins.append(i)
    outs = [th.InferRequestedOutput(f"out_{t}", binary_data=binary) for t in sent]
    r = c.infer("identity", ins, outputs=outs)
    for t, a in sent.items():
        got = r.as_numpy(f"out_{t}")
        if t == "BYTES" and not binary and got is not None:  # tritonclient hands JSON strings back as str
            got = np.array([v.encode() for v in got.reshape(-1)], dtype=np.object_).reshape(got.shape)
        ok = got is not None and got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a)
        round_trip[f"{t} {'binary' if binary else 'json'}"] = bool(ok) or f"sent {a!r}, got {got!r}"
out["round_trip"] = round_trip
# classification (class_count), binary and JSON
inputs = [th.InferInput("x", [1, 4], "FP32"), th.InferInput("y", [1, 4], "FP32")]
inputs[0].set_data_from_numpy(np.array([[0.1, 0.9, 0.3, 0.2]], np.float32))
inputs[1].set_data_from_numpy(np.zeros((1, 4), np.float32))
out["top"] = [[v.decode() if isinstance(v, bytes) else v for v in c.infer("add_sub", inputs, outputs=[
    th.InferRequestedOutput("sum", binary_data=b, class_count=2)]).as_numpy("sum")[0]] for b in (True, False)]
stats = c.get_inference_statistics("add_sub")["model_stats"][0]
out["stats"] = [stats["name"], stats["version"], int(stats["inference_count"]),
                int(stats["inference_stats"]["success"]["count"])]
try:
    c.infer("nope", inputs)
except InferenceServerException as e:
    out["not_found"] = [e.status(), e.message()]
try:
    c.infer("identity", ins[:2])
except InferenceServerException as e:
    out["partial"] = [e.status(), e.message()]
print(json.dumps(out))
"""


def test_tritonclient_http_unchanged(server):
    r = subprocess.run([sys.executable, "-c", TRITON_HTTP, f"127.0.0.1:{server.http_port}", json.dumps(ALL_TYPES)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    assert got["live"] and got["ready"] and got["model_ready"] and "binary_tensor_data" in got["extensions"]
    assert got["platform"] == "onnxruntime_onnx" and got["max_batch"] == 8
    assert got["mixes"] == {"TrueTrueTrue": True, "FalseFalseFalse": True, "TrueFalseFalse": True,
                            "FalseTrueTrue": True}
    assert got["round_trip"] == {f"{t} {m}": True for m in ("binary", "json") for t in ALL_TYPES}
    assert got["top"] == [["0.900000:1:b", "0.300000:2:c"]] * 2
    name, version, inferences, successes = got["stats"]
    assert (name, version) == ("add_sub", "1") and inferences >= 4 * 3 + 2 and successes >= 4 + 2
    assert got["not_found"][0] == "404" and "unknown model 'nope'" in got["not_found"][1]
    assert got["partial"][0] == "400" and "missing inputs" in got["partial"][1]


TRITON_HTTP_SEQUENCE = r"""
import json, sys
import numpy as np
import tritonclient.http as th
url, seqs = sys.argv[1], json.loads(sys.argv[2])
c = th.InferenceServerClient(url)
finals = {}
for sid, seq in seqs.items():
    for i, x in enumerate(seq):
        inp = th.InferInput("x_t", [1, 1], "FP32"); inp.set_data_from_numpy(np.array([[x]], np.float32))
        r = c.infer("cell", [inp], sequence_id=int(sid) if sid.isdigit() else sid, sequence_start=i == 0,
                    sequence_end=i == len(seq) - 1)
    finals[sid] = r.as_numpy("y")[0].tolist()
print(json.dumps(finals))
"""


def test_tritonclient_http_sequence(seq_server):
    server, weights = seq_server
    rng = np.random.default_rng(12)
    seqs = {"3001": rng.standard_normal(5).tolist(), "3002": rng.standard_normal(3).tolist(),
            "http-seq": rng.standard_normal(4).tolist()}
    r = subprocess.run([sys.executable, "-c", TRITON_HTTP_SEQUENCE, f"127.0.0.1:{server.http_port}",
                        json.dumps(seqs)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for sid, y in json.loads(r.stdout).items():
        np.testing.assert_allclose(y, reference(np.array(seqs[sid], np.float32), weights), atol=1e-5)


TRITON_LOAD = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException
kind, url, onnx_path = sys.argv[1:4]
tc = tg if kind == "grpc" else th
c = tc.InferenceServerClient(url)
model = open(onnx_path, "rb").read()
out = {}

def answer(name):
    inputs = [tc.InferInput("x", [1, 4], "FP32"), tc.InferInput("y", [1, 4], "FP32")]
    for i in inputs:
        i.set_data_from_numpy(np.ones((1, 4), np.float32))
    return c.infer(name, inputs).as_numpy("sum").tolist()

def error(fn):
    try:
        fn()
    except InferenceServerException as e:
        return [str(e.status()), e.message()]
    return None

def index():
    got = c.get_model_repository_index()
    entries = got.models if kind == "grpc" else got
    return {(e.name if kind == "grpc" else e["name"]):
            (e.state if kind == "grpc" else e.get("state", "")) for e in entries}

out["index_before"] = index()
c.load_model("add_sub")
out["loaded"] = [c.is_model_ready("add_sub"), answer("add_sub")]
c.unload_model("add_sub")
out["unloaded"] = [c.is_model_ready("add_sub"), error(lambda: answer("add_sub"))]
c.load_model("add_sub", config=json.dumps({"max_batch_size": 2}))
cfg = c.get_model_config("add_sub")
out["override"] = (cfg.config.max_batch_size if kind == "grpc" else cfg["max_batch_size"])
name = f"uploaded_{kind}"
c.load_model(name, config=json.dumps({"max_batch_size": 4}), files={"file:1/model.onnx": model})
out["uploaded"] = [c.is_model_ready(name), answer(name)]
out["bad_name"] = error(lambda: c.load_model("evil", config="{}", files={"file:../evil/1/model.onnx": model}))
out["no_config"] = error(lambda: c.load_model("evil", files={"file:1/model.onnx": model}))
out["uploaded_after"] = answer(name)
out["index_after"] = index()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def explicit_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("explicit") / "models"
    save(add_sub_model(), repo, "add_sub", config="max_batch_size: 8\n")
    s = Server(repo, "--model-control-mode", "explicit")
    yield s
    s.stop()


@pytest.mark.parametrize("kind", ["grpc", "http"])
def test_tritonclient_repository_load_unload_config_and_files(explicit_server, kind, tmp_path):
    onnx_path = tmp_path / "model.onnx"
    save(add_sub_model(scale=3.0), tmp_path / "src", "m")
    onnx_path.write_bytes((tmp_path / "src" / "m" / "1" / "model.onnx").read_bytes())
    url = explicit_server.url if kind == "grpc" else f"127.0.0.1:{explicit_server.http_port}"
    r = subprocess.run([sys.executable, "-c", TRITON_LOAD, kind, url, str(onnx_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    assert "add_sub" in got["index_before"]  # on disk (loaded or not, as the other kind's run left it)
    assert got["loaded"] == [True, [[2.0] * 4]]
    assert got["unloaded"][0] is False and "not ready" in got["unloaded"][1][1]
    assert got["override"] == 2
    assert got["uploaded"] == [True, [[6.0] * 4]]  # the model from bytes (scale 3), not anything on disk
    assert "is not a relative path inside the model" in got["bad_name"][1]
    assert "need the config parameter" in got["no_config"][1]
    assert got["uploaded_after"] == [[6.0] * 4]
    assert got["index_after"]["add_sub"] == "READY"
    assert not (explicit_server.log_path.parent / "models" / "evil").exists()


@pytest.mark.slow
@pytest.mark.skipif(not PERF_ANALYZER.exists(), reason="../shared/tools/perf_analyzer is not beside the repository")
@pytest.mark.parametrize("concurrency", [1, 4])
def test_perf_analyzer_http_runs_without_errors(server, tmp_path, concurrency):
    csv = tmp_path / "pa.csv"
    r = subprocess.run([str(PERF_ANALYZER), "-m", "add_sub", "-u", f"127.0.0.1:{server.http_port}", "-i", "http",
                        "--concurrency-range", str(concurrency), "--measurement-interval", "500",
                        "-f", str(csv), "-b", "2", "--max-trials", "6", "--stability-percentage", "10000"],
                       capture_output=True, text=True, timeout=300, env={**os.environ})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = csv.read_text().splitlines()
    header, values = rows[0].split(","), rows[1].split(",")
    assert float(values[header.index("Inferences/Second")]) > 0
    assert "error" not in r.stdout.lower(), r.stdout[-3000:]
