"""The decode loop of a generation model, with continuous batching: every running generation advances by one token
per step, and the steps of all of them are ONE onnxruntime run (their caches padded to the longest past, the
padding masked). A new request's prompt is prefilled (newcomers together, one run) and the generation joins the next
decode step; a finished or cancelled one leaves at once. Protocol-neutral: front ends (gRPC ModelStreamInfer, HTTP
generate/generate_stream) iterate `Generator.generate` and convert what it yields.

Nothing here knows the model: config.pbtxt declares the loop in its `parameters` (all string values):

  generation_ids_input        input of token ids, INT64 [B, T]
  generation_positions_input  input of positions, INT64 [B, T] (each row's own: its past length + t)
  generation_mask_input       input of the key mask, INT64 or BOOL [B, P+T]: 1 = a real key, 0 = padding
  generation_cache_inputs     comma-separated past cache inputs, e.g. past_key_0,past_value_0,...; their config
                              dims (after the batch axis) have exactly one -1, the past axis (P may be 0)
  generation_cache_outputs    the present cache outputs, same order: each input's tensor grown by T on that axis
  generation_logits_output    output of logits, FP32 [B, T, V]
  generation_end_token        token id that ends a generation (not sent as text); "" = none
  generation_prefix_tokens    comma-separated token ids put before every prompt (e.g. a start-of-text); "" = none
  generation_token_offset     byte b of the UTF-8 text is token b + offset; tokens below the offset are special
  generation_context_length   tokens the model can attend to: prefix + prompt + generated never exceed it
  generation_max_tokens       the largest max_tokens a request may ask for (default: the context length)
  generation_default_max_tokens  max_tokens when a request gives none (default 16, capped by the limit)
  max_generations             generations decoded together (default 8)
  generation_max_queue        requests waiting for a slot behind them (default 64); more: Unavailable
  generation_text_input / generation_text_output  names the front ends give the text tensors (informational)

Request parameters: max_tokens, temperature (0 = greedy, the default), top_k (0 = off), top_p (1 = off), seed
(an integer: the same seed gives the same text), stop (a string or a list of strings; the text ends before it)."""

from __future__ import annotations

import asyncio
import codecs
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service._proto import model_config_pb2
from service.errors import InvalidArgument, Unavailable
from service.generation_spec import PARAMETERS, DecodeSpec, Params, parse_params
from service.stats import Duration

__all__ = ["PARAMETERS", "DecodeSpec", "Finished", "Generator", "Params", "choose", "parse_params"]


class Runner(Protocol):
    """What the engine needs of a session: service.runtime.Instance."""

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class Finished:
    """The last item of a generation: why it ended and how many tokens it generated."""

    reason: str  # "max_tokens" | "end_token" | "stop" | "context_length"
    tokens: int


@dataclass(eq=False)
class Generation:
    """One request's state; its cache is its own, a [*dims] buffer per cache tensor with the past axis sized to the
    context, of which the first `length` slots are filled."""

    prompt: list[int]
    params: Params
    rng: np.random.Generator
    cache: list[np.ndarray] = field(default_factory=list)
    length: int = 0  # cache slots filled
    pending: int = -1  # sampled, not yet fed
    generated: int = 0
    text: str = ""  # decoded so far
    sent: int = 0  # characters of `text` handed out
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    queued_at: float = field(default_factory=time.perf_counter)
    last_token_at: float = 0.0
    done: bool = False


