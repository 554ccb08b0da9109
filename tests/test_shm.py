"""Triton's system shared memory extension against real servers: tritonclient's shared_memory utilities (their own
process, see DESIGN.md), perf_analyzer --shared-memory system, every bad key / region / offset / size refused with
its status and message, unregister under running requests, and the flag that keeps it all off by default."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from support import ROOT, Server, outputs, request

from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc
from service.errors import InvalidArgument

PERF_ANALYZER = ROOT.parent / "shared" / "tools" / "perf_analyzer"
SHM_ARGS = ("--no-strict-readiness", "--allow-shared-memory")


@pytest.fixture(scope="module")
def shm_server(repository):
    s = Server(repository, *SHM_ARGS)
    yield s
    s.stop()


@pytest.fixture
def stub(shm_server):
    with shm_server.channel() as ch:
        yield inference_pb2_grpc.GRPCInferenceServiceStub(ch)


class ShmObject:
    """A POSIX shared memory object this test owns (created and unlinked here, as a client would)."""

    count = 0

    def __init__(self, size: int) -> None:
        ShmObject.count += 1
        self.key = f"/deepserve-test-{os.getpid()}-{ShmObject.count}"
        self.path = Path("/dev/shm") / self.key[1:]
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, size)
        self.fd, self.map = fd, mmap.mmap(fd, size)

    def put(self, offset: int, arr: np.ndarray) -> None:
        data = np.ascontiguousarray(arr).tobytes()
        self.map[offset:offset + len(data)] = data

    def get(self, offset: int, dtype, shape) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(self.map[offset:offset + n], dtype=dtype).reshape(shape)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


@pytest.fixture
def shm_object():
    made: list[ShmObject] = []

    def make(size: int) -> ShmObject:
        made.append(ShmObject(size))
        return made[-1]

    yield make
    for obj in made:
        obj.close()


def _register(stub, name: str, key: str, offset: int = 0, byte_size: int = 0):
    return stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset,
                                                                                byte_size=byte_size))


def _error(call, *args) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as err:
        call(*args)
    return err.value.code().name, err.value.details()


def _in_shm(tensor, region: str, byte_size: int, offset: int | None = None) -> None:
    tensor.parameters["shared_memory_region"].string_param = region
    tensor.parameters["shared_memory_byte_size"].int64_param = byte_size
    if offset is not None:
        tensor.parameters["shared_memory_offset"].int64_param = offset


def _shm_request(model: str, inputs: dict[str, tuple[str, int, int, tuple, str]]) -> pb.ModelInferRequest:
    """inputs: name -> (region, offset, byte_size, shape, datatype)."""
    req = pb.ModelInferRequest(model_name=model)
    for name, (region, offset, size, shape, dtype) in inputs.items():
        _in_shm(req.inputs.add(name=name, datatype=dtype, shape=shape), region, size, offset)
    return req


TRITON_SHM_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import serialize_byte_tensor, serialized_byte_size
url, tag = sys.argv[1], sys.argv[2]
c = tc.InferenceServerClient(url)
c.unregister_system_shared_memory()
rng = np.random.default_rng(0)
x, y = rng.random((3, 4), dtype=np.float32), rng.random((3, 4), dtype=np.float32)
n = x.nbytes
# x and y in one region at offsets 0 and n; sum and diff in another, diff at an offset
ins = shm.create_shared_memory_region("ins", f"/{tag}-ins", 2 * n)
outs = shm.create_shared_memory_region("outs", f"/{tag}-outs", 2 * n + 16)
shm.set_shared_memory_region(ins, [x, y])
c.register_system_shared_memory("ins", f"/{tag}-ins", 2 * n)
c.register_system_shared_memory("outs", f"/{tag}-outs", 2 * n + 16)
status = c.get_system_shared_memory_status(as_json=True)

def plain():
    i = [tc.InferInput("x", [3, 4], "FP32"), tc.InferInput("y", [3, 4], "FP32")]
    i[0].set_data_from_numpy(x); i[1].set_data_from_numpy(y)
    r = c.infer("add_sub", i)
    return r.as_numpy("sum"), r.as_numpy("diff")

i = [tc.InferInput("x", [3, 4], "FP32"), tc.InferInput("y", [3, 4], "FP32")]
i[0].set_shared_memory("ins", n); i[1].set_shared_memory("ins", n, offset=n)
o = [tc.InferRequestedOutput("sum"), tc.InferRequestedOutput("diff")]
o[0].set_shared_memory("outs", n); o[1].set_shared_memory("outs", n, offset=n + 16)
r = c.infer("add_sub", i, outputs=o)
# copies: views into a region crash the process once tritonclient destroys (unmaps) it
got_sum = shm.get_contents_as_numpy(outs, np.float32, [3, 4]).copy()
got_diff = shm.get_contents_as_numpy(outs, np.float32, [3, 4], offset=n + 16).copy()
want_sum, want_diff = plain()
out_shapes = {name: list(r.get_output(name).shape) for name in ("sum", "diff")}
raw_count = len([b for b in r.get_response().raw_output_contents if b == b""])
# mixed: x in shm, y in the request; sum in shm, diff in the reply (as_numpy must find diff's raw entry)
i = [tc.InferInput("x", [3, 4], "FP32"), tc.InferInput("y", [3, 4], "FP32")]
i[0].set_shared_memory("ins", n); i[1].set_data_from_numpy(y)
o = [tc.InferRequestedOutput("sum"), tc.InferRequestedOutput("diff")]
o[0].set_shared_memory("outs", n)
shm.set_shared_memory_region(outs, [np.zeros((3, 4), np.float32)])
r = c.infer("add_sub", i, outputs=o)
mixed_ok = bool(np.array_equal(r.as_numpy("diff"), want_diff)
                and np.array_equal(shm.get_contents_as_numpy(outs, np.float32, [3, 4]), want_sum))
# BYTES in and out through shared memory (identity model: every datatype; only BYTES and INT64 here by region)
words = np.array([[b"h\xc3\xa9llo", b""], [b"tab\tnul\x00", b"x" * 300]], dtype=np.object_)
wire = serialize_byte_tensor(words)
size = serialized_byte_size(wire)
bin_ = shm.create_shared_memory_region("bin", f"/{tag}-bin", size)
bout = shm.create_shared_memory_region("bout", f"/{tag}-bout", size)
shm.set_shared_memory_region(bin_, [wire])
c.register_system_shared_memory("bin", f"/{tag}-bin", size)
c.register_system_shared_memory("bout", f"/{tag}-bout", size)
types = json.loads(sys.argv[3])
ins_ = []
for t in types:
    a = words if t == "BYTES" else np.zeros((2, 2), dtype={"BOOL": np.bool_, "FP16": np.float16, "FP32": np.float32,
                                                       "FP64": np.float64}.get(t, t.lower()))
    ii = tc.InferInput(f"in_{t}", [2, 2], t)
    if t == "BYTES":
        ii.set_shared_memory("bin", size)
    else:
        ii.set_data_from_numpy(a)
    ins_.append(ii)
bo = tc.InferRequestedOutput("out_BYTES"); bo.set_shared_memory("bout", size)
r = c.infer("identity", ins_, outputs=[bo, tc.InferRequestedOutput("out_INT64")])
bytes_back = shm.get_contents_as_numpy(bout, np.object_, [2, 2])
bytes_ok = bool(np.array_equal(bytes_back, words)) and r.as_numpy("out_INT64").shape == (2, 2)
c.unregister_system_shared_memory("bin")
after_one = sorted(c.get_system_shared_memory_status(as_json=True).get("regions", {}))
c.unregister_system_shared_memory()
after_all = c.get_system_shared_memory_status(as_json=True).get("regions", {})
cuda = [c.get_cuda_shared_memory_status(as_json=True), c.unregister_cuda_shared_memory() is None]
try:
    c.register_cuda_shared_memory("g", "aGFuZGxl", 0, 8)  # base64, as the client takes it
except tc.InferenceServerException as e:
    cuda.append(e.status())
for h in (ins, outs, bin_, bout):
    shm.destroy_shared_memory_region(h)
print(json.dumps({
    "status": status, "sum_equal": bool(np.array_equal(got_sum, want_sum)),
    "diff_equal": bool(np.array_equal(got_diff, want_diff)), "out_shapes": out_shapes, "raw_count": raw_count,
    "mixed_ok": mixed_ok, "bytes_ok": bytes_ok, "after_one": after_one, "after_all": after_all, "cuda": cuda,
    "extensions": c.get_server_metadata(as_json=True)["extensions"]}))
"""


