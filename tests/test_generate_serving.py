"""Generation served: a tiny trained byte GPT behind a real server, over HTTP (Triton's generate extension:
/generate and /generate_stream as server-sent events) and gRPC (ModelStreamInfer on a decoupled model, driven by
tritonclient's start_stream / async_stream_infer in its own process). The torch model's greedy decode is the
reference; streamed chunks, the unary answer and the gRPC stream must all agree with it."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import threading
import urllib.parse

import grpc
import numpy as np
import pytest

pytest.importorskip("torch")

from gpt_support import publish_tiny_gpt, reference  # noqa: E402
from support import ROOT, Server  # noqa: E402

from service._proto import inference_pb2 as pb  # noqa: E402
from service._proto import inference_pb2_grpc  # noqa: E402

PROMPTS = ["Hello", "What is your name?\n", "Tell me a joke.\n", "Do you", "I", "Who are you?\n", "Good morning",
           "hi"]


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    """(server, torch model): tiny_gpt (16 generations at once, 4 queued) and tiny_gpt_one, the same model capped
    at one generation and no queue."""
    from training.gpt_job import generation_config

    repo = tmp_path_factory.mktemp("genserve") / "models"
    folder, model = publish_tiny_gpt(repo)
    one = repo / "tiny_gpt_one"
    shutil.copytree(folder, one)
    (one / "config.pbtxt").write_text(generation_config("tiny_gpt_one", model.config, {
        "max_generations": 1, "max_queue": 0, "default_max_tokens": 8}))
    server = Server(repo)
    yield server, model
    server.stop()


def post(server, path: str, doc: dict) -> tuple[int, dict]:
    u = urllib.parse.urlsplit(server.http_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, json.loads(body)


def sse(server, model: str, doc: dict) -> tuple[int, list[dict]]:
    u = urllib.parse.urlsplit(server.http_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", f"/v2/models/{model}/generate_stream", json.dumps(doc).encode())
    r = conn.getresponse()
    if r.status != 200:
        return r.status, [json.loads(r.read())]
    assert r.getheader("content-type") == "text/event-stream"
    events = [json.loads(line[6:]) for line in r.read().decode().split("\n") if line.startswith("data: ")]
    conn.close()
    return r.status, events


def test_greedy_over_http_equals_the_torch_decode_and_the_stream_equals_the_unary_answer(gpt):
    server, model = gpt
    for prompt in PROMPTS[:4]:
        want, _, _ = reference(model, prompt, 24)
        status, reply = post(server, "/v2/models/tiny_gpt/generate",
                             {"text_input": prompt, "parameters": {"max_tokens": 24, "temperature": 0}})
        assert status == 200, reply
        assert reply == {"model_name": "tiny_gpt", "model_version": "1", "text_output": want}
        status, events = sse(server, "tiny_gpt", {"text_input": prompt, "parameters": {"max_tokens": 24}})
        assert status == 200 and len(events) > 1, events
        assert {(e["model_name"], e["model_version"]) for e in events} == {("tiny_gpt", "1")}
        assert "".join(e["text_output"] for e in events) == want


def test_a_fixed_seed_gives_the_same_sampled_text_twice(gpt):
    server, _ = gpt
    doc = {"text_input": "Hello", "parameters": {"max_tokens": 30, "temperature": 1.0, "top_k": 20, "top_p": 0.9,
                                                 "seed": 7}}
    first, second = post(server, "/v2/models/tiny_gpt/generate", doc), post(server, "/v2/models/tiny_gpt/generate",
                                                                           doc)
    assert first == second and first[0] == 200
    other = post(server, "/v2/models/tiny_gpt/generate", {**doc, "parameters": {**doc["parameters"], "seed": 8}})
    assert other[1]["text_output"] != first[1]["text_output"]


def test_concurrent_generations_each_equal_their_result_alone_and_batch(gpt):
    server, _ = gpt
    alone = {p: post(server, "/v2/models/tiny_gpt/generate", {"text_input": p, "parameters": {"max_tokens": 30}})
             for p in PROMPTS}
    together: dict[str, tuple] = {}
    threads = [threading.Thread(target=lambda p=p: together.__setitem__(p, post(
        server, "/v2/models/tiny_gpt/generate", {"text_input": p, "parameters": {"max_tokens": 30}})))
               for p in PROMPTS * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    with server.channel() as ch:
        stats = inference_pb2_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
            pb.ModelStatisticsRequest(name="tiny_gpt")).model_stats[0]
    sizes = {b.batch_size for b in stats.batch_stats}
    assert max(sizes) > 1, sizes  # decode steps of several generations ran as one batch
    assert stats.inference_count >= 30 * len(PROMPTS) * 3 - 3 * len(PROMPTS)  # tokens (some end early)


TRITON_STREAM = r"""
import json, queue, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

url, prompt, empty_final = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
c = tc.InferenceServerClient(url)
got = queue.Queue()
c.start_stream(callback=lambda result, error: got.put((result, error)))
x = tc.InferInput("text_input", [1], "BYTES")
x.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
params = {"max_tokens": 24, "temperature": 0}
c.async_stream_infer("tiny_gpt", [x], request_id="r1", parameters=params, enable_empty_final_response=empty_final)
chunks, finals = [], []
while True:
    result, error = got.get(timeout=60)
    if error is not None:
        print(json.dumps({"error": str(error)})); sys.exit(0)
    r = result.get_response()
    final = r.parameters["triton_final_response"].bool_param
    out = result.as_numpy("text_output")
    chunks.append(None if out is None else out[0].decode())
    finals.append(final)
    if final:
        break
