"""--workers: processes sharing the port, supervised, with metrics and statistics that add up across them."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
from support import Server, add_sub_model, outputs, request, save
from test_metrics import scrape, value

from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_two_workers_share_the_port_and_the_figures(tmp_path):
    repo = tmp_path / "models"
    save(add_sub_model(), repo, "m", config="max_batch_size: 8\ndynamic_batching { }\n")
    server = Server(repo, "--workers", "2")
    try:
        assert len(children(server.proc.pid)) == 2
        x = np.ones((3, 4), np.float32)
        sent = 0
        for _ in range(24):  # fresh connections: the kernel spreads them over the two workers
            with server.channel() as ch:
                stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
                for _ in range(5):
                    assert outputs(stub.ModelInfer(request("m", x=x, y=x)))["sum"][0, 0] == 2.0
                    sent += 1
        time.sleep(0.3)  # other workers publish their figures every 50 ms
        for _ in range(8):
            with server.channel() as ch:
                st = inference_pb2_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
                    pb.ModelStatisticsRequest(name="m")).model_stats[0]
            assert st.inference_count == 3 * sent and st.inference_stats.success.count == sent
        m = scrape(server)
        assert value(m, "deepserve_requests_total", model="m", version="1", code="OK") == sent
        assert value(m, "deepserve_inferences_total", model="m", version="1") == 3 * sent
        assert value(m, "deepserve_model_info", model="m", version="1", platform="onnxruntime_onnx",
                     execution_provider="CPUExecutionProvider") == 1
        # a worker that dies is replaced, and the port keeps serving meanwhile
        victim = children(server.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (victim in children(server.proc.pid)
                                               or len(children(server.proc.pid)) < 2):
            time.sleep(0.1)
        assert len(children(server.proc.pid)) == 2 and victim not in children(server.proc.pid)
        server.wait_ready()
        with server.channel() as ch:
            assert outputs(inference_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
                request("m", x=x, y=x)))["sum"][0, 0] == 2.0
    finally:
        assert server.stop() == 0
    assert "restarting it" in server.log()
