"""Raw text in: a model whose config declares `parameters { text_input: "<INT64 input>" ... }` also accepts UTF-8
strings on a BYTES input, encoded here exactly as its training job encoded them. The encoding lives in the
model's config, not in code written for one model:

  text_input        the model's INT64 [batch, T] input the text feeds (enables the feature)
  text_name         the BYTES input clients send (default "text"), shape [batch] or [batch, 1]
  text_encoding     "utf8_bytes": each UTF-8 byte is one token
  text_offset       added to each byte value (default 0)
  text_pad_id       token for padding shorter rows (default 0)
  text_max_length   longest row in tokens (default 512)
  text_overflow     "truncate" (default) or "error" for longer text"""

from __future__ import annotations

import numpy as np

from service._proto import model_config_pb2
from service.errors import InvalidArgument, ModelLoadError
from service.protocol import InputTensor
from service.runtime import param
from service.tensors import BY_WIRE, BYTES, TensorSpec, check_shape, decode_bytes, typed_bytes

ENCODINGS = ("utf8_bytes",)


class TextInput:
    def __init__(self, config: model_config_pb2.ModelConfig, inputs: dict[str, TensorSpec]) -> None:
        self.target = param(config, "text_input")
        self.name = param(config, "text_name", "text")
        if self.target not in inputs or inputs[self.target].dtype is not BY_WIRE["INT64"]:
            raise ModelLoadError(f"parameter text_input {self.target!r} must name an INT64 input of the model")
        if len(inputs[self.target].shape) != 2 or config.max_batch_size <= 0:
            raise ModelLoadError("parameter text_input needs a batched [batch, T] input")
        if self.name in inputs:
            raise ModelLoadError(f"parameter text_name {self.name!r} clashes with a model input")
        self.encoding = param(config, "text_encoding", "utf8_bytes")
        if self.encoding not in ENCODINGS:
            raise ModelLoadError(f"text_encoding {self.encoding!r} is not one of {ENCODINGS}")
        try:
            self.offset = int(param(config, "text_offset", "0"))
            self.pad = int(param(config, "text_pad_id", "0"))
            self.max_length = int(param(config, "text_max_length", "512"))
        except ValueError as exc:
            raise ModelLoadError(f"text parameters must be integers: {exc}") from None
        fixed = inputs[self.target].shape[1]
        if fixed != -1:
            self.max_length = min(self.max_length, fixed)
        self.overflow = param(config, "text_overflow", "truncate")
        if self.overflow not in ("truncate", "error"):
            raise ModelLoadError(f"text_overflow must be 'truncate' or 'error', got {self.overflow!r}")
        self.spec = TensorSpec(self.name, BYTES, (-1, 1))
        self.fixed = fixed

    def decode(self, where: str, tensor: InputTensor, max_batch: int, max_elements: int, used: int = 0
               ) -> np.ndarray:
        """The request's strings as the [batch, T] token array the model takes."""
        if tensor.datatype != "BYTES":
            raise InvalidArgument(f"{where}: expected datatype BYTES (UTF-8 text), got {tensor.datatype}")
        shape, raw = tensor.shape, tensor.raw
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InvalidArgument(f"{where}: expected shape [batch] or [batch,1], got {list(shape)}")
        count = check_shape(where, TensorSpec(self.name, BYTES, (-1,) * len(shape)), shape, max_batch, max_elements,
                            used)
        if raw is not None:
            if count * 4 > len(raw):
                raise InvalidArgument(f"{where}: shape {list(shape)} needs at least {count * 4} bytes, got {len(raw)}")
            items = decode_bytes(raw, count, where)
        else:
            items = typed_bytes(tensor.values or (), shape, count, where, tensor.values_from)
        rows = []
        for i, item in enumerate(items):
            try:
                item.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArgument(f"{where}: text {i} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
                                      ) from None
            if len(item) > self.max_length:
                if self.overflow == "error":
                    raise InvalidArgument(f"{where}: text {i} is {len(item)} bytes, over the model's "
                                          f"{self.max_length} (text_overflow: error)")
                item = item[:self.max_length]
            rows.append(np.frombuffer(item, dtype=np.uint8))
        width = self.fixed if self.fixed != -1 else max(1, max((len(r) for r in rows), default=1))
        tokens = np.full((len(rows), width), self.pad, dtype=np.int64)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r.astype(np.int64) + self.offset
        return tokens
