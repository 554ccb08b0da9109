"""`deepserve infer` as a user runs it, against a real server, over gRPC and over HTTP (an http:// URL): --examples
on a published classifier (examples.npz and labels.txt the way training jobs publish them) and --input
NAME=FILE.npy. The output is the same whichever protocol carried it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import EXAMPLE_LABELS, EXAMPLE_SCORES
from support import ROOT


def infer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", "infer", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(params=["grpc", "http"])
def url(request, edge_server) -> str:
    return edge_server.url if request.param == "grpc" else edge_server.http_url


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_examples_show_top_classes_true_labels_and_accuracy(url, edge_repository):
    r = infer("classifier", "--examples", "--url", url, "--repository", str(edge_repository),
              "--top", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "classifier version 1"
    rows = [ln for ln in lines if ln.startswith("  [")]
    assert len(rows) == len(EXAMPLE_LABELS)
    names = ["cat", "dog", "bird"]
    probs = _softmax(np.array(EXAMPLE_SCORES, np.float32))
    for i, (row, truth) in enumerate(zip(rows, EXAMPLE_LABELS, strict=True)):
        top = np.argsort(-probs[i])[:2]
        shown = "  ".join(f"{probs[i, k]:f}:{k}:{names[k]}" for k in top)
        verdict = "ok" if top[0] == truth else "WRONG"
        assert row == f"  [{i}] {shown}  true {truth} {verdict}", row
    assert [ln.rsplit(" ", 1)[1] for ln in rows] == ["ok", "ok", "ok", "WRONG"]
    assert lines[-1] == "accuracy on these examples: 75.0%"


def test_examples_of_a_model_that_has_none(url, edge_repository):
    r = infer("gather", "--examples", "--url", url, "--repository", str(edge_repository))
    assert r.returncode != 0 and f"no examples.npz for gather under {edge_repository / 'gather'}" in r.stderr


def test_input_from_npy_prints_each_output(url, tmp_path):
    scores = np.array([[0.0, 0.0, 2.0], [1.0, 1.0, 1.0]], np.float32)
    path = tmp_path / "scores.npy"
    np.save(path, scores)
    r = infer("classifier", "--input", f"scores={path}", "--url", url)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "logits float32 [2, 3]" in out and "probabilities float32 [2, 3]" in out
    # a classifier gets its top classes per sample; no true labels were given, so no verdict and no accuracy
    p = _softmax(scores)
    assert f"  [0] {p[0, 2]:f}:2:bird  {p[0, 0]:f}:0:cat  {p[0, 1]:f}:1:dog\n" in out
    assert "  [1] 0.333333:0:cat  0.333333:1:dog  0.333333:2:bird\n" in out
    assert "true" not in out and "accuracy" not in out


def test_input_errors_are_plain(url, tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((1, 4), np.float32))
    r = infer("classifier", "--input", f"nope={path}", "--url", url)
    assert r.returncode != 0 and "model classifier has no input 'nope'; inputs: scores" in r.stderr
    r = infer("classifier", "--input", f"scores={path}", "--url", url)
    status = "HTTP 400" if "://" in url else "INVALID_ARGUMENT"
    assert r.returncode == 1 and status in r.stderr and "expected shape [-1,3], got [1,4]" in r.stderr
    r = infer("classifier", "--url", url)
    assert r.returncode != 0 and "nothing to send" in r.stderr


def test_an_error_is_the_servers_message_on_both_protocols(url):
    r = infer("nope", "--input", "x=/dev/null", "--url", url)
    assert r.returncode == 1 and "unknown model 'nope'" in r.stderr, r.stderr
    assert ("NOT_FOUND" if "://" not in url else "HTTP 404") in r.stderr