def test_tritonclient_shared_memory_equals_the_plain_path(shm_server):
    from conftest import ALL_TYPES

    tag = f"deepserve-tc-{os.getpid()}"
    r = subprocess.run([sys.executable, "-c", TRITON_SHM_SCRIPT, shm_server.url, tag, json.dumps(ALL_TYPES)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    n = 3 * 4 * 4
    assert got["status"] == {"regions": {
        "ins": {"name": "ins", "key": f"/{tag}-ins", "byte_size": str(2 * n)},
        "outs": {"name": "outs", "key": f"/{tag}-outs", "byte_size": str(2 * n + 16)}}}
    assert got["sum_equal"] and got["diff_equal"]
    assert got["out_shapes"] == {"sum": [3, 4], "diff": [3, 4]}  # the reply describes outputs it did not carry
    assert got["raw_count"] == 2  # empty entries, as Triton sends (clients pair outputs[i] with raw entry i)
    assert got["mixed_ok"] and got["bytes_ok"]
    assert got["after_one"] == ["bout", "ins", "outs"] and got["after_all"] == {}
    assert got["cuda"] == [{}, True, "StatusCode.UNIMPLEMENTED"]  # nothing registered: as a GPU-less Triton
    assert "system_shared_memory" in got["extensions"]


def test_bad_keys_are_refused(stub, shm_object, tmp_path):
    obj = shm_object(64)
    link = Path("/dev/shm") / f"deepserve-test-link-{os.getpid()}"
    target = tmp_path / "secret"
    target.write_bytes(b"s" * 64)
    link.symlink_to(target)
    try:
        for key in ("", "noslash", "/", "//x", "/a/b", "/..", "/.", "/dev/shm" + obj.key, "../etc/passwd",
                    "/" + "x" * 251, "/nul\x00byte"):
            code, msg = _error(_register, stub, "r", key, 0, 64)
            assert code == "INVALID_ARGUMENT", key
            assert f"key {key!r} is not a POSIX shared memory object name" in msg, key
        code, msg = _error(_register, stub, "r", f"/deepserve-missing-{os.getpid()}", 0, 8)
        assert (code, msg) == ("INVALID_ARGUMENT", f"system shared memory region 'r': cannot open the shared memory "
                                                   f"object '/deepserve-missing-{os.getpid()}': No such file or "
                                                   "directory")
        code, msg = _error(_register, stub, "r", "/" + link.name, 0, 8)  # O_NOFOLLOW: never leaves /dev/shm
        assert code == "INVALID_ARGUMENT" and "Too many levels of symbolic links" in msg
    finally:
        link.unlink()
    assert stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions == {}


def test_bad_regions_are_refused_and_the_server_keeps_serving(stub, shm_object):
    obj = shm_object(100)
    assert _error(_register, stub, "r", obj.key, 0, 101) == (
        "INVALID_ARGUMENT", f"system shared memory region 'r': offset 0 + byte_size 101 = 101 is past the end of the "
        f"shared memory object {obj.key!r} (100 bytes)")
    assert _error(_register, stub, "r", obj.key, 60, 41)[1].endswith("60 + byte_size 41 = 101 is past the end of "
                                                                     f"the shared memory object {obj.key!r} (100 "
                                                                     "bytes)")
    assert _error(_register, stub, "r", obj.key, 0, 0) == (
        "INVALID_ARGUMENT", "system shared memory region 'r': byte_size must be > 0 and offset >= 0, got offset 0, "
        "byte_size 0")
    assert _error(_register, stub, "", obj.key, 0, 8) == (
        "INVALID_ARGUMENT", "system shared memory register: the region needs a name")
    _register(stub, "r", obj.key, 4, 96)
    assert _error(_register, stub, "r", obj.key, 0, 8) == (
        "ALREADY_EXISTS", f"system shared memory region 'r' is already registered (key {obj.key!r}); unregister it "
        "first")
    assert _error(stub.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest(name="nope")) == (
        "NOT_FOUND", "system shared memory region 'nope' is not registered")
    one = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="r")).regions["r"]
    assert (one.name, one.key, one.offset, one.byte_size) == ("r", obj.key, 4, 96)

    x, y = np.arange(8, dtype=np.float32).reshape(2, 4), np.ones((2, 4), np.float32)
    obj.put(4, x)
    obj.put(4 + 32, y)
    where = "model 'add_sub' input 'x'"
    good = {"x": ("r", 0, 32, (2, 4), "FP32"), "y": ("r", 32, 32, (2, 4), "FP32")}
    cases = [
        ({"x": ("nope", 0, 32, (2, 4), "FP32")}, f"{where}: system shared memory region 'nope' is not registered"),
        ({"x": ("r", 70, 32, (2, 4), "FP32")}, f"{where}: shared_memory_offset 70 + shared_memory_byte_size 32 = "
                                               "102 is past the end of region 'r' (96 bytes)"),
        ({"x": ("r", -4, 32, (2, 4), "FP32")}, f"{where}: shared_memory_offset must be an integer >= 0, got -4"),
        ({"x": ("r", 0, -1, (2, 4), "FP32")}, f"{where}: shared_memory_byte_size must be an integer >= 0, got -1"),
        ({"x": ("r", 0, 28, (2, 4), "FP32")}, f"{where}: shape [2,4] of FP32 needs 32 bytes of raw contents, got 28"),
        ({"x": ("r", 0, 32, (2, 4), "FP64")}, f"{where}: expected datatype FP32, got FP64"),
    ]
    for inputs, message in cases:
        assert _error(stub.ModelInfer, _shm_request("add_sub", {**good, **inputs})) == ("INVALID_ARGUMENT", message)
    req = _shm_request("add_sub", good)
    del req.inputs[0].parameters["shared_memory_byte_size"]
    assert _error(stub.ModelInfer, req) == ("INVALID_ARGUMENT", f"{where}: parameter shared_memory_region needs "
                                                                "shared_memory_byte_size too")
    req = _shm_request("add_sub", good)
    req.inputs[0].contents.fp32_contents.extend([0.0] * 8)
    assert _error(stub.ModelInfer, req) == ("INVALID_ARGUMENT", f"{where}: names shared memory region 'r' and also "
                                                                "carries contents; send one")
    req = _shm_request("add_sub", good)
    req.inputs[0].parameters["shared_memory_region"].int64_param = 3
    assert _error(stub.ModelInfer, req) == ("INVALID_ARGUMENT", f"{where}: parameter shared_memory_region must be "
                                                                "a region name (string), got 3")
    # outputs: checked before the model runs (region, range) and when written (size)
    req = _shm_request("add_sub", good)
    _in_shm(req.outputs.add(name="sum"), "nope", 32)
    assert _error(stub.ModelInfer, req) == ("INVALID_ARGUMENT", "model 'add_sub' output 'sum': system shared memory "
                                                                "region 'nope' is not registered")
    req = _shm_request("add_sub", good)
    _in_shm(req.outputs.add(name="sum"), "r", 31, 64)
    assert _error(stub.ModelInfer, req) == ("INVALID_ARGUMENT", "model 'add_sub' output 'sum': the output needs 32 "
                                                                "bytes, more than the shared_memory_byte_size 31 "
                                                                "given for region 'r'")
    # the good request, outputs in the request's own reply, then one written over the inputs' tail
    reply = stub.ModelInfer(_shm_request("add_sub", good))
    assert {k: v.tolist() for k, v in outputs(reply).items()} == {"sum": (x + y).tolist(), "diff": (x - y).tolist()}
    req = _shm_request("add_sub", good)
    _in_shm(req.outputs.add(name="diff"), "r", 32, 64)
    reply = stub.ModelInfer(req)
    assert [o.name for o in reply.outputs] == ["diff"] and list(reply.raw_output_contents) == [b""]
    p = reply.outputs[0].parameters
    assert (p["shared_memory_region"].string_param, p["shared_memory_byte_size"].int64_param) == ("r", 32)
    assert obj.get(4 + 64, np.float32, (2, 4)).tolist() == (x - y).tolist()
    # an object shrunk after registration is refused, not read past its end (which would be SIGBUS)
    os.ftruncate(obj.fd, 40)
    assert _error(stub.ModelInfer, _shm_request("add_sub", good)) == (
        "INVALID_ARGUMENT", f"{where}: the shared memory object {obj.key!r} of region 'r' shrank to 40 bytes since "
        "it was registered (100 needed); register it again")
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="r"))
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="never-registered"))  # a no-op
    assert stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions == {}
    reply = stub.ModelInfer(request("add_sub", x=x, y=y))
    assert outputs(reply)["sum"].tolist() == (x + y).tolist()
    # CUDA: register is UNIMPLEMENTED; status and unregister answer for the regions there are: none
    assert _error(stub.CudaSharedMemoryRegister, pb.CudaSharedMemoryRegisterRequest(name="g", byte_size=8)) == (
        "UNIMPLEMENTED", "CUDA shared memory region 'g': CUDA shared memory is not supported by this server; use "
        "system shared memory (--allow-shared-memory) or send tensors in the request")
    assert stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest()).regions == {}
    assert _error(stub.CudaSharedMemoryStatus, pb.CudaSharedMemoryStatusRequest(name="g"))[0] == "NOT_FOUND"
    stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest())


