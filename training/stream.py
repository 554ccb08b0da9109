"""The streaming variant of a recurrent job (`<job>_stream`): one time step per call with the whole state explicit,
x_t [B,1] + h_in [B,S] -> y [B,classes] + h_out [B,S], for a server that keeps state per sequence (Triton's
sequence batcher with implicit state). Published only after proving that stepping through a sequence from the
zero state gives the whole-sequence model's logits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.export import BATCHES, LENGTHS, ExportError, _inputs, onnx_export, session
from training.loop import Log
from training.nets_seq import RecurrentNet, StreamCell
from training.publish import ModelSpec, Tensor, publish

STEP_TOLERANCE = 1e-5  # stepped vs whole-sequence logits: the same arithmetic, only the summation order differs


@dataclass
class StreamExport:
    job: str
    path: Path
    state_size: int
    classes: int
    labels: list[str] | None
    report: dict[str, Any]

    def spec(self) -> ModelSpec:
        s = [Tensor("h_in", "float32", [self.state_size]), Tensor("h_out", "float32", [self.state_size])]
        return ModelSpec(f"{self.job}_stream", [Tensor("x_t", "float32", [1])],
                         [Tensor("y", "float32", [self.classes], "labels.txt" if self.labels else "")],
                         {"stream_of": self.job, "state_size": str(self.state_size)}, state=s)

    def publish(self, repo: Path, write_examples: Any, card: dict[str, Any], log: Log) -> dict[str, Any]:
        from training import card as cards

        spec = self.spec()
        stream_card = dict(card, stream={"of": self.job, "state_size": self.state_size, **self.report})

        def write(folder: Path, version: int) -> None:
            (folder / "model.onnx").write_bytes(self.path.read_bytes())
            cards.write_card(folder / "card.json", {"name": spec.name, "version": version, **stream_card})
            cards.plot_curve(card["history"], folder / "training_curve.png", f"{spec.name} v{version}")
            write_examples(folder / "examples.npz")

        version, where = publish(repo, spec, write, self.labels)
        log(f"{spec.name}: published {where} (version {version}); stepped vs whole-sequence max |diff| "
            f"{self.report['stepped_max_abs_diff']:.2e}")
        return {"version": version, "path": str(where), **self.report}


def step_through(sess: Any, x: np.ndarray, state_size: int) -> np.ndarray:
    """Feed [B,T,1] one step at a time from the zero state; the last y is the answer for the whole sequence."""
    h = np.zeros((x.shape[0], state_size), np.float32)
    y = None
    for t in range(x.shape[1]):
        y, h = sess.run(["y", "h_out"], {"x_t": np.ascontiguousarray(x[:, t, :]), "h_in": h})
    assert y is not None
    return y


def prepare_stream(net: RecurrentNet, job: str, data: Any, tmp: Path, tolerance: float) -> StreamExport:
    """Export the cell and check it twice: one step against torch (all batch sizes), and whole sequences stepped
    in onnxruntime against the whole-sequence torch net. Any failure raises ExportError: nothing is published."""
    from torch.export import Dim

    try:
        cell = StreamCell(net).eval()
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    path = tmp / "stream.onnx"
    batch = Dim("batch", min=1, max=4096)
    example = (torch.zeros(2, 1), torch.zeros(2, cell.state_size))
    onnx_export(cell, example, path, ["x_t", "h_in"], ["y", "h_out"], [{0: batch}, {0: batch}])
    sess = session(path)
    rng = np.random.default_rng(0)
    one_step = 0.0
    for b in BATCHES:
        x_t = rng.standard_normal((b, 1)).astype(np.float32)
        h = rng.standard_normal((b, cell.state_size)).astype(np.float32) * 0.5
        with torch.no_grad():
            ref = [t.numpy() for t in cell(torch.from_numpy(x_t), torch.from_numpy(h))]
        got = sess.run(["y", "h_out"], {"x_t": x_t, "h_in": h})
        one_step = max(one_step, *(float(np.abs(r - g).max()) for r, g in zip(ref, got, strict=True)))
    stepped = []
    for length in LENGTHS:
        x = _inputs(data.test.x, 7, length, rng)
        with torch.no_grad():
            whole = net(torch.from_numpy(x)).numpy()
        stepped.append({"length": length, "batch": 7,
                        "max_abs_diff": float(np.abs(step_through(sess, x, cell.state_size) - whole).max())})
    worst = max(c["max_abs_diff"] for c in stepped)
    report = {"one_step_max_abs_diff": one_step, "stepped_cases": stepped, "stepped_max_abs_diff": worst,
              "stepped_tolerance": STEP_TOLERANCE, "tolerance": tolerance}
    if one_step > tolerance or worst > STEP_TOLERANCE:
        raise ExportError(f"stream check failed: one step |torch - onnxruntime| {one_step:.3g} (tolerance "
                          f"{tolerance:g}), stepped vs whole sequence {worst:.3g} (tolerance {STEP_TOLERANCE:g})")
    return StreamExport(job, path, cell.state_size, data.num_classes, data.labels, report)
