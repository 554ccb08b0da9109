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


def _parse(collapsed: str) -> tuple[Counter[str], Counter[str], Counter[str], int]:
    """Collapsed stacks -> samples per thread, self samples per frame, inclusive samples per frame, total."""
    threads: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = "all threads"
        if frames[0].startswith("thread ("):
            thread, frames = re.sub(r"^thread \(\d+\): ", "", frames[0]), frames[1:]
        if not frames:
            continue
        n = int(count)
        total += n
        threads[re.sub(r"_\d+$", "", thread)] += n
        names = [_frame(f) for f in frames]
        self_[names[-1]] += n
        for name in set(names):
            incl[name] += n
    return threads, self_, incl, total


def _table(title: str, rows: list[tuple[str, int]], total: int, code: bool = True) -> list[str]:
    fmt = "| `{}` | {:.1%} |" if code else "| {} | {:.1%} |"
    return ["", f"| {title} | share |", "| --- | ---: |", *[fmt.format(k, n / total) for k, n in rows]]


def summarize(cpu: str, gil: str, top: int = 10) -> list[str]:
    """Markdown for the two views: which threads use the cores, and what the GIL holder does."""
    threads, cpu_self, _, cpu_total = _parse(cpu)
    _, gil_self, gil_incl, gil_total = _parse(gil)
    out: list[str] = []
    if cpu_total:
        out += [f"CPU view: {cpu_total:,} samples of runnable threads (on a busy 2-core machine, runnable is not "
                "always running).", *_table("thread", threads.most_common(6), cpu_total, code=False),
                *_table("top frames, self (CPU view)", cpu_self.most_common(top), cpu_total)]
    if gil_total:
        root = ("(service/cli.py)", "serve_main (")  # the process's entry frames: in every main-thread sample
        ours = [(k, n) for k, n in gil_incl.most_common() if "(service/" in k and not k.startswith(root)
                and not k.endswith(root)][:top]
        out += ["", f"GIL view: {gil_total:,} samples of the thread holding the GIL, i.e. the Python work that "
                "serialises the request path.", *_table("top frames, self (GIL view)", gil_self.most_common(top),
                                                         gil_total),
                *_table("deepserve functions, inclusive (GIL view)", ours, gil_total)]
    return out or ["(no samples)"]


def record(pid: int, seconds: float, out: Path, stem: str, load: Callable[[], None]) -> list[str]:
    """Three passes, each under `load()` (a call that keeps the server busy about `seconds`): collapsed stacks of
    every runnable thread (who uses the cores), of the GIL holder only (what serialises Python), and a flame graph
    of the GIL holder. Returns the markdown summary, or why there is none."""
    exe = pyspy()
    if exe is None:
        return ["py-spy is not installed (`.venv/bin/pip install py-spy`); no profile."]
    passes = [("cpu", "raw", [], out / f"{stem}.cpu.txt"), ("gil", "raw", ["--gil"], out / f"{stem}.gil.txt"),
              ("svg", "flamegraph", ["--gil"], out / f"{stem}.gil.svg")]
    texts: dict[str, str] = {}
    for key, fmt, extra, path in passes:
        argv = [str(exe), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "200",
                "--threads", "--format", fmt, *extra, "-o", str(path)]
        spy = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            load()
        finally:
            log, _ = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0 or not path.exists():
            return [f"py-spy failed ({spy.returncode}): {log.strip()[-300:]}"]
        texts[key] = path.read_text() if fmt == "raw" else ""
    return [f"Files beside this report: `{stem}.gil.svg` (flame graph of the GIL holder), `{stem}.cpu.txt` and "
            f"`{stem}.gil.txt` (collapsed stacks).", "", *summarize(texts["cpu"], texts["gil"])]