def _pending(server: Server, model: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith("deepserve_pending_requests{")
                and f'model="{model}"' in ln)
    return float(line.rsplit(" ", 1)[1])


def test_unregister_while_requests_use_the_region(edge_repository, shm_object):
    """Documented behaviour (deferred, as current Triton does): unregister answers OK at once and the name is
    free; the running requests finish on the old mapping, reading their inputs and writing their outputs."""
    server = Server(edge_repository, env={"DEEPSERVE_ALLOW_SHARED_MEMORY": "1"})
    try:
        obj = shm_object(8)
        obj.put(0, np.array([[2.5]], np.float32))
        with server.channel() as ch:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
            _register(stub, "in", obj.key, 0, 4)
            _register(stub, "out", obj.key, 4, 4)
            req = _shm_request("slow", {"x": ("in", 0, 4, (1, 1), "FP32")})
            _in_shm(req.outputs.add(name="y"), "out", 4)
            # the slow model has one instance and ~0.5 s a run: three requests are in flight for a second or more
            futures = [stub.ModelInfer.future(req, timeout=60) for _ in range(3)]
            deadline = time.monotonic() + 30
            while _pending(server, "slow") == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())
            assert stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions == {}
            assert not all(f.done() for f in futures)  # the unregister really met running requests
            replies = [f.result() for f in futures]
            assert [[o.name for o in r.outputs] for r in replies] == [["y"]] * 3
            assert obj.get(4, np.float32, (1, 1)).tolist() == [[2.5]]
            assert _error(stub.ModelInfer, req) == ("INVALID_ARGUMENT", "model 'slow' input 'x': system shared "
                                                                        "memory region 'in' is not registered")
            _register(stub, "in", obj.key, 0, 4)  # the name is free again
            assert list(stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions) == ["in"]
    finally:
        server.stop()


