"""Every metric DESIGN.md names is exported on /metrics and moves when requests are served."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import request

from service._proto import inference_pb2 as pb


def scrape(server) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return samples.get(key, 0.0)


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
        delta = value(after, name, **labels) - value(before, name, **labels)
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
