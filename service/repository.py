"""The model repository on disk (Triton layout): which models exist, which versions the policy serves, and a
fingerprint of each so that polling notices a change. Names come from folder names; a request never builds a path."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from service._proto import model_config_pb2

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Source:
    """What a model folder holds right now; equal sources mean nothing to reload. Taken before a load reads
    anything, and the load works from it, so a change made during the load is a change on the next poll."""

    config: bytes | None  # config.pbtxt as read (bytes: a file that is not UTF-8 is still a fingerprint)
    filename: str  # the model file the versions were looked for under (config default_model_filename)
    versions: tuple[tuple[int, float, int], ...]  # (version, model file mtime, size; -1 when absent)

    @property
    def available(self) -> list[int]:
        """Versions that hold the model file."""
        return [v for v, _, size in self.versions if size >= 0]


def model_names(root: Path) -> list[str]:
    """Folders that look like models; hidden folders (a publish in progress) and stray files are ignored."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and not p.name.startswith("."))


def version_dirs(model_dir: Path) -> list[int]:
    """Version folders whether or not they hold a model file (so a broken version can be reported)."""
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def select(policy: model_config_pb2.ModelVersionPolicy, versions: list[int]) -> list[int]:
    """Triton's version_policy: latest N (default 1), all, or specific."""
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return versions
    if choice == "specific":
        return [v for v in versions if v in set(policy.specific.versions)]
    n = policy.latest.num_versions if choice == "latest" else 1
    return versions[-max(n, 1):]


def read_config_bytes(model_dir: Path) -> bytes | None:
    cfg = model_dir / "config.pbtxt"
    return cfg.read_bytes() if cfg.is_file() else None


def source(model_dir: Path, filename: str, config: bytes | None) -> Source:
    """The folder's fingerprint; `config` is config.pbtxt as the caller read it (None: there is none)."""
    vs = []
    for v in version_dirs(model_dir):
        f = model_dir / str(v) / filename
        st = f.stat() if f.is_file() else None
        vs.append((v, st.st_mtime if st else 0.0, st.st_size if st else -1))
    return Source(config, filename, tuple(vs))
