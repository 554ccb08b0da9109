"""`deepserve train` options that change what is trained, checked on what was trained (the checkpoint's weights and
the card), not on what was parsed: a --config file, its precedence under --set and flags, and --seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
CONFIG = """
[model]
channels = [4, 8]
hidden = 16

[train]
epochs = 2
lr = 0.01
optimizer = "sgd"
"""
RUNS = {  # name: CLI arguments after the job
    "config": ["--config", "{config}", "--set", "train.lr=0.02"],
    "seed3": ["--epochs", "2", "--seed", "3"],
    "seed3_again": ["--epochs", "2", "--seed", "3"],
    "seed4": ["--epochs", "2", "--seed", "4"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """Each run in its own process and folders, all side by side: (card, checkpoint) per run."""
    tmp = tmp_path_factory.mktemp("options")
    config = tmp / "mine.toml"
    config.write_text(CONFIG)
    procs = {}
    for name, args in RUNS.items():
        cmd = [sys.executable, "-m", "training", "digits_cnn", *(a.format(config=config) for a in args),
               "--repository", str(tmp / name / "models"), "--runs", str(tmp / name / "runs")]
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=dict(os.environ))
    done = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
        card = json.loads((tmp / name / "models" / "digits_cnn" / "1" / "card.json").read_text())
        ckpt = torch.load(tmp / name / "runs" / "digits_cnn" / "checkpoint.pt", weights_only=False)
        done[name] = (card, ckpt)
    return done


def test_config_file_is_applied_under_set_and_flags(runs) -> None:
    card, ckpt = runs["config"]
    t = card["spec"]["train"]
    assert (card["spec"]["model"]["channels"], card["spec"]["model"]["hidden"]) == ([4, 8], 16)
    assert t["optimizer"] == "sgd" and t["epochs"] == 2 and len(card["history"]) == 2
    assert t["lr"] == 0.02  # --set wins over the file
    # The net that trained is the one the file describes: 4 and 8 conv channels, a 16-unit hidden layer.
    shapes = {tuple(v.shape) for v in ckpt["best_model"].values()}
    assert {(4, 1, 3, 3), (8, 4, 3, 3), (16, 8 * 2 * 2), (10, 16)} <= shapes, shapes
    assert "momentum_buffer" in str(ckpt["optimizer"]["state"])  # SGD with momentum, not the default AdamW
    assert card["history"][0]["lr"] <= 0.02


def test_same_seed_same_model_other_seed_other_model(runs) -> None:
    (a, a_ckpt), (b, b_ckpt), (c, c_ckpt) = runs["seed3"], runs["seed3_again"], runs["seed4"]
    assert a["seed"] == b["seed"] == a["spec"]["train"]["seed"] == 3 and c["seed"] == 4

    def without_time(card: dict) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in card["history"]]

    assert without_time(a) == without_time(b) and a["test"] == b["test"]
    assert all(torch.equal(a_ckpt["best_model"][k], b_ckpt["best_model"][k]) for k in a_ckpt["best_model"])
    assert without_time(a) != without_time(c)
    assert not torch.equal(a_ckpt["best_model"]["head.5.weight"], c_ckpt["best_model"]["head.5.weight"])
