"""The scheduler of one model version: a queue, N onnxruntime instances, and Triton's dynamic batching semantics.

Requests wait in one queue. Whenever an instance is free, the scheduler forms a batch from the oldest request and
the queued requests whose non-batch shapes equal its own (up to max_batch_size rows; preferred sizes and
max_queue_delay honoured), and runs it in an executor thread: merge with np.concatenate, run, split by slicing,
all off the event loop. While every instance is busy requests pile up, so load itself makes batches bigger.
Without dynamic_batching every request runs alone through the same path."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service._proto import model_config_pb2
from service.errors import ServingError, Unavailable
from service.runtime import Instance
from service.stats import Recorder

log = logging.getLogger("deepserve.batcher")
Outputs = dict[str, np.ndarray]
REJECT = model_config_pb2.ModelQueuePolicy.TimeoutAction.REJECT
INLINE_MAX_NS = 250_000


class Pending:
    __slots__ = ("feeds", "rows", "key", "future", "enqueued", "timer")

    def __init__(self, feeds: dict[str, np.ndarray], rows: int, key: tuple, future: asyncio.Future) -> None:
        self.feeds, self.rows, self.key, self.future = feeds, rows, key, future
        self.enqueued = time.perf_counter_ns()
        self.timer: asyncio.TimerHandle | None = None


class ExecutionError(ServingError):
    """onnxruntime failed on a batch; grpc_api turns it into INTERNAL with the request id."""


class Batcher:
    def __init__(self, name: str, instances: list[Instance], config: model_config_pb2.ModelConfig,
                 recorder: Recorder) -> None:
        self.name = name
        self.instances = instances
        self.free = list(instances)
        self.recorder = recorder
        self.max_batch = config.max_batch_size
        dyn = config.dynamic_batching if config.HasField("dynamic_batching") else None
        if config.HasField("sequence_batching"):  # steps of different sequences batch like requests do
            sb = config.sequence_batching
            dyn = model_config_pb2.ModelDynamicBatching()
            strategy = sb.oldest if sb.HasField("oldest") else None
            dyn.max_queue_delay_microseconds = (strategy or sb.direct).max_queue_delay_microseconds
            if strategy:
                dyn.preferred_batch_size.extend(strategy.preferred_batch_size)
        self.batching = dyn is not None and self.max_batch > 0
        self.delay_ns = dyn.max_queue_delay_microseconds * 1000 if dyn else 0
        self.preferred = sorted(p for p in dyn.preferred_batch_size if 0 < p <= self.max_batch) if dyn else []
        policy = dyn.default_queue_policy if dyn else model_config_pb2.ModelQueuePolicy()
        self.max_queue = policy.max_queue_size
        self.default_timeout_us = policy.default_timeout_microseconds
        self.reject_on_timeout = policy.timeout_action == REJECT
        self.target = (self.preferred[-1] if self.preferred else self.max_batch) if self.batching else 1
        # Runs measured shorter than this go inline on the event loop: handing a 50 us run to a thread and back
        # costs two thread wake-ups and more CPU than the run. Longer ones (with hysteresis) use executor threads.
        self.inline_max_ns = int(config.parameters["inline_max_us"].string_value) * 1000 \
            if "inline_max_us" in config.parameters else INLINE_MAX_NS
        self.run_ns: float | None = None  # moving average of onnxruntime's run time per execution
        self.inline = False
        self.queue: deque[Pending] = deque()
        self.executor = ThreadPoolExecutor(max_workers=len(instances), thread_name_prefix=f"ort-{name}")
        self._arrived = asyncio.Event()
        self._freed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()  # scheduled batches, referenced until done

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._schedule(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Let queued and running work finish, then stop (used when a version is unloaded or replaced)."""
        while self.queue or len(self.free) < len(self.instances):
            await asyncio.sleep(0.005)
        if self._task:
            self._task.cancel()
        self.executor.shutdown(wait=False)

    async def submit(self, feeds: dict[str, np.ndarray], rows: int, timeout_us: int = 0) -> Outputs:
        """Queue one request and wait for its rows of the outputs."""
        if self.max_queue and len(self.queue) >= self.max_queue:
            raise Unavailable(f"model {self.name!r}: queue full ({self.max_queue} requests waiting); retry later")
        loop = asyncio.get_running_loop()
        if not self.queue and self.free and not self.delay_ns and not timeout_us:
            return await self._run_now(feeds, rows)
        key = tuple(a.shape[1:] for a in feeds.values()) if self.batching else ()
        p = Pending(feeds, rows, key, loop.create_future())
        timeout_us = timeout_us or self.default_timeout_us
        if timeout_us and self.reject_on_timeout:
            p.timer = loop.call_later(timeout_us / 1e6, self._expire, p, timeout_us)
        self.queue.append(p)
        self._arrived.set()
        try:
            return await p.future
        finally:
            if p.timer:
                p.timer.cancel()

    async def _run_now(self, feeds: dict[str, np.ndarray], rows: int) -> Outputs:
        """Idle fast path: nothing queued, an instance free and no delay to wait for, so no batch could form.
        Run from this request's own coroutine, without waking the scheduler. (Measured: sending batching models
        through the scheduler anyway, to gather what one loop tick decoded, made small models slower; batches
        form where they pay, when instances are busy.)"""
        return (await self._run_batch(self.free.pop(), [Pending(feeds, rows, (), None)]))[0]

    def _expire(self, p: Pending, timeout_us: int) -> None:
        if not p.future.done():
            p.future.set_exception(Unavailable(f"model {self.name!r}: request timed out after {timeout_us} us "
                                               "in the queue"))

    async def _schedule(self) -> None:
        while True:
            while self.queue and self.queue[0].future.done():  # cancelled by its client, or timed out
                self.queue.popleft()
            if not self.queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if not self.free:
                self._freed.clear()
                await self._freed.wait()
                continue
            if self.batching and self.delay_ns:
                await self._wait_for_batch()
            batch = self._take()
            if not batch:
                continue
            instance = self.free.pop()
            if self.inline:
                try:
                    self._deliver(batch, self._run_inline(instance, batch))
                except ServingError as exc:
                    self._deliver(batch, exc)
                await asyncio.sleep(0)  # let the loop decode requests and send replies between batches
            else:
                task = asyncio.get_running_loop().create_task(self._execute(instance, batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _wait_for_batch(self) -> None:
        """Hold the oldest request up to max_queue_delay while its batch is smaller than the target size."""
        head = self.queue[0]
        deadline = head.enqueued + self.delay_ns
        while not head.future.done() and self._rows_like(head) < self.target:
            remaining = deadline - time.perf_counter_ns()
            if remaining <= 0:
                return
            self._arrived.clear()
            timer = asyncio.get_running_loop().call_later(remaining / 1e9, self._arrived.set)
            await self._arrived.wait()  # a new request, or the delay is over (cheaper than wait_for's task)
            timer.cancel()

    def _rows_like(self, head: Pending) -> int:
        return sum(p.rows for p in self.queue if p.key == head.key and not p.future.done())

    def _take(self) -> list[Pending]:
        """The oldest live request and, when batching, the compatible ones behind it, in arrival order."""
        while self.queue and self.queue[0].future.done():
            self.queue.popleft()
        if not self.queue:
            return []
        head = self.queue.popleft()
        batch, rows = [head], head.rows
        if self.batching and rows < self.max_batch:
            keep: deque[Pending] = deque()
            while self.queue:
                p = self.queue.popleft()
                if p.future.done():
                    continue
                if p.key == head.key and rows + p.rows <= self.max_batch:
                    batch.append(p)
                    rows += p.rows
                else:
                    keep.append(p)
                    if rows >= self.max_batch:
                        break
            keep.extend(self.queue)
            self.queue = keep
            if self.preferred and rows not in self.preferred:
                batch = self._cut_to_preferred(batch)
        return batch

    def _cut_to_preferred(self, batch: list[Pending]) -> list[Pending]:
        """Run the longest prefix that makes a preferred size, if any; the rest goes back to the queue front."""
        total, best = 0, 0
        for i, p in enumerate(batch):
            total += p.rows
            if total in self.preferred:
                best = i + 1
        if best == 0 or best == len(batch):
            return batch
        self.queue.extendleft(reversed(batch[best:]))
        return batch[:best]

    async def _execute(self, instance: Instance, batch: list[Pending]) -> None:
        try:
            self._deliver(batch, await self._run_batch(instance, batch))
        except ServingError as exc:
            self._deliver(batch, exc)

    @staticmethod
    def _deliver(batch: list[Pending], result: list[Outputs] | ServingError) -> None:
        for i, p in enumerate(batch):
            if not p.future.done():
                if isinstance(result, ServingError):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result[i])

    async def _run_batch(self, instance: Instance, batch: list[Pending]) -> list[Outputs]:
        """Merge, run and split, inline for fast models, else in an executor thread. An executor's instance is
        handed back only when its thread is done with it, even if the caller was cancelled meanwhile."""
        if self.inline:
            return self._run_inline(instance, batch)
        loop = asyncio.get_running_loop()
        started = time.perf_counter_ns()
        work = self.executor.submit(_work, instance, batch)
        try:
            parts, t_in, t_run, t_out = await asyncio.wrap_future(work)
        except BaseException as exc:
            if work.done():
                self._release(instance)
            else:
                work.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release, instance))
            if isinstance(exc, Exception):
                raise self._failed(batch, exc) from exc
            raise
        self._release(instance)
        self._account(batch, started, t_in, t_run, t_out)
        return parts

    def _run_inline(self, instance: Instance, batch: list[Pending]) -> list[Outputs]:
        started = time.perf_counter_ns()
        try:
            parts, t_in, t_run, t_out = _work(instance, batch)
        except Exception as exc:
            raise self._failed(batch, exc) from exc
        finally:
            self._release(instance)
        self._account(batch, started, t_in, t_run, t_out)
        return parts

    def _failed(self, batch: list[Pending], exc: Exception) -> ExecutionError:
        log.exception("model %r: execution of a batch of %d requests failed", self.name, len(batch))
        return ExecutionError(f"model {self.name!r}: execution failed: {exc}")

    def _account(self, batch: list[Pending], started: int, t_in: int, t_run: int, t_out: int) -> None:
        rec = self.recorder
        for p in batch:
            rec.queued(started - p.enqueued)
        rec.executed(sum(p.rows for p in batch), len(batch), t_in, t_run, t_out)
        self.run_ns = t_run if self.run_ns is None else 0.9 * self.run_ns + 0.1 * t_run
        # hysteresis: go inline below the threshold, back to threads above twice it
        self.inline = self.run_ns < self.inline_max_ns * (2 if self.inline else 1)

    def _release(self, instance: Instance) -> None:
        self.free.append(instance)
        self._freed.set()


def _work(instance: Instance, batch: list[Pending]) -> tuple[list[Outputs], int, int, int]:
    """Runs in an executor thread: numpy and onnxruntime release the GIL for the heavy parts."""
    t0 = time.perf_counter_ns()
    if len(batch) == 1:
        feeds = batch[0].feeds
    else:
        feeds = {k: np.concatenate([p.feeds[k] for p in batch]) for k in batch[0].feeds}
    t1 = time.perf_counter_ns()
    out = instance.run(feeds)
    t2 = time.perf_counter_ns()
    if len(batch) == 1:
        parts = [out]
    else:
        parts, start = [], 0
        for p in batch:
            end = start + p.rows
            parts.append({k: v[start:end] for k, v in out.items()})
            start = end
    t3 = time.perf_counter_ns()
    return parts, t1 - t0, t2 - t1, t3 - t2
