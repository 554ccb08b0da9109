"""`deepserve serve` options from flags and DEEPSERVE_* environment variables: the same checks for both, and the
command line wins."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
from support import ROOT, Server, add_sub_model, save

from service import settings
from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc


@pytest.fixture(autouse=True)
def _no_env_from_outside(monkeypatch):
    import os

    for key in [k for k in os.environ if k.startswith("DEEPSERVE_")]:
        monkeypatch.delenv(key)


def _refused(monkeypatch, capsys, env: dict[str, str], argv: list[str]) -> str:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_:
        settings.parse(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(("env", "words"), [
    ({"DEEPSERVE_LOG_FORMAT": "xml"}, ["DEEPSERVE_LOG_FORMAT", "invalid choice: 'xml'"]),
    ({"DEEPSERVE_MODEL_CONTROL_MODE": "manual"}, ["DEEPSERVE_MODEL_CONTROL_MODE", "invalid choice: 'manual'"]),
    ({"DEEPSERVE_GRPC_PORT": "80o1"}, ["DEEPSERVE_GRPC_PORT", "invalid int value: '80o1'"]),
    ({"DEEPSERVE_DRAIN_SECS": "soon"}, ["DEEPSERVE_DRAIN_SECS", "invalid float value: 'soon'"]),
    ({"DEEPSERVE_STRICT_READINESS": "maybe"}, ["DEEPSERVE_STRICT_READINESS", "'maybe'", "true", "false"]),
    ({"DEEPSERVE_TLS_CERT": "server.pem"}, ["--tls-cert and --tls-key go together"]),
])
def test_env_values_get_the_checks_flags_get(monkeypatch, capsys, env, words):
    err = _refused(monkeypatch, capsys, env, [])
    for w in words:
        assert w in err, (w, err)


def test_env_values_are_typed_and_the_command_line_wins(monkeypatch):
    for key, value in {"DEEPSERVE_GRPC_PORT": "9001", "DEEPSERVE_DRAIN_SECS": "2.5", "DEEPSERVE_ACCESS_LOG": "yes",
                       "DEEPSERVE_STRICT_READINESS": "off", "DEEPSERVE_LOAD_MODEL": "a,b",
                       "DEEPSERVE_LOG_LEVEL": "debug"}.items():
        monkeypatch.setenv(key, value)
    args = settings.parse([])
    assert (args.grpc_port, args.drain_secs, args.access_log, args.strict_readiness, args.load_model,
            args.log_level) == (9001, 2.5, True, False, ["a", "b"], "debug")
    args = settings.parse(["--grpc-port", "9100", "--strict-readiness", "--load-model", "c", "--load-model", "d",
                           "--log-level", "error"])
    assert (args.grpc_port, args.strict_readiness, args.load_model, args.log_level) == (9100, True, ["c", "d"],
                                                                                       "error")
    assert args.drain_secs == 2.5  # not on the command line: the environment still counts


def test_workers_with_explicit_model_control_is_refused(monkeypatch, capsys):
    # load/unload RPCs would reach one worker of N: the others would keep serving the old set.
    err = _refused(monkeypatch, capsys, {}, ["--workers", "2", "--model-control-mode", "explicit"])
    assert "--workers" in err and "explicit" in err
    err = _refused(monkeypatch, capsys, {"DEEPSERVE_WORKERS": "3"}, ["--model-control-mode", "explicit"])
    assert "--workers" in err and "explicit" in err


def test_a_bad_env_value_stops_the_real_cli_with_exit_2_and_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--repository", str(tmp_path)], cwd=ROOT,
                       env={**_clean_env(), "DEEPSERVE_MAX_INFLIGHT": "lots"}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert "DEEPSERVE_MAX_INFLIGHT" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_server_takes_env_and_the_command_line_list_replaces_the_env_list(tmp_path):
    repo = tmp_path / "models"
    for name in ("a", "b"):
        save(add_sub_model(), repo, name, config="max_batch_size: 4\n")
    # Server() passes --grpc-port on the command line: the env's port 1 must lose to it, or nothing answers.
    env = {"DEEPSERVE_MODEL_CONTROL_MODE": "explicit", "DEEPSERVE_LOAD_MODEL": "a,b", "DEEPSERVE_LOG_FORMAT": "json",
           "DEEPSERVE_GRPC_PORT": "1"}
    server = Server(repo, "--load-model", "a", env=env)
    try:
        with server.channel() as ch:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ModelReady(pb.ModelReadyRequest(name="a")).ready
            assert not stub.ModelReady(pb.ModelReadyRequest(name="b")).ready
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="a"))  # explicit mode, from env
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(pb.ModelInferRequest(model_name="a"))
        lines = [line for line in server.log().splitlines() if line.strip()]
        assert lines and all(json.loads(line)["level"] for line in lines if line.startswith("{"))
        assert any("ready:" in json.loads(line)["message"] for line in lines if line.startswith("{"))
    finally:
        server.stop()


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("DEEPSERVE_")}
