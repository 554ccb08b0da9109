"""Loading the repository: configs checked against the graph, unsupported fields named, no silent CPU fallback,
version policies, warmup, and a broken model that never stops the rest from serving."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from support import Server, add_sub_model, outputs, parse_model, request, save

from service._proto import inference_pb2 as pb

BAD = {
    "unsupported_field": ('ensemble_scheduling { }\n', "no field named \"ensemble_scheduling\""),
    "wrong_name": ('name: "other"\n', "names the model 'other' but its folder is 'wrong_name'"),
    "wrong_platform": ('platform: "tensorflow_savedmodel"\n', "is not served"),
    "gpu_absent": ('instance_group [ { kind: KIND_GPU } ]\n', "KIND_GPU but onnxruntime has no CUDAExecutionProvider"),
    "tensorrt_absent": ('instance_group [ { kind: KIND_CPU } ]\noptimization { execution_accelerators { '
                        'gpu_execution_accelerator [ { name: "openvino" } ] } }\n', "only 'tensorrt'"),
    "wrong_dtype": ('max_batch_size: 4\ninput [ { name: "x" data_type: TYPE_INT32 dims: [ 4 ] } ]\n',
                    "says TYPE_INT32, the model has TYPE_FP32"),
    "wrong_dims": ('max_batch_size: 4\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 5 ] } ]\n',
                   "dims [5] do not fit the model's [4]"),
    "unknown_input": ('input [ { name: "zzz" data_type: TYPE_FP32 dims: [ 4 ] } ]\n', "'zzz' is not in the model"),
    "missing_labels": ('output [ { name: "sum" data_type: TYPE_FP32 dims: [ -1, 4 ] label_filename: "l.txt" } ]\n',
                       "label_filename 'l.txt' does not exist"),
    "bad_warmup": ('model_warmup [ { name: "w" batch_size: 1 inputs { key: "nope" value { data_type: TYPE_FP32 '
                   'dims: [ 4 ] zero_data: true } } } ]\nmax_batch_size: 2\n', "unknown input 'nope'"),
    "bad_graph_level": ('optimization { graph { level: 7 } }\n', "graph.level 7"),
    "syntax_error": ('max_batch_size: "many"\n', "config.pbtxt"),
    # Latin-1 bytes: not UTF-8. Once this stopped the whole server at start.
    "bad_utf8": (b'max_batch_size: 4\n# caf\xe9\n', "config.pbtxt is not valid UTF-8"),
    "warmup_dims": ('max_batch_size: 2\nmodel_warmup [ { name: "w5" batch_size: 1 inputs [ { key: "x" value { '
                    'data_type: TYPE_FP32 dims: [ 5 ] zero_data: true } }, { key: "y" value { data_type: TYPE_FP32 '
                    'dims: [ 5 ] zero_data: true } } ] } ]\n', "warmup 'w5' failed"),
    # Fields in the schema that deepserve does not implement: named, never silently ignored.
    "preserve_ordering": ('max_batch_size: 4\ndynamic_batching { preserve_ordering: true }\n',
                          "dynamic_batching.preserve_ordering"),
    "inline_max_us": ('max_batch_size: 4\nparameters { key: "inline_max_us" value { string_value: "fast" } }\n',
                      "inline_max_us must be an integer"),
    "timeout_delay": ('max_batch_size: 4\ndynamic_batching { default_queue_policy { timeout_action: DELAY } }\n',
                      "timeout_action DELAY"),
    "slot_utilization": ('max_batch_size: 4\nsequence_batching { direct { minimum_slot_utilization: 0.5 } '
                         'state [ { input_name: "x" output_name: "sum" data_type: TYPE_FP32 dims: [ 4 ] } ] }\n',
                         "sequence_batching.direct.minimum_slot_utilization"),
    "oldest_ordering": ('max_batch_size: 4\nsequence_batching { oldest { preserve_ordering: true } '
                        'state [ { input_name: "x" output_name: "sum" data_type: TYPE_FP32 dims: [ 4 ] } ] }\n',
                        "sequence_batching.oldest.preserve_ordering"),
    "tensorrt_params": ('optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt" '
                        'parameters { key: "precision_mode" value: "FP16" } } ] } }\n',
                        "gpu_execution_accelerator 'tensorrt' parameters ['precision_mode']"),
    "input_format": ('max_batch_size: 4\ninput [ { name: "x" data_type: TYPE_FP32 format: FORMAT_NCHW '
                     'dims: [ 4 ] } ]\n', "format FORMAT_NCHW needs 3 dims"),
}

GOOD = {
    "gpu_fallback": 'instance_group [ { kind: KIND_GPU } ]\nparameters { key: "allow_cpu_fallback" value { '
                    'string_value: "true" } }\nmax_batch_size: 4\n',
    "warm": 'max_batch_size: 4\nmodel_warmup [ { name: "r" batch_size: 3 count: 2 inputs [ { key: "x" value { '
            'data_type: TYPE_FP32 dims: [ 4 ] random_data: true } }, { key: "y" value { data_type: TYPE_FP32 dims: '
            '[ 4 ] zero_data: true } } ] } ]\nparameters { key: "intra_op_thread_count" value { string_value: "1" '
            '} }\noptimization { graph { level: -1 } }\n',
    "latest2": 'max_batch_size: 4\nversion_policy { latest { num_versions: 2 } }\n',
    "specific": 'max_batch_size: 4\nversion_policy { specific { versions: [ 1, 3 ] } }\n',
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    repo = tmp_path_factory.mktemp("mixed") / "models"
    for name, (config, _) in BAD.items():
        save(add_sub_model(), repo, name, config=config if isinstance(config, str) else None)
        if isinstance(config, bytes):
            (repo / name / "config.pbtxt").write_bytes(config)
    for name, config in GOOD.items():
        for v in (1, 2, 3) if name in ("latest2", "specific") else (1,):
            save(add_sub_model(scale=float(v)), repo, name, version=v, config=config)
    # Valid models the implicit warmup once refused: a Cast of strings to INT32 (empty strings do not parse), and
    # one whose graph cannot take the implicit request's shape at all (it loads with a warning, as in Triton).
    save(parse_model(), repo, "parse", config="max_batch_size: 4\n")
    save(parse_model(fixed=3), repo, "parse_fixed", config="max_batch_size: 4\n")
    (repo / "no_versions").mkdir()
    (repo / ".publishing-tmp" / "1").mkdir(parents=True)  # hidden: a publish in progress, ignored
    strict = Server(repo, wait_ready=False)
    lenient = Server(repo, "--no-strict-readiness")
    yield strict, lenient
    strict.stop()
    lenient.stop()


def _stub(server):
    from service._proto import inference_pb2_grpc

    return inference_pb2_grpc.GRPCInferenceServiceStub(server.channel())


def test_each_bad_config_is_reported_by_name_and_the_rest_serve(mixed):
    _, lenient = mixed
    stub = _stub(lenient)
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest()).models
    reasons = {m.name: m.reason for m in index if m.state == "UNAVAILABLE"}
    for name, (_, words) in BAD.items():
        assert words in reasons.get(name, ""), (name, reasons.get(name))
        assert not stub.ModelReady(pb.ModelReadyRequest(name=name)).ready
    assert "no version to serve" in reasons["no_versions"]
    assert ".publishing-tmp" not in {m.name for m in index}
    for name in GOOD:
        assert stub.ModelReady(pb.ModelReadyRequest(name=name)).ready, name
    x = np.ones((1, 4), np.float32)
    assert outputs(stub.ModelInfer(request("warm", x=x, y=x)))["sum"][0, 0] == 2.0
    assert "failed to load" in lenient.log() and "unsupported_field" in lenient.log()


def test_strict_readiness_waits_for_every_model(mixed):
    strict, lenient = mixed
    _stub(lenient).ServerReady(pb.ServerReadyRequest())  # the lenient one is up, so loading is over
    stub = _stub(strict)
    deadline = time.monotonic() + 30
    while "ready:" not in strict.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ModelReady(pb.ModelReadyRequest(name="warm")).ready
    assert _stub(lenient).ServerReady(pb.ServerReadyRequest()).ready


def test_gpu_fallback_is_explicit_and_reported(mixed):
    cfg = _stub(mixed[1]).ModelConfig(pb.ModelConfigRequest(name="gpu_fallback")).config
    assert cfg.parameters["execution_providers"].string_value == "CPUExecutionProvider"
    assert "running on CPU (allow_cpu_fallback)" in mixed[1].log()


def test_version_policies(mixed):
    stub = _stub(mixed[1])
    assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="latest2")).versions) == ["2", "3"]
    assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="specific")).versions) == ["1", "3"]
    x = np.ones((1, 4), np.float32)
    assert outputs(stub.ModelInfer(request("specific", "1", x=x, y=x)))["sum"][0, 0] == 2.0
    assert outputs(stub.ModelInfer(request("specific", x=x, y=x)))["sum"][0, 0] == 6.0
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request("specific", "2", x=x, y=x))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_valid_model_the_implicit_warmup_cannot_run_still_loads_and_serves(mixed):
    """Triton warms up only what model_warmup lists: our implicit request must never refuse a valid model."""
    stub = _stub(mixed[1])
    for name, text in (("parse", [["12", "-7"]]), ("parse_fixed", [["1", "2", "3"]])):
        assert stub.ModelReady(pb.ModelReadyRequest(name=name)).ready, name
        got = outputs(stub.ModelInfer(request(name, text=np.array(text, dtype=object))))["value"]
        np.testing.assert_array_equal(got, np.array(text, dtype=np.int32))
    assert "model parse_fixed: the implicit warmup request" in mixed[1].log()
    assert "model parse: the implicit warmup request" not in mixed[1].log()
