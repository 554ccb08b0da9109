"""The data plane's rules, driven in-process (no sockets, no front end): a Registry, ServerState and DataPlane on a
tmp repository inside a running asyncio loop, as server.serve wires them. Whatever holds here holds for both
protocols, since grpc_api and http_api only convert."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from conftest import ADD_SUB_CONFIG
from prometheus_client import CollectorRegistry
from support import add_sub_model, save

from service.dataplane import DataPlane
from service.errors import InvalidArgument, NotFound, Unavailable
from service.metrics import Metrics
from service.protocol import InferRequest, InputTensor
from service.registry import Registry
from service.state import ServerState

X = np.ones((1, 4), np.float32)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("dataplane") / "models"
    save(add_sub_model(), r, "add_sub", config=ADD_SUB_CONFIG)
    (r / "add_sub" / "labels.txt").write_text("a\nb\nc\nd\n")
    save(add_sub_model(scale=1.0), r, "versioned", version=1, config="max_batch_size: 4\nversion_policy { all {} }\n")
    save(add_sub_model(scale=2.0), r, "versioned", version=2)
    save(add_sub_model(), r, "on_disk_only", config="max_batch_size: 4\n")
    (r / "broken" / "1").mkdir(parents=True)
    (r / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    return r


def infer_request(model: str = "add_sub", rows: int = 1, version: str = "") -> InferRequest:
    x = np.ones((rows, 4), np.float32)
    return InferRequest(model, version, inputs=[InputTensor("x", "FP32", x.shape, raw=x.tobytes()),
                                                InputTensor("y", "FP32", x.shape, raw=x.tobytes())])


def run(body, repo: Path, load=("add_sub", "versioned", "broken"), explicit: bool = False, max_inflight: int = 0):
    """Run `await body(dataplane)` in a fresh loop with `load` loaded; every version is stopped afterwards."""

    async def main():
        registry = Registry(repo, Metrics(CollectorRegistry()))
        state = ServerState(registry, strict=False, explicit_control=explicit)
        for name in load:
            await registry.load(name)
        state.loaded = True
        dataplane = DataPlane(registry, state, max_inflight=max_inflight)
        try:
            return await body(dataplane)
        finally:
            for name in list(registry.models):
                await registry.unload(name)

    return asyncio.run(main())


def test_infer_answers_and_draining_refuses(repo):
    async def body(dp: DataPlane):
        response = await dp.infer(infer_request(rows=2))
        assert (response.model, response.version) == ("add_sub", "1")
        assert [o.name for o in response.outputs] == ["sum", "diff"]
        np.testing.assert_array_equal(response.outputs[0].data, 2 * np.ones((2, 4), np.float32))
        assert dp.model_ready("add_sub") and dp.ready()
        dp.state.draining = True
        with pytest.raises(Unavailable, match="the server is shutting down"):
            await dp.infer(infer_request())
        assert not dp.model_ready("add_sub")  # draining: no model is ready
        assert dp.live()
        assert dp.inflight == 0  # the refused request is not left counted

    run(body, repo)


def test_max_inflight_refuses_beyond_the_limit(repo):
    """--max-inflight 1: of two requests started together the second finds the first in flight (it waits in the
    batcher, which has a 2 ms queue delay) and is refused at once; the first is answered."""

    async def body(dp: DataPlane):
        first, second = await asyncio.gather(dp.infer(infer_request()), dp.infer(infer_request()),
                                             return_exceptions=True)
        assert first.outputs[0].data.tolist() == [[2.0] * 4]
        assert isinstance(second, Unavailable) and "1 requests in flight (--max-inflight)" in str(second)
        assert dp.inflight == 0
        assert (await dp.infer(infer_request())).version == "1"  # free again

    run(body, repo, max_inflight=1)


def test_model_ready_metadata_versions_and_config(repo):
    async def body(dp: DataPlane):
        assert dp.model_ready("versioned") and dp.model_ready("versioned", "1") and dp.model_ready("versioned", "2")
        assert not dp.model_ready("versioned", "3") and not dp.model_ready("versioned", "x")
        assert not dp.model_ready("broken") and not dp.model_ready("nope")
        assert dp.model_metadata("versioned")["versions"] == ["1", "2"]
        assert dp.model_metadata("versioned", "1")["versions"] == ["1", "2"]  # every ready version, either way
        assert dp.model_config("add_sub").max_batch_size == 8
        assert (await dp.infer(infer_request("versioned"))).outputs[0].data[0, 0] == 4.0  # latest: scale 2
        assert (await dp.infer(infer_request("versioned", version="1"))).outputs[0].data[0, 0] == 2.0
        with pytest.raises(NotFound, match="unknown model 'nope'"):
            dp.model_metadata("nope")
        with pytest.raises(Unavailable, match="model 'broken' is not ready"):
            dp.model_metadata("broken")
        md = dp.server_metadata()
        assert md["name"] == "deepserve" and "binary_tensor_data" in md["extensions"]

    run(body, repo)


def test_statistics_count_requests_samples_and_failures(repo):
    async def body(dp: DataPlane):
        for rows in (1, 3):
            await dp.infer(infer_request(rows=rows))
        with pytest.raises(InvalidArgument):
            await dp.infer(InferRequest("add_sub", inputs=[InputTensor("x", "FP64", (1, 4), raw=b"\0" * 32)]))
        (st,) = dp.statistics("add_sub")
        assert (st["name"], st["version"]) == ("add_sub", "1")
        assert int(st["inference_count"]) == 4
        assert int(st["inference_stats"]["success"]["count"]) == 2
        assert int(st["inference_stats"]["fail"]["count"]) == 1
        assert [s["version"] for s in dp.statistics("versioned")] == ["1", "2"]
        assert [s["version"] for s in dp.statistics("versioned", "2")] == ["2"]
        assert {s["name"] for s in dp.statistics()} == {"add_sub", "versioned"}  # broken has no version loaded
        with pytest.raises(NotFound):
            dp.statistics("nope")

    run(body, repo)


def test_load_and_unload_need_explicit_control(repo):
    async def body(dp: DataPlane):
        for call in (dp.load("add_sub"), dp.unload("add_sub")):
            with pytest.raises(Unavailable, match="not allowed unless --model-control-mode explicit"):
                await call
        assert dp.model_ready("add_sub")  # untouched

    run(body, repo)


def test_repository_index_states_through_load_and_unload(repo):
    async def body(dp: DataPlane):
        index = {(e["name"], e["version"]): (e["state"], e["reason"]) for e in dp.repository_index()}
        assert index[("add_sub", "1")] == ("READY", "")
        assert index[("on_disk_only", "")] == ("", "")  # on disk, never loaded
        assert index[("broken", "1")][0] == "UNAVAILABLE" and "onnxruntime could not load" in index[("broken", "1")][1]
        assert [e["name"] for e in dp.repository_index(ready_only=True)] == ["add_sub"]
        await dp.load("on_disk_only")
        assert (await dp.infer(infer_request("on_disk_only"))).version == "1"
        await dp.unload("add_sub")
        index = {(e["name"], e["version"]): (e["state"], e["reason"]) for e in dp.repository_index()}
        assert index[("add_sub", "1")] == ("UNAVAILABLE", "unloaded") and index[("on_disk_only", "1")][0] == "READY"
        with pytest.raises(Unavailable, match="model 'add_sub' is not ready"):
            await dp.infer(infer_request())
        assert not dp.model_ready("add_sub")
        with pytest.raises(NotFound, match="no model folder 'nope'"):
            await dp.load("nope")
        with pytest.raises(InvalidArgument, match="failed to load 'broken'"):
            await dp.load("broken")
        await dp.load("add_sub", '{"max_batch_size": 2}')  # a config override (the JSON `config` parameter)
        assert dp.model_config("add_sub").max_batch_size == 2

    run(body, repo, load=("add_sub", "broken"), explicit=True)


def test_load_from_files_and_bad_file_names(repo):
    """Triton's file:<path> load parameters: a model loaded from bytes answers; a bad name is refused with a
    message that says what is allowed, and the version that serves keeps serving."""
    onnx_bytes = (repo / "add_sub" / "1" / "model.onnx").read_bytes()
    config = '{"max_batch_size": 8}'

    async def body(dp: DataPlane):
        await dp.load("uploaded", config, {"1/model.onnx": onnx_bytes})
        assert (await dp.infer(infer_request("uploaded", rows=2))).outputs[0].data.tolist() == [[2.0] * 4] * 2
        with pytest.raises(InvalidArgument, match="model files need the config parameter"):
            await dp.load("uploaded", None, {"1/model.onnx": onnx_bytes})
        bad = {"..": {"../1/model.onnx": onnx_bytes}, "absolute": {"/tmp/1/model.onnx": onnx_bytes},
               "hidden": {"1/.model.onnx": onnx_bytes}}
        for what, files in bad.items():
            with pytest.raises(InvalidArgument) as err:
                await dp.load("uploaded", config, files)
            name = next(iter(files))
            assert f"file name {name!r} is not a relative path inside the model" in str(err.value), what
        with pytest.raises(InvalidArgument, match="65 files, over the limit of 64"):
            await dp.load("uploaded", config, {f"1/f{i}": b"" for i in range(64)} | {"1/model.onnx": onnx_bytes})
        with pytest.raises(InvalidArgument, match="is a version folder name, not a file"):
            await dp.load("uploaded", config, {"1": onnx_bytes})
        assert (await dp.infer(infer_request("uploaded"))).version == "1"  # still serving
        # refused requests, not failed loads: the index shows no failure and the failure metric did not move
        assert [r for r in dp.repository_index() if r["name"] == "uploaded"] == [
            {"name": "uploaded", "version": "1", "state": "READY", "reason": ""}]
        assert dp.registry.metrics.registry.get_sample_value("deepserve_model_load_failures_total",
                                                             {"model": "uploaded"}) in (None, 0.0)
        assert not (Path(repo) / "uploaded").exists()  # nothing written into the repository

    run(body, repo, load=(), explicit=True)
