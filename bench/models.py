"""Benchmark models, built with onnx.helper so the harness and its smoke test need neither torch nor training.

`bench_resnet` is the compute-heavy model: a small ResNet over 3x64x64 images whose batch-32 run costs tens of
milliseconds, so that the transport is negligible and the server's overhead shows up against raw onnxruntime.
`digits_standin` has the exact signature of the published `digits_cnn` (image FP32 [B,1,8,8] -> logits,
probabilities [B,10]) and stands in for it when the repository has none: a transport-bound model whose run costs
microseconds, so that its numbers are about the request path, not the model.

The work repository the server runs on is a copy: the user's repository is never modified. Batching on vs off is
the same model file with and without the `dynamic_batching` block, served under two names.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

from service._proto import model_config_pb2

OPSET = 17
IR_VERSION = 9  # what onnxruntime >= 1.16 loads; make_model's default may be newer than the installed runtime
RESNET = "bench_resnet"
DIGITS = "digits_cnn"
DIGITS_NOBATCH = "digits_cnn_nobatch"


@dataclass(frozen=True)
class BenchRepository:
    """Where the work repository is and what it holds; `digits_source` says where digits_cnn came from."""

    root: Path
    digits_source: str
    digits_batching: str


class _Graph:
    """Accumulates nodes and initializers; names are generated so blocks can be stacked without bookkeeping."""

    def __init__(self, seed: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}_{self.count}"

    def const(self, array: np.ndarray, kind: str) -> str:
        name = self.name(kind)
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> str:
        """Conv with bias (batch norm folded in, as an exported inference graph has it), He-initialised."""
        w = self.rng.normal(0.0, np.sqrt(2.0 / (cin * k * k)), size=(cout, cin, k, k))
        b = np.zeros(cout)
        y = self.name("conv")
        pad = k // 2
        self.nodes.append(helper.make_node("Conv", [x, self.const(w, "w"), self.const(b, "b")], [y],
                                           kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4))
        return self.relu(y) if relu else y

    def relu(self, x: str) -> str:
        y = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [x], [y]))
        return y

    def block(self, x: str, cin: int, cout: int, stride: int) -> str:
        """A ResNet basic block: two 3x3 convs and a shortcut (1x1 conv when the shape changes)."""
        h = self.conv(x, cin, cout, 3, stride)
        h = self.conv(h, cout, cout, 3, 1, relu=False)
        short = x if (cin == cout and stride == 1) else self.conv(x, cin, cout, 1, stride, relu=False)
        y = self.name("add")
        self.nodes.append(helper.make_node("Add", [h, short], [y]))
        return self.relu(y)

    def head(self, x: str, features: int, classes: int) -> None:
        """Flattened features -> `logits` (Gemm) and `probabilities` (Softmax), the published models' outputs."""
        w = self.rng.normal(0.0, np.sqrt(1.0 / features), size=(classes, features))
        self.nodes.append(helper.make_node("Gemm", [x, self.const(w, "fc_w"), self.const(np.zeros(classes), "fc_b")],
                                           ["logits"], transB=1))
        self.nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))

    def model(self, name: str, input_name: str, chw: tuple[int, int, int], classes: int) -> onnx.ModelProto:
        inp = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", *chw])
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", classes])
                for n in ("logits", "probabilities")]
        graph = helper.make_graph(self.nodes, name, [inp], outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="deepserve-bench")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def build_resnet(widths: tuple[int, ...] = (32, 64, 128), seed: int = 0) -> onnx.ModelProto:
    """ResNet-style CNN, input FP32 [B,3,64,64]: stride-2 stem, one basic block per stage, stride 2 between stages.

    Untrained weights: only the arithmetic matters. About 0.1 GFLOP per sample with the default widths, which
    makes a batch-32 request cost tens of ms on 2 cores against well under a ms of transport.
    """
    g = _Graph(seed)
    x = g.conv("input", 3, widths[0], 3, stride=2)
    cin = widths[0]
    for i, width in enumerate(widths):
        x = g.block(x, cin, width, 1 if i == 0 else 2)
        cin = width
    pooled, flat = g.name("gap"), g.name("flat")
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], [pooled]))
    g.nodes.append(helper.make_node("Flatten", [pooled], [flat], axis=1))
    g.head(flat, cin, 10)
    return g.model(RESNET, "input", (3, 64, 64), 10)


