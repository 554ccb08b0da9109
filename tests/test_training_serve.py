"""What training publishes, as a user of the server meets it: the streaming RNN stepped over gRPC matches the
whole-sequence model, `deepserve infer --text` names a language, and a training job publishing into a polled
repository under load swaps versions without one failed request. Real training processes, a real server, real
clients."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("mnist1d")

from support import Load, Server, outputs, request  # noqa: E402

from service._proto import inference_pb2 as pb  # noqa: E402
from service._proto import inference_pb2_grpc  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
FAST = {  # a few seconds of training each: these tests check serving behaviour, not accuracy
    "mnist1d_rnn": ["--epochs", "1", "--set", "data.mnist1d_samples=2000"],
    "langid_transformer": ["--epochs", "1", "--set", "data.max_per_language=100"],
}


def train_command(job: str, repo: Path, runs: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "training", job, *args, "--set", "train.threads=1", "--repository", str(repo),
            "--runs", str(runs)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Both jobs trained side by side into one repository, then served by one `deepserve serve`."""
    tmp = tmp_path_factory.mktemp("trained")
    repo = tmp / "models"
    procs = [subprocess.Popen(train_command(job, repo, tmp / "runs", *args), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for job, args in FAST.items()]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert sorted(p.name for p in repo.iterdir()) == ["langid_transformer", "mnist1d_rnn", "mnist1d_rnn_stream"]
    server = Server(repo)
    yield server, repo
    server.stop()


def step_request(sid: int | str, x: float, start: bool, end: bool) -> pb.ModelInferRequest:
    req = request("mnist1d_rnn_stream", x_t=np.array([[x]], np.float32))
    req.parameters["sequence_id"].CopyFrom(pb.InferParameter(**({"string_param": sid} if isinstance(sid, str)
                                                                 else {"uint64_param": sid})))
    req.parameters["sequence_start"].bool_param = start
    req.parameters["sequence_end"].bool_param = end
    return req


def test_streamed_rnn_steps_over_grpc_match_the_whole_sequence_model(served) -> None:
    """Issue 6's proof: test sequences fed one step per request, several interleaved on each of four concurrent
    clients (numeric and string sequence ids), end with the logits ModelInfer gives for the whole sequence."""
    server, repo = served
    examples = np.load(repo / "mnist1d_rnn" / "1" / "examples.npz")["signal"]  # real test rows, [k, 40, 1]
    rng = np.random.default_rng(0)
    sequences = [examples[i] for i in range(len(examples))]
    sequences += [examples[i][:n] for i, n in enumerate((1, 5, 17, 24))]  # other lengths too
    sequences.append(np.concatenate([examples[0], examples[1]]))  # longer than training's 40
    sequences.append(rng.standard_normal((23, 1)).astype(np.float32))
    with server.channel() as ch:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
        whole = [outputs(stub.ModelInfer(request("mnist1d_rnn", signal=s[None])))["logits"][0] for s in sequences]

    def client(c: int, mine: list[int]) -> dict[int, np.ndarray]:
        """Round-robin over this client's sequences: step t of each, then step t+1 of each, ..."""
        last: dict[int, np.ndarray] = {}
        with server.channel() as ch:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
            for t in range(max(len(sequences[k]) for k in mine)):
                for k in mine:
                    seq = sequences[k]
                    if t < len(seq):
                        sid = f"client{c}-seq{k}" if c % 2 else 1000 + k
                        reply = stub.ModelInfer(step_request(sid, float(seq[t, 0]), t == 0, t == len(seq) - 1))
                        last[k] = outputs(reply)["y"][0]
        return last

    clients = 4
    with ThreadPoolExecutor(clients) as pool:
        parts = pool.map(client, range(clients), [list(range(c, len(sequences), clients)) for c in range(clients)])
        stepped = {k: y for part in parts for k, y in part.items()}
    assert sorted(stepped) == list(range(len(sequences)))
    diffs = [float(np.abs(stepped[k] - whole[k]).max()) for k in range(len(sequences))]
    assert max(diffs) <= 1e-5, diffs
    assert len({tuple(np.round(w, 3)) for w in whole}) > 1  # the sequences really are different inputs


def test_infer_text_prints_the_language_the_model_predicts(served) -> None:
    """`deepserve infer langid_transformer --text ...`: raw UTF-8 in, one line per text with the top classes as
    score:index:label, the first being the class the published model itself ranks highest."""
    import onnxruntime as ort

    server, repo = served
    model_dir = repo / "langid_transformer"
    labels = (model_dir / "labels.txt").read_text().splitlines()
    texts = ["¿Dónde está la biblioteca?", "Wie spät ist es?", "Where is the station?"]
    cmd = [sys.executable, "-m", "service.cli", "infer", "langid_transformer", "--url", server.url]
    for t in texts:
        cmd += ["--text", t]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    sess = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    lines = done.stdout.splitlines()
    assert lines[0] == "langid_transformer version 1"
    for i, text in enumerate(texts):
        prefix = f"  [{i}] {text!r}: "
        (line,) = [ln for ln in lines if ln.startswith(prefix)]
        top = line[len(prefix):].split()
        assert len(top) == 3
        score, index, label = top[0].split(":", 2)
        tokens = np.frombuffer(text.encode(), np.uint8).astype(np.int64)[None] + 1  # the config's encoding
        probs = sess.run(["probabilities"], {"tokens": tokens})[0][0]
        assert label == labels[int(index)] and int(index) == int(probs.argmax())
        assert float(score) == pytest.approx(float(probs.max()), abs=1e-4)


def load_failures(server: Server) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith("deepserve_model_load_failures_total{"))