class Generator:
    """Owns the decode loop of one loaded model version. Every mutation happens on the event loop thread; only the
    onnxruntime runs go to the engine's one executor thread (one run at a time is what continuous batching wants:
    more work per run, not more runs)."""

    def __init__(self, name: str, config: model_config_pb2.ModelConfig, instance: Runner,
                 on_first_token: Callable[[float], None] | None = None,
                 on_inter_token: Callable[[float], None] | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> None:
        self.name, self.instance = name, instance
        self.on_step = on_step  # (batch size, run ns) after each prefill or decode run, on the event loop
        self.spec = DecodeSpec.from_config(config)
        self.on_first_token, self.on_inter_token = on_first_token, on_inter_token
        self.tokens_generated = 0
        self.time_to_first_token = Duration()
        self.inter_token = Duration()
        self.decode_batches: Counter[int] = Counter()  # decode steps per batch size
        self.prefill_batches: Counter[int] = Counter()
        self.waiting: deque[Generation] = deque()
        self.running: list[Generation] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        """On the event loop that will serve the generations (the loader runs in a worker thread: start it there
        once the version is ready)."""
        if self._task is not None:
            return
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"generate-{self.name}")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"generate-{self.name}")

    async def stop(self) -> None:
        """Ends every generation (their consumers get Unavailable) and the loop."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for g in [*self.running, *self.waiting]:
            self._fail(g, Unavailable(f"model {self.name!r} is shutting down"))
        self.running.clear()
        self.waiting.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    @property
    def active(self) -> int:
        return len(self.running)

    def encode(self, prompt: str | bytes) -> list[int]:
        if isinstance(prompt, bytes):
            try:
                prompt = prompt.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArgument(f"model {self.name!r}: the prompt is not valid UTF-8 (byte {exc.start}: "
                                      f"{prompt[exc.start:exc.start + 1]!r})") from None
        if not isinstance(prompt, str):
            raise InvalidArgument(f"model {self.name!r}: the prompt must be text, got {type(prompt).__name__}")
        tokens = [*self.spec.prefix, *(b + self.spec.offset for b in prompt.encode("utf-8"))]
        room = self.spec.context - 1 - len(self.spec.prefix)
        if not tokens:
            raise InvalidArgument(f"model {self.name!r}: the prompt is empty and the model has no prefix tokens")
        if len(tokens) > self.spec.context - 1:
            raise InvalidArgument(f"model {self.name!r}: the prompt is {len(tokens) - len(self.spec.prefix)} bytes; "
                                  f"the context holds {self.spec.context} tokens, so at most {room} for the prompt")
        return tokens

    def submit(self, prompt: str | bytes, params: dict[str, Any]) -> Generation:
        """Checks everything and queues the request; raises before anything is queued."""
        if self._task is None:
            raise Unavailable(f"model {self.name!r}: the generation engine is not running")
        checked = parse_params(self.name, self.spec, dict(params or {}))
        tokens = self.encode(prompt)
        free = max(0, self.spec.max_generations - len(self.running))  # admitted at the next step, not queued
        if len(self.waiting) >= self.spec.max_queue + free:
            raise Unavailable(f"model {self.name!r}: {len(self.running)} generations running and "
                              f"{len(self.waiting)} waiting, the most it queues; try again later")
        g = Generation(tokens, checked, np.random.default_rng(checked.seed))
        self.waiting.append(g)
        self._wake.set()
        return g

    async def generate(self, prompt: str | bytes, params: dict[str, Any] | None = None,
                       ) -> AsyncIterator[str | Finished]:
        """Text chunks, then one Finished. Closing the iterator (or cancelling its consumer) frees the slot."""
        g = self.submit(prompt, params or {})
        try:
            while True:
                item = await g.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            self._leave(g)

    def _leave(self, g: Generation) -> None:
        g.done = True
        if g in self.running:
            self.running.remove(g)
        elif g in self.waiting:
            self.waiting.remove(g)
        self._wake.set()

    def _fail(self, g: Generation, exc: BaseException) -> None:
        if not g.done:
            g.done = True
            g.out.put_nowait(exc)

    async def _loop(self) -> None:
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            newcomers = []
            while self.waiting and len(self.running) < self.spec.max_generations:
                g = self.waiting.popleft()
                self.running.append(g)
                newcomers.append(g)
            try:
                if newcomers:
                    await self._prefill(newcomers)
                rows = [g for g in self.running if not g.done and g.length]
                if rows:
                    await self._decode(rows)
            except Exception as exc:  # a failed run fails the generations in it; the engine goes on
                for g in list(self.running):
                    self._fail(g, exc)
                    self.running.remove(g)
            await asyncio.sleep(0)  # let consumers take their chunks and cancellations land between steps

    async def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter_ns()
        out = await asyncio.get_running_loop().run_in_executor(self._pool, self.instance.run, feeds)
        if self.on_step:
            self.on_step(len(next(iter(feeds.values()))), time.perf_counter_ns() - t0)
        return out

    async def _prefill(self, batch: list[Generation]) -> None:
        s = self.spec
        width = max(len(g.prompt) for g in batch)
        ids = np.zeros((len(batch), width), np.int64)
        mask = np.zeros((len(batch), width), s.mask_dtype)
        for i, g in enumerate(batch):
            ids[i, :len(g.prompt)] = g.prompt
            mask[i, :len(g.prompt)] = 1
        positions = np.minimum(np.arange(width, dtype=np.int64), s.context - 1)[None, :].repeat(len(batch), 0)
        feeds = {s.ids: ids, s.positions: positions, s.mask: mask}
        for name, dims in zip(s.cache_in, s.cache_dims, strict=True):
            feeds[name] = np.zeros((len(batch), *(0 if d == -1 else d for d in dims)), np.float32)
        out = await self._run(feeds)
        self.prefill_batches[len(batch)] += 1
        for i, g in enumerate(batch):
            if g.done:
                continue
            n = len(g.prompt)
            for dims, name in zip(s.cache_dims, s.cache_out, strict=True):
                axis = dims.index(-1)
                buf = np.zeros(tuple(s.context if d == -1 else d for d in dims), np.float32)
                buf[_at(axis, slice(0, n))] = out[name][i][_at(axis, slice(0, n))]
                g.cache.append(buf)
            g.length = n
            self._emit(g, out[s.logits][i, n - 1])

    async def _decode(self, batch: list[Generation]) -> None:
        s = self.spec
        past = max(g.length for g in batch)
        ids = np.array([[g.pending] for g in batch], np.int64)
        positions = np.array([[g.length] for g in batch], np.int64)
        mask = np.zeros((len(batch), past + 1), s.mask_dtype)
        mask[:, past] = 1
        feeds = {s.ids: ids, s.positions: positions, s.mask: mask}
        for i, g in enumerate(batch):
            mask[i, :g.length] = 1
        for k, (name, dims) in enumerate(zip(s.cache_in, s.cache_dims, strict=True)):
            axis = dims.index(-1)
            t = np.zeros((len(batch), *(past if d == -1 else d for d in dims)), np.float32)
            for i, g in enumerate(batch):
                t[i][_at(axis, slice(0, g.length))] = g.cache[k][_at(axis, slice(0, g.length))]
            feeds[name] = t
        out = await self._run(feeds)
        self.decode_batches[len(batch)] += 1
        for i, g in enumerate(batch):
            if g.done:
                continue
            for k, (name, dims) in enumerate(zip(s.cache_out, s.cache_dims, strict=True)):
                axis = dims.index(-1)
                g.cache[k][_at(axis, g.length)] = out[name][i][_at(axis, past)]
            g.length += 1
            self._emit(g, out[s.logits][i, 0])

    def _emit(self, g: Generation, logits: np.ndarray) -> None:
        """Sample the next token, hand out the text it completes, and finish the generation if it is over."""
        s = self.spec
        token = choose(logits, g.params, g.rng)
        now = time.perf_counter()
        if g.generated == 0:
            self.time_to_first_token.add(int((now - g.queued_at) * 1e9))
            if self.on_first_token:
                self.on_first_token(now - g.queued_at)
        else:
            self.inter_token.add(int((now - g.last_token_at) * 1e9))
            if self.on_inter_token:
                self.on_inter_token(now - g.last_token_at)
        g.last_token_at = now
        g.generated += 1
        self.tokens_generated += 1
        g.pending = token
        reason = None
        if token == s.end_token:
            reason = "end_token"
        elif token >= s.offset:
            g.text += g.decoder.decode(bytes([token - s.offset]))
        if reason is None and g.params.stop:
            cut = min((i for i in (g.text.find(x, max(0, g.sent - len(x))) for x in g.params.stop) if i >= 0),
                      default=-1)
            if cut >= 0:
                g.text, reason = g.text[:cut], "stop"
        if reason is None and g.generated >= g.params.max_tokens:
            reason = "max_tokens"
        if reason is None and g.length + 1 >= s.context:
            reason = "context_length"
        if reason not in (None, "stop"):
            g.text += g.decoder.decode(b"", final=True)
        hold = 0 if reason else _held_back(g.text, g.params.stop)
        if len(g.text) - hold > g.sent:
            g.out.put_nowait(g.text[g.sent:len(g.text) - hold])
            g.sent = len(g.text) - hold
        if reason:
            g.done = True
            g.out.put_nowait(Finished(reason, g.generated))
            if g in self.running:
                self.running.remove(g)


def _at(axis: int, index: int | slice) -> tuple:
    return (slice(None),) * axis + (index,)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might be the start of a stop string, so are not sent yet."""
    return max((n for x in stops for n in range(min(len(x) - 1, len(text)), 0, -1) if text.endswith(x[:n])),
               default=0)


def choose(logits: np.ndarray, p: Params, rng: np.random.Generator) -> int:
    """Greedy at temperature 0 (the first maximum, as torch.argmax picks it); else top-k, then top-p (the smallest
    set of tokens whose probability reaches p), then one draw from the generation's own seeded generator."""
    if p.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / p.temperature
    if p.top_k and p.top_k < len(z):
        z[z < np.partition(z, -p.top_k)[-p.top_k]] = -np.inf
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if p.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        drop = order[np.searchsorted(cum, p.top_p) + 1:]
        probs[drop] = 0
        probs /= probs.sum()
    return int(min(np.searchsorted(np.cumsum(probs), rng.random(), side="right"), len(probs) - 1))
