"""Triton's sequence batcher with implicit state. The client sends one step at a time with the request parameters
sequence_id, sequence_start and sequence_end; the server keeps each live sequence's state (config
`sequence_batching.state`: an input the model reads and the output it writes back) and feeds it in. Steps of
different sequences go through the same batcher, so they merge into one run; steps of one sequence run strictly
in arrival order. Idle sequences are freed after max_sequence_idle_microseconds, and the number of live ones is
capped."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from service._proto import model_config_pb2
from service.batcher import Batcher, Outputs
from service.errors import InvalidArgument, ModelLoadError, Unavailable
from service.tensors import BY_CONFIG

DEFAULT_IDLE_US = 1_000_000  # Triton's default
DEFAULT_MAX_SEQUENCES = 1024


@dataclass
class StateSpec:
    input: str
    output: str
    dtype: np.dtype
    dims: tuple[int, ...]


@dataclass
class Sequence:
    state: dict[str, np.ndarray]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)


def state_names(config: model_config_pb2.ModelConfig) -> set[str]:
    """Graph inputs and outputs that carry state: the server's, never the client's."""
    if not config.HasField("sequence_batching"):
        return set()
    return {n for s in config.sequence_batching.state for n in (s.input_name, s.output_name)}


class Sequences:
    def __init__(self, name: str, config: model_config_pb2.ModelConfig) -> None:
        sb = config.sequence_batching
        if config.max_batch_size <= 0:
            raise ModelLoadError("sequence_batching needs max_batch_size > 0 (steps of different sequences batch)")
        self.name = name
        self.states = []
        for s in sb.state:
            dt = BY_CONFIG.get(s.data_type)
            if dt is None or dt.typed_field is None and dt.wire != "FP16":
                raise ModelLoadError(f"sequence_batching state {s.input_name!r}: unsupported data_type")
            if any(d < 0 for d in s.dims):
                raise ModelLoadError(f"sequence_batching state {s.input_name!r}: dims must be fixed, got "
                                     f"{list(s.dims)}")
            for init in s.initial_state:
                if init.WhichOneof("state_data") != "zero_data":
                    raise ModelLoadError("sequence_batching initial_state: only zero_data is supported")
            self.states.append(StateSpec(s.input_name, s.output_name, dt.numpy, tuple(s.dims)))
        self.idle_s = (sb.max_sequence_idle_microseconds or DEFAULT_IDLE_US) / 1e6
        self.max_live = int(config.parameters["max_sequences"].string_value) \
            if "max_sequences" in config.parameters else DEFAULT_MAX_SEQUENCES
        self.live: dict[int | str, Sequence] = {}
        self._sweeper: asyncio.Task | None = None

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(self.idle_s, 1.0) / 2)
            cutoff = time.monotonic() - self.idle_s
            for sid in [k for k, s in self.live.items() if s.last_used < cutoff and not s.lock.locked()]:
                del self.live[sid]

    async def step(self, batcher: Batcher, feeds: dict[str, np.ndarray], rows: int,
                   params, timeout_us: int) -> Outputs:
        sid, start, end = _control(params, self.name)
        if rows != 1:
            raise InvalidArgument(f"model {self.name!r}: a sequence step carries batch size 1, got {rows}")
        seq = self.live.get(sid)
        if start:
            if seq is None and len(self.live) >= self.max_live:
                raise Unavailable(f"model {self.name!r}: {self.max_live} sequences are live (the cap); end one "
                                  "or retry later")
            fresh = {s.input: np.zeros((1, *s.dims), s.dtype) for s in self.states}
            if seq is None:
                seq = self.live[sid] = Sequence(fresh)
            else:
                seq.state = fresh  # a new start on a live id begins it again
        elif seq is None:
            raise InvalidArgument(f"model {self.name!r}: sequence {sid!r} is not live (never started, ended, or "
                                  f"idle for over {self.idle_s:g}s); send its first step with sequence_start")
        async with seq.lock:
            if self.live.get(sid) is not seq:
                raise InvalidArgument(f"model {self.name!r}: sequence {sid!r} ended while this step waited")
            seq.last_used = time.monotonic()
            out = await batcher.submit({**feeds, **seq.state}, 1, timeout_us)
            seq.state = {s.input: out[s.output] for s in self.states}
            seq.last_used = time.monotonic()
            if end:
                del self.live[sid]
        return out


def _control(params, model: str) -> tuple[int | str, bool, bool]:
    p = params.get("sequence_id")
    if p is None:
        raise InvalidArgument(f"model {model!r} is stateful: set the request parameter sequence_id (and "
                              "sequence_start on the first step, sequence_end on the last)")
    which = p.WhichOneof("parameter_choice")
    sid: int | str
    if which in ("int64_param", "uint64_param"):
        sid = getattr(p, which)
    elif which == "string_param" and p.string_param:
        sid = p.string_param
    else:
        raise InvalidArgument(f"model {model!r}: sequence_id must be a non-zero integer or a non-empty string")
    if sid == 0:
        raise InvalidArgument(f"model {model!r}: sequence_id 0 is reserved (it means no sequence)")
    return sid, _flag(params, "sequence_start"), _flag(params, "sequence_end")


def _flag(params, key: str) -> bool:
    p = params.get(key)
    return p is not None and p.WhichOneof("parameter_choice") == "bool_param" and p.bool_param

