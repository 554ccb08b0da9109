"""Refusing strangers: bearer tokens, TLS and mutual TLS (with tritonclient ssl=True), message size and in-flight
limits; tokens and limits over both protocols."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from protocols import HttpClient, connect, raw
from support import Server, add_sub_model, outputs, request, save, slow_model

from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc

X = np.ones((1, 4), np.float32)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    r = tmp_path_factory.mktemp("sec") / "models"
    save(add_sub_model(), r, "m", config="max_batch_size: 8\n")
    return r


@pytest.fixture(scope="module")
def token_server(repo, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text("first-secret\n\nsecond-secret\n")
    server = Server(repo, "--auth-token-file", str(tokens), wait_ready=False)
    server.wait_log("ready:")
    yield server
    server.stop()


def _inferences(stub, metadata) -> int:
    return stub.ModelStatistics(pb.ModelStatisticsRequest(name="m"), metadata=metadata).model_stats[0].inference_count


def test_token_auth(token_server):
    ch = token_server.channel()
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
    good = [("authorization", "Bearer second-secret")]
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        # health is open: Kubernetes probes carry no token
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status == 1
        count = _inferences(stub, good)
        for meta in (None, [("authorization", "Bearer wrong")], [("authorization", "second-secret")],
                     [("authorization", "Bearer ")]):
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request("m", x=X, y=X), metadata=meta)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=meta)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _inferences(stub, good) == count  # the model was never touched
        assert outputs(stub.ModelInfer(request("m", x=X, y=X), metadata=good))["sum"][0, 0] == 2.0
        first = [("authorization", "Bearer first-secret")]
        assert stub.ServerLive(pb.ServerLiveRequest(), metadata=first).live
    finally:
        ch.close()


def test_token_auth_over_both_protocols(token_server, protocol):
    """No token or a wrong one: UNAUTHENTICATED on gRPC, 401 (with WWW-Authenticate) on HTTP, for inference and
    metadata alike, and the model is never reached; either accepted token serves."""
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(token_server.channel())
    good = [("authorization", "Bearer first-secret")]
    count = _inferences(stub, good)
    for token in (None, "wrong", "first-secret-but-longer"):
        client = connect(token_server, protocol, token)
        answer = client.infer("m", [raw("x", X), raw("y", X)])
        assert (answer.kind, answer.status) == ("UNAUTHENTICATED", client.status_of("UNAUTHENTICATED")), answer
        assert "bearer token" in answer.message
        assert client.server_metadata().status == client.status_of("UNAUTHENTICATED")
        client.close()
    assert _inferences(stub, good) == count
    for token in ("first-secret", "second-secret"):
        client = connect(token_server, protocol, token)
        assert client.infer("m", [raw("x", X), raw("y", X)]).outputs["sum"][0, 0] == 2.0
        assert client.server_metadata().kind == "OK"
        client.close()
    if protocol == "http":  # --open-health (the default): the probes' endpoints answer without a token
        client = HttpClient(token_server.http_url)
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/m/ready"):
            assert client.send("GET", path)[0] == 200, path
        status, headers, body = client.send("GET", "/v2/models/m")
        assert status == 401 and headers["www-authenticate"] == "Bearer" and b"bearer token" in body
        client.close()


def test_closed_health_and_the_streaming_rpc_need_the_token(repo, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tokens = tmp_path / "tokens"
    tokens.write_text("the-secret\n")
    server = Server(repo, "--auth-token-file", str(tokens), "--no-open-health", wait_ready=False)
    good = [("authorization", "Bearer the-secret")]
    try:
        server.wait_log("ready:")
        with server.channel() as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for meta in (None, [("authorization", "Bearer wrong")]):
                with pytest.raises(grpc.RpcError) as err:
                    health.Check(health_pb2.HealthCheckRequest(), metadata=meta)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert health.Check(health_pb2.HealthCheckRequest(), metadata=good).status == 1  # SERVING
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
            for meta in (None, [("authorization", "Bearer wrong")]):
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.ModelStreamInfer(iter([request("m", x=X, y=X)]), metadata=meta, timeout=10))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="m"), metadata=good).model_stats[0]
            assert stats.inference_count == 0  # the refused streams never reached the model
            replies = list(stub.ModelStreamInfer(iter([request("m", x=X, y=X)]), metadata=good, timeout=10))
            assert not replies[0].error_message and outputs(replies[0].infer_response)["sum"][0, 0] == 2.0
    finally:
        server.stop()


def test_unreadable_token_file_stops_the_server_plainly(repo, tmp_path):
    for name, content in (("latin1", b"caf\xe9-secret\n"), ("empty", b"\n\n")):
        tokens = tmp_path / name
        tokens.write_bytes(content)
        server = Server(repo, "--auth-token-file", str(tokens), wait_ready=False)
        assert server.proc.wait(30) == 2
        assert "Traceback" not in server.log() and "--auth-token-file" in server.log(), server.log()
        server.stop()


def _certs(d):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made with openssl."""

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=test-ca")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj",
            f"/CN={who}")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            f"{who}.pem", "-days", "2", "-extfile", "san.ext")
    return d