def test_off_by_default(repository, shm_object):
    """Without --allow-shared-memory every shared memory call answers UNAVAILABLE."""
    server = Server(repository, "--no-strict-readiness")
    try:
        _off_checks(server, shm_object(32))
    finally:
        server.stop()
    bad = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--workers", "2", "--allow-shared-memory"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--workers > 1 cannot be combined with --allow-shared-memory" in bad.stderr


def _off_checks(server: Server, obj: ShmObject) -> None:
    disabled = ("system shared memory is disabled on this server; start it with --allow-shared-memory "
                "(DEEPSERVE_ALLOW_SHARED_MEMORY=1) to let clients on this host register regions")
    with server.channel() as ch:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
        assert _error(_register, stub, "r", obj.key, 0, 32) == ("UNAVAILABLE", disabled)
        assert _error(stub.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest()) == ("UNAVAILABLE",
                                                                                               disabled)
        assert _error(stub.SystemSharedMemoryUnregister, pb.SystemSharedMemoryUnregisterRequest()) == (
            "UNAVAILABLE", disabled)
        req = _shm_request("add_sub", {"x": ("r", 0, 16, (1, 4), "FP32"), "y": ("r", 16, 16, (1, 4), "FP32")})
        assert _error(stub.ModelInfer, req) == ("UNAVAILABLE", f"model 'add_sub' input 'x': {disabled}")
        md = stub.ServerMetadata(pb.ServerMetadataRequest())
        assert "system_shared_memory" not in md.extensions and "statistics" in md.extensions


