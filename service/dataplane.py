"""The inference path between the servicer and the batcher: look the model up, check and decode the inputs,
queue them, and encode the requested outputs into raw_output_contents. Everything here is per request, so it
stays short: dict lookups, np.frombuffer views, one tobytes per output."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from service._proto import inference_pb2
from service.errors import InvalidArgument, Unavailable, status_of
from service.models import ModelVersion
from service.registry import Registry
from service.tensors import BYTES, decode_input, to_raw

log = logging.getLogger("deepserve.access")
InferRequest = inference_pb2.ModelInferRequest
InferResponse = inference_pb2.ModelInferResponse


class DataPlane:
    def __init__(self, registry: Registry, max_inflight: int = 0, access_log: bool = False,
                 max_elements: int = 0) -> None:
        self.registry = registry
        self.max_elements = max_elements
        self.max_inflight = max_inflight
        self.access_log = access_log
        self.inflight = 0  # accepted and not yet answered; the drain on shutdown waits for 0

    async def infer(self, request: InferRequest) -> InferResponse:
        self.inflight += 1
        code, version = "OK", request.model_version
        t0 = time.perf_counter_ns()
        try:
            if self.max_inflight and self.inflight > self.max_inflight:
                raise Unavailable(f"server busy: {self.inflight - 1} requests in flight (--max-inflight); retry "
                                  "later")
            response = await self._infer(request, t0)
            version = response.model_version  # the version that served it, also when the request named none
            return response
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = status_of(exc).name
            raise
        finally:
            self.inflight -= 1
            if self.access_log:
                log.info("infer", extra={"request_id": request.id, "model": request.model_name, "version": version,
                                         "status": code,
                                         "duration_ms": round((time.perf_counter_ns() - t0) / 1e6, 3)})

    async def _infer(self, request: InferRequest, t0: int) -> InferResponse:
        mv = self.registry.lookup(request.model_name, request.model_version)
        rec = mv.recorder
        rec.pending.inc()
        try:
            feeds, rows = decode_request(request, mv, self.max_elements)
            wanted = requested_outputs(request, mv)
            timeout_us = _timeout_us(request, mv)
            if mv.sequences is None:
                outputs = await mv.batcher.submit(feeds, rows, timeout_us)
            else:
                outputs = await mv.sequences.step(feeds, rows, request.parameters, timeout_us)
            response = encode_response(request, mv, outputs, wanted)
        except asyncio.CancelledError:
            rec.request_failed(time.perf_counter_ns() - t0, "CANCELLED")
            raise
        except Exception as exc:
            rec.request_failed(time.perf_counter_ns() - t0, status_of(exc).name)
            raise
        finally:
            rec.pending.dec()
        rec.request_ok(time.perf_counter_ns() - t0, rows)
        return response


def _timeout_us(request: InferRequest, mv: ModelVersion) -> int:
    p = request.parameters.get("timeout")
    if p is None:
        return 0
    value = p.int64_param or p.uint64_param
    if value < 0:
        raise InvalidArgument(f"model {mv.name!r}: parameter timeout must be >= 0 microseconds, got {value}")
    return value


def decode_request(request: InferRequest, mv: ModelVersion, max_elements: int = 0
                   ) -> tuple[dict[str, np.ndarray], int]:
    """Inputs as numpy arrays in the model's input order, and the batch size (rows) they share."""
    inputs, raws = request.inputs, request.raw_input_contents
    where = f"model {mv.name!r}"
    if not inputs:
        raise InvalidArgument(f"{where}: the request has no inputs; expected {_names(mv.inputs)}")
    if raws and len(raws) != len(inputs):
        raise InvalidArgument(f"{where}: {len(raws)} raw_input_contents for {len(inputs)} inputs; "
                              "send one raw entry per input, in order")
    decoded: dict[str, np.ndarray] = {}
    text = mv.text
    used = 0  # elements decoded so far: --max-elements bounds the whole request
    for i, tensor in enumerate(inputs):
        name = tensor.name
        has_typed = tensor.HasField("contents") and tensor.contents.ByteSize() > 0
        if raws and has_typed:
            raise InvalidArgument(f"{where} input {name!r}: both raw_input_contents and typed contents are set; "
                                  "use one")
        if not raws and not has_typed and any(d != 0 for d in tensor.shape):
            raise InvalidArgument(f"{where} input {name!r}: no contents (neither raw_input_contents nor typed "
                                  "contents)")
        raw = raws[i] if raws else None
        if text is not None and name == text.name:
            if text.target in decoded:
                raise InvalidArgument(f"{where}: send {text.name!r} or {text.target!r}, not both, and once")
            arr = decoded[text.target] = text.decode(f"{where} input {name!r}", tensor, raw, mv.max_batch,
                                                     max_elements, used)
        else:
            spec = mv.inputs.get(name)
            if spec is None:
                raise InvalidArgument(f"{where}: unknown input {name!r}; expected {_names(mv.inputs)}")
            if name in decoded:
                if text is not None and name == text.target:
                    raise InvalidArgument(f"{where}: send {text.name!r} or {text.target!r}, not both")
                raise InvalidArgument(f"{where}: input {name!r} appears twice")
            arr = decoded[name] = decode_input(f"{where} input {name!r}", spec, tensor, raw, mv.max_batch,
                                               max_elements, used)
        used += arr.size
    feeds = {n: decoded[n] for n in mv.inputs if n in decoded}
    missing = [n for n, s in mv.inputs.items() if n not in feeds and not s.optional]
    if missing:
        raise InvalidArgument(f"{where}: missing input{'s' * (len(missing) > 1)} {missing}; expected "
                              f"{_names(mv.inputs)}")
    if mv.max_batch <= 0:
        return feeds, 1
    sizes = {a.shape[0] for a in feeds.values()}
    if len(sizes) != 1:
        raise InvalidArgument(f"{where}: inputs disagree on the batch size: "
                              f"{ {n: a.shape[0] for n, a in feeds.items()} }")
    rows = sizes.pop()
    if rows == 0:
        raise InvalidArgument(f"{where}: batch size 0; send at least one sample")
    return feeds, rows


