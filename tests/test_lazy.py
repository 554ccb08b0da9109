"""Lazy loading and bounded residency (--model-control-mode lazy, --max-loaded-models, --max-loaded-bytes), each
against a real server process with real gRPC clients."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper
from support import (
    ROOT,
    SEQUENCE_CONFIG,
    Server,
    add_sub_model,
    outputs,
    publish,
    request,
    rnn_cell_model,
    save,
    slow_model,
)

from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc

X = np.ones((1, 4), np.float32)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
LAZY = ("--model-control-mode", "lazy")
EXPLICIT = ("--model-control-mode", "explicit")


def _stub(server: Server) -> inference_pb2_grpc.GRPCInferenceServiceStub:
    return inference_pb2_grpc.GRPCInferenceServiceStub(server.channel())


def _metric(server: Server, name: str, model: str | None = None) -> float:
    """One sample of /metrics (0 when the series does not exist yet)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    prefix = f'{name}{{model="{model}"}} ' if model else f"{name} "
    return next((float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def _index(stub) -> dict[str, tuple[str, str]]:
    """name -> (state, reason), one entry per model (these models have one version)."""
    return {m.name: (m.state, m.reason) for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}


def _ready(stub) -> list[str]:
    return sorted(n for n, (state, _) in _index(stub).items() if state == "READY")


def _wait(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _sum(stub, name: str) -> float:
    return float(outputs(stub.ModelInfer(request(name, x=X, y=X), timeout=60))["sum"][0, 0])


def _folder_bytes(repo: Path, name: str) -> int:
    return sum(f.stat().st_size for f in (repo / name / "1").rglob("*") if f.is_file())


def test_twelve_models_three_slots_under_concurrent_clients(tmp_path):
    repo = tmp_path / "models"
    names = [f"m{i:02d}" for i in range(12)]
    for i, name in enumerate(names):
        save(add_sub_model(scale=float(i + 1)), repo, name)
    server = Server(repo, *LAZY, "--max-loaded-models", "3")
    stub = _stub(server)
    # Ready once the scan is done: nothing is loaded yet, and nothing is ready before a request asks for it.
    assert _index(stub) == {n: ("", "") for n in names}
    assert not stub.ModelReady(pb.ModelReadyRequest(name="m00")).ready
    assert _metric(server, "deepserve_loaded_models") == 0.0

    failures: list[str] = []
    wrong: list[tuple[str, float]] = []
    done = threading.Event()
    seen_ready: list[int] = []  # READY models in each poll of the index
    seen_gauge: list[float] = []

    def client(k: int) -> None:
        # Three clients for three slots: whatever the others hold, the model this one last used is idle, so a
        # load always finds room and no request may fail.
        order = names[4 * k:] + names[:4 * k]
        ch = server.channel()
        s = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
        for _ in range(4):
            for name in order:
                try:
                    got = float(outputs(s.ModelInfer(request(name, x=X, y=X), timeout=60))["sum"][0, 0])
                    if got != 2.0 * (names.index(name) + 1):
                        wrong.append((name, got))
                except grpc.RpcError as exc:
                    failures.append(f"{name}: {exc.code().name}: {exc.details()}")
        ch.close()

    def poller() -> None:
        while not done.is_set():
            seen_ready.append(len(_ready(stub)))
            seen_gauge.append(_metric(server, "deepserve_loaded_models"))

    watcher = threading.Thread(target=poller)
    watcher.start()
    clients = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(300)
    done.set()
    watcher.join(30)

    assert failures == [] and wrong == []
    assert len(seen_ready) > 10 and max(seen_ready) <= 3 and max(seen_gauge) <= 3.0
    assert len(_ready(stub)) == 3 and _metric(server, "deepserve_loaded_models") == 3.0
    loads = sum(_metric(server, "deepserve_model_loads_total", n) for n in names)
    evictions = sum(_metric(server, "deepserve_model_evictions_total", n) for n in names)
    assert loads >= 12 and loads - evictions == 3  # every load past the first three made room by one eviction
    assert _metric(server, "deepserve_loaded_model_bytes") == sum(_folder_bytes(repo, n) for n in _ready(stub))
    assert server.stop() == 0


def test_the_least_recently_used_idle_model_is_the_one_that_goes(tmp_path):
    repo = tmp_path / "models"
    for i, name in enumerate("abcd"):
        save(add_sub_model(scale=float(i + 1)), repo, name)
    server = Server(repo, *LAZY, "--max-loaded-models", "3")
    stub = _stub(server)
    assert [_sum(stub, n) for n in "abca"] == [2.0, 4.0, 6.0, 2.0]  # order of use now: b, c, a
    assert _ready(stub) == ["a", "b", "c"]
    assert _sum(stub, "d") == 8.0
    index = _index(stub)
    assert _ready(stub) == ["a", "c", "d"] and index["b"] == ("UNAVAILABLE", "unloaded: least recently used")
    assert _metric(server, "deepserve_model_evictions_total", "b") == 1.0
    health = health_pb2_grpc.HealthStub(server.channel())  # per-model health follows lazy loads and evictions
    _wait(lambda: [health.Check(health_pb2.HealthCheckRequest(service=n)).status for n in "abcd"] ==
          [SERVING, NOT_SERVING, SERVING, SERVING], what="health to follow the eviction")
    # An evicted model is not ready; metadata says it is not loaded and does not load it (no side effects).
    assert not stub.ModelReady(pb.ModelReadyRequest(name="b")).ready
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="b"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == ("model 'b' is not loaded (version 1 UNAVAILABLE: unloaded: least recently used); "
                                   "--model-control-mode lazy loads it on its next inference request")
    assert _ready(stub) == ["a", "c", "d"]
    # The next request for b loads it again, in place of c (order of use was c, a, d).
    assert _sum(stub, "b") == 4.0
    assert _ready(stub) == ["a", "b", "d"] and _index(stub)["c"] == ("UNAVAILABLE", "unloaded: least recently used")
    assert _metric(server, "deepserve_model_loads_total", "b") == 2.0
    assert stub.ModelReady(pb.ModelReadyRequest(name="b")).ready
    assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="b")).versions) == ["1"]
    assert server.stop() == 0


