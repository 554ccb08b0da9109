"""text_gpt end to end in a real process, shortened (one layer, a few steps, n-gram orders 1-4): it publishes a
decoupled generation model whose parity passed over prefill and decode steps, whose card holds held-out bits per
byte for the Transformer and the n-gram baseline, and which the server's loader and generation engine serve. The
default run (10 x 50 steps, ~5 minutes on two cores) is `deepserve train text_gpt`; it is not repeated here."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

pytestmark = pytest.mark.slow

ARGS = ["--epochs", "2", "--set", "train.steps_per_epoch=3", "--set", "model.n_layer=1", "--set", "model.n_embd=32",
        "--set", "baseline.orders=[1, 2, 3, 4]", "--set", "train.threads=1"]


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("text_gpt")
    cmd = [sys.executable, "-m", "training", "text_gpt", *ARGS, "--repository", str(tmp / "models"), "--runs",
           str(tmp / "runs")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "text_gpt: test bits/byte" in done.stdout and "n-gram (order" in done.stdout
    return tmp / "models" / "text_gpt"


def test_card_holds_bits_per_byte_for_both_models_and_parity(published):
    version = published / "1"
    assert sorted(p.name for p in version.iterdir()) == ["card.json", "examples.npz", "model.onnx",
                                                          "training_curve.png"]
    card = json.loads((version / "card.json").read_text())
    test = card["test"]
    assert 0 < test["bits_per_byte"] < 9 and 0 < test["ngram_bits_per_byte"] < 9
    by_order = {int(k): v for k, v in test["ngram_val_bits_per_byte_by_order"].items()}
    assert sorted(by_order) == [1, 2, 3, 4] and test["ngram_order"] == min(by_order, key=by_order.__getitem__)
    assert test["reduction_vs_ngram"] == pytest.approx(1 - test["bits_per_byte"] / test["ngram_bits_per_byte"])
    assert [r["epoch"] for r in card["history"]] == [1, 2]
    parity = card["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4
    steps = {(c["step"], c["batch"], c["new_tokens"], c["past"]) for c in parity["cases"]}
    assert steps == {(s, b, n, p) for b in (1, 3, 8) for s, n, p in
                     [("prefill", 1, 0), ("prefill", 7, 0), ("prefill", 64, 0), ("decode", 1, 1),
                      ("decode", 1, 40), ("decode", 1, 200), ("chunk", 5, 30)]}
    assert [s["prompt"] for s in card["samples"]] == ["Hello", "What is your name?\n", "Tell me a joke.\n",
                                                      "Do you like music?\n"]
    assert all(isinstance(s["greedy"], str) and isinstance(s["sampled"], str) for s in card["samples"])
    assert card["data"]["unique_conversations"] < card["data"]["conversations"]  # repeats dropped before the split


def test_the_server_loads_and_generates_from_it(published):
    from prometheus_client import CollectorRegistry

    from service.config import read_config
    from service.generation import Finished, Generator
    from service.metrics import Metrics
    from service.models import load_version

    config = read_config(published, (published / "config.pbtxt").read_bytes())
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 16
    mv = load_version(published, 1, config, True, Metrics(CollectorRegistry()))
    engine = Generator(mv.name, mv.config, mv.instances[0])

    async def body():
        engine.start()
        try:
            items = [item async for item in engine.generate("Hello", {"max_tokens": 8, "temperature": 0})]
        finally:
            await engine.stop()
        return items

    items = asyncio.run(body())
    assert isinstance(items[-1], Finished) and (items[-1].tokens == 8 or items[-1].reason == "end_token")
    assert all(isinstance(i, str) for i in items[:-1])
    assert engine.spec.context == 256 and engine.spec.max_generations == 16
