"""System shared memory over HTTP/REST with tritonclient.http (its own process, see DESIGN.md): the same data plane
rules as over gRPC (tests/test_shm.py), reached through Triton's /v2/systemsharedmemory endpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import ROOT, Server

SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.http as th
import tritonclient.utils.shared_memory as shm

c = th.InferenceServerClient(sys.argv[1])
tag = sys.argv[2]
x = np.arange(8, dtype=np.float32).reshape(2, 4)
y = np.full((2, 4), 10, dtype=np.float32)
ins = shm.create_shared_memory_region("ins", f"/{tag}-in", 64)
outs = shm.create_shared_memory_region("outs", f"/{tag}-out", 64)
shm.set_shared_memory_region(ins, [x, y])
c.register_system_shared_memory("ins", f"/{tag}-in", 64)
c.register_system_shared_memory("outs", f"/{tag}-out", 64)
status = sorted(r["name"] for r in c.get_system_shared_memory_status())
a = th.InferInput("x", [2, 4], "FP32"); a.set_shared_memory("ins", 32, offset=0)
b = th.InferInput("y", [2, 4], "FP32"); b.set_shared_memory("ins", 32, offset=32)
o = th.InferRequestedOutput("sum", binary_data=True); o.set_shared_memory("outs", 32)
d = th.InferRequestedOutput("diff", binary_data=True)
r = c.infer("add_sub", [a, b], outputs=[o, d])
got_sum = shm.get_contents_as_numpy(outs, np.float32, [2, 4]).tolist()
errors = []
for key, offset, size in (("/" + tag + "-in", 0, 1 << 20), ("../etc/passwd", 0, 8), ("/" + tag + "-in", 60, 8)):
    try:
        c.register_system_shared_memory("bad", key, size, offset=offset)
    except th.InferenceServerException as e:
        errors.append([e.status(), e.message()])
c.unregister_system_shared_memory("ins")
after_one = sorted(r["name"] for r in c.get_system_shared_memory_status())
c.unregister_system_shared_memory()
after_all = c.get_system_shared_memory_status()
for h in (ins, outs):
    shm.destroy_shared_memory_region(h)
print(json.dumps({"status": status, "sum": got_sum, "diff": r.as_numpy("diff").tolist(),
                  "errors": errors, "after_one": after_one, "after_all": after_all}))
"""


@pytest.fixture(scope="module")
def http_shm_server(repository):
    s = Server(repository, "--no-strict-readiness", "--allow-shared-memory")
    yield s
    s.stop()


def test_tritonclient_http_shared_memory_equals_the_plain_path(http_shm_server):
    url = http_shm_server.http_url.removeprefix("http://")
    r = subprocess.run([sys.executable, "-c", SCRIPT, url, f"deepserve-http-{http_shm_server.http_port}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    assert got["status"] == ["ins", "outs"]
    assert got["sum"] == [[10.0, 11.0, 12.0, 13.0], [14.0, 15.0, 16.0, 17.0]]
    assert got["diff"] == [[-10.0, -9.0, -8.0, -7.0], [-6.0, -5.0, -4.0, -3.0]]
    assert [e[0] for e in got["errors"]] == ["400", "400", "400"], got["errors"]
    assert "past the end" in got["errors"][0][1] or "64" in got["errors"][0][1], got["errors"][0]
    assert got["after_one"] == ["outs"] and got["after_all"] == []
