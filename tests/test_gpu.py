"""The CUDA execution provider through the real server. Needs an NVIDIA GPU with onnxruntime-gpu
(pip install 'deepserve[gpu]'); skipped elsewhere, with the reason."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from support import Server, add_sub_model, outputs, request, save

from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason=f"no CUDAExecutionProvider in onnxruntime {ort.__version__} (providers: "
           f"{', '.join(ort.get_available_providers())}); needs an NVIDIA GPU and deepserve[gpu]")]


def test_kind_gpu_runs_on_cuda_and_matches_cpu(tmp_path):
    repo = tmp_path / "models"
    gpu_config = "max_batch_size: 64\ninstance_group [ { kind: KIND_GPU gpus: [ 0 ] } ]\n"
    save(add_sub_model(), repo, "on_gpu", config=gpu_config)
    save(add_sub_model(), repo, "on_cpu", config="max_batch_size: 64\ninstance_group [ { kind: KIND_CPU } ]\n")
    server = Server(repo)
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(server.channel())
    try:
        cfg = stub.ModelConfig(pb.ModelConfigRequest(name="on_gpu")).config
        assert cfg.parameters["execution_providers"].string_value.startswith("CUDAExecutionProvider")
        rng = np.random.default_rng(0)
        for batch in (1, 7, 64):
            x, y = rng.random((batch, 4), dtype=np.float32), rng.random((batch, 4), dtype=np.float32)
            gpu = outputs(stub.ModelInfer(request("on_gpu", x=x, y=y)))
            cpu = outputs(stub.ModelInfer(request("on_cpu", x=x, y=y)))
            for name in ("sum", "diff"):
                np.testing.assert_allclose(gpu[name], cpu[name], atol=1e-5)
    finally:
        server.stop()
