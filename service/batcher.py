"""The scheduler of one model version: a queue, N onnxruntime instances, and Triton's dynamic batching semantics.

Requests wait in one queue. Whenever an instance is free, the oldest request and the queued requests whose
non-batch shapes equal its own form a batch (up to max_batch_size rows; preferred sizes and max_queue_delay
honoured): merge with np.concatenate, run, split by slicing. Without dynamic_batching every request runs alone
through the same path.

Scheduling is done by loop callbacks, not by a scheduler task: an arrival that completes a batch schedules a
dispatch with call_soon, an incomplete one leaves a single timer armed for the head's max_queue_delay, and an
executor thread that finishes hands its instance back with call_soon_threadsafe. Per request that is one future
and no task wake-up, which matters when the whole request path must fit in a few hundred microseconds.

Two measured policies on top of Triton's:
- Inline runs: a model whose runs cost under runtime.FAST_RUN_NS a row (its fastest run seen: a run in a thread
  on a busy machine takes longer by the wait for a core, and must not make a fast model look slow for good) runs
  its batches on the event loop thread itself, up to inline_max_us a batch (ALONE_INLINE times that while fewer
  than SEQUENTIAL of the arrivals find another request still here: a client at concurrency 1 holds up nobody).
  Handing a 50 us run to a thread and back costs two thread wake-ups and a loop iteration, which every request
  waits for and the event loop pays in CPU; inline, the batch is whatever arrived while the previous one ran.
  Slower models and bigger batches run in executor threads (onnxruntime releases the GIL): the loop decodes the
  next requests while a batch runs. Until 2026-12-02 overlapping gRPC requests (grpc.aio hands the loop about one
  new call per iteration) went to threads too, to queue up into bigger batches there. On uvloop that lost at every
  concurrency: digits_cnn batch 1, perf_analyzer, median of 4 interleaved runs, requests/s threads vs inline:
  1,930 vs 2,361 at 4 in flight, 2,040 vs 2,579 at 16, 2,105 vs 2,391 at 32, 2,060 vs 2,422 at 64. The inline
  batches gather 2.5-2.9 requests from 16 in flight up.
- Adaptive delay: max_queue_delay is an upper bound. While holding batches open finds them no company (a
  concurrency-1 client sends nothing while it waits for its reply), requests run in the next loop iteration
  with whatever arrived with them; a batch that finds company, or several requests arriving at once, turns
  waiting back on. And a batch that has gathered as many rows as waiting out the delay has been gathering goes
  at once (one in PATIENT_EVERY still waits it out, to keep that figure current). Parameter
  `adaptive_queue_delay: "false"` restores Triton's always-wait behaviour."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from service._proto import model_config_pb2
from service.errors import ModelLoadError, ServingError, Unavailable
from service.runtime import FAST_RUN_NS, Instance, param
from service.stats import Recorder
from service.tracing import Trace

Outputs = dict[str, np.ndarray]
INLINE_MAX_NS = 1_000_000  # longest a batch may block the event loop (the other requests' decode and replies)
GAIN_WEIGHT = 0.2  # weight of the newest batch in the moving average of what waiting gained
PATIENT_EVERY = 8  # one waiting head in this many waits out the whole delay, to keep measuring the fill
PROBE_EVERY = 128  # while waiting does not pay, one arrival in this many waits anyway (under 1%: p99 holds)
OVERLAP_WEIGHT = 0.05  # weight of the newest arrival in the moving average of arrivals that overlap another
SEQUENTIAL = 0.25  # below this share of overlapping arrivals, traffic counts as one request at a time
ALONE_INLINE = 10  # while requests come one at a time, a batch may hold the loop this many times inline_max_us
# (digits_cnn batch-32 at concurrency 1: a 1.1 ms run, in a thread by the 1 ms bound, cost 0.3 ms of p50)


class Pending:
    __slots__ = ("feeds", "rows", "key", "future", "enqueued", "deadline", "patient", "timer", "taken", "trace")

    def __init__(self, feeds: dict[str, np.ndarray], rows: int, key: tuple, future: asyncio.Future | None,
                 enqueued: int, deadline: int = 0, patient: bool = False, trace: Trace | None = None) -> None:
        self.feeds, self.rows, self.key, self.future, self.enqueued = feeds, rows, key, future, enqueued
        self.trace = trace  # service.tracing handle when this request is traced: told its queue wait and compute
        self.deadline = deadline  # until when its batch may wait for company (perf_counter_ns)
        self.patient = patient  # as its head, the batch waits out the whole delay (adaptive: to measure the fill)
        self.timer: asyncio.TimerHandle | None = None
        self.taken = False  # in a batch: no longer counts against max_queue_size


class ExecutionError(ServingError):
    """onnxruntime failed on a batch: a server-side failure (INTERNAL); grpc_api answers it with a short message
    and the request id, the details go to the log."""


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
        self.delay_ns = dyn.max_queue_delay_microseconds * 1000 if self.batching and dyn else 0
        self.preferred = sorted(p for p in dyn.preferred_batch_size if 0 < p <= self.max_batch) if dyn else []
        policy = dyn.default_queue_policy if dyn else model_config_pb2.ModelQueuePolicy()
        self.max_queue = policy.max_queue_size
        self.default_timeout_us = policy.default_timeout_microseconds
        self.allow_timeout_override = policy.allow_timeout_override
        self.target = (self.preferred[-1] if self.preferred else self.max_batch) if self.batching else 1
        self.adaptive = param(config, "adaptive_queue_delay", "true").lower() not in ("0", "false", "no", "off")
        try:
            self.inline_max_ns = int(param(config, "inline_max_us", str(INLINE_MAX_NS // 1000))) * 1000
        except ValueError:
            raise ModelLoadError(f"parameters inline_max_us must be an integer (microseconds), got "
                                 f"{param(config, 'inline_max_us')!r}") from None
        self.row_ns: float | None = None  # moving average of onnxruntime's run time per row (sample)
        self.queue: deque[Pending] = deque()
        self.queued_rows = 0  # rows in the queue, live or not: only an upper bound for "a batch is complete"
        self.waiting = 0  # live requests in the queue: what max_queue_size bounds (timed-out ones do not count)
        self.executor = ThreadPoolExecutor(max_workers=len(instances), thread_name_prefix=f"ort-{name}")
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None  # the head's max_queue_delay
        self._soon = False  # a dispatch is already scheduled for this loop iteration
        self._waits = True  # hold batches open (Triton's behaviour) until batches show it finds no company
        self._gain: float | None = None  # moving average of the requests a waiting head was joined by
        self._since_probe = 0
        self._fill: float | None = None  # moving average of the rows a batch gathers by waiting out the delay
        self._heads = 0  # requests that arrived to an empty queue, each the head of a batch
        self.outstanding = 0  # submitted and not yet returned to their caller
        self._overlap = 0.0  # moving average: did a request arrive while another was here (1) or not (0)
        self.best_row_ns: float | None = None  # fastest run per row seen: what the model costs, not the machine

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        """Let queued and running work finish, then stop (used when a version is unloaded or replaced)."""
        while self.queue or len(self.free) < len(self.instances):
            self._drop_dead()
            await asyncio.sleep(0.005)
        self.closed = True
        self.executor.shutdown(wait=False)

    async def submit(self, feeds: dict[str, np.ndarray], rows: int, timeout_us: int = 0,
                     trace: Trace | None = None) -> Outputs:
        """Queue one request and wait for its rows of the outputs."""
        if self.closed:
            raise Unavailable(f"model {self.name!r}: this version was unloaded; retry")
        if self.max_queue and self.waiting >= self.max_queue:
            raise Unavailable(f"model {self.name!r}: queue full ({self.max_queue} requests waiting); retry later")
        now = time.perf_counter_ns()
        timeout_us = self._timeout(timeout_us)
        self._overlap += OVERLAP_WEIGHT * ((self.outstanding > 0) - self._overlap)
        if not self.batching and not self.queue and self.free and not timeout_us and self._inline(rows):
            # idle fast path: no partner is possible and nothing is queued, so run right here
            return self._run_inline(self.free.pop(), [Pending(feeds, rows, (), None, now, trace=trace)], rows)[0]
        loop = self._loop
        delay, patient = self._delay()
        if delay and self.adaptive and not self.queue:  # it arrives first: the head of the next batch
            self._heads += 1
            patient = patient or self._fill is None or self._heads % PATIENT_EVERY == 0
        p = Pending(feeds, rows, tuple([a.shape[1:] for a in feeds.values()]) if self.batching else (),
                    loop.create_future(), now, now + delay, patient, trace)
        if timeout_us:  # timeout_action DELAY is refused at load: a request past its timeout is refused
            p.timer = loop.call_later(timeout_us / 1e6, self._expire, p, timeout_us)
        self.queue.append(p)
        self.queued_rows += rows
        self.waiting += 1
        self.outstanding += 1
        self._kick()
        try:
            return await p.future
        finally:
            self.outstanding -= 1
            if not p.taken:  # timed out or cancelled while queued
                self.waiting -= 1
            if p.timer:
                p.timer.cancel()

    def _timeout(self, requested_us: int) -> int:
        """Triton's queue policy: with a default timeout, a request may only shorten it, and only when
        allow_timeout_override is set; without one (0: none), the request's own timeout parameter applies."""
        default = self.default_timeout_us
        if not default:
            return requested_us
        return requested_us if self.allow_timeout_override and 0 < requested_us < default else default

    def _delay(self) -> tuple[int, bool]:
        """How long a request arriving now may hold its batch open for company: max_queue_delay while waiting
        has been finding company, else nothing (its batch is what arrives in the same event-loop iteration),
        except for one arrival in PROBE_EVERY, which waits the delay out to notice traffic that became dense.
        Returns the delay and whether its batch must wait all of it (a probe)."""
        if self._waits or not self.delay_ns:
            return self.delay_ns, False
        self._since_probe += 1
        if self._since_probe >= PROBE_EVERY:
            self._since_probe = 0
            return self.delay_ns, True
        return 0, False

    def _learn(self, batch: list[Pending], rows: int, now: int) -> None:
        """Adaptive delay: did holding the head's batch open pay? Concurrency-1 clients never send a partner
        while they wait for their reply, so there waiting is pure latency; concurrent ones do. A batch that
        waited out the whole delay also says how many rows a wait gathers (the fill)."""
        head = batch[0]
        if head.deadline > head.enqueued:  # the head waited: count the company it found
            gained = len(batch) - 1
            self._gain = gained if self._gain is None else self._gain + GAIN_WEIGHT * (gained - self._gain)
            self._waits = self._gain >= 1.0
            if now >= head.deadline:
                self._fill = rows if self._fill is None else self._fill + GAIN_WEIGHT * (rows - self._fill)
        elif len(batch) > 1 and not self._waits:  # several arrived at once without waiting: concurrent traffic
            self._waits = True
            self._fill = None  # gathered under the old traffic: measure afresh

    def _enough(self, head: Pending, rows: int) -> bool:
        """Rows that need not wait any longer: the target (preferred or max batch size), or (adaptive) what
        waiting out the delay has been gathering. Four clients at concurrency 4 send four requests: once they
        are here, waiting on would find nobody."""
        return rows >= self.target or (not head.patient and self._fill is not None and rows >= self._fill)

    def _expire(self, p: Pending, timeout_us: int) -> None:
        if not p.future.done():
            p.future.set_exception(Unavailable(f"model {self.name!r}: request timed out after {timeout_us} us "
                                               "in the queue"))

    def _kick(self) -> None:
        """Arrange the next dispatch: now (next loop iteration) when a batch can go, else at the head's deadline.
        Called on every arrival, so it only compares counters."""
        self._drop_dead()  # a dead head's deadline must not hold the live ones
        if self._soon or not self.free or not self.queue:
            return
        head = self.queue[0]
        if time.perf_counter_ns() < head.deadline and not self._enough(head, self.queued_rows):
            self._arm(head.deadline)
            return
        self._soon = True
        self._loop.call_soon(self._dispatch)

    def _arm(self, deadline: int) -> None:
        if self._timer is None:
            self._timer = self._loop.call_later(max(deadline - time.perf_counter_ns(), 0) / 1e9, self._dispatch)

    def _dispatch(self) -> None:
        self._soon = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.free:
            return
        self._drop_dead()
        if not self.queue:
            return
        head = self.queue[0]
        now = time.perf_counter_ns()
        if now < head.deadline and not self._enough(head, self._rows_like(head)):
            self._arm(head.deadline)  # the rows that arrived are other shapes, or dead: the head waits on
            return
        batch, rows = self._take()
        instance = self.free.pop()
        try:
            if self.adaptive and self.delay_ns:
                self._learn(batch, rows, now)
            if self._inline(rows):
                self._deliver(batch, self._run_inline(instance, batch, rows))
            else:
                self._spawn(instance, batch, rows)
        except ServingError as exc:
            self._deliver(batch, exc)
        except BaseException as exc:  # a bug here must not leave the batch unanswered or the instance lost
            if instance not in self.free:
                self.free.append(instance)
            self._deliver(batch, self._failed(batch, exc))
            raise
        finally:
            self._kick()  # more queued: the next batch goes in a later iteration, after replies and arrivals

    def _drop_dead(self) -> None:
        while self.queue and self.queue[0].future.done():  # cancelled by its client, or timed out
            self.queued_rows -= self.queue.popleft().rows

    def _rows_like(self, head: Pending) -> int:
        return sum(p.rows for p in self.queue if p.key == head.key and not p.future.done())

    def _take(self) -> tuple[list[Pending], int]:
        """The oldest live request and, when batching, the compatible ones behind it, in arrival order; and
        their rows."""
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
                rows = sum(p.rows for p in batch)
        self.queued_rows = sum(p.rows for p in self.queue)
        self.waiting -= len(batch)
        for p in batch:
            p.taken = True
            if p.timer:  # its queue timeout no longer applies: it runs now
                p.timer.cancel()
        return batch, rows

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

    @staticmethod
    def _deliver(batch: list[Pending], result: list[Outputs] | ServingError) -> None:
        for i, p in enumerate(batch):
            if not p.future.done():
                if isinstance(result, ServingError):  # one exception object each: raising appends to its trace
                    err = type(result)(*result.args)
                    err.__cause__ = result.__cause__
                    p.future.set_exception(err)
                else:
                    p.future.set_result(result[i])

    def _spawn(self, instance: Instance, batch: list[Pending], rows: int) -> None:
        """Run a batch in an executor thread. The instance comes back (and the next dispatch is arranged) only
        when the thread is done with it, even if every caller was cancelled meanwhile."""
        started = time.perf_counter_ns()
        work = self.executor.submit(_work, instance, batch)
        loop = self._loop
        work.add_done_callback(lambda w: loop.call_soon_threadsafe(self._finished, instance, batch, rows, started,
                                                                   w))

    def _finished(self, instance: Instance, batch: list[Pending], rows: int, started: int, work: Future) -> None:
        self.free.append(instance)
        try:
            exc = work.exception()
            if exc is None:
                parts, t_in, t_run, t_out = work.result()
                self._account(batch, rows, started, t_in, t_run, t_out)
                self._deliver(batch, parts)
            else:
                self._deliver(batch, self._failed(batch, exc))
        finally:
            self._kick()

    def _run_inline(self, instance: Instance, batch: list[Pending], rows: int) -> list[Outputs]:
        started = time.perf_counter_ns()
        try:
            parts, t_in, t_run, t_out = _work(instance, batch)
        except Exception as exc:
            raise self._failed(batch, exc) from exc
        finally:
            self.free.append(instance)
        self._account(batch, rows, started, t_in, t_run, t_out)
        return parts

    def _failed(self, batch: list[Pending], exc: BaseException) -> ExecutionError:
        """The trace is logged by grpc_api, once per request and under its request id (the cause travels along)."""
        rows = sum(p.rows for p in batch)
        err = ExecutionError(f"model {self.name!r}: onnxruntime failed on a batch of {rows} row(s) from "
                             f"{len(batch)} request(s): {exc}")
        err.__cause__ = exc
        return err

    def _account(self, batch: list[Pending], rows: int, started: int, t_in: int, t_run: int, t_out: int) -> None:
        rec = self.recorder
        ended = 0  # read once a batch, and only when one of its requests is traced
        for p in batch:
            rec.queued(started - p.enqueued)
            if p.trace is not None:
                ended = ended or time.perf_counter_ns()
                p.trace.ran(p.enqueued, started, ended, rows, len(batch), t_in, t_run, t_out)
        rec.executed(rows, len(batch), t_in, t_run, t_out)
        per_row = t_run / rows
        self.row_ns = per_row if self.row_ns is None else 0.9 * self.row_ns + 0.1 * per_row
        if self.best_row_ns is None or per_row < self.best_row_ns:
            self.best_row_ns = per_row

    def _inline(self, rows: int) -> bool:
        """Run this batch on the event loop? For a fast model (a row costs under runtime.FAST_RUN_NS) and a batch
        that blocks the loop under inline_max_us, or ALONE_INLINE times that while requests come one at a time
        (SEQUENTIAL), as then there are no other requests' decoding and replies to hold up (measured by a batching
        model only: without batching, a request run in submit never counts as overlapping)."""
        if self.best_row_ns is None or self.best_row_ns >= FAST_RUN_NS:
            return False
        alone = self.batching and self._overlap < SEQUENTIAL
        return self.row_ns * rows < self.inline_max_ns * (ALONE_INLINE if alone else 1)


def _work(instance: Instance, batch: list[Pending]) -> tuple[list[Outputs], int, int, int]:
    """Merge, run, split: in an executor thread (numpy and onnxruntime release the GIL for the heavy parts) or
    inline on the event loop for fast models."""
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
