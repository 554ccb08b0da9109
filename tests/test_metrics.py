"""Every metric DESIGN.md names is exported on /metrics and moves when requests are served."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import outputs, request

from service._proto import inference_pb2 as pb


def scrape(server) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name, **labels) -> float:
    """The sample's value; a sample that is not exported fails the test (a default would hide a missing metric)."""
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} is not exported; exported: " + \
        ", ".join(sorted({f"{n}{dict(lb)}" for n, lb in samples if n == name})[:10])
    return samples[key]


def value_or_zero(samples, name, **labels) -> float:
    """For the `before` side of a delta only: a counter child is created on its first increment."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_exist_and_move(server, stub):
    before = scrape(server)
    mv = {"model": "add_sub", "version": "1"}
    x = np.ones((3, 4), np.float32)
    for _ in range(2):
        stub.ModelInfer(request("add_sub", x=x, y=x))
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(request("add_sub", x=np.ones((3, 5), np.float32), y=x))
    after = scrape(server)

    def moved(name, by=None, **labels):
        delta = value(after, name, **labels) - value_or_zero(before, name, **labels)
        assert (delta == by) if by is not None else delta > 0, (name, labels, delta)

    moved("deepserve_requests_total", 2, code="OK", **mv)
    moved("deepserve_requests_total", 1, code="INVALID_ARGUMENT", **mv)
    moved("deepserve_inferences_total", 6, **mv)
    moved("deepserve_executions_total", **mv)
    moved("deepserve_request_duration_seconds_count", 3, **mv)
    moved("deepserve_queue_duration_seconds_count", 2, **mv)
    moved("deepserve_compute_duration_seconds_count", **mv)
    moved("deepserve_batch_size_sum", 6, **mv)
    moved("deepserve_grpc_requests_total", 2, method="ModelInfer", code="OK")
    moved("deepserve_grpc_requests_total", 1, method="ModelInfer", code="INVALID_ARGUMENT")
    moved("deepserve_grpc_request_duration_seconds_count", method="ModelInfer")
    assert value(after, "deepserve_pending_requests", **mv) == 0
    for quantity in ("request", "queue", "compute"):
        assert value(after, f"deepserve_{quantity}_duration_seconds_sum", **mv) > 0
        assert value(after, f"deepserve_{quantity}_duration_seconds_bucket", le="+Inf", **mv) == \
            value(after, f"deepserve_{quantity}_duration_seconds_count", **mv)
    assert value(after, "deepserve_model_load_duration_seconds", **mv) > 0
    assert value(after, "deepserve_model_info", platform="onnxruntime_onnx",
                 execution_provider="CPUExecutionProvider", **mv) == 1
    assert value(after, "deepserve_model_load_failures_total", model="broken") >= 1
    assert value(after, "process_resident_memory_bytes") > 0


def test_statistics_rpc_agrees_with_metrics(server, stub):
    stub.ModelInfer(request("nobatch", x=np.ones((1, 4), np.float32), y=np.ones((1, 4), np.float32)))
    st = stub.ModelStatistics(pb.ModelStatisticsRequest(name="nobatch")).model_stats[0]
    m = scrape(server)
    assert st.execution_count == value(m, "deepserve_executions_total", model="nobatch", version="1")
    assert st.inference_stats.success.count == value(m, "deepserve_requests_total", model="nobatch", version="1",
                                                     code="OK")


def test_pending_requests_counts_requests_in_flight(edge_server, edge_stub):
    """The slow model has one instance and runs ~0.5 s a request: three sent at once are in flight together for
    about a second, so a scrape taken meanwhile sees them pending; once all are answered, none is."""
    mv = {"model": "slow", "version": "1"}
    assert value(scrape(edge_server), "deepserve_pending_requests", **mv) == 0
    x = np.ones((1, 1), np.float32)
    calls = [edge_stub.ModelInfer.future(request("slow", x=x), timeout=120) for _ in range(3)]
    seen = []
    while not all(c.done() for c in calls):
        seen.append(value(scrape(edge_server), "deepserve_pending_requests", **mv))
    for c in calls:
        np.testing.assert_array_equal(outputs(c.result())["y"], x)
    assert max(seen, default=0) >= 1, seen
    assert value(scrape(edge_server), "deepserve_pending_requests", **mv) == 0


def test_counts_are_exact_right_after_concurrent_replies(server, protocol):
    """The per-request counters are summed on the event loop and written to prometheus-client once per loop
    iteration (service.metrics.Tally); a scrape right after the last reply must still count every request, on
    each front end. 96 requests from 8 threads, batched by the server, then one scrape at once."""
    from concurrent.futures import ThreadPoolExecutor

    from protocols import connect, raw

    mv = {"model": "add_sub", "version": "1"}
    x = np.ones((2, 4), np.float32)
    before = scrape(server)
    clients = [connect(server, protocol) for _ in range(8)]
    try:
        with ThreadPoolExecutor(8) as pool:  # one client per thread, 12 requests each
            answers = [a for batch in pool.map(lambda c: [c.infer("add_sub", [raw("x", x), raw("y", x)])
                                                          for _ in range(12)], clients) for a in batch]
        after = scrape(server)
    finally:
        for c in clients:
            c.close()
    assert [a.kind for a in answers] == ["OK"] * 96

    def delta(name, **labels):
        return value(after, name, **labels) - value_or_zero(before, name, **labels)

    assert delta("deepserve_requests_total", code="OK", **mv) == 96
    assert delta("deepserve_inferences_total", **mv) == 192
    assert delta("deepserve_request_duration_seconds_count", **mv) == 96
    assert value(after, "deepserve_pending_requests", **mv) == 0
    if protocol == "grpc":
        assert delta("deepserve_grpc_requests_total", method="ModelInfer", code="OK") == 96
    else:
        assert delta("deepserve_http_requests_total", endpoint="infer", code="200") == 96
