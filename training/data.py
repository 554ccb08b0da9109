"""Datasets for the jobs: offline, shipped inside PyPI packages (no download at train time), or the user's own
through --data. Every loader returns the same `Dataset`, so the loop, export and publish never ask where data came
from; the test split is fixed by `data.split_seed`, not by the training seed, so runs with different seeds are
scored on the same samples."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from training.spec import SpecError
from training.text_data import encode_texts, load_chatterbot, load_textdir

# Input tensor name per model family: fixed by the repository contract (server, clients and tests rely on them).
INPUT_NAMES = {"cnn": "image", "rnn": "signal", "transformer": "tokens", "autoencoder": "features", "gan": "image",
               "cvae": "image"}
IMAGE_ARCHS = ("cnn", "gan", "cvae")  # nets that read [N, 1, H, W]


@dataclass
class Split:
    x: np.ndarray
    y: np.ndarray
    text: list[str] | None = None


@dataclass
class Dataset:
    """Arrays ready for the net: image [N,1,H,W] / signal [N,T,1] / features [N,D] float32, tokens [N,T] int64."""

    input_name: str
    train: Split
    val: Split
    test: Split
    labels: list[str] | None
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels or [])

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train.y), "val": len(self.val.y), "test": len(self.test.y)}


def _split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int, text: list[str] | None = None,
           ) -> tuple[Split, Split]:
    """A stratified split when every class has at least two samples (small user data sets may not)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    if fraction <= 0:
        return Split(x, y, text), Split(x[:0], y[:0], [] if text is not None else None)
    counts = np.unique(y, return_counts=True)[1]
    strat = y if counts.min() >= 2 and int(len(y) * fraction) >= len(counts) else None
    a, b = train_test_split(idx, test_size=fraction, random_state=seed, stratify=strat)

    def take(i: np.ndarray) -> Split:
        return Split(x[i], y[i], [text[j] for j in i] if text is not None else None)

    return take(a), take(b)


def _three_way(x: np.ndarray, y: np.ndarray, cfg: dict[str, Any], text: list[str] | None = None,
               ) -> tuple[Split, Split, Split]:
    rest, test = _split(x, y, cfg["test_fraction"], cfg["split_seed"], text)
    train, val = _split(rest.x, rest.y, cfg["val_fraction"], cfg["split_seed"] + 1, rest.text)
    return train, val, test


def _digits(arch: str) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # pixel counts 0..16 -> [0, 1], the scale the published model expects
    x = x.reshape(-1, 1, 8, 8) if arch in IMAGE_ARCHS else x
    return x, y.astype(np.int64), [str(i) for i in range(10)], {
        "name": "scikit-learn load_digits (UCI optdigits, 8x8 scans, pixel values / 16)", "samples": len(y)}


