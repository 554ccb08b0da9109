"""The MLServer runtime the benchmark serves digits_cnn with: one onnxruntime session, the thread settings our
server uses for the model (passed in the model settings), NumpyCodec in and out. Runs inside MLServer's own
virtualenv (bench/mlserver.py copies it beside the model settings); it is never imported by deepserve.

Three Triton endpoints are added as MLServer custom handlers because perf_analyzer asks for them before
measuring and MLServer does not have them: the model config (for max_batch_size and the inputs) and statistics
(zero counters). They are off the infer path; the infer path is MLServer's own, but for the outputs' codec
parameter (`content_type: np`), dropped: tritonclient reads output parameters as binary tensor ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.handlers import custom_handler
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

_STATS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


class OnnxModel(MLModel):
    async def load(self) -> bool:
        extra = self.settings.parameters.extra or {}
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(extra.get("intra_op_threads", 0))
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        uri = await get_model_uri(self.settings)
        self.session = ort.InferenceSession(uri, sess_options=so, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.config = json.loads((Path(uri).parent / "triton_config.json").read_text())
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self.session.run(None, feeds)
        outputs = [NumpyCodec.encode_output(n, r) for n, r in zip(self.output_names, results, strict=True)]
        for o in outputs:  # tritonclient (perf_analyzer) takes output parameters for binary data; say nothing
            o.parameters = None
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id, outputs=outputs)

    def _stats(self) -> dict:
        return {"model_stats": [{"name": self.name, "version": self.version or "1", "last_inference": 0,
                                 "inference_count": 0, "execution_count": 0, "batch_stats": [],
                                 "inference_stats": {k: {"count": 0, "ns": 0} for k in _STATS}}]}

    @custom_handler(rest_path="/v2/models/{model_name}/config", rest_method="GET")
    async def triton_config(self, model_name: str) -> dict:
        return self.config

    @custom_handler(rest_path="/v2/models/{model_name}/versions/{version}/config", rest_method="GET")
    async def triton_config_versioned(self, model_name: str, version: str) -> dict:
        return self.config

    @custom_handler(rest_path="/v2/models/{model_name}/stats", rest_method="GET")
    async def triton_stats(self, model_name: str) -> dict:
        return self._stats()

    @custom_handler(rest_path="/v2/models/{model_name}/versions/{version}/stats", rest_method="GET")
    async def triton_stats_versioned(self, model_name: str, version: str) -> dict:
        return self._stats()
