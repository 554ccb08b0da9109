"""Dynamic batching with Triton's semantics: first the scheduler on its own (real onnxruntime sessions, no server),
then through the server with many concurrent clients."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from prometheus_client import CollectorRegistry
from support import Server, add_sub_model, outputs, request, save, seq_model, slow_model

from service import eventloop
from service._proto import inference_pb2 as pb
from service._proto import model_config_pb2
from service.batcher import Batcher
from service.errors import Unavailable
from service.metrics import Metrics
from service.runtime import Instance, placement, session_options
from service.stats import Recorder


def make_batcher(tmp_path, model, config_text: str, name: str = "m") -> Batcher:
    path = save(model, tmp_path / "repo", name)
    config = text_format.Parse(config_text, model_config_pb2.ModelConfig())
    place = placement(config)
    instances = [Instance(str(path), session_options(config, place), place) for _ in range(place.count)]
    return Batcher(name, instances, config, Recorder(Metrics(CollectorRegistry()), name, "1"))


def run(coro, event_loop: str = "uvloop"):
    return eventloop.run(coro, event_loop)  # the server's loop by default


def test_merge_split_each_caller_gets_its_rows(tmp_path):
    b = make_batcher(tmp_path, add_sub_model(), "max_batch_size: 16\ndynamic_batching { "
                     "max_queue_delay_microseconds: 20000 }")
    rng = np.random.default_rng(0)
    sizes = [1, 3, 2, 5, 1, 4]
    xs = [rng.random((n, 4), dtype=np.float32) for n in sizes]

    async def main():
        b.start()
        return await asyncio.gather(*(b.submit({"x": x, "y": x * 0 + 1}, len(x)) for x in xs))

    results = run(main())
    for x, out in zip(xs, results, strict=True):
        np.testing.assert_array_equal(out["sum"], x + 1)
        np.testing.assert_array_equal(out["diff"], x - 1)
    assert b.recorder.execution_count == 1  # 16 rows fit one batch within the delay
    assert sorted(b.recorder.per_batch) == [16]


def test_only_equal_shapes_merge(tmp_path):
    b = make_batcher(tmp_path, seq_model(), "max_batch_size: 32\ndynamic_batching { "
                     "max_queue_delay_microseconds: 20000 }")
    lengths = [3, 5, 3, 5, 7, 3]

    async def main():
        b.start()
        return await asyncio.gather(*(b.submit({"tokens": np.full((2, t), i, np.int64)}, 2)
                                      for i, t in enumerate(lengths)))

    results = run(main())
    for i, (t, out) in enumerate(zip(lengths, results, strict=True)):
        np.testing.assert_array_equal(out["total"], np.full((2, 1), i * t, np.float32))
    assert b.recorder.execution_count == 3  # one batch per length
    assert sorted(b.recorder.per_batch) == [2, 4, 6]


def test_preferred_batch_size_and_max_batch(tmp_path):
    b = make_batcher(tmp_path, add_sub_model(), "max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 4 ] "
                     "max_queue_delay_microseconds: 50000 }")
    x = np.ones((1, 4), np.float32)

    async def main():
        b.start()
        await asyncio.gather(*(b.submit({"x": x, "y": x}, 1) for _ in range(12)))

    run(main())
    assert set(b.recorder.per_batch) == {4} and b.recorder.execution_count == 3


def test_max_queue_delay_is_honoured(tmp_path):
    b = make_batcher(tmp_path, add_sub_model(), "max_batch_size: 8\ndynamic_batching { "
                     "max_queue_delay_microseconds: 150000 }")
    x = np.ones((1, 4), np.float32)

    async def main():
        b.start()
        t0 = time.perf_counter()
        await b.submit({"x": x, "y": x}, 1)  # alone: waits for company up to the delay
        alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        await asyncio.gather(*(b.submit({"x": x, "y": x}, 1) for _ in range(8)))  # a full batch goes at once
        full = time.perf_counter() - t0
        return alone, full

    alone, full = run(main())
    assert 0.14 <= alone < 2.0
    assert full < 0.14


@pytest.mark.parametrize("adaptive", [True, False])
def test_adaptive_delay_stops_waiting_when_waiting_finds_no_company(tmp_path, adaptive):
    """max_queue_delay is an upper bound: a client that sends one request at a time never sends a partner while
    it waits, so once a held-open batch found no company the next requests run at once; a burst still makes one
    batch. `adaptive_queue_delay: "false"` always waits, like Triton."""
    b = make_batcher(tmp_path, add_sub_model(), "max_batch_size: 8\ndynamic_batching { "
                     "max_queue_delay_microseconds: 200000 }\n"
                     f'parameters {{ key: "adaptive_queue_delay" value {{ string_value: "{adaptive}" }} }}')
    x = np.ones((1, 4), np.float32)

    async def main():
        b.start()
        took = []
        for _ in range(3):  # one request at a time, as a concurrency-1 client sends them
            t0 = time.perf_counter()
            await b.submit({"x": x, "y": x}, 1)
            took.append(time.perf_counter() - t0)
        burst = await asyncio.gather(*(b.submit({"x": x, "y": x}, 1) for _ in range(8)))
        t0 = time.perf_counter()
        await b.submit({"x": x, "y": x}, 1)
        return took, burst, time.perf_counter() - t0

    took, burst, after_burst = run(main())
    assert took[0] >= 0.19  # nothing learnt yet: the first waits for company, as Triton does
    if adaptive:
        assert max(took[1:]) < 0.1
    else:
        assert min(took[1:]) >= 0.19
    assert len(burst) == 8 and 8 in b.recorder.per_batch  # a burst still makes one full batch...
    assert after_burst >= 0.19  # ...and concurrent arrivals turn waiting back on


def _busy(tmp_path, config: str) -> Batcher:
    return make_batcher(tmp_path, slow_model(n=1000, reps=16), config)  # ~0.1 s a run: it holds the instance


def test_queue_full_is_unavailable_at_once(tmp_path):
    b = _busy(tmp_path, "max_batch_size: 1\ndynamic_batching { default_queue_policy { max_queue_size: 2 } }")
    x = np.ones((1, 1), np.float32)

    async def main():
        b.start()
        tasks = [asyncio.ensure_future(b.submit({"x": x}, 1))]
        await asyncio.sleep(0.01)  # the first runs...
        tasks += [asyncio.ensure_future(b.submit({"x": x}, 1)) for _ in range(2)]
        await asyncio.sleep(0.001)  # ...and two wait: the queue is full
        t0 = time.perf_counter()
        with pytest.raises(Unavailable, match="queue full"):
            await b.submit({"x": x}, 1)
        refused_in = time.perf_counter() - t0
        await asyncio.gather(*tasks)
        return refused_in

    assert run(main()) < 0.05
    assert b.recorder.execution_count == 3


def test_timed_out_requests_do_not_count_against_the_queue_size(tmp_path):
    b = _busy(tmp_path, "max_batch_size: 1\ndynamic_batching { default_queue_policy { max_queue_size: 2 } }")
    x = np.ones((1, 1), np.float32)

    async def main():
        b.start()
        first = asyncio.ensure_future(b.submit({"x": x}, 1))  # runs ~0.1 s
        await asyncio.sleep(0.005)
        for _ in range(2):  # fill the queue with requests that time out behind `first`
            with pytest.raises(Unavailable, match="timed out"):
                await b.submit({"x": x}, 1, timeout_us=2_000)
        late = asyncio.ensure_future(b.submit({"x": x}, 1))  # the queue holds no live request: accepted
        await asyncio.gather(first, late)

    run(main())
    assert b.recorder.execution_count == 2


def test_timeout_in_queue_and_cancelled_requests_never_run(tmp_path):
    b = _busy(tmp_path, "max_batch_size: 1\ndynamic_batching { default_queue_policy { "
                        "default_timeout_microseconds: 1000 } }")
    x = np.ones((1, 1), np.float32)

    async def main():
        b.start()
        first = asyncio.ensure_future(b.submit({"x": x}, 1, timeout_us=10_000_000))  # runs at once
        await asyncio.sleep(0.005)
        with pytest.raises(Unavailable, match="timed out"):
            await b.submit({"x": x}, 1)  # 1 ms default timeout, stuck behind `first`
        cancelled = asyncio.ensure_future(b.submit({"x": x}, 1, timeout_us=10_000_000))
        await asyncio.sleep(0.001)
        cancelled.cancel()
        await first
        await asyncio.sleep(0.05)

    run(main())
    assert b.recorder.execution_count == 1  # neither the timed-out nor the cancelled request ran


@pytest.mark.parametrize("adaptive", [True, False])
def test_adaptive_delay_sends_a_batch_once_it_holds_what_a_full_wait_gathers(tmp_path, adaptive):
    """Four clients in lockstep send four requests per round: once the batch has them, waiting on would find
    nobody, so (adaptive) it goes at once; one head in eight still waits the delay out to keep that figure."""
    b = make_batcher(tmp_path, add_sub_model(), "max_batch_size: 64\ndynamic_batching { "
                     "max_queue_delay_microseconds: 100000 }\n"
                     f'parameters {{ key: "adaptive_queue_delay" value {{ string_value: "{adaptive}" }} }}')
    x = np.ones((1, 4), np.float32)
    rounds = 40 if adaptive else 10

    async def main():
        b.start()
        t0 = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*(b.submit({"x": x, "y": x}, 1) for _ in range(4)))
        return time.perf_counter() - t0

    took = run(main())
    assert set(b.recorder.per_batch) == {4} and b.recorder.execution_count == rounds
    if adaptive:  # rounds 1, 8, 16, 24, 32, 40 wait it out (0.6 s), the other 34 do not (3.4 s more)
        assert 0.45 <= took < 2.0
    else:
        assert took >= 1.0


def test_adaptive_delay_probes_one_request_in_128_once_waiting_is_off(tmp_path):
    """With waiting off (nothing joins), one arrival in 128 still waits the delay out: the probe that notices
    traffic turning concurrent."""
    b = make_batcher(tmp_path, add_sub_model(), "max_batch_size: 8\ndynamic_batching { "
                     "max_queue_delay_microseconds: 50000 }")
    x = np.ones((1, 4), np.float32)

    async def main():
        b.start()
        took = []
        for _ in range(1 + 128):  # the first waits (nothing learnt yet) and finds nobody: waiting turns off
            t0 = time.perf_counter()
            await b.submit({"x": x, "y": x}, 1)
            took.append(time.perf_counter() - t0)
        return took

    took = run(main())
    assert took[0] >= 0.045 and sum(t >= 0.045 for t in took[1:]) == 1


def test_queue_policy_timeout_override_as_triton(tmp_path):
    """With a default timeout a request may only shorten it, and only with allow_timeout_override; a request
    that starts running before its timeout is answered, not timed out."""
    x = np.ones((1, 1), np.float32)
    policy = "max_batch_size: 1\ndynamic_batching { default_queue_policy { default_timeout_microseconds: 150000 "
    strict = make_batcher(tmp_path / "a", slow_model(n=1000, reps=60), policy + "} }")  # ~0.3 s a run
    lenient = make_batcher(tmp_path / "b", slow_model(n=1000, reps=60), policy + "allow_timeout_override: true } }")

    async def main(b: Batcher, requested_us: int) -> float:
        b.start()
        first = asyncio.ensure_future(b.submit({"x": x}, 1, timeout_us=requested_us))  # runs longer than any
        await asyncio.sleep(0.005)                                                      # timeout here
        t0 = time.perf_counter()
        with pytest.raises(Unavailable, match="timed out"):  # stuck behind `first`
            await b.submit({"x": x}, 1, timeout_us=requested_us)
        waited = time.perf_counter() - t0
        np.testing.assert_array_equal((await first)["y"], x)  # it ran: its queue timeout no longer applied
        return waited

    run(main(strict, 10_000_000))  # timed out: a longer request timeout never extends the default
    assert run(main(strict, 5_000)) >= 0.14  # nor may a shorter one shorten it without allow_timeout_override
    assert run(main(lenient, 5_000)) < 0.1  # with it, it may


def test_no_batching_runs_each_request_alone(tmp_path):
    b = make_batcher(tmp_path, add_sub_model(), "max_batch_size: 8")
    x = np.ones((2, 4), np.float32)

    async def main():
        b.start()
        await asyncio.gather(*(b.submit({"x": x, "y": x}, 2) for _ in range(5)))

    run(main())
    assert b.recorder.execution_count == 5 and set(b.recorder.per_batch) == {2}


def _executor_cpu_ns(prefix: str) -> int:
    """CPU time so far of this process's batcher executor threads (named after the model), from the kernel."""
    total = 0
    for t in threading.enumerate():
        if t.name.startswith(prefix) and t.native_id is not None:
            with open(f"/proc/self/task/{t.native_id}/schedstat") as f:
                total += int(f.read().split()[0])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads per-thread CPU time from /proc (Linux)")
