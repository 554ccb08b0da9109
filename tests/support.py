"""Test helpers: small ONNX models built with onnx.helper (no torch), repository folders, and a real
`deepserve serve` process on free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
ONNX_TYPES = {
    "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def save(model: onnx.ModelProto, repo: Path, name: str, version: int = 1, config: str | None = None) -> Path:
    d = repo / name / str(version)
    d.mkdir(parents=True, exist_ok=True)
    model.opset_import[0].version = 17
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, d / "model.onnx")
    if config is not None:
        (repo / name / "config.pbtxt").write_text(config)
    return d / "model.onnx"


def add_sub_model(width: int = 4, scale: float = 1.0) -> onnx.ModelProto:
    """x, y FP32 [B,width] -> sum = (x+y)*scale, diff = x-y."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    s = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", width])
    d = helper.make_tensor_value_info("diff", TensorProto.FLOAT, ["batch", width])
    k = helper.make_tensor("k", TensorProto.FLOAT, [], [scale])
    nodes = [helper.make_node("Add", ["x", "y"], ["xy"]), helper.make_node("Mul", ["xy", "k"], ["sum"]),
             helper.make_node("Sub", ["x", "y"], ["diff"])]
    return helper.make_model(helper.make_graph(nodes, "add_sub", [x, y], [s, d], initializer=[k]))


def identity_model(datatypes: list[str]) -> onnx.ModelProto:
    """One Identity per datatype: in_<T> [B,-1] -> out_<T>."""
    ins, outs, nodes = [], [], []
    for t in datatypes:
        ins.append(helper.make_tensor_value_info(f"in_{t}", ONNX_TYPES[t], ["batch", "n"]))
        outs.append(helper.make_tensor_value_info(f"out_{t}", ONNX_TYPES[t], ["batch", "n"]))
        nodes.append(helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]))
    return helper.make_model(helper.make_graph(nodes, "identity", ins, outs))