def test_a_training_publish_into_a_polled_repository_swaps_versions_under_load(tmp_path: Path) -> None:
    """Issue 5 with a real publisher: `deepserve train` publishes version 2 into the repository a polling server
    serves while clients send requests without pause. The server picks up the new version, no request fails, and
    no load ever fails (a half-written file would be a failed load)."""
    repo = tmp_path / "models"
    first = subprocess.run(train_command("digits_cnn", repo, tmp_path / "runs1", "--epochs", "1"), cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert first.returncode == 0, first.stderr[-3000:]  # version 1, from nothing (CI has no models/)
    images = np.load(repo / "digits_cnn" / "1" / "examples.npz")["image"][:4]
    server = Server(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    versions: list[str] = []
    lock = threading.Lock()

    def check(reply: pb.ModelInferResponse) -> bool:
        probs = outputs(reply)["probabilities"]
        with lock:
            versions.append(reply.model_version)
        return probs.shape == (4, 10) and bool(np.allclose(probs.sum(1), 1, atol=1e-4))

    load = Load(server.url, lambda: request("digits_cnn", image=images), concurrency=4, check=check)
    try:
        trained = subprocess.run(train_command("digits_cnn", repo, tmp_path / "runs", "--epochs", "1"), cwd=ROOT,
                                 capture_output=True, text=True, timeout=300, env=dict(os.environ))
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert (repo / "digits_cnn" / "2" / "model.onnx").is_file()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                after = versions[versions.index("2"):] if "2" in versions else []
            if len(after) >= 50:
                break
            time.sleep(0.1)
    finally:
        codes = load.stop()
    try:
        assert codes.get("OK", 0) > 0 and set(codes) == {"OK"}, (codes, load.errors[:5])
        assert versions[0] == "1" and versions[-1] == "2", "the new version never took the traffic"
        assert load_failures(server) == 0, server.log()[-3000:]
        with server.channel() as ch:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=False)).models
        assert [(m.name, m.version, m.state) for m in index if m.state == "READY"] == [("digits_cnn", "2", "READY")]
        assert not [m.reason for m in index if m.state not in ("READY", "UNAVAILABLE") or "fail" in m.reason]
    finally:
        server.stop()
