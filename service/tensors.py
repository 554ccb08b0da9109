"""Wire tensors (neutral InputTensor) <-> numpy. Raw contents are viewed with np.frombuffer (no copy); every size is
checked against the declared shape before anything is allocated, so a request that declares 2^40
elements costs nothing."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from service._proto import model_config_pb2
from service.errors import InvalidArgument
from service.protocol import InputTensor

DataType = model_config_pb2.DataType


@dataclass(frozen=True)
class Dtype:
    """One datatype under its four names: the wire string, the config enum, numpy, and onnxruntime."""

    wire: str
    config: int
    numpy: np.dtype
    ort: str
    typed_field: str | None  # InferTensorContents field, None when the type travels raw only


DTYPES: tuple[Dtype, ...] = (
    Dtype("BOOL", DataType.TYPE_BOOL, np.dtype(np.bool_), "tensor(bool)", "bool_contents"),
    Dtype("UINT8", DataType.TYPE_UINT8, np.dtype(np.uint8), "tensor(uint8)", "uint_contents"),
    Dtype("UINT16", DataType.TYPE_UINT16, np.dtype(np.uint16), "tensor(uint16)", "uint_contents"),
    Dtype("UINT32", DataType.TYPE_UINT32, np.dtype(np.uint32), "tensor(uint32)", "uint_contents"),
    Dtype("UINT64", DataType.TYPE_UINT64, np.dtype(np.uint64), "tensor(uint64)", "uint64_contents"),
    Dtype("INT8", DataType.TYPE_INT8, np.dtype(np.int8), "tensor(int8)", "int_contents"),
    Dtype("INT16", DataType.TYPE_INT16, np.dtype(np.int16), "tensor(int16)", "int_contents"),
    Dtype("INT32", DataType.TYPE_INT32, np.dtype(np.int32), "tensor(int32)", "int_contents"),
    Dtype("INT64", DataType.TYPE_INT64, np.dtype(np.int64), "tensor(int64)", "int64_contents"),
    Dtype("FP16", DataType.TYPE_FP16, np.dtype(np.float16), "tensor(float16)", None),
    Dtype("FP32", DataType.TYPE_FP32, np.dtype(np.float32), "tensor(float)", "fp32_contents"),
    Dtype("FP64", DataType.TYPE_FP64, np.dtype(np.float64), "tensor(double)", "fp64_contents"),
    Dtype("BYTES", DataType.TYPE_STRING, np.dtype(object), "tensor(string)", "bytes_contents"),
)
BY_WIRE = {d.wire: d for d in DTYPES}
BY_CONFIG = {d.config: d for d in DTYPES}
BY_ORT = {d.ort: d for d in DTYPES}
BYTES = BY_WIRE["BYTES"]

_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class TensorSpec:
    """An input or output as the server checks it: `shape` is the full shape, batch dim first when batching,
    -1 for any size."""

    name: str
    dtype: Dtype
    shape: tuple[int, ...]
    optional: bool = False


def decode_bytes(raw: bytes | memoryview, count: int, where: str, text: bool = False) -> np.ndarray:
    """BYTES raw layout: each element is a 4-byte little-endian length then that many bytes. With `text`, elements
    become str: ONNX string tensors hold text, and onnxruntime would turn a bytes object into its repr."""
    view = memoryview(raw)
    out = np.empty(count, dtype=object)
    pos, end = 0, len(view)
    for i in range(count):
        if pos + 4 > end:
            raise InvalidArgument(f"{where}: BYTES contents hold fewer than the {count} elements the shape declares")
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + n > end:
            raise InvalidArgument(f"{where}: BYTES element {i} declares {n} bytes but only {end - pos} remain")
        item = bytes(view[pos:pos + n])
        if text:
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArgument(f"{where}: BYTES element {i} is not valid UTF-8 ({exc.reason} at byte "
                                      f"{exc.start}); ONNX string tensors hold text") from None
        out[i] = item
        pos += n
    if pos != end:
        raise InvalidArgument(f"{where}: {end - pos} bytes left over after the {count} BYTES elements of the shape")
    return out


def encode_bytes(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.reshape(-1):
        b = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def to_raw(arr: np.ndarray, dtype: Dtype) -> bytes:
    if dtype is BYTES:
        return encode_bytes(arr)
    return np.ascontiguousarray(arr, dtype=dtype.numpy).tobytes()


def check_shape(where: str, spec: TensorSpec, shape: tuple[int, ...], max_batch: int, max_elements: int,
                used: int = 0) -> int:
    """Validate a declared shape against the spec; return its element count (without allocating anything).
    `max_elements` bounds the whole request: `used` is what its earlier inputs already hold."""
    if len(shape) != len(spec.shape):
        raise InvalidArgument(f"{where}: expected rank {len(spec.shape)} shape {_fmt(spec.shape)}, got {_fmt(shape)}")
    for i, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
        if got < 0:
            raise InvalidArgument(f"{where}: negative dimension {got} at axis {i} in shape {_fmt(shape)}")
        if want != -1 and want != got:
            raise InvalidArgument(f"{where}: expected shape {_fmt(spec.shape)}, got {_fmt(shape)} (axis {i})")
    if max_batch > 0 and shape[0] > max_batch:
        raise InvalidArgument(f"{where}: batch size {shape[0]} exceeds the model's max_batch_size {max_batch}")
    count = math.prod(shape)
    if max_elements and used + count > max_elements:
        others = f" (the request's other inputs hold {used} more)" if used else ""
        raise InvalidArgument(f"{where}: shape {_fmt(shape)} has {count} elements{others}, over the server's limit "
                              f"of {max_elements} per request (--max-elements)")
    return count


def decode_input(where: str, spec: TensorSpec, tensor: InputTensor, max_batch: int, max_elements: int = 0,
                 used: int = 0) -> np.ndarray:
    """One input tensor to a numpy array of the spec's dtype and the request's shape."""
    if tensor.datatype != spec.dtype.wire:
        raise InvalidArgument(f"{where}: expected datatype {spec.dtype.wire}, got {tensor.datatype or '(empty)'}")
    shape = tensor.shape
    count = check_shape(where, spec, shape, max_batch, max_elements, used)
    dt = spec.dtype
    raw = tensor.raw
    if raw is not None:
        if dt is BYTES:
            if count * 4 > len(raw):
                raise InvalidArgument(f"{where}: shape {_fmt(shape)} needs at least {count * 4} bytes of BYTES "
                                      f"contents, got {len(raw)}")
            return decode_bytes(raw, count, where, text=True).reshape(shape)
        expected = count * dt.numpy.itemsize
        if len(raw) != expected:
            raise InvalidArgument(f"{where}: shape {_fmt(shape)} of {dt.wire} needs {expected} bytes of raw "
                                  f"contents, got {len(raw)}")
        return np.frombuffer(raw, dtype=dt.numpy).reshape(shape)
    values = tensor.values if tensor.values is not None else ()
    if dt is BYTES:
        items = typed_bytes(values, shape, count, where, tensor.values_from)
        return decode_bytes(b"".join(_LEN.pack(len(v)) + v for v in items), count, where, text=True).reshape(shape)
    try:
        arr = np.array(values, dtype=dt.numpy)
    except OverflowError:
        info = np.iinfo(dt.numpy)
        bad = next(v for v in flatten(values) if not info.min <= v <= info.max)
        raise InvalidArgument(f"{where}: value {bad} in {tensor.values_from} does not fit {dt.wire} "
                              f"[{info.min}, {info.max}]") from None
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{where}: {tensor.values_from} must hold {dt.wire} numbers in a flat or "
                              f"regularly nested list: {exc}") from None
    if arr.size != count:
        raise InvalidArgument(f"{where}: shape {_fmt(shape)} needs {count} values in {tensor.values_from}, "
                              f"got {arr.size}")
    return arr.reshape(shape)


def flatten(values) -> list:
    """JSON `data` may be nested row by row; gRPC typed contents are always flat."""
    if not any(isinstance(v, list) for v in values):
        return list(values)
    out: list = []
    stack = [iter(values)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def typed_bytes(values, shape: tuple[int, ...], count: int, where: str, values_from: str) -> list[bytes]:
    """Typed BYTES values (gRPC bytes_contents, JSON strings) as bytes, counted against the shape."""
    items = flatten(values)
    if len(items) != count:
        raise InvalidArgument(f"{where}: shape {_fmt(shape)} needs {count} values in "
                              f"{values_from}, got {len(items)}")
    out = []
    for i, v in enumerate(items):
        if isinstance(v, str):
            out.append(v.encode("utf-8"))
        elif isinstance(v, bytes | bytearray | memoryview):
            out.append(bytes(v))
        else:
            raise InvalidArgument(f"{where}: BYTES element {i} in {values_from} is {type(v).__name__}, not a string")
    return out


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"