@pytest.mark.slow
@pytest.mark.skipif(not PERF_ANALYZER.exists(), reason="../shared/tools/perf_analyzer is not beside the repository")
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_shared_memory_system(shm_server, stub, tmp_path, protocol):
    """Over HTTP an output written to a region comes back as name, datatype and shape only, as Triton answers:
    perf_analyzer's client fails on an output whose parameters lack binary_data_size."""
    before = stub.ModelStatistics(pb.ModelStatisticsRequest(name="add_sub")).model_stats[0].inference_count
    csv = tmp_path / "pa.csv"
    url = shm_server.url if protocol == "grpc" else shm_server.http_url.removeprefix("http://")
    r = subprocess.run([str(PERF_ANALYZER), "-m", "add_sub", "-u", url, "-i", protocol,
                        "--shared-memory", "system", "--output-shared-memory-size", "1024",
                        "--concurrency-range", "2", "--measurement-interval", "500", "-f", str(csv), "-b", "2",
                        "--max-trials", "6", "--stability-percentage", "10000"],
                       capture_output=True, text=True, timeout=300, env={**os.environ})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = csv.read_text().splitlines()
    header, values = rows[0].split(","), rows[1].split(",")
    assert float(values[header.index("Inferences/Second")]) > 0
    after = stub.ModelStatistics(pb.ModelStatisticsRequest(name="add_sub")).model_stats[0].inference_count
    assert after > before
    # perf_analyzer unregisters what it registered, and the server took every request it sent
    assert stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions == {}
    assert "error" not in r.stdout.lower() and "unable" not in (r.stdout + r.stderr).lower()


