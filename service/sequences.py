"""Triton's sequence batcher with implicit state. The client sends one step at a time with the request parameters
sequence_id, sequence_start and sequence_end; the server keeps each live sequence's state (config
`sequence_batching.state`: an input the model reads and the output it writes back) and feeds it in. Steps of
different sequences go through the same batcher, so they merge into one run; steps of one sequence run strictly
in arrival order. Idle sequences are freed after max_sequence_idle_microseconds, and the number of live ones is
capped. With the oldest strategy's max_candidate_sequences, sequences beyond that many wait in a backlog until a
candidate ends, as in Triton.

The live sequences are a Table that outlives one model version: when a new version with the same state takes
over, it adopts the table, so a reload loses no sequence, and a step that was waiting behind its sequence's lock
runs on whichever version owns the table when its turn comes (never on a version that is being retired)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from service._proto import model_config_pb2
from service.batcher import Batcher, Outputs
from service.errors import InvalidArgument, ModelLoadError, Unavailable
from service.runtime import param
from service.tensors import BY_CONFIG
from service.tracing import Trace

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
    candidate: asyncio.Event = field(default_factory=asyncio.Event)  # set: its steps may run (not in the backlog)
    ended: bool = False


class Table:
    """The live sequences of a model and which version runs their steps."""

    def __init__(self, owner: Sequences) -> None:
        self.owner: Sequences | None = owner  # None once closed (model unloaded, or replaced by other state)
        self.live: dict[int | str, Sequence] = {}
        self.backlog: deque[Sequence] = deque()
        self.candidates = 0
        self.active = 0  # steps accepted and not yet answered
        self.closing = False  # its owner is retiring without a successor: finish what was accepted, then close

    def add(self, sid: int | str, seq: Sequence, max_candidates: int) -> None:
        self.live[sid] = seq
        if max_candidates and self.candidates >= max_candidates:
            self.backlog.append(seq)
        else:
            self.candidates += 1
            seq.candidate.set()

    def remove(self, sid: int | str, seq: Sequence) -> None:
        if self.live.get(sid) is seq:
            del self.live[sid]
        if seq.ended:
            return
        seq.ended = True
        if seq.candidate.is_set():
            self.candidates -= 1
            self.promote()
        else:
            seq.candidate.set()  # a step waiting in the backlog wakes, sees it ended, and says so

    def promote(self) -> None:
        limit = self.owner.max_candidates if self.owner else 0
        while self.backlog and (not limit or self.candidates < limit):
            seq = self.backlog.popleft()
            if not seq.ended:
                self.candidates += 1
                seq.last_used = time.monotonic()
                seq.candidate.set()


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
        self.max_live = int(param(config, "max_sequences", str(DEFAULT_MAX_SEQUENCES)))
        self.max_candidates = sb.oldest.max_candidate_sequences if sb.HasField("oldest") else 0  # 0: no backlog
        self.table = Table(self)
        self.adopted = False
        self.batcher: Batcher | None = None
        self._sweeper: asyncio.Task | None = None

    @property
    def live(self) -> dict[int | str, Sequence]:
        return self.table.live

    def start(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def adopt(self, previous: Sequences) -> bool:
        """Take over the live sequences of the version this one replaces, if their state has the same shape.
        Called at the swap, before either version yields to the event loop."""
        if self.adopted or self.table.live or previous.states != self.states or previous.table.owner is not previous:
            return False
        self.adopted = True
        self.table = previous.table
        self.table.owner = self
        self.table.promote()  # this version may allow more candidates
        return True

    async def retire(self) -> None:
        """The version is leaving. A table handed over goes on with its new owner. Otherwise the steps already
        accepted finish on this version first (its batcher is still running), sequences waiting in the backlog
        are told the model went away, and the table closes."""
        if self._sweeper:
            self._sweeper.cancel()
        table = self.table
        if table.owner is not self:
            return
        table.closing = True
        for seq in list(table.backlog):
            seq.ended = True
            seq.candidate.set()
        while table.active:
            await asyncio.sleep(0.005)
        table.owner = None
        table.live.clear()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(self.idle_s, 1.0) / 2)
            table = self.table
            if table.owner is not self:
                continue  # the owner sweeps
            cutoff = time.monotonic() - self.idle_s
            for sid, seq in [(k, s) for k, s in table.live.items() if s.last_used < cutoff and not s.lock.locked()]:
                table.remove(sid, seq)

    async def step(self, feeds: dict[str, np.ndarray], rows: int, params, timeout_us: int,
                   trace: Trace | None = None) -> Outputs:
        """One step of a sequence. It runs on the batcher of the version that owns the sequence when its turn
        comes: the version the request was routed to, unless a reload handed the sequence over meanwhile."""
        sid, start, end = _control(params, self.name)
        if rows != 1:
            raise InvalidArgument(f"model {self.name!r}: a sequence step carries batch size 1, got {rows}")
        table = self.table
        seq = table.live.get(sid)
        if start:
            if seq is None:
                if len(table.live) >= self.max_live:
                    raise Unavailable(f"model {self.name!r}: {self.max_live} sequences are live (the cap); end "
                                      "one or retry later")
                seq = Sequence(self._fresh())
                table.add(sid, seq, self.max_candidates)
        elif seq is None:
            raise InvalidArgument(f"model {self.name!r}: sequence {sid!r} is not live (never started, ended, or "
                                  f"idle for over {self.idle_s:g}s); send its first step with sequence_start")
        table.active += 1
        try:
            async with seq.lock:
                await seq.candidate.wait()  # at once, unless the sequence waits in the backlog
                owner = table.owner
                if owner is None or (seq.ended and table.closing):
                    raise Unavailable(f"model {self.name!r} was unloaded while sequence {sid!r} waited")
                if seq.ended:
                    raise InvalidArgument(f"model {self.name!r}: sequence {sid!r} ended while this step waited")
                if start:  # a new start on a live id begins it again, in its turn
                    seq.state = self._fresh()
                seq.last_used = time.monotonic()
                out = await owner.batcher.submit({**feeds, **seq.state}, 1, timeout_us, trace)
                seq.state = {s.input: out[s.output] for s in owner.states}
                seq.last_used = time.monotonic()
                if end:
                    table.remove(sid, seq)
            return out
        finally:
            table.active -= 1

    def _fresh(self) -> dict[str, np.ndarray]:
        return {s.input: np.zeros((1, *s.dims), s.dtype) for s in self.states}


def _control(params: dict, model: str) -> tuple[int | str, bool, bool]:
    sid = params.get("sequence_id")
    if sid is None:
        raise InvalidArgument(f"model {model!r} is stateful: set the request parameter sequence_id (and "
                              "sequence_start on the first step, sequence_end on the last)")
    if isinstance(sid, bool) or not isinstance(sid, int | str) or sid == "":
        raise InvalidArgument(f"model {model!r}: sequence_id must be a non-zero integer or a non-empty string")
    if sid == 0:
        raise InvalidArgument(f"model {model!r}: sequence_id 0 is reserved (it means no sequence)")
    return sid, params.get("sequence_start") is True, params.get("sequence_end") is True
