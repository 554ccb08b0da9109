"""Job specs: one TOML file per job in training/jobs/, overridden by --config FILE and --set key=value.

The job's own file is the schema: a key that is not in it is a typo, so it is rejected with the list of keys that
do exist, rather than silently ignored (the classic way a hyper-parameter sweep trains the same model ten times)."""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JOBS_DIR = Path(__file__).parent / "jobs"

# Keys whose value must be one of a fixed set: checked here so a typo fails before any data is loaded.
CHOICES: dict[str, tuple[str, ...]] = {
    "task": ("classify", "autoencode", "generate"),
    "data.source": ("digits", "mnist1d", "chatterbot", "npz", "textdir"),
    "model.arch": ("cnn", "rnn", "transformer", "autoencoder", "gpt", "gan", "cvae"),
    "model.activation": ("relu", "gelu", "tanh", "sigmoid"),
    "model.cell": ("gru", "lstm"),
    "train.optimizer": ("sgd", "adam", "adamw", "rmsprop"),
    "train.loss": ("cross_entropy", "mse", "bce"),
    "train.schedule": ("none", "step", "cosine", "onecycle"),
    "train.device": ("cpu", "cuda"),
    "train.early_stopping_metric": ("val_loss", "val_accuracy", "last"),
}
# Numeric keys that must be positive / within [0, 1): a zero batch size or a dropout of 1.5 is a clear error here.
POSITIVE = ("train.epochs", "train.batch_size", "train.lr", "export.tolerance")
FRACTIONS = ("model.dropout", "data.val_fraction", "data.test_fraction", "train.label_smoothing")
NON_NEGATIVE = ("train.l1", "train.l2", "train.weight_decay", "train.momentum", "train.seed", "train.patience")


class SpecError(ValueError):
    """Bad user input in a spec, an override or a data file: the message alone tells the user what to fix."""


def available_jobs() -> list[str]:
    return sorted(p.stem for p in JOBS_DIR.glob("*.toml"))


def training_order() -> list[str]:
    """The jobs `train all` runs: alphabetical, except that a job judged by another (evaluate.judge, e.g.
    digits_gan by digits_cnn) comes after its judge, which it needs published."""
    order: list[str] = []
    for job in available_jobs():
        judge = load_job(job).get("evaluate", {}).get("judge")
        if judge and judge not in order:
            order.append(judge)
        if job not in order:
            order.append(job)
    return order


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"{what} {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{what} {path} is not valid TOML: {exc}") from None


def load_job(job: str) -> dict[str, Any]:
    """The default spec of a shipped job."""
    path = JOBS_DIR / f"{job}.toml"
    if not path.is_file():
        jobs = available_jobs()
        hint = difflib.get_close_matches(job, jobs, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise SpecError(f"unknown job {job!r}{extra}; expected one of: {', '.join(jobs)} or 'all'")
    spec = _read_toml(path, "job spec")
    spec.setdefault("job", job)
    return spec


def flatten(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), type(value).__name__)


def _coerce(key: str, value: Any, default: Any) -> Any:
    """The override converted to the default's type, or a SpecError saying which type was expected."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, bool) and isinstance(value, bool):
        return value
    if isinstance(default, float) and number:
        return float(value)
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, int) and number:
        return value
    if isinstance(default, str | list) and type(value) is type(default):
        return value
    raise SpecError(f"{key} = {value!r}: expected {_type_name(default)} (like the default {default!r})")


def set_key(spec: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key that must already exist in the spec, with a value of the same type."""
    known = flatten(spec)
    if key not in known:
        hint = difflib.get_close_matches(key, known, n=1)
        extra = f"did you mean {hint[0]!r}? " if hint else ""
        raise SpecError(f"unknown key {key!r} for job {spec.get('job')!r}; {extra}known keys: {', '.join(known)}")
    node = spec
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = _coerce(key, value, known[key])


def parse_assignment(text: str) -> tuple[str, Any]:
    """`key=value` with a TOML value (`3`, `0.1`, `true`, `[32, 64]`, `"adam"`); a bare word is a string."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key or not raw:
        raise SpecError(f"--set {text!r}: expected key=value, e.g. --set train.lr=0.001")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def merge_file(spec: dict[str, Any], path: Path) -> None:
    """Apply a user's TOML file of overrides (same sections as the job spec)."""
    for key, value in flatten(_read_toml(path, "--config file")).items():
        if key == "job":
            continue
        set_key(spec, key, value)


def validate(spec: dict[str, Any]) -> None:
    flat = flatten(spec)
    for key, allowed in CHOICES.items():
        if key in flat and flat[key] not in allowed:
            raise SpecError(f"{key} = {flat[key]!r}: expected one of {', '.join(allowed)}")
    for key in POSITIVE:
        if key in flat and not flat[key] > 0:
            raise SpecError(f"{key} = {flat[key]!r}: expected a number > 0")
    for key in FRACTIONS:
        if key in flat and not 0 <= flat[key] < 1:
            raise SpecError(f"{key} = {flat[key]!r}: expected a fraction in [0, 1)")
    for key in NON_NEGATIVE:
        if key in flat and flat[key] < 0:
            raise SpecError(f"{key} = {flat[key]!r}: expected a number >= 0")
    if flat.get("export.tolerance", 0) > 1e-4:
        raise SpecError(f"export.tolerance = {flat['export.tolerance']}: the contract allows at most 1e-4")
    if flat.get("task") == "autoencode" and flat.get("train.loss") == "cross_entropy":
        raise SpecError("train.loss = 'cross_entropy' does not fit an autoencoder; expected 'mse' or 'bce'")
    if flat.get("export.stream") and flat.get("model.bidirectional"):
        raise SpecError("export.stream = true needs a unidirectional net (a stream cannot see the future); expected "
                        "model.bidirectional = false, or export.stream = false")
    if flat.get("task") == "autoencode" and flat.get("train.early_stopping_metric") == "val_accuracy":
        raise SpecError("train.early_stopping_metric = 'val_accuracy' does not fit an autoencoder; expected "
                        "'val_loss'")


def resolve(job: str, config: Path | None = None, sets: list[str] | None = None,
            flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spec a run uses: job defaults, then --config, then --set, then the dedicated flags (--epochs...)."""
    spec = copy.deepcopy(load_job(job))
    if config is not None:
        merge_file(spec, config)
    for text in sets or []:
        set_key(spec, *parse_assignment(text))
    for key, value in (flags or {}).items():
        if value is not None:
            set_key(spec, key, value)
    validate(spec)
    return spec


def fingerprint(spec: dict[str, Any]) -> str:
    """Identifies a spec, so --resume refuses a checkpoint that was trained under different settings. The device is
    left out: a run killed on a GPU may go on on the CPU."""
    same = copy.deepcopy(spec)
    same.get("train", {}).pop("device", None)
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Options:
    """The command line, minus the job name."""

    repository: Path = Path("models")
    runs: Path = Path("runs")
    config: Path | None = None
    sets: list[str] = field(default_factory=list)
    data: Path | None = None
    epochs: int | None = None
    seed: int | None = None
    device: str | None = None
    resume: bool = False
    quantize: str | None = None
