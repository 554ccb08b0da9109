"""py-spy profile of the server's request path under load: where its CPU goes when a target is missed.

Sampled from outside the process (no instrumentation to distort it), on-CPU samples only (py-spy leaves idle
threads out by default), per thread. The raw collapsed stacks are summarised into the frames that take the most
samples, by self time and inclusive; a flame graph (SVG) is written beside them for the whole picture.
py-spy is optional (`pip install py-spy`); it needs ptrace rights over the server, which a same-user child gives.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def pyspy() -> Path | None:
    beside = Path(sys.executable).parent / "py-spy"
    found = beside if beside.exists() else shutil.which("py-spy")
    return Path(found) if found else None


def _frame(raw: str) -> str:
    """`handler (/x/y/service/grpc_api.py:88)` -> `handler (service/grpc_api.py)`: lines merged, paths shortened."""
    m = _FRAME.match(raw.strip())
    if not m:
        return raw.strip()
    path = m["file"]
    for marker in ("/site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m['func']} ({path})"


def summarize(collapsed: str, top: int = 12) -> list[str]:
    """Markdown: samples per thread, then the top frames by self and by inclusive samples."""
    threads: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread, frames = (frames[0], frames[1:]) if frames[0].startswith("thread") or "(0x" in frames[0] \
            else ("all threads", frames)
        names = [_frame(f) for f in frames]
        if not names:
            continue
        total += n
        threads[re.sub(r"\s*\(0x[0-9a-f]+\)", "", thread)] += n
        self_[names[-1]] += n
        for name in set(names):
            incl[name] += n
    if not total:
        return ["(no samples)"]
    out = [f"{total:,} on-CPU samples.", "", "| thread | share |", "| --- | ---: |"]
    out += [f"| {t} | {n / total:.0%} |" for t, n in threads.most_common(6)]
    for title, counter in (("self", self_), ("inclusive", incl)):
        out += ["", f"| top frames, {title} | share |", "| --- | ---: |"]
        out += [f"| `{f}` | {n / total:.1%} |" for f, n in counter.most_common(top)]
    return out


def record(pid: int, seconds: float, out: Path, stem: str, load: Callable[[], None]) -> list[str]:
    """Two passes under `load()` (a call that keeps the server busy about `seconds`): collapsed stacks for the
    summary, then an SVG flame graph. Returns the markdown summary, or why there is none."""
    exe = pyspy()
    if exe is None:
        return ["py-spy is not installed (`.venv/bin/pip install py-spy`); no profile."]
    lines: list[str] = []
    for fmt, path in (("raw", out / f"{stem}.txt"), ("flamegraph", out / f"{stem}.svg")):
        argv = [str(exe), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "200",
                "--threads", "--format", fmt, "-o", str(path)]
        spy = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            load()
        finally:
            log, _ = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0 or not path.exists():
            return [f"py-spy failed ({spy.returncode}): {log.strip()[-300:]}"]
        if fmt == "raw":
            lines = summarize(path.read_text())
    return [f"Flame graph: `{stem}.svg`; collapsed stacks: `{stem}.txt` (beside this file).", "", *lines]