@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_fast_runs_stay_on_the_loop_however_requests_arrive(tmp_path, event_loop):
    """A fast model's batches run on the event loop whether requests come one at a time, arrive together (32
    clients in lockstep, uvicorn's way) or trickle in one per loop iteration (grpc.aio's way, which until
    2026-12-02 went to executor threads: on uvloop that cost 12-21% of requests/s at 4-64 in flight). Seen from
    the kernel: the executor threads' CPU time stays flat in all three. The control is the same trickle with an
    inline_max_us of 1 us, which sends every batch to the threads, so the measurement can see them work.
    inline_max_us is high in the first batcher so that only the arrival pattern could decide: the bound judges a
    32-row batch by the per-row cost of batch-1 runs, which on a loaded machine can exceed it (seen in CI)."""
    b = make_batcher(tmp_path, add_sub_model(), "max_batch_size: 64\ndynamic_batching { }\n"
                     'parameters { key: "inline_max_us" value { string_value: "100000" } }')
    bounded = make_batcher(tmp_path, add_sub_model(), "max_batch_size: 64\ndynamic_batching { }\n"
                           'parameters { key: "inline_max_us" value { string_value: "1" } }', "bounded")
    x = np.ones((1, 4), np.float32)
    feeds = {"x": x, "y": x}

    async def trickle(batcher: Batcher) -> None:
        pending = []
        for _ in range(640):
            pending.append(asyncio.ensure_future(batcher.submit(feeds, 1)))
            await asyncio.sleep(0)  # the task submits in the next iteration: one arrival per iteration
        await asyncio.gather(*pending)

    async def main():
        b.start()
        bounded.start()
        for _ in range(5):  # the first run is timed in a thread: the model's speed is not known yet
            await b.submit(feeds, 1)
            await bounded.submit(feeds, 1)
        c0 = _executor_cpu_ns("ort-m")
        for _ in range(300):
            await b.submit(feeds, 1)
        c1 = _executor_cpu_ns("ort-m")

        async def client():  # all 32 resume from one batch's replies in the same iteration, and send together
            for _ in range(20):
                await b.submit(feeds, 1)

        await asyncio.gather(*(client() for _ in range(32)))
        c2 = _executor_cpu_ns("ort-m")
        await trickle(b)
        c3 = _executor_cpu_ns("ort-m")
        d0 = _executor_cpu_ns("ort-bounded")
        await trickle(bounded)
        return c1 - c0, c2 - c1, c3 - c2, _executor_cpu_ns("ort-bounded") - d0

    sequential_ns, together_ns, trickled_ns, control_ns = run(main(), event_loop)
    assert sequential_ns < 1_000_000, f"300 sequential requests used {sequential_ns / 1e6:.1f} ms in threads"
    assert together_ns < 1_000_000, f"640 requests sent together used {together_ns / 1e6:.1f} ms in threads"
    assert trickled_ns < 1_000_000, f"640 trickled requests used {trickled_ns / 1e6:.1f} ms in threads"
    assert control_ns > 5 * max(sequential_ns, together_ns, trickled_ns, 100_000), (trickled_ns, control_ns)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads per-thread CPU time from /proc (Linux)")