c.stop_stream()
try:
    c.infer("tiny_gpt", [x])
    unary = "ok"
except InferenceServerException as e:
    unary = e.status()
print(json.dumps({"chunks": chunks, "finals": finals, "unary": unary}))
"""


@pytest.mark.parametrize("empty_final", [False, True])
def test_tritonclient_streams_a_decoupled_model(gpt, empty_final):
    server, model = gpt
    want, _, _ = reference(model, "Hello", 24)
    r = subprocess.run([sys.executable, "-c", TRITON_STREAM, server.url, "Hello", "1" if empty_final else "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    assert "error" not in got, got
    assert got["finals"] == [False] * (len(got["finals"]) - 1) + [True]
    if empty_final:
        assert got["chunks"][-1] is None  # the end is an empty response of its own
        assert "".join(got["chunks"][:-1]) == want
    else:
        assert "".join(got["chunks"]) == want
    assert got["unary"] == "StatusCode.UNIMPLEMENTED"  # ModelInfer on a decoupled model, as in Triton


def test_infer_on_a_decoupled_model_is_refused_on_both_protocols(gpt):
    server, _ = gpt
    status, reply = post(server, "/v2/models/tiny_gpt/infer", {"inputs": [
        {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["Hello"]}]})
    assert status == 501 and "decoupled" in reply["error"], reply
    with server.channel() as ch:
        req = pb.ModelInferRequest(model_name="tiny_gpt")
        req.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Hello")
        with pytest.raises(grpc.RpcError) as err:
            inference_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _failed(server, model: str) -> int:
    with server.channel() as ch:
        return inference_pb2_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
            pb.ModelStatisticsRequest(name=model)).model_stats[0].inference_stats.fail.count


def test_a_closed_stream_frees_its_slot_at_once(gpt):
    server, _ = gpt
    failed = _failed(server, "tiny_gpt_one")
    u = urllib.parse.urlsplit(server.http_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v2/models/tiny_gpt_one/generate_stream",
                 json.dumps({"text_input": "Tell me a joke.\n", "parameters": {"max_tokens": 60}}).encode())
    r = conn.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b"data: ")  # the generation is running: the only slot is taken
    status, reply = post(server, "/v2/models/tiny_gpt_one/generate", {"text_input": "hi"})
    assert status == 503 and "tiny_gpt_one" in reply["error"], reply
    conn.close()  # the client goes away mid-stream
    refused = 1
    for _ in range(100):
        status, reply = post(server, "/v2/models/tiny_gpt_one/generate", {"text_input": "hi",
                                                                          "parameters": {"max_tokens": 4}})
        if status == 200:
            break
        refused += 1
    assert status == 200, reply
    # the server saw the client go and cancelled that generation (not one that ran to its end): one failure
    # counted as CANCELLED, besides the refused 503s
    assert _failed(server, "tiny_gpt_one") == failed + 1 + refused


@pytest.mark.parametrize(("params", "words"), [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"top_k": -2}, "top_k"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_generation_parameters_are_refused_and_the_server_goes_on(gpt, params, words):
    server, _ = gpt
    for path in ("/v2/models/tiny_gpt/generate", "/v2/models/tiny_gpt/generate_stream"):
        status, reply = (post(server, path, {"text_input": "Hello", "parameters": params}) if path.endswith("generate")
                         else sse(server, "tiny_gpt", {"text_input": "Hello", "parameters": params}))
        reply = reply if isinstance(reply, dict) else reply[0]
        assert status == 400 and words in reply["error"] and "tiny_gpt" in reply["error"], (path, reply)
    status, reply = post(server, "/v2/models/tiny_gpt/generate", {"text_input": "x" * 500})
    assert status == 400 and "context" in reply["error"], reply
    status, reply = post(server, "/v2/models/tiny_gpt/generate", {"text_input": "Hello", "parameters": {
        "max_tokens": 2}})
    assert status == 200


def test_generation_metrics_move(gpt):
    server, _ = gpt
    from prometheus_client.parser import text_string_to_metric_families

    post(server, "/v2/models/tiny_gpt/generate", {"text_input": "Hello", "parameters": {"max_tokens": 5}})
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    samples = {(s.name, s.labels.get("model")): s.value for f in text_string_to_metric_families(text)
               for s in f.samples}
    assert samples[("deepserve_generated_tokens_total", "tiny_gpt")] >= 5
    assert samples[("deepserve_time_to_first_token_seconds_count", "tiny_gpt")] >= 1
    assert samples[("deepserve_inter_token_latency_seconds_count", "tiny_gpt")] >= 4
    assert np.isfinite(samples[("deepserve_time_to_first_token_seconds_sum", "tiny_gpt")])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_deepserve_generate_streams_to_the_terminal(gpt, protocol):
    server, model = gpt
    want, _, _ = reference(model, "Hello", 16)
    url = server.http_url if protocol == "http" else server.url
    r = subprocess.run([sys.executable, "-m", "service.cli", "generate", "tiny_gpt", "--prompt", "Hello",
                        "--max-tokens", "16", "--temperature", "0", "--url", url], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello" + want + "\n"
    r = subprocess.run([sys.executable, "-m", "service.cli", "generate", "tiny_gpt", "--prompt", "Hello",
                        "--temperature", "-1", "--url", url], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "temperature" in r.stderr