def build_digits_standin(seed: int = 0) -> onnx.ModelProto:
    """Same signature as the published digits_cnn: image FP32 [B,1,8,8] -> logits, probabilities [B,10]."""
    g = _Graph(seed)
    x = g.conv("image", 1, 16, 3)
    pooled, flat = g.name("pool"), g.name("flat")
    g.nodes.append(helper.make_node("MaxPool", [x], [pooled], kernel_shape=[2, 2], strides=[2, 2]))
    g.nodes.append(helper.make_node("Flatten", [pooled], [flat], axis=1))
    g.head(flat, 16 * 4 * 4, 10)
    return g.model(DIGITS, "image", (1, 8, 8), 10)


def model_config(name: str, model: onnx.ModelProto, max_batch_size: int,
                 batching: model_config_pb2.ModelDynamicBatching | None) -> model_config_pb2.ModelConfig:
    """A complete Triton config for a graph whose first axis is the batch axis."""
    cfg = model_config_pb2.ModelConfig(name=name, backend="onnxruntime", max_batch_size=max_batch_size)
    for values, field in ((model.graph.input, cfg.input), (model.graph.output, cfg.output)):
        for v in values:
            dims = [d.dim_value for d in v.type.tensor_type.shape.dim[1:]]
            field.add(name=v.name, data_type=model_config_pb2.TYPE_FP32, dims=dims)
    if batching is not None:
        cfg.dynamic_batching.CopyFrom(batching)
    return cfg


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def write_model(repo: Path, cfg: model_config_pb2.ModelConfig, model_file: Path | onnx.ModelProto,
                version: str = "1") -> Path:
    """Write `repo/<name>/config.pbtxt` and `repo/<name>/<version>/model.onnx` (copied, or serialized)."""
    folder = repo / cfg.name
    (folder / version).mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    target = folder / version / "model.onnx"
    if isinstance(model_file, Path):
        shutil.copyfile(model_file, target)
    else:
        onnx.save_model(model_file, str(target))
    return target


def _latest_version(folder: Path) -> Path | None:
    versions = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and (p / "model.onnx").is_file()]
    return max(versions, key=lambda p: int(p.name)) if versions else None


def prepare_repository(work: Path, source: Path | None, resnet_widths: tuple[int, ...] = (32, 64, 128)
                       ) -> BenchRepository:
    """Build the work repository: digits_cnn (batching on), digits_cnn_nobatch (block removed), bench_resnet.

    The published digits_cnn is used when `source` has one (its latest version, its own dynamic_batching block if
    it has one); otherwise the onnx.helper stand-in. Batching "on" without a published block means Triton's
    default `dynamic_batching {}`: no added delay, whatever is queued when an instance frees up runs together.
    """
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    published = source / DIGITS if source is not None else None
    version = _latest_version(published) if published is not None and published.is_dir() else None
    if version is not None and published is not None and (published / "config.pbtxt").is_file():
        cfg = read_config(published / "config.pbtxt")
        model_file: Path | onnx.ModelProto = version / "model.onnx"
        origin = f"published ({published / version.name})"
    else:
        standin = build_digits_standin()
        cfg = model_config(DIGITS, standin, 256, None)
        model_file, origin = standin, "onnx.helper stand-in (no published digits_cnn in the repository)"
    if cfg.HasField("dynamic_batching"):
        batching = "published block: " + text_format.MessageToString(cfg.dynamic_batching, as_one_line=True)
    else:
        cfg.dynamic_batching.SetInParent()
        batching = "dynamic_batching {} (no published block; Triton's default, no added delay)"
    cfg.name = DIGITS
    ver = version.name if version is not None else "1"
    off = model_config_pb2.ModelConfig()
    off.CopyFrom(cfg)
    off.name = DIGITS_NOBATCH
    off.ClearField("dynamic_batching")
    copied = write_model(work, cfg, model_file, ver)
    write_model(work, off, copied, ver)
    if version is not None and published is not None:  # labels.txt and the like, which outputs may name
        for extra in published.iterdir():
            if extra.is_file() and extra.name != "config.pbtxt":
                for name in (DIGITS, DIGITS_NOBATCH):
                    shutil.copyfile(extra, work / name / extra.name)
    resnet = build_resnet(resnet_widths)
    write_model(work, model_config(RESNET, resnet, 128, model_config_pb2.ModelDynamicBatching()), resnet)
    return BenchRepository(work, origin, batching)