def test_a_batch_alone_may_hold_the_loop_longer_than_inline_max_us(tmp_path):
    """inline_max_us bounds how long a batch may hold up the other requests' decoding and replies; with nobody
    else here (requests one at a time), a batch of up to ALONE_INLINE times that runs inline too. inline_max_us is
    set to a third of what a 32-row run of the model takes on this machine (measured first): sequential requests
    keep the executor threads idle, and the same requests trickling in one per loop iteration go to them."""
    model = slow_model(n=160, reps=4)  # about 0.5 ms: a preempted run moves the moving average less
    x = np.ones((32, 1), np.float32)
    one_thread = 'parameters { key: "intra_op_thread_count" value { string_value: "1" } }\n'  # as a fast model gets
    config = text_format.Parse("max_batch_size: 64\ndynamic_batching { }\n" + one_thread,
                               model_config_pb2.ModelConfig())
    timer = Instance(str(save(model, tmp_path / "timing", "m")), session_options(config, placement(config)),
                     placement(config))
    runs = []
    for _ in range(30):
        t0 = time.perf_counter_ns()
        timer.run({"x": x})
        runs.append(time.perf_counter_ns() - t0)
    inline_max_us = max(1, int(np.median(runs) / 3 / 1000))
    b = make_batcher(tmp_path, model, "max_batch_size: 64\ndynamic_batching { }\n" + one_thread +
                     f'parameters {{ key: "inline_max_us" value {{ string_value: "{inline_max_us}" }} }}')

    async def main():
        b.start()
        for _ in range(100):  # the model's speed (the first runs go to a thread, and take longer there)
            await b.submit({"x": x}, 32)
            await asyncio.sleep(0)
        c0 = _executor_cpu_ns("ort-m")
        for _ in range(100):
            await b.submit({"x": x}, 32)
            await asyncio.sleep(0)
        c1 = _executor_cpu_ns("ort-m")
        trickle = []
        for _ in range(300):
            trickle.append(asyncio.ensure_future(b.submit({"x": x}, 32)))
            await asyncio.sleep(0)
        await asyncio.gather(*trickle)
        return c1 - c0, _executor_cpu_ns("ort-m") - c1

    sequential_ns, trickled_ns = run(main())
    run_ns = inline_max_us * 3000
    # by the 1x bound all 100 would run in threads; a loaded machine's preempted runs may send some there
    assert sequential_ns < 50 * run_ns, f"100 sequential runs used {sequential_ns / 1e6:.1f} ms in threads"
    assert trickled_ns > 50 * run_ns, f"trickled requests used {trickled_ns / 1e6:.1f} ms in threads"


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("batching") / "models"
    save(add_sub_model(), repo, "batched", config="max_batch_size: 32\ndynamic_batching { "
         "max_queue_delay_microseconds: 2000 }\ninstance_group [ { count: 2 kind: KIND_CPU } ]\n")
    save(seq_model(), repo, "seq", config="max_batch_size: 32\ndynamic_batching { max_queue_delay_microseconds: "
         "2000 }\n")
    save(add_sub_model(), repo, "patient", config="max_batch_size: 32\ndynamic_batching { "
         "max_queue_delay_microseconds: 200000 }\n"
         "parameters { key: \"adaptive_queue_delay\" value { string_value: \"false\" } }\n")
    s = Server(repo)
    yield s, repo
    s.stop()