def test_concurrent_first_requests_share_one_load(tmp_path):
    repo = tmp_path / "models"
    save(slow_model(n=1000, reps=40), repo, "slow", config="max_batch_size: 8\ndynamic_batching { }\n")
    server = Server(repo, *LAZY)
    stub = _stub(server)
    one = request("slow", x=np.ones((1, 1), np.float32))
    impatient = request("slow", x=np.ones((1, 1), np.float32))
    impatient.parameters["timeout"].int64_param = 1000  # 1 ms: less than the load (its warmup alone takes longer)
    futures = [stub.ModelInfer.future(one, timeout=120) for _ in range(8)]  # all sent while the warmup runs
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(impatient, timeout=120)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "model 'slow' is still loading after the request's timeout of 1000 us; retry"
    assert [float(outputs(f.result())["y"][0, 0]) for f in futures] == [1.0] * 8
    assert _metric(server, "deepserve_model_loads_total", "slow") == 1.0
    assert server.log().count("model slow version 1 loaded in") == 1
    assert server.stop() == 0


def failing_slow_model() -> object:
    """x FP32 [B,1] -> y: seconds of matrix products, then a Gather whose index (100, from the products' result)
    is out of range, so the warmup fails only after all that work: a load that fails slowly."""
    model = slow_model(n=1000, reps=40)
    g = model.graph
    table = helper.make_tensor("table", TensorProto.FLOAT, [4], [0.0, 1.0, 2.0, 3.0])
    hundred = helper.make_tensor("hundred", TensorProto.FLOAT, [], [100.0])
    g.initializer.extend([table, hundred])
    g.node.extend([helper.make_node("Mul", ["y", "eps"], ["y0"]), helper.make_node("Add", ["y0", "hundred"], ["yi"]),
                   helper.make_node("Cast", ["yi"], ["idx"], to=TensorProto.INT64),
                   helper.make_node("Gather", ["table", "idx"], ["out"], axis=0)])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 1]))
    return model