def test_a_view_outliving_its_region_stays_valid(shm_object):
    """In process: a numpy view of an input (a request cancelled while its batch still runs) keeps the mapping
    alive after the region is unregistered and closed; the registry never unmaps memory that is still viewed."""
    from service.shm import SharedMemory

    obj = shm_object(16)
    obj.put(0, np.arange(4, dtype=np.float32))
    shm = SharedMemory(allowed=True)
    shm.register("r", obj.key, 0, 16)
    lease = shm.lease()
    arr = np.frombuffer(lease.read("r", 0, 16, "input 'x'"), dtype=np.float32)
    shm.unregister()
    lease.release()  # the last user: the region is closed now, while `arr` still views it
    assert shm.status() == [] and arr.tolist() == [0.0, 1.0, 2.0, 3.0]
    lease = shm.lease()
    with pytest.raises(InvalidArgument, match="^input 'x': system shared memory region 'r' is not registered$"):
        lease.read("r", 0, 16, "input 'x'")
    shm.register("w", obj.key, 8, 8)  # the registry's own read and write, offsets relative to the region
    shm.write("w", 4, b"abcd")
    assert bytes(shm.read("w", 4, 4)) == b"abcd" and obj.map[12:16] == b"abcd"
    with pytest.raises(InvalidArgument, match="past the end of region 'w' \\(8 bytes\\)$"):
        shm.write("w", 6, b"abcd")
    shm.close()
