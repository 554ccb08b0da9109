"""Where the server's CPU goes under a load that misses a target: per-thread CPU time, then a py-spy profile.

Two views, because on a busy 2-core machine each alone misleads. Per-thread CPU time comes from the kernel
(/proc/PID/task/*/stat), exact, and covers native threads (onnxruntime's pool, gRPC core) that a Python profiler
cannot name; py-spy's own "active" test only sees runnable threads, and runnable is not running when the cores
are shared. Then py-spy samples the thread holding the GIL (`--gil`): the Python work that serialises every
request. Sampled from outside the process, nothing instrumented. The GIL samples are summarised by self and
inclusive share and drawn as a flame graph (SVG). py-spy is optional (`pip install py-spy`); it needs ptrace
rights over the server, which a same-user child gives.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time
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


def _ticks(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (kernel thread name, user+system clock ticks so far)."""
    out: dict[int, tuple[str, int]] = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the thread ended between listing and reading
            continue
        comm, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        out[int(stat.parent.name)] = (comm, int(rest[11]) + int(rest[12]))
    return out


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _python_names(exe: Path, pid: int) -> dict[int, str]:
    """tid -> Python thread name, from `py-spy dump` (native-only threads are not in it)."""
    try:
        dump = subprocess.run([str(exe), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(m[1]): m[2] for m in re.finditer(r"^Thread (\d+) \([a-z]+\): \"(.*)\"$", dump, re.M)}


def cpu_by_thread(pid: int, load: Callable[[], None], exe: Path | None) -> list[str]:
    """Run `load()` and report the cores used by each server thread, by the load generator (a child of this
    process, so its CPU shows in RUSAGE_CHILDREN once it exits) and by the whole machine."""
    hz, ncpu = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    t0, m0, c0, w0 = _ticks(pid), machine_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    load()
    t1, m1, c1, wall = _ticks(pid), machine_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN), \
        time.monotonic() - w0
    names = _python_names(exe, pid) if exe else {}
    used: Counter[str] = Counter()
    for tid, (comm, ticks) in t1.items():
        label = names.get(tid) or f"native: {comm}"
        used[re.sub(r"_\d+$", "", label)] += ticks - t0.get(tid, (comm, 0))[1]
    server = sum(used.values()) / hz / wall
    client = (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime) / wall
    busy = (m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * ncpu
    out = [f"Cores busy over {wall:.1f} s: whole machine {busy:.2f} of {ncpu}; the server {server:.2f}, the load "
           f"generator {client:.2f}, everything else {max(0.0, busy - server - client):.2f}.", "",
           "| server thread | cores |", "| --- | ---: |"]
    out += [f"| {name} | {ticks / hz / wall:.2f} |" for name, ticks in used.most_common(8) if ticks]
    return out


def summarize(gil: str, top: int = 10) -> list[str]:
    """Markdown for the GIL view: top frames by self share, then deepserve's own functions, inclusive."""
    _, gil_self, gil_incl, gil_total = _parse(gil)
    if not gil_total:
        return ["(no GIL samples)"]
    root = ("(service/cli.py)", "serve_main (")  # the process's entry frames: in every main-thread sample
    ours = [(k, n) for k, n in gil_incl.most_common() if "(service/" in k and not k.startswith(root)
            and not k.endswith(root)][:top]
    return [f"py-spy, GIL view: {gil_total:,} samples of the thread holding the GIL. `Handle._run` self time is "
            "C code run from the event loop (gRPC's Cython layer, protobuf parsing and serialising, asyncio's C "
            "tasks) with no Python frame of its own.",
            *_table("top frames, self", gil_self.most_common(top), gil_total),
            *_table("deepserve functions, inclusive", ours, gil_total)]


def record(pid: int, seconds: float, out: Path, stem: str, load: Callable[[], None]) -> list[str]:
    """Three runs of `load()` (a call that keeps the server busy about `seconds`): one unprofiled for per-thread
    CPU time, one under py-spy for the GIL holder's collapsed stacks, one for its flame graph. Returns the
    markdown summary, or why there is none."""
    exe = pyspy()
    lines = cpu_by_thread(pid, load, exe)
    if exe is None:
        return [*lines, "", "py-spy is not installed (`.venv/bin/pip install py-spy`): no GIL profile."]
    texts: dict[str, str] = {}
    for key, fmt, path in (("gil", "raw", out / f"{stem}.gil.txt"), ("svg", "flamegraph", out / f"{stem}.gil.svg")):
        argv = [str(exe), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "200",
                "--gil", "--threads", "--format", fmt, "-o", str(path)]
        spy = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            load()
        finally:
            log, _ = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0 or not path.exists():
            return [*lines, "", f"py-spy failed ({spy.returncode}): {log.strip()[-300:]}"]
        texts[key] = path.read_text() if fmt == "raw" else ""
    return [*lines, "", *summarize(texts["gil"]), "",
            f"Beside this report: `{stem}.gil.svg` (flame graph), `{stem}.gil.txt` (collapsed stacks)."]