def requested_outputs(request: InferRequest, mv: ModelVersion) -> list[tuple[str, int]]:
    """(output name, classification top-k or 0), in request order; all outputs when none is named."""
    if not request.outputs:
        return [(n, 0) for n in mv.outputs]
    wanted = []
    for out in request.outputs:
        if out.name not in mv.outputs:
            raise InvalidArgument(f"model {mv.name!r}: unknown output {out.name!r}; the model has "
                                  f"{_names(mv.outputs)}")
        k = 0
        p = out.parameters.get("classification")
        if p is not None:
            k = p.int64_param or p.uint64_param
            if k <= 0:
                raise InvalidArgument(f"model {mv.name!r} output {out.name!r}: classification must be a positive "
                                      f"int64 (top k), got {p}")
        wanted.append((out.name, k))
    return wanted


def encode_response(request: InferRequest, mv: ModelVersion, outputs: dict[str, np.ndarray],
                    wanted: list[tuple[str, int]]) -> InferResponse:
    response = InferResponse(model_name=mv.name, model_version=mv.version_str, id=request.id)
    for name, k in wanted:
        arr = outputs[name]
        spec = mv.outputs[name]
        if k:
            arr = classify(arr, k, mv.labels.get(name) or _labels_like(mv, arr.shape[-1]), mv, name)
            dtype = BYTES
        else:
            dtype = spec.dtype
        response.outputs.add(name=name, datatype=dtype.wire, shape=arr.shape)
        response.raw_output_contents.append(to_raw(arr, dtype))
    return response


def classify(arr: np.ndarray, k: int, labels: list[str] | None, mv: ModelVersion, name: str) -> np.ndarray:
    """Triton's classification extension: the top k classes of the last axis as BYTES "score:index[:label]"."""
    if arr.ndim == 0 or arr.dtype == object:
        raise InvalidArgument(f"model {mv.name!r} output {name!r}: classification needs a numeric class axis")
    k = min(k, arr.shape[-1])
    flat = arr.reshape(-1, arr.shape[-1])
    top = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    out = np.empty(top.shape, dtype=object)
    for r, row in enumerate(top):
        for j, idx in enumerate(row):
            label = f":{labels[idx]}" if labels and idx < len(labels) else ""
            out[r, j] = f"{float(flat[r, idx]):f}:{int(idx)}{label}".encode()
    return out.reshape(arr.shape[:-1] + (k,))


def _labels_like(mv: ModelVersion, classes: int) -> list[str] | None:
    return next((ls for ls in mv.labels.values() if len(ls) == classes), None)


def _names(specs) -> str:
    return ", ".join(f"{s.name} {s.dtype.wire} {list(s.shape)}" for s in specs.values())