def seq_model() -> onnx.ModelProto:
    """tokens INT64 [B,T] -> total FP32 [B,1] = sum over T (variable length: batches only with equal T)."""
    t = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"])
    o = helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch", 1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Cast", ["tokens"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["f", "axes"], ["total"], keepdims=1)]
    return helper.make_model(helper.make_graph(nodes, "seq", [t], [o], initializer=[axes]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `deepserve serve` subprocess. Its log is kept in a file for assertions and failures. Every one
    started is killed at the end of the session (conftest), even when a failing test never reached stop()."""

    started: list[Server] = []

    def __init__(self, repo: Path, *args: str, env: dict | None = None, wait_ready: bool = True) -> None:
        self.grpc_port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        self.url = f"127.0.0.1:{self.grpc_port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = repo.parent / f"server-{self.grpc_port}.log"
        cmd = [sys.executable, "-m", "service.cli", "serve", "--repository", str(repo), "--host", "127.0.0.1",
               "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
               "--http-port", str(self.http_port), *args]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        Server.started.append(self)
        if wait_ready:
            self.wait_ready()

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.url)

    def wait_ready(self, timeout: float = 60.0) -> None:
        from service._proto import inference_pb2, inference_pb2_grpc

        deadline = time.monotonic() + timeout
        with self.channel() as ch:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
                try:
                    if stub.ServerReady(inference_pb2.ServerReadyRequest(), timeout=1).ready:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def wait_log(self, text: str, timeout: float = 60.0) -> None:
        """For servers a plain-text probe cannot reach (TLS, tokens): wait until the log says `text`."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server never logged {text!r}:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self, sig: int = 15, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def request(model: str, version: str = "", raw: bool = True, **arrays):
    """A ModelInferRequest from numpy arrays (wire datatype from the array's dtype; object arrays are BYTES)."""
    import numpy as np

    from service._proto import inference_pb2
    from service.tensors import BY_WIRE, DTYPES, to_raw

    req = inference_pb2.ModelInferRequest(model_name=model, model_version=version)
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        dt = BY_WIRE["BYTES"] if arr.dtype == object else next(d for d in DTYPES if d.numpy == arr.dtype)
        t = req.inputs.add(name=name, datatype=dt.wire, shape=arr.shape)
        if raw:
            req.raw_input_contents.append(to_raw(arr, dt))
        else:
            getattr(t.contents, dt.typed_field).extend(arr.reshape(-1).tolist())
    return req


def outputs(reply) -> dict:
    from service.client import decode_output

    return {t.name: decode_output(t, raw) for t, raw in zip(reply.outputs, reply.raw_output_contents, strict=True)}


def slow_model(n: int = 700, reps: int = 4) -> onnx.ModelProto:
    """x FP32 [B,1] -> y = x + tiny*sum(W^reps): a model that takes milliseconds, to hold an instance busy."""
    import numpy as np

    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [n, n], (rng.random((n, n), dtype=np.float32) / n).ravel())
    eps = helper.make_tensor("eps", TensorProto.FLOAT, [], [0.0])
    # The chain starts from the input, or onnxruntime folds it into a constant at load.
    nodes, prev = [helper.make_node("ReduceSum", ["x"], ["xs"], keepdims=0),
                   helper.make_node("Mul", ["w", "xs"], ["w0"])], "w0"
    for i in range(reps):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"m{i}"]))
        prev = f"m{i}"
    nodes += [helper.make_node("ReduceSum", [prev], ["s"], keepdims=0),
              helper.make_node("Mul", ["s", "eps"], ["z"]), helper.make_node("Add", ["x", "z"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])
    return helper.make_model(helper.make_graph(nodes, "slow", [x], [y], initializer=[w, eps]))


def publish(model: onnx.ModelProto, repo: Path, name: str, version: int, raw: bytes | None = None) -> None:
    """Publish a version the way training jobs do: build it in a hidden folder, then rename it into place."""
    import shutil

    tmp = repo / name / f".tmp-{version}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if raw is None:
        model.opset_import[0].version = 17
        model.ir_version = 8
        onnx.save(model, tmp / "model.onnx")
    else:
        (tmp / "model.onnx").write_bytes(raw)
    os.rename(tmp, repo / name / str(version))


class Load:
    """Clients hammering one model from threads until stopped; every reply's status is counted."""

    def __init__(self, url: str, make_request, concurrency: int = 16, check=None) -> None:
        import collections
        import threading

        from service._proto import inference_pb2_grpc

        self.codes: collections.Counter = collections.Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.channel = grpc.insecure_channel(url)
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(self.channel)

        self.calls: list[tuple[float, str]] = []  # (monotonic start, status) of every call

        def loop() -> None:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    reply = stub.ModelInfer(make_request(), timeout=30)
                    code = "OK" if check is None or check(reply) else "WRONG"
                except grpc.RpcError as exc:
                    code = exc.code().name
                    with self._lock:
                        self.errors.append(f"{code}: {exc.details()}")
                with self._lock:
                    self.codes[code] += 1
                    self.calls.append((t0, code))

        self.threads = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
        for t in self.threads:
            t.start()

    def stop(self) -> dict:
        self._stop.set()
        for t in self.threads:
            t.join(60)
        self.channel.close()
        return dict(self.codes)


def rnn_cell_model(hidden: int = 8, classes: int = 3, seed: int = 0):
    """x_t FP32 [B,1], h_in [B,hidden] -> h_out = tanh(x_t W + h_in U), y = h_out V. Returns (model, (W, U, V))."""
    import numpy as np

    rng = np.random.default_rng(seed)
    w, u, v = (rng.standard_normal(s).astype(np.float32) * 0.5 for s in ((1, hidden), (hidden, hidden),
                                                                      (hidden, classes)))
    inits = [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel()) for n, a in (("W", w), ("U", u), ("V", v))]
    nodes = [helper.make_node("MatMul", ["x_t", "W"], ["a"]), helper.make_node("MatMul", ["h_in", "U"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Tanh", ["c"], ["h_out"]),
             helper.make_node("MatMul", ["h_out", "V"], ["y"])]
    ins = [helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["batch", 1]),
           helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", hidden])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", hidden])]
    return helper.make_model(helper.make_graph(nodes, "cell", ins, outs, initializer=inits)), (w, u, v)


SEQUENCE_CONFIG = """
max_batch_size: 16
sequence_batching {
  max_sequence_idle_microseconds: %d
  state [ { input_name: "h_in" output_name: "h_out" data_type: TYPE_FP32 dims: [ 8 ]
            initial_state: { name: "zero" data_type: TYPE_FP32 dims: [ 8 ] zero_data: true } } ]
  oldest { max_candidate_sequences: 16 max_queue_delay_microseconds: 2000 }
}
parameters { key: "max_sequences" value { string_value: "%d" } }
"""


