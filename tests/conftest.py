from __future__ import annotations

from pathlib import Path

import pytest
import support
from protocols import PROTOCOLS, connect

ALL_TYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BYTES"]
ADD_SUB_CONFIG = """
name: "add_sub"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "sum" data_type: TYPE_FP32 dims: [ 4 ] label_filename: "labels.txt" },
         { name: "diff" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [ { count: 2 kind: KIND_CPU } ]
"""


def build_repository(repo: Path) -> Path:
    """The models most service tests share: batching, every datatype, variable length, two versions, a broken one."""
    support.save(support.add_sub_model(), repo, "add_sub", config=ADD_SUB_CONFIG)
    (repo / "add_sub" / "labels.txt").write_text("a\nb\nc\nd\n")
    support.save(support.identity_model(ALL_TYPES), repo, "identity")  # no config: completed from the graph
    support.save(support.seq_model(), repo, "seq", config="max_batch_size: 16\ndynamic_batching {}\n")
    support.save(support.add_sub_model(scale=1.0), repo, "versioned", version=1,
                 config="max_batch_size: 4\nversion_policy { all {} }\n")
    support.save(support.add_sub_model(scale=2.0), repo, "versioned", version=2)
    support.save(support.add_sub_model(), repo, "nobatch", config="max_batch_size: 0\n"
                 "input [ { name: \"x\" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]\n")
    broken = repo / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"this is not an onnx file")
    return repo


TYPED_TYPES = [t for t in ALL_TYPES if t != "FP16"]  # every datatype with a typed `contents` field
EXAMPLE_SCORES = [[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.5, 0.0, 4.0], [0.0, 5.0, 1.0]]
EXAMPLE_LABELS = [0, 1, 2, 0]  # the last example is predicted 1: three right, one wrong
CLASSIFIER_CONFIG = """
max_batch_size: 16
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 3 ] },
         { name: "probabilities" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "labels.txt" } ]
"""


def build_edge_repository(repo: Path) -> Path:
    """Models for edge cases, served apart so the shared repository stays as other tests expect it: identity over
    the typed datatypes, a lookup that fails inside onnxruntime for an out-of-range index, a slow model (one
    instance, ~0.5 s a run) to see requests in flight, and a classifier published with labels.txt and
    examples.npz the way training jobs publish them."""
    import numpy as np

    support.save(support.identity_model(TYPED_TYPES), repo, "typed_identity")
    support.save(support.add_sub_model(), repo, "nobatch", config="max_batch_size: 0\n"
                 "input [ { name: \"x\" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]\n")
    support.save(support.gather_model(), repo, "gather", config="max_batch_size: 8\n")
    support.save(support.slow_model(n=1000, reps=60), repo, "slow",
                 config="max_batch_size: 8\ninstance_group [ { count: 1 kind: KIND_CPU } ]\n")
    d = support.save(support.classifier_model(), repo, "classifier", config=CLASSIFIER_CONFIG).parent
    (repo / "classifier" / "labels.txt").write_text("cat\ndog\nbird\n")
    np.savez(d / "examples.npz", scores=np.array(EXAMPLE_SCORES, np.float32), label=np.array(EXAMPLE_LABELS))
    return repo


@pytest.fixture(scope="session")
def edge_repository(tmp_path_factory) -> Path:
    return build_edge_repository(tmp_path_factory.mktemp("edge") / "models")


@pytest.fixture(scope="session")
def edge_server(edge_repository):
    """A server for the edge-case models, with --max-elements 0: no element limit, so the only thing between a
    huge declared shape and an allocation is the check of the body's size against the shape."""
    s = support.Server(edge_repository, "--max-elements", "0")
    yield s
    s.stop()


@pytest.fixture
def edge_stub(edge_server):
    from service._proto import inference_pb2_grpc

    with edge_server.channel() as ch:
        yield inference_pb2_grpc.GRPCInferenceServiceStub(ch)


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_servers():
    yield
    for s in support.Server.started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


@pytest.fixture(scope="session")
def serve_options() -> dict[str, dict]:
    """`deepserve serve --help`, parsed: the flags the deploy artefacts must agree with."""
    from deploy_support import cli_help

    return cli_help("serve")


@pytest.fixture(scope="session")
def repository(tmp_path_factory) -> Path:
    return build_repository(tmp_path_factory.mktemp("shared") / "models")


@pytest.fixture(scope="session")
def server(repository):
    """One server for the read-mostly API tests (non-strict readiness: the broken model must not block them)."""
    s = support.Server(repository, "--no-strict-readiness")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def seq_server(tmp_path_factory):
    """The stateful RNN cell (64 live sequences, freed after 0.4 s idle): (server, the cell's weights)."""
    repo = tmp_path_factory.mktemp("seq") / "models"
    model, weights = support.rnn_cell_model()
    support.save(model, repo, "cell", config=support.SEQUENCE_CONFIG % (400_000, 64))
    s = support.Server(repo)
    yield s, weights
    s.stop()


@pytest.fixture(params=PROTOCOLS)
def protocol(request) -> str:
    """Each protocol test runs once per front end: grpc, http."""
    return request.param


@pytest.fixture
def client(server, protocol):
    """A protocol-neutral client (tests/protocols.py) of the shared server."""
    c = connect(server, protocol)
    yield c
    c.close()


@pytest.fixture
def edge_client(edge_server, protocol):
    c = connect(edge_server, protocol)
    yield c
    c.close()


@pytest.fixture
def stub(server):
    from service._proto import inference_pb2_grpc

    with server.channel() as ch:
        yield inference_pb2_grpc.GRPCInferenceServiceStub(ch)


def pytest_addoption(parser):
    parser.addoption("--soak-seconds", type=float, default=8.0, help="soak test duration (make soak: 600)")
    parser.addoption("--soak-repository", default="", help="soak this repository instead of the test models "
                     "(make soak: models/)")