def test_a_failed_load_answers_every_waiting_request_and_is_retried_by_a_later_one(tmp_path):
    repo = tmp_path / "models"
    # the config asks for the warmup, so its failure is a load failure (an implicit one only warns)
    save(failing_slow_model(), repo, "flaky", config='max_batch_size: 8\nmodel_warmup [ { name: "w" batch_size: 1 '
         'inputs { key: "x" value { data_type: TYPE_FP32 dims: [ 1 ] zero_data: true } } } ]\n')
    server = Server(repo, *LAZY)
    stub = _stub(server)
    one = request("flaky", x=np.ones((1, 1), np.float32))
    futures = [stub.ModelInfer.future(one, timeout=120) for _ in range(6)]
    errors = []
    for f in futures:
        with pytest.raises(grpc.RpcError) as err:
            f.result()
        errors.append((err.value.code(), err.value.details()))
    assert [code for code, _ in errors] == [grpc.StatusCode.UNAVAILABLE] * 6
    assert len({d for _, d in errors}) == 1 and errors[0][1].startswith("failed to load 'flaky': version 1: ")
    assert "warmup" in errors[0][1]
    assert _metric(server, "deepserve_model_load_failures_total", "flaky") == 1.0  # one load for all six
    assert _index(stub)["flaky"][0] == "UNAVAILABLE" and stub.ServerReady(pb.ServerReadyRequest()).ready
    # Nothing retries on its own: other calls come and go and the count stays.
    assert not stub.ModelReady(pb.ModelReadyRequest(name="flaky")).ready
    assert _metric(server, "deepserve_model_load_failures_total", "flaky") == 1.0
    # Fixed on disk: the next request loads it.
    (repo / "flaky" / "config.pbtxt").write_text("max_batch_size: 8\n")
    publish(add_sub_model(), repo, "flaky", 2)
    assert _sum(stub, "flaky") == 2.0
    assert _metric(server, "deepserve_model_load_failures_total", "flaky") == 1.0
    assert _metric(server, "deepserve_model_loads_total", "flaky") == 1.0
    assert server.stop() == 0


