"""Changing models without downtime and stopping without dropping work, each under continuous load."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from support import Load, Server, add_sub_model, outputs, publish, request, save, slow_model

from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc

X = np.ones((1, 4), np.float32)


def _stub(server):
    return inference_pb2_grpc.GRPCInferenceServiceStub(server.channel())


def _scrape(server) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()


def _wait(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_poll_swaps_versions_under_load_and_survives_a_corrupt_one(tmp_path):
    repo = tmp_path / "models"
    save(add_sub_model(scale=1.0), repo, "m", config="max_batch_size: 8\ndynamic_batching { }\n")
    server = Server(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    stub = _stub(server)
    seen = set()

    def check(reply):
        value = float(outputs(reply)["sum"][0, 0])
        seen.add(reply.model_version)
        return value == {"1": 2.0, "2": 4.0}[reply.model_version]

    load = Load(server.url, lambda: request("m", x=X, y=X), concurrency=16, check=check)
    try:
        time.sleep(0.5)
        publish(add_sub_model(scale=2.0), repo, "m", 2)
        _wait(lambda: list(stub.ModelMetadata(pb.ModelMetadataRequest(name="m")).versions) == ["2"],
              what="version 2 to take over")
        time.sleep(0.5)
        publish(None, repo, "m", 3, raw=b"not onnx at all")
        _wait(lambda: any(m.version == "3" and m.state == "UNAVAILABLE"
                          for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models),
              what="version 3 to fail")
        time.sleep(0.5)
    finally:
        codes = load.stop()
    assert set(codes) == {"OK"}, (codes, load.errors[:5])
    assert codes["OK"] > 100 and seen == {"1", "2"}
    index = {(m.name, m.version): m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert index[("m", "2")].state == "READY" and "onnxruntime could not load" in index[("m", "3")].reason
    assert float(outputs(stub.ModelInfer(request("m", x=X, y=X)))["sum"][0, 0]) == 4.0
    assert server.stop() == 0


def _load_failures(server, model: str) -> float:
    prefix = f'deepserve_model_load_failures_total{{model="{model}"}} '
    return next((float(line[len(prefix):]) for line in _scrape(server).splitlines() if line.startswith(prefix)), 0.0)


def test_poll_counts_a_bad_config_once_and_forgets_removed_models(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    repo = tmp_path / "models"
    for name in ("good", "bad", "gone"):
        save(add_sub_model(), repo, name, config="max_batch_size: 4\n")
    for name in ("bad", "gone"):
        (repo / name / "config.pbtxt").write_text('max_batch_size: "many"\n')
    server = Server(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.1", wait_ready=False)
    stub = _stub(server)
    health = health_pb2_grpc.HealthStub(server.channel())
    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        server.wait_log("ready:")
        assert not stub.ServerReady(pb.ServerReadyRequest()).ready  # strict: two models failed
        time.sleep(1.0)  # ten polls over an unchanged bad config
        publish(add_sub_model(scale=2.0), repo, "good", 2)  # the poller is alive: it picks this up
        _wait(lambda: list(stub.ModelMetadata(pb.ModelMetadataRequest(name="good")).versions) == ["2"],
              what="good version 2")
        assert _load_failures(server, "bad") == 1 and _load_failures(server, "gone") == 1
        assert server.log().count("model bad model failed to load") == 1
        (repo / "bad" / "config.pbtxt").write_text("max_batch_size: 4\n")  # fixed: noticed and loaded
        shutil.rmtree(repo / "gone")  # removed while failing: no longer counts against readiness
        _wait(lambda: stub.ServerReady(pb.ServerReadyRequest()).ready, what="ready once bad is fixed")
        assert stub.ModelReady(pb.ModelReadyRequest(name="bad")).ready
        shutil.move(repo / "good", tmp_path / "good")  # a serving model removed: unloaded, the server stays ready
        _wait(lambda: not stub.ModelReady(pb.ModelReadyRequest(name="good")).ready, what="good unloaded")
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        assert health.Check(health_pb2.HealthCheckRequest()).status == serving
        assert health.Check(health_pb2.HealthCheckRequest(service="good")).status != serving
        shutil.move(tmp_path / "good", repo / "good")  # and put back as it was: it loads again
        _wait(lambda: stub.ModelReady(pb.ModelReadyRequest(name="good")).ready, what="good back")
    finally:
        server.stop()


def test_explicit_mode_load_unload_and_config_override(tmp_path):
    repo = tmp_path / "models"
    save(add_sub_model(), repo, "a", config="max_batch_size: 8\n")
    save(add_sub_model(), repo, "b", config="max_batch_size: 8\n")
    server = Server(repo, "--model-control-mode", "explicit", "--load-model", "a")
    stub = _stub(server)
    try:
        assert stub.ModelReady(pb.ModelReadyRequest(name="a")).ready
        assert not stub.ModelReady(pb.ModelReadyRequest(name="b")).ready
        names = {m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
        assert names == {"a", "b"}
        override = pb.RepositoryModelLoadRequest(model_name="b")
        override.parameters["config"].string_param = json.dumps({"max_batch_size": 2})
        stub.RepositoryModelLoad(override)
        assert stub.ModelConfig(pb.ModelConfigRequest(name="b")).config.max_batch_size == 2
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request("b", x=np.ones((3, 4), np.float32), y=np.ones((3, 4), np.float32)))
        assert "max_batch_size 2" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="../etc"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        bad = pb.RepositoryModelLoadRequest(model_name="a")
        bad.parameters["config"].string_param = '{"max_batch_size": "x"'
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelLoad(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert stub.ModelReady(pb.ModelReadyRequest(name="a")).ready  # a failed reload keeps it serving
        # Valid JSON, invalid config, for a model that serves: the reload fails, the call says so and why, and the
        # old version keeps serving with its old config.
        for config, why in (({"max_batch_size": -1}, "max_batch_size must be >= 0"),
                            ({"max_batch_size": 8, "input": [{"name": "zzz", "data_type": "TYPE_FP32", "dims": [4]}]},
                             "'zzz' is not in the model")):
            bad = pb.RepositoryModelLoadRequest(model_name="a")
            bad.parameters["config"].string_param = json.dumps(config)
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelLoad(bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in err.value.details(), why
            assert "still serving version 1" in err.value.details()
            assert stub.ModelConfig(pb.ModelConfigRequest(name="a")).config.max_batch_size == 8
            assert outputs(stub.ModelInfer(request("a", x=X, y=X)))["sum"][0, 0] == 2.0
        index = {(m.name, m.version): m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
        assert index[("a", "1")].state == "READY"
        script = ("import sys, tritonclient.grpc as tc\nc = tc.InferenceServerClient(sys.argv[1])\n"
                  "c.unload_model('a')\nassert not c.is_model_ready('a')\n"
                  "assert c.is_server_ready(), 'an unloaded model must not count against readiness'\n"
                  "c.load_model('a')\nassert c.is_model_ready('a')\n"
                  "try:\n    c.load_model('a', config='{\"max_batch_size\": -1}')\n"
                  "    raise SystemExit('load_model reported success for a failed load')\n"
                  "except tc.InferenceServerException as e:\n    assert 'max_batch_size' in str(e), e\n"
                  "print(sorted((m.name, m.state) for m in c.get_model_repository_index().models))")
        r = subprocess.run([sys.executable, "-c", script, server.url], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "('a', 'READY')" in r.stdout and "('b', 'READY')" in r.stdout
    finally:
        server.stop()


def test_load_rpcs_refused_outside_explicit_mode(server):
    with pytest.raises(grpc.RpcError) as err:
        _stub(server).RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="add_sub"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "explicit" in err.value.details()


def test_unload_lets_in_flight_requests_finish(tmp_path):
    repo = tmp_path / "models"
    save(slow_model(), repo, "slow", config="max_batch_size: 1\n")
    server = Server(repo, "--model-control-mode", "explicit", "--load-model", "slow")
    stub = _stub(server)
    try:
        futures = [stub.ModelInfer.future(request("slow", x=np.ones((1, 1), np.float32))) for _ in range(6)]
        time.sleep(0.05)
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="slow"))
        assert all(float(outputs(f.result(timeout=30))["y"][0, 0]) == 1.0 for f in futures)
        assert not stub.ModelReady(pb.ModelReadyRequest(name="slow")).ready
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request("slow", x=np.ones((1, 1), np.float32)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_sigterm_under_load_loses_no_accepted_request(tmp_path, event_loop):
    repo = tmp_path / "models"
    save(slow_model(n=300), repo, "slow", config="max_batch_size: 4\ndynamic_batching { }\n")
    server = Server(repo, "--drain-secs", "20", "--shutdown-grace-secs", "0.5", "--event-loop", event_loop)
    assert f"event loop {event_loop}" in server.log()
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(server.channel())
    load = Load(server.url, lambda: request("slow", x=np.ones((1, 1), np.float32)), concurrency=16,
                check=lambda r: float(outputs(r)["y"][0, 0]) == 1.0)
    time.sleep(1.0)
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not _stub(server).ServerReady(pb.ServerReadyRequest()).ready
    assert server.proc.wait(30) == 0
    load.stop()
    before = [code for t0, code in load.calls if t0 < signalled]
    after = {code for t0, code in load.calls if t0 >= signalled}
    # Every request sent before the signal completed correctly; later ones were served during the grace period
    # or refused (UNAVAILABLE from us, or CANCELLED by grpc as the port closed), never failed half-way.
    assert len(before) > 16 and set(before) == {"OK"}, load.errors[:5]
    assert after <= {"OK", "UNAVAILABLE", "CANCELLED"} and "OK" in after, after
    assert "stopped after" in server.log()


def test_sigterm_grace_period_then_refusal_then_exit_code(tmp_path):
    """After SIGTERM: not ready at once; requests still accepted during the grace period; refused with UNAVAILABLE
    after it while accepted work drains; exit 0. A drain that runs out of time exits 1."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    repo = tmp_path / "models"
    save(slow_model(n=1000, reps=60), repo, "slow", config="max_batch_size: 1\n"
         "instance_group [ { count: 1 kind: KIND_CPU } ]\n")  # ~0.5 s a run, one at a time
    one = request("slow", x=np.ones((1, 1), np.float32))
    server = Server(repo, "--shutdown-grace-secs", "1.5", "--drain-secs", "120")
    stub = _stub(server)
    health = health_pb2_grpc.HealthStub(server.channel())
    accepted = [stub.ModelInfer.future(one, timeout=120) for _ in range(8)]  # ~4 s of queued work
    _wait(lambda: 'deepserve_pending_requests{model="slow",version="1"} 8.0' in _scrape(server), 30,
          "the 8 requests to be accepted")
    server.proc.send_signal(signal.SIGTERM)
    _wait(lambda: not stub.ServerReady(pb.ServerReadyRequest()).ready, 2, "ServerReady false right after SIGTERM")
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    in_grace = stub.ModelInfer.future(one, timeout=120)  # the grace period: still accepted
    _wait(lambda: not stub.ModelReady(pb.ModelReadyRequest(name="slow")).ready, 30, "the grace period to end")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(one, timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
    assert all(float(outputs(f.result())["y"][0, 0]) == 1.0 for f in [*accepted, in_grace])
    assert server.proc.wait(60) == 0

    short = Server(repo, "--drain-secs", "0.5")
    short_stub = _stub(short)
    stuck = [short_stub.ModelInfer.future(one, timeout=60) for _ in range(4)]
    _wait(lambda: 'deepserve_pending_requests{model="slow",version="1"} 4.0' in _scrape(short), 30,
          "the 4 requests to be accepted")
    short.proc.send_signal(signal.SIGTERM)
    assert short.proc.wait(60) == 1  # the drain time ran out with requests in flight
    assert "drain time over" in short.log()
    for f in stuck:
        f.cancel()


def test_deadlines_inflight_limit_and_json_access_log(tmp_path):
    repo = tmp_path / "models"
    save(slow_model(n=1000, reps=60), repo, "slow", config="max_batch_size: 1\n")  # ~0.5 s a run here
    server = Server(repo, "--max-inflight", "3", "--log-format", "json", "--access-log")
    stub = _stub(server)
    stub.ServerReady(pb.ServerReadyRequest())  # the connection is up: the next calls arrive in order
    one = request("slow", x=np.ones((1, 1), np.float32))
    try:
        # A request whose gRPC deadline passes while it waits is dropped before it runs.
        long = stub.ModelInfer.future(one, timeout=30)
        # The long one must be running before the short ones arrive (on a busy machine 20 ms were not enough).
        _wait(lambda: 'deepserve_pending_requests{model="slow",version="1"} 1.0' in _scrape(server), 10,
              "the long request to start")
        short = [stub.ModelInfer.future(one, timeout=0.05) for _ in range(2)]
        for f in short:
            with pytest.raises(grpc.RpcError) as err:
                f.result()
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        long.result(timeout=30)
        time.sleep(0.3)
        st = stub.ModelStatistics(pb.ModelStatisticsRequest(name="slow")).model_stats[0]
        assert st.execution_count == 1  # the long request alone (warmup is not counted)
        # Beyond --max-inflight requests are refused at once.
        futures = [stub.ModelInfer.future(one, timeout=30) for _ in range(6)]
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
                assert "--max-inflight" in exc.details()
        assert codes.count("OK") >= 3 and "UNAVAILABLE" in codes, codes
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        access = [r for r in lines if r["message"] == "infer"]
        assert {"request_id", "model", "version", "status", "duration_ms", "time", "level"} <= set(access[0])
        assert {r["status"] for r in access} >= {"OK", "UNAVAILABLE", "CANCELLED"}
    finally:
        server.stop()