def test_concurrent_clients_get_exactly_their_unbatched_results(batching_server):
    server, repo = batching_server
    sess = ort.InferenceSession(str(repo / "batched" / "1" / "model.onnx"))
    rng = np.random.default_rng(7)
    jobs = [rng.random((int(rng.integers(1, 5)), 4), dtype=np.float32) for _ in range(200)]
    seqs = [np.full((int(rng.integers(1, 4)), int(rng.integers(1, 6))), i, np.int64) for i in range(100)]

    def one(i):
        from service._proto import inference_pb2_grpc

        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        if i < len(jobs):
            x = jobs[i]
            got = outputs(stub.ModelInfer(request("batched", x=x, y=2 * x)))
            want = sess.run(None, {"x": x, "y": 2 * x})
            return np.array_equal(got["sum"], want[0]) and np.array_equal(got["diff"], want[1])
        t = seqs[i - len(jobs)]
        got = outputs(stub.ModelInfer(request("seq", tokens=t)))["total"]
        return np.array_equal(got, t.sum(axis=1, keepdims=True).astype(np.float32))

    with server.channel() as channel, ThreadPoolExecutor(32) as pool:
        assert all(pool.map(one, range(len(jobs) + len(seqs))))
        from service._proto import inference_pb2_grpc

        st = inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name="batched")).model_stats[0]
    assert st.inference_count == sum(len(x) for x in jobs)
    assert st.execution_count < len(jobs)  # requests really were merged
    assert max(b.batch_size for b in st.batch_stats) > 4


def test_request_timeout_parameter_through_the_server(batching_server, tmp_path):
    server, _ = batching_server
    with server.channel() as ch:
        from service._proto import inference_pb2_grpc

        stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
        req = request("batched", x=np.ones((1, 4), np.float32), y=np.ones((1, 4), np.float32))
        req.parameters["timeout"].int64_param = 10_000_000
        assert outputs(stub.ModelInfer(req))["sum"][0, 0] == 2.0
        before = _stats(stub, "patient").inference_count
        req = request("patient", x=np.ones((1, 4), np.float32), y=np.ones((1, 4), np.float32))
        with pytest.raises(grpc.RpcError) as err:  # the deadline passes while the request waits for company
            stub.ModelInfer(req, timeout=0.05)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.5)  # past the queue delay: had it not been dropped, it would have run by now
        assert _stats(stub, "patient").inference_count == before


def _stats(stub, model: str):
    return stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0]