TRITON_TLS = """
import sys, numpy as np, tritonclient.grpc as tc
url, ca, cert, key = sys.argv[1:5]
kw = dict(ssl=True, root_certificates=ca)
if cert != "-":
    kw.update(certificate_chain=cert, private_key=key)
c = tc.InferenceServerClient(url, **kw)
i = [tc.InferInput("x", [1, 4], "FP32"), tc.InferInput("y", [1, 4], "FP32")]
for t in i:
    t.set_data_from_numpy(np.ones((1, 4), np.float32))
print(c.infer("m", i).as_numpy("sum")[0, 0])
"""


def _triton(url, d, with_cert: bool):
    args = [str(d / "ca.pem"), str(d / "client.pem") if with_cert else "-", str(d / "client.key")]
    return subprocess.run([sys.executable, "-c", TRITON_TLS, url, *args], capture_output=True, text=True,
                          timeout=60)


def test_tls_and_mutual_tls_with_tritonclient(repo, tmp_path):
    d = _certs(tmp_path)
    tls = Server(repo, "--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "server.key"), wait_ready=False)
    mtls = Server(repo, "--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "server.key"), "--tls-ca",
                  str(d / "ca.pem"), wait_ready=False)
    try:
        tls.wait_log("ready:")
        mtls.wait_log("ready:")
        r = _triton(tls.url, d, with_cert=False)
        assert r.returncode == 0 and r.stdout.strip() == "2.0", r.stderr[-2000:]
        with grpc.insecure_channel(tls.url) as plain, pytest.raises(grpc.RpcError):  # plaintext to TLS fails
            inference_pb2_grpc.GRPCInferenceServiceStub(plain).ServerLive(pb.ServerLiveRequest(), timeout=3)
        r = _triton(mtls.url, d, with_cert=True)
        assert r.returncode == 0 and r.stdout.strip() == "2.0", r.stderr[-2000:]
        r = _triton(mtls.url, d, with_cert=False)  # mutual TLS: no client certificate, no service
        assert r.returncode != 0
        health = subprocess.run([sys.executable, "-m", "service.cli", "health", "--url", tls.url, "--tls-ca",
                                 str(d / "ca.pem")], capture_output=True, text=True)
        assert health.returncode == 0, health.stderr
    finally:
        tls.stop()
        mtls.stop()


@pytest.fixture(scope="module")
def limits_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("limits") / "models"
    save(add_sub_model(), repo, "m", config="max_batch_size: 8\n")
    save(slow_model(n=1000, reps=60), repo, "slow", config="max_batch_size: 1\n")  # ~0.5 s a run
    server = Server(repo, "--max-message-bytes", str(1 << 20), "--max-inflight", "1")
    yield server
    server.stop()


def test_message_size_limit(limits_server, protocol):
    """A request over --max-message-bytes: RESOURCE_EXHAUSTED on gRPC, 413 on HTTP; the next one is served."""
    client = connect(limits_server, protocol)
    try:
        big = np.ones((8, 4), np.float32)
        answer = client.infer("m", [raw("x", big), raw("y", big)], params={"padding": "x" * (2 << 20)})
        assert answer.status == {"grpc": grpc.StatusCode.RESOURCE_EXHAUSTED, "http": 413}[protocol], answer
        if protocol == "http":
            assert f"limit of {1 << 20} bytes (--max-message-bytes)" in answer.message
        assert client.infer("m", [raw("x", X), raw("y", X)]).outputs["sum"][0, 0] == 2.0
    finally:
        client.close()


def _pending(server, model: str) -> float:
    prefix = f'deepserve_pending_requests{{model="{model}",version="1"}} '
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    return next((float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def test_max_inflight_over_both_protocols(limits_server, protocol):
    """--max-inflight 1: while one slow request runs, the next is refused at once (UNAVAILABLE / 503) on either
    protocol, whichever protocol the running one came by."""
    one = [raw("x", np.ones((1, 1), np.float32))]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: connect(limits_server, "grpc").infer("slow", one))
        deadline = time.monotonic() + 30
        while _pending(limits_server, "slow") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        client = connect(limits_server, protocol)
        answer = client.infer("m", [raw("x", X), raw("y", X)])
        assert (answer.kind, answer.status) == ("UNAVAILABLE", client.status_of("UNAVAILABLE")), answer
        assert "--max-inflight" in answer.message
        assert running.result(60).kind == "OK"
    assert client.infer("m", [raw("x", X), raw("y", X)]).kind == "OK"
    client.close()
