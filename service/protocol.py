"""The protocol-neutral request and response of one inference, what both front ends convert their wire format to
and from. Plain slotted classes: building one costs about a microsecond, and the tensor bytes are never copied
(`raw` is a view into the received frame or body)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import InvalidArgument

Parameters = dict[str, Any]  # plain Python values: bool, int, float, str (bytes for gRPC bytes_param)
# the parameters of an input or output held in a shared memory region (Triton's extension; rules in service.dataplane)
REGION, REGION_SIZE, REGION_OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"


@dataclass(slots=True)
class InputTensor:
    """One input as it arrived: exactly one of `raw` (little-endian bytes; BYTES elements each a 4-byte length then
    the bytes) or `values` (typed values, flat or nested as the wire had them), or neither when the shape holds no
    element. `values_from` names where the values came from in messages (gRPC: contents.fp32_contents)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | memoryview | None = None
    values: Sequence | None = None
    values_from: str = "data"
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    name: str
    classification: int = 0  # Triton's classification extension: top k as "score:index[:label]" BYTES
    binary: bool = True  # HTTP: binary_data (gRPC replies are always raw)
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    model: str
    version: str = ""
    id: str = ""
    inputs: list[InputTensor] = field(default_factory=list)
    outputs: list[RequestedOutput] = field(default_factory=list)  # empty: every output
    parameters: Parameters = field(default_factory=dict)
    binary_outputs: bool = True  # how outputs the request does not name travel (HTTP: binary_data_output)
    shared_memory: bool = False  # an input or output names a shared memory region (the front end, converting, saw)


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # BYTES: an object array of bytes
    binary: bool = True
    parameters: Parameters = field(default_factory=dict)  # shared_memory_*: written to a region, send no contents


@dataclass(slots=True)
class InferResponse:
    model: str
    version: str
    id: str
    outputs: list[OutputTensor]
    parameters: Parameters = field(default_factory=dict)


def parameter_int(params: Parameters, key: str, where: str, default: int = 0) -> int:
    """An integer request parameter (gRPC int64/uint64, JSON number); bool is not an integer here."""
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{where}: parameter {key} must be an integer, got {value!r}")
    return value
