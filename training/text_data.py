"""Text data for language identification: chatterbot-corpus dialogue lines (YAML files shipped in the package) or a
user's folder of `<label>/*.txt`. Texts become UTF-8 byte tokens (byte + 1; 0 pads), the same encoding the server
applies to raw strings from the model's config parameters, so no tokenizer has to be downloaded or shipped."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from training.spec import SpecError
from training.tokens import PAD_ID, TOKEN_OFFSET


def encode_texts(texts: list[str], max_length: int) -> np.ndarray:
    """[N, L] int64, L = longest row (capped at max_length), right-padded with PAD_ID; long texts are truncated."""
    rows = [np.frombuffer(t.encode("utf-8")[:max_length], dtype=np.uint8).astype(np.int64) + TOKEN_OFFSET
            for t in texts]
    out = np.full((len(rows), max(1, max((len(r) for r in rows), default=1))), PAD_ID, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _corpus_dir() -> Path:
    import chatterbot_corpus

    return Path(chatterbot_corpus.__file__).parent / "data"


def _yaml_lines(path: Path) -> list[str]:
    import yaml

    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    lines = []
    for conversation in doc.get("conversations") or []:
        for line in conversation or []:
            if isinstance(line, str) and line.strip():
                lines.append(" ".join(line.split()))
    return lines


def load_chatterbot(cfg: dict[str, Any]) -> tuple[list[str], np.ndarray, list[str], dict[str, Any]]:
    """Unique lines per language. A line found in two languages ("OK", "Python", a number) says nothing about
    either, so it is dropped; large languages are capped so the classes stay roughly balanced."""
    root = _corpus_dir()
    available = sorted(p.name for p in root.iterdir() if p.is_dir())
    languages = cfg["languages"] or available
    unknown = [lang for lang in languages if lang not in available]
    if unknown:
        raise SpecError(f"data.languages: {unknown} not in chatterbot-corpus; available: {', '.join(available)}")
    per_lang = {}
    for lang in languages:
        seen = dict.fromkeys(line for f in sorted((root / lang).glob("*.yml")) for line in _yaml_lines(f))
        per_lang[lang] = [t for t in seen if len(t) >= cfg["min_chars"]]
    shared = Counter(t for lines in per_lang.values() for t in lines)
    usable = {lang: [t for t in lines if shared[t] == 1] for lang, lines in per_lang.items()}
    if not cfg["languages"]:  # all languages with enough data to train and test on
        languages = [lang for lang in languages if len(usable[lang]) >= cfg["min_lines"]]
    rng = np.random.default_rng(cfg["split_seed"])
    texts: list[str] = []
    labels: list[int] = []
    counts = {}
    for i, lang in enumerate(languages):
        lines = usable[lang]
        if len(lines) > cfg["max_per_language"]:
            lines = [lines[j] for j in sorted(rng.choice(len(lines), cfg["max_per_language"], replace=False))]
        counts[lang] = len(lines)
        texts += lines
        labels += [i] * len(lines)
    small = [lang for lang, n in counts.items() if n < 10]
    if small:
        raise SpecError(f"data.languages: {small} have fewer than 10 usable lines; drop them from the list")
    rule = (f"every corpus language with >= {cfg['min_lines']} usable lines" if not cfg["languages"]
            else "listed in data.languages")
    info = {"name": "chatterbot-corpus dialogue lines (YAML in the package's data/ folder)", "languages_rule": rule,
            "lines_per_language": counts, "dropped_shared_lines": sum(1 for n in shared.values() if n > 1),
            "min_chars": cfg["min_chars"]}
    return texts, np.asarray(labels, dtype=np.int64), list(languages), info


def load_textdir(path: Path, job: str) -> tuple[list[str], np.ndarray, list[str], dict[str, Any]]:
    """`<label>/*.txt`, one text per non-empty line; the folder names are the labels."""
    where = f"--data {path}"
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    texts: list[str] = []
    labels: list[int] = []
    names: list[str] = []
    for folder in folders:
        lines = []
        for f in sorted(folder.glob("*.txt")):
            try:
                lines += [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
            except UnicodeDecodeError as exc:
                raise SpecError(f"{where}: {f} is not UTF-8 text ({exc.reason}); expected UTF-8 .txt files") from None
        if lines:
            names.append(folder.name)
            texts += lines
            labels += [len(names) - 1] * len(lines)
    if len(names) < 2:
        raise SpecError(f"{where}: found {len(names)} label folder(s) with text; the {job} job expects a folder "
                        "holding <label>/*.txt for at least two labels, one text per line")
    counts = Counter(labels)
    return texts, np.asarray(labels, dtype=np.int64), names, {
        "name": f"user text folder {path}", "lines_per_label": {names[k]: v for k, v in sorted(counts.items())}}
