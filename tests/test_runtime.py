"""Thread counts the server chooses for onnxruntime, as a user sees them in ModelConfig."""

from __future__ import annotations

import os

import pytest
from support import Server, add_sub_model, save, slow_model

from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc


@pytest.fixture(scope="module")
def threads(tmp_path_factory) -> dict[str, str]:
    repo = tmp_path_factory.mktemp("threads") / "models"
    save(add_sub_model(), repo, "fast", config="max_batch_size: 8\n")
    save(add_sub_model(), repo, "pinned", config="max_batch_size: 8\n"
         'parameters { key: "intra_op_thread_count" value { string_value: "2" } }\n')
    save(slow_model(n=1000, reps=4), repo, "slow", config="max_batch_size: 8\n")
    save(slow_model(n=1000, reps=4), repo, "two", config="max_batch_size: 8\n"
         "instance_group [ { count: 2 kind: KIND_CPU } ]\n")
    save(slow_model(n=1000, reps=4), repo, "still", config="max_batch_size: 8\n"
         'parameters { key: "allow_spinning" value { string_value: "false" } }\n')
    server = Server(repo)
    try:
        with server.channel() as ch:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
            params = {m: stub.ModelConfig(pb.ModelConfigRequest(name=m)).config.parameters
                      for m in ("fast", "pinned", "slow", "two", "still")}
            return {m: p["intra_op_thread_count"].string_value for m, p in params.items()} | {
                f"{m} spins": p["allow_spinning"].string_value for m, p in params.items()}
    finally:
        server.stop()


def test_a_fast_model_runs_on_one_intra_op_thread(threads):
    # a microsecond model runs inline on the event loop: a second thread would only add wake-ups
    assert threads["fast"] == "1"


def test_the_config_thread_count_is_kept(threads):
    assert threads["pinned"] == "2"


def test_a_slow_model_gets_the_cores_split_between_its_instances(threads):
    cores = os.cpu_count() or 1
    assert threads["slow"] == str(cores)
    assert threads["two"] == str(max(1, cores // 2))


def test_a_thread_pool_spins_between_operators_unless_the_config_says_not(threads):
    # onnxruntime's default, kept where there is a pool: sleeping between operators makes each run wait for wake-ups
    cores = os.cpu_count() or 1
    assert threads["slow spins"] == ("true" if cores > 1 else "false")
    assert threads["fast spins"] == "false"  # one thread: no pool, nothing spins
    assert threads["pinned spins"] == "true"
    assert threads["still spins"] == "false" and threads["still"] == str(cores)
