"""Model files sent with a load request (Triton's `file:<path>` parameters of RepositoryModelLoad, tritonclient's
`load_model(..., config=..., files=...)`). The bytes are written to a private, freshly made folder laid out like a
repository model folder and loaded from there; the folder is removed once the load is done (onnxruntime holds the
model in memory). Every name is checked first: a relative path inside the model, no `..`, no absolute path, no
hidden or odd characters, bounded in length, count and total size, so a request can never write outside it."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from service.errors import InvalidArgument

MAX_FILES = 64
MAX_PATH = 255
MAX_TOTAL_BYTES = 2 << 30  # beyond the message limit anyway; a bound that does not depend on it
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def check(name: str, files: dict[str, bytes]) -> dict[PurePosixPath, bytes]:
    """The files as safe relative paths, or InvalidArgument naming the first bad one."""
    where = f"load of {name!r}"
    if len(files) > MAX_FILES:
        raise InvalidArgument(f"{where}: {len(files)} files, over the limit of {MAX_FILES}")
    total = sum(len(b) for b in files.values())
    if total > MAX_TOTAL_BYTES:
        raise InvalidArgument(f"{where}: {total} bytes of files, over the limit of {MAX_TOTAL_BYTES}")
    out = {}
    for raw_name, data in files.items():
        path = PurePosixPath(raw_name)
        if (len(raw_name) > MAX_PATH or not raw_name or path.is_absolute() or "\\" in raw_name
                or any(not _PART.match(part) for part in path.parts)):
            raise InvalidArgument(f"{where}: file name {raw_name[:80]!r} is not a relative path inside the model "
                                  f"(parts of letters, digits, '_', '.', '-'; no '..', no leading '/' or '.'; at "
                                  f"most {MAX_PATH} characters)")
        if path.parts[0].isdigit() and len(path.parts) == 1:
            raise InvalidArgument(f"{where}: file {raw_name!r} is a version folder name, not a file in it")
        out[path] = data
    return out


@contextmanager
def stage(name: str, checked: dict[PurePosixPath, bytes]) -> Iterator[Path]:
    """A private folder holding the files (as `check` returned them) under `name`, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="deepserve-load-"))
    try:
        model_dir = root / name
        model_dir.mkdir()
        for path, data in checked.items():
            target = model_dir.joinpath(*path.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        yield model_dir
    finally:
        shutil.rmtree(root, ignore_errors=True)