def _mnist1d(cfg: dict[str, Any]) -> tuple[Split, Split, dict[str, Any]]:
    """The generator, never get_dataset(): that one tries a download first. Its own 4,000/1,000 split is kept."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = cfg["mnist1d_samples"]
    data = make_dataset(args)
    train = Split(data["x"].astype(np.float32)[:, :, None], data["y"].astype(np.int64))
    test = Split(data["x_test"].astype(np.float32)[:, :, None], data["y_test"].astype(np.int64))
    return train, test, {"name": "mnist1d generator (Greydanus & Kobak), make_dataset(get_dataset_args())",
                         "generator_seed": args.seed, "length": args.final_seq_length}


def _label_names(y: np.ndarray, names: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
    values = np.unique(y)
    if names is not None:
        return y.astype(np.int64), [str(n) for n in names]
    return np.searchsorted(values, y).astype(np.int64), [str(v) for v in values]


def _npz(path: Path, arch: str) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """A user's arrays, checked against what the net takes; every complaint names the array and the shape."""
    where = f"--data {path}"
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise SpecError(f"{where}: not a readable .npz file ({exc}); expected np.savez(path, x=..., y=...)") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise SpecError(f"{where}: missing array(s) {', '.join(missing)}; found {sorted(arrays)}, expected 'x' "
                        "(inputs) and 'y' (integer labels)")
    x, y = arrays["x"], arrays["y"]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise SpecError(f"{where}: 'y' has shape {y.shape} and dtype {y.dtype}; expected a 1-D integer array [N]")
    if len(x) != len(y):
        raise SpecError(f"{where}: 'x' has {len(x)} rows but 'y' has {len(y)}; expected one label per sample")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise SpecError(f"{where}: 'x' has dtype {x.dtype} or non-finite values; expected finite numbers")
    expected = {"rnn": "[N, T] or [N, T, 1] sequences", "autoencoder": "[N, D] feature vectors"}.get(
        arch, "[N, H, W] or [N, 1, H, W] images (H, W >= 4)")
    x = x.astype(np.float32)
    if arch in IMAGE_ARCHS:
        x = x[:, None] if x.ndim == 3 else x
        ok = x.ndim == 4 and x.shape[1] == 1 and min(x.shape[2:]) >= 4
    elif arch == "rnn":
        x = x[:, :, None] if x.ndim == 2 else x
        ok = x.ndim == 3 and x.shape[2] == 1 and x.shape[1] >= 2
    else:
        ok = x.ndim == 2 and x.shape[1] >= 2
    if not ok:
        raise SpecError(f"{where}: 'x' has shape {arrays['x'].shape}; this job expects {expected}")
    if len(np.unique(y)) < 2:
        raise SpecError(f"{where}: 'y' holds a single class; expected at least two")
    y, labels = _label_names(y, arrays.get("labels"))
    if arrays.get("labels") is not None and (y.min() < 0 or y.max() >= len(labels)):
        raise SpecError(f"{where}: 'y' must index 'labels' (0..{len(labels) - 1}), got {y.min()}..{y.max()}")
    return x, y, labels, {"name": f"user arrays {path}", "samples": len(y)}


def load(spec: dict[str, Any], data_path: Path | None = None) -> Dataset:
    """The job's data set; `data_path` (the --data flag) replaces the shipped data with the user's."""
    cfg, arch = spec["data"], spec["model"]["arch"]
    name = INPUT_NAMES[arch]
    source = cfg["source"]
    if data_path is not None:
        if not data_path.exists():
            raise SpecError(f"--data {data_path}: no such file or folder")
        if arch == "transformer":
            if not data_path.is_dir():
                raise SpecError(f"--data {data_path}: the {spec['job']} job expects a folder <label>/*.txt "
                                "(one text per line)")
            source = "textdir"
        else:
            if data_path.suffix != ".npz" or not data_path.is_file():
                raise SpecError(f"--data {data_path}: the {spec['job']} job expects a .npz file with arrays x and y")
            source = "npz"
    if source == "mnist1d":
        rest, test, info = _mnist1d(cfg)
        train, val = _split(rest.x, rest.y, cfg["val_fraction"], cfg["split_seed"])
        return Dataset(name, train, val, test, [str(i) for i in range(10)], info)
    if source in ("chatterbot", "textdir"):
        if source == "chatterbot":
            texts, y, labels, info = load_chatterbot(cfg)
        else:
            texts, y, labels, info = load_textdir(data_path or Path(cfg["path"]), spec["job"])
        x = encode_texts(texts, spec["model"]["max_length"])
        train, val, test = _three_way(x, y, cfg, texts)
        return Dataset(name, train, val, test, labels, info)
    if source == "digits":
        x, y, labels, info = _digits(arch)
    elif source == "npz":
        x, y, labels, info = _npz(data_path or Path(cfg["path"]), arch)
    else:
        raise SpecError(f"data.source {source!r} does not fit model.arch {arch!r}")
    train, val, test = _three_way(x, y, cfg)
    return Dataset(name, train, val, test, labels, info)


def hold_out(ds: Dataset, anomaly: int) -> Dataset:
    """The anomaly-detection view: train and validate on the normal classes only; y becomes 1 = anomaly."""
    if not 0 <= anomaly < ds.num_classes:
        raise SpecError(f"data.anomaly_class = {anomaly}: expected a class index 0..{ds.num_classes - 1}")

    def flag(s: Split, keep_anomalies: bool) -> Split:
        a = s.y == anomaly
        keep = np.ones_like(a) if keep_anomalies else ~a
        return Split(s.x[keep], a[keep].astype(np.int64))

    info = dict(ds.source, anomaly_class=anomaly, anomaly_label=(ds.labels or [])[anomaly])
    return replace(ds, train=flag(ds.train, False), val=flag(ds.val, True), test=flag(ds.test, True),
                   labels=None, source=info)