def test_a_busy_model_is_never_evicted(tmp_path):
    repo = tmp_path / "models"
    save(slow_model(n=1000, reps=60), repo, "slow", config="max_batch_size: 1\n")  # ~0.5 s a run here
    save(add_sub_model(), repo, "fast")
    server = Server(repo, *LAZY, "--max-loaded-models", "1")
    stub = _stub(server)
    one = request("slow", x=np.ones((1, 1), np.float32))
    queued = [stub.ModelInfer.future(one, timeout=120) for _ in range(4)]  # seconds of work, one at a time
    _wait(lambda: _pending(server, "slow") == 4.0, what="four slow requests in flight")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request("fast", x=X, y=X), timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "cannot load 'fast': 1 model loaded (--max-loaded-models 1), all busy"
    body = json.dumps({"inputs": [{"name": n, "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}
                                  for n in ("x", "y")]}).encode()
    with pytest.raises(urllib.error.HTTPError) as http_err:  # the same answer over HTTP: 503 with the reason
        urllib.request.urlopen(urllib.request.Request(f"{server.http_url}/v2/models/fast/infer", body), timeout=60)
    assert http_err.value.code == 503
    assert json.loads(http_err.value.read()) == {"error": err.value.details()}
    assert _index(stub) == {"fast": ("UNAVAILABLE", err.value.details()), "slow": ("READY", "")}
    assert [float(outputs(f.result())["y"][0, 0]) for f in queued] == [1.0] * 4
    assert _sum(stub, "fast") == 2.0  # slow is idle now: it makes room
    assert _index(stub) == {"fast": ("READY", ""), "slow": ("UNAVAILABLE", "unloaded: least recently used")}
    assert _metric(server, "deepserve_model_evictions_total", "slow") == 1.0
    assert _metric(server, "deepserve_model_evictions_total", "fast") == 0.0
    assert server.stop() == 0


def test_a_model_with_a_live_sequence_is_never_evicted(tmp_path):
    repo = tmp_path / "models"
    model, _ = rnn_cell_model()
    save(model, repo, "cell", config=SEQUENCE_CONFIG % (60_000_000, 8))  # idle sequences live a minute
    save(add_sub_model(), repo, "fast")
    server = Server(repo, *LAZY, "--max-loaded-models", "1")
    stub = _stub(server)

    def step(start: bool, end: bool):
        req = request("cell", x_t=np.ones((1, 1), np.float32))
        req.parameters["sequence_id"].uint64_param = 7
        req.parameters["sequence_start"].bool_param = start
        req.parameters["sequence_end"].bool_param = end
        return stub.ModelInfer(req, timeout=60)

    step(True, False)  # sequence 7 is live, and no request is in flight
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request("fast", x=X, y=X), timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "cannot load 'fast': 1 model loaded (--max-loaded-models 1), all busy"
    step(False, True)  # the sequence ends: cell is idle
    assert _sum(stub, "fast") == 2.0
    assert _index(stub)["cell"] == ("UNAVAILABLE", "unloaded: least recently used")
    assert server.stop() == 0


def _pending(server: Server, model: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    prefix = f'deepserve_pending_requests{{model="{model}",version="1"}} '
    return next((float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def test_max_loaded_bytes_in_lazy_and_explicit_mode(tmp_path):
    repo = tmp_path / "models"
    for name in ("p", "q", "r"):
        save(slow_model(n=100, reps=1), repo, name)  # 40 KB of weights each
    save(slow_model(n=200, reps=1), repo, "big")  # 160 KB
    size = _folder_bytes(repo, "p")
    limit = 2 * size + 1000  # two of p, q, r fit; big never does
    server = Server(repo, *LAZY, "--max-loaded-bytes", str(limit))
    stub = _stub(server)
    x = np.ones((1, 1), np.float32)
    for name in ("p", "q", "r"):
        assert float(outputs(stub.ModelInfer(request(name, x=x), timeout=60))["y"][0, 0]) == 1.0
    assert _ready(stub) == ["q", "r"] and _index(stub)["p"] == ("UNAVAILABLE", "unloaded: least recently used")
    assert _metric(server, "deepserve_loaded_model_bytes") == 2 * size
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request("big", x=x), timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == (f"cannot load 'big': it needs {_folder_bytes(repo, 'big')} bytes, more than "
                                   f"--max-loaded-bytes {limit}")
    assert _ready(stub) == ["q", "r"]  # a model that can never fit evicts nothing
    assert server.stop() == 0

    # Explicit mode: a load by request makes room the same way; what it evicted stays unloaded until loaded again.
    server = Server(repo, *EXPLICIT, "--load-model", "p", "--load-model", "q",
                    "--max-loaded-bytes", str(limit))
    stub = _stub(server)
    assert _ready(stub) == ["p", "q"]
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="r"))
    assert _ready(stub) == ["q", "r"] and _index(stub)["p"] == ("UNAVAILABLE", "unloaded: least recently used")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request("p", x=x), timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "model 'p' is not ready: version 1 UNAVAILABLE: unloaded: least recently used"
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="big"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "more than --max-loaded-bytes" in err.value.details()
    assert stub.ServerReady(pb.ServerReadyRequest()).ready  # a refused load does not make the server unready
    assert server.stop() == 0


def test_limits_need_a_mode_that_loads_on_demand(tmp_path):
    r = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--repository", str(tmp_path),
                        "--max-loaded-models", "3"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "--max-loaded-models / --max-loaded-bytes need --model-control-mode lazy or explicit" in r.stderr