def build_request_for(stub, name: str):
    """A request maker for any served model, from its metadata and config: examples.npz rows when published,
    else ones with every dynamic dim 1; stateful models get a one-step sequence with a fresh id each call. For a
    decoupled (generation) model the maker has `decoupled` set: its request is a four-token generation, for
    ModelStreamInfer (ModelInfer refuses such a model, as Triton does)."""
    import numpy as np

    from service._proto import inference_pb2
    from service.tensors import BY_WIRE

    md = stub.ModelMetadata(inference_pb2.ModelMetadataRequest(name=name))
    cfg = stub.ModelConfig(inference_pb2.ModelConfigRequest(name=name)).config
    if cfg.model_transaction_policy.decoupled:  # generation: a short prompt for ModelStreamInfer
        text = cfg.parameters["generation_text_input"].string_value or "text_input"

        def generate(i: int):
            req = request(name, **{text: np.array([b"hello"], dtype=object)})
            req.id = str(i)
            req.parameters["max_tokens"].int64_param = 4
            return req

        generate.decoupled = True
        return generate
    stateful = cfg.HasField("sequence_batching")
    feeds = {}
    for t in md.inputs:
        if t.datatype == "BYTES" and "text_input" in cfg.parameters:
            continue  # the token input covers it
        shape = [1 if d == -1 else d for d in t.shape]
        dt = BY_WIRE[t.datatype]
        feeds[t.name] = (np.full(shape, b"a", dtype=object) if t.datatype == "BYTES"
                         else np.ones(shape, dtype=dt.numpy))

    def make(i: int):
        req = request(name, **feeds)
        if stateful:
            req.parameters["sequence_id"].uint64_param = i
            req.parameters["sequence_start"].bool_param = True
            req.parameters["sequence_end"].bool_param = True
        return req

    return make


def gather_model(size: int = 10) -> onnx.ModelProto:
    """index INT64 [B,1] -> value FP32 [B,1] = table[index], table = 0, 1.5, 3, ...: an index outside [-size, size)
    passes every input check and fails inside onnxruntime, at run time."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [size], [1.5 * i for i in range(size)])
    i = helper.make_tensor_value_info("index", TensorProto.INT64, ["batch", 1])
    o = helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch", 1])
    node = helper.make_node("Gather", ["table", "index"], ["value"], axis=0)
    return helper.make_model(helper.make_graph([node], "gather", [i], [o], initializer=[table]))


def classifier_model(classes: int = 3) -> onnx.ModelProto:
    """scores FP32 [B,classes] -> logits (the scores) and probabilities = softmax(scores): the argmax is the
    largest score, so examples with a known answer are easy to write."""
    x = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", classes])
    lo = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    p = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])
    nodes = [helper.make_node("Identity", ["scores"], ["logits"]),
             helper.make_node("Softmax", ["scores"], ["probabilities"], axis=-1)]
    return helper.make_model(helper.make_graph(nodes, "classifier", [x], [lo, p]))


def proc_status(pid: int) -> dict[str, int]:
    """/proc/<pid>/status memory lines in bytes: VmRSS (resident now), VmHWM (resident peak), VmPeak (virtual
    peak), VmSize."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key.startswith("Vm") and rest.strip().endswith("kB"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def parse_model(fixed: int | None = None) -> onnx.ModelProto:
    """text BYTES [B,n] of decimal strings -> value INT32 [B,n] (a Cast of strings, as Triton users' graphs parse
    their inputs). With `fixed`, the strings are reshaped to [B, fixed] first: zeros of shape [1,1] cannot run."""
    t = helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", "n"])
    o = helper.make_tensor_value_info("value", TensorProto.INT32, ["batch", fixed or "n"])
    nodes, inits = [], []
    src = "text"
    if fixed:
        inits.append(helper.make_tensor("shape", TensorProto.INT64, [2], [-1, fixed]))
        nodes.append(helper.make_node("Reshape", ["text", "shape"], ["fixed"]))
        src = "fixed"
    nodes.append(helper.make_node("Cast", [src], ["value"], to=TensorProto.INT32))
    return helper.make_model(helper.make_graph(nodes, "parse", [t], [o], initializer=inits))
