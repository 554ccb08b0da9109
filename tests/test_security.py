"""Refusing strangers: bearer tokens, TLS and mutual TLS (with tritonclient ssl=True), message size limits."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
from support import Server, add_sub_model, outputs, request, save

from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc

X = np.ones((1, 4), np.float32)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    r = tmp_path_factory.mktemp("sec") / "models"
    save(add_sub_model(), r, "m", config="max_batch_size: 8\n")
    return r


def test_token_auth(repo, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("first-secret\n\nsecond-secret\n")
    server = Server(repo, "--auth-token-file", str(tokens), wait_ready=False)
    ch = server.channel()
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
    good = [("authorization", "Bearer second-secret")]
    try:
        import time

        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # health is open: Kubernetes probes carry no token
            try:
                if health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status == 1:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        for meta in (None, [("authorization", "Bearer wrong")], [("authorization", "second-secret")],
                     [("authorization", "Bearer ")]):
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request("m", x=X, y=X), metadata=meta)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=meta)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="m"), metadata=good).model_stats[0]
        assert stats.inference_stats.fail.count == 0 and stats.inference_count == 0  # the model was never touched
        assert outputs(stub.ModelInfer(request("m", x=X, y=X), metadata=good))["sum"][0, 0] == 2.0
        first = [("authorization", "Bearer first-secret")]
        assert stub.ServerLive(pb.ServerLiveRequest(), metadata=first).live
    finally:
        ch.close()
        server.stop()


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


def test_message_size_limit(repo):
    server = Server(repo, "--max-message-bytes", str(1 << 20))
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(server.channel())
    try:
        big = np.ones((8, 4), np.float32)
        req = request("m", x=big, y=big)
        req.parameters["padding"].string_param = "x" * (2 << 20)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert outputs(stub.ModelInfer(request("m", x=X, y=X)))["sum"][0, 0] == 2.0
    finally:
        server.stop()
