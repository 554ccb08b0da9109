"""The data plane's side of decoupled (generation) models: one request, N responses. Admission, lookup and
statistics as for any inference; the text in (a BYTES `text_input`) and out (`text_output` chunks) as Triton's
generate extension names them; and the stream's end as Triton marks it: every ModelStreamInfer response carries
`triton_final_response`, and with the request parameter `triton_enable_empty_final_response` the end is an empty
final response of its own (otherwise the last chunk is held back one token so that it can carry the flag)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import numpy as np

from service.errors import InvalidArgument
from service.generation import Finished
from service.models import ModelVersion
from service.protocol import InferRequest, InferResponse, OutputTensor
from service.runtime import param
from service.tensors import decode_bytes, typed_bytes

if TYPE_CHECKING:
    from service.dataplane import DataPlane

FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"


def _names(mv: ModelVersion) -> tuple[str, str]:
    return param(mv.config, "generation_text_input", "text_input"), param(mv.config, "generation_text_output",
                                                                          "text_output")


async def _chunks(dp: DataPlane, mv: ModelVersion, text: str | bytes, params: dict, t0: int
                  ) -> AsyncIterator[str]:
    rec = mv.recorder
    rec.arrived()
    mv.active += 1  # a generating model is busy: never evicted under --max-loaded-models
    try:
        async for item in mv.generator.generate(text, params):
            if not isinstance(item, Finished):
                yield item
    except BaseException as exc:
        rec.request_raised(t0, exc)
        raise
    finally:
        rec.left()
        mv.active -= 1
    rec.request_ok(time.perf_counter_ns() - t0, 0)  # its tokens were counted as they came


def _generator_of(dp: DataPlane, model: str, version: str) -> ModelVersion:
    mv = dp.registry.lookup(model, version)
    if mv.generator is None:
        raise InvalidArgument(f"model {mv.name!r} is not a generation model (no decoupled decode loop in its "
                              "config); use /infer or ModelInfer")
    return mv


async def generate(dp: DataPlane, model: str, version: str, text: str | bytes, params: dict, request_id: str = ""
                   ) -> AsyncIterator[str]:
    dp.inflight += 1
    t0 = time.perf_counter_ns()
    try:
        dp.admit()
        mv = _generator_of(dp, model, version)
        async for chunk in _chunks(dp, mv, text, params, t0):
            yield chunk
    finally:
        dp.inflight -= 1


def _prompt(mv: ModelVersion, request: InferRequest) -> str | bytes:
    name, _ = _names(mv)
    where = f"model {mv.name!r}"
    tensors = {t.name: t for t in request.inputs}
    if set(tensors) != {name}:
        raise InvalidArgument(f"{where}: a generation request has one input, {name!r} (BYTES, shape [1]), got "
                              f"{sorted(tensors) or 'none'}")
    t = tensors[name]
    if t.datatype != "BYTES" or t.shape not in ((1,), (1, 1)):
        raise InvalidArgument(f"{where} input {name!r}: expected BYTES shape [1], got {t.datatype} {list(t.shape)}")
    if t.raw is not None:
        return decode_bytes(t.raw, 1, f"{where} input {name!r}")[0]
    return typed_bytes(t.values or (), t.shape, 1, f"{where} input {name!r}", t.values_from)[0]


def _response(mv: ModelVersion, request: InferRequest, chunk: str | None, final: bool) -> InferResponse:
    _, out = _names(mv)
    outputs = [] if chunk is None else [OutputTensor(out, "BYTES", (1,), np.array([chunk.encode()], dtype=object))]
    return InferResponse(mv.name, mv.version_str, request.id, outputs, {FINAL: final})


async def stream_infer(dp: DataPlane, request: InferRequest, trace=None) -> AsyncIterator[InferResponse]:
    try:
        mv = dp.registry.lookup(request.model, request.version)
    except Exception:
        mv = None  # infer answers it (and loads the model in lazy mode)
    if mv is None or mv.generator is None:
        yield await dp.infer(request, trace)
        return
    params = dict(request.parameters)
    empty_final = params.pop(EMPTY_FINAL, False) is True
    prompt = _prompt(mv, request)
    held: str | None = None
    async for chunk in generate(dp, request.model, request.version, prompt, params, request.id):
        if empty_final:
            yield _response(mv, request, chunk, False)
        else:
            if held is not None:
                yield _response(mv, request, held, False)
            held = chunk
    yield _response(mv, request, None if empty_final else (held or ""), True)
