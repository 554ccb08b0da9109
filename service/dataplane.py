"""The protocol-neutral data plane: every rule of the Open Inference Protocol lives here, once, for both front ends
(grpc_api, http_api). A front-end method converts its wire format to the neutral types of service.protocol, calls
one method here and converts the answer back; it holds no rule of its own.

Rules: admission (draining, --max-inflight), model lookup and readiness, metadata (the versions list), config,
statistics (with the --workers merge), the repository index, load and unload (the explicit-control guard), and
the inference path itself: check and decode the inputs, queue them on the batcher (or the sequence table), and hand
back the requested outputs (classification applied). The inference path is per request, so it stays short: dict
lookups, np.frombuffer views, no copy of a tensor.

Lazy mode (--model-control-mode lazy) costs a loaded model nothing: only a request whose lookup misses takes the
path that waits for a load (Registry.ensure). Metadata, config and readiness never load: ModelReady is false until
a request has loaded the model, and ModelMetadata / ModelConfig answer UNAVAILABLE "not loaded" (as Triton answers
for a model that is not loaded), so probes and index walkers cannot churn models through --max-loaded-models."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import numpy as np

from service import __version__, decoupled, logs
from service._proto import model_config_pb2
from service.config import parse_json
from service.errors import InvalidArgument, ModelLoadError, NotFound, Unavailable, Unimplemented, kind_of
from service.models import ModelVersion
from service.protocol import (
    REGION,
    InferRequest,
    InferResponse,
    OutputTensor,
    RequestedOutput,
    parameter_int,
)
from service.registry import READY, Registry
from service.shm import Lease, SharedMemory, region_args
from service.state import ServerState
from service.tensors import BYTES, decode_input, encode_bytes
from service.tracing import Trace, Tracing
from service.workers import SharedStats, merge

log = logging.getLogger("deepserve.access")
EXTENSIONS = ["classification", "sequence", "model_repository", "model_repository(unload_dependents)",
              "schedule_policy", "model_configuration", "statistics", "parameters", "binary_tensor_data", "trace",
              "logging", "generate"]
SYSTEM_SHARED_MEMORY = "system_shared_memory"  # advertised only with --allow-shared-memory: it works only then


class DataPlane:
    def __init__(self, registry: Registry, state: ServerState, max_inflight: int = 0, access_log: bool = False,
                 max_elements: int = 0, shared: SharedStats | None = None,
                 shared_memory: SharedMemory | None = None, tracing: Tracing | None = None) -> None:
        self.registry = registry
        self.state = state
        self.max_elements = max_elements
        self.max_inflight = max_inflight
        self.access_log = access_log
        self.shared = shared  # --workers: the other workers' statistics
        self.inflight = 0  # accepted and not yet answered; the drain on shutdown waits for 0
        self.shm = shared_memory or SharedMemory(allowed=False)
        self._touch = registry.residency.touch  # the eviction order, updated per request
        self.tracing = tracing or Tracing()  # off unless --trace-config or the trace extension turns it on

    # --- health and metadata ------------------------------------------------------------------------------------
    def live(self) -> bool:
        return self.state.live

    def ready(self) -> bool:
        return self.state.ready

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.registry.lookup(name, version)
        except (NotFound, Unavailable, InvalidArgument):
            return False
        return not self.state.draining

    def server_metadata(self) -> dict:
        extensions = EXTENSIONS + [SYSTEM_SHARED_MEMORY] if self.shm.allowed else list(EXTENSIONS)
        return {"name": "deepserve", "version": __version__, "extensions": extensions}

    def model_metadata(self, name: str, version: str = "") -> dict:
        mv = self._loaded(name, version)
        versions = [str(v) for v in sorted(self.registry.models[mv.name].ready)]
        return {**mv.metadata, "versions": versions}

    def model_config(self, name: str, version: str = "") -> model_config_pb2.ModelConfig:
        return self._loaded(name, version).config

    def _loaded(self, name: str, version: str) -> ModelVersion:
        """A serving version, or (lazy mode, nothing of it loaded) UNAVAILABLE saying what would load it."""
        try:
            return self.registry.lookup(name, version)
        except (NotFound, Unavailable):
            if not self.registry.loads_on_demand(name):
                raise
        model = self.registry.models[name]
        why = f" ({self.registry.reason(model)})" if model.state else ""
        raise Unavailable(f"model {name!r} is not loaded{why}; --model-control-mode lazy loads it on its next "
                          "inference request")

    def statistics(self, name: str = "", version: str = "") -> list[dict]:
        """Triton's ModelStatistics, one dict per model version, summed over --workers."""
        if name:
            if name not in self.registry.models:
                raise NotFound(f"unknown model {name!r}")
            versions = [mv for mv in self.registry.versions() if mv.name == name]
            if version:
                versions = [self.registry.lookup(name, version)]
        else:
            versions = list(self.registry.versions())
        stats = [mv.recorder.snapshot() for mv in versions]
        if self.shared:
            mine = {(m["name"], m["version"]): m for m in stats}
            for other in self.shared.others():
                for m in other:
                    if (m["name"], m["version"]) in mine:
                        merge(mine[(m["name"], m["version"])], m)
        return stats

    # --- repository ---------------------------------------------------------------------------------------------
    def repository_index(self, ready_only: bool = False) -> list[dict]:
        out = []
        for name in sorted(set(self.registry.names_on_disk()) | set(self.registry.models)):
            model = self.registry.models.get(name)
            if model is None or not model.state:
                if not ready_only:
                    out.append({"name": name, "version": "", "state": "", "reason": ""})
                continue
            for v, (state, reason) in sorted(model.state.items()):
                if ready_only and state != READY:
                    continue
                out.append({"name": name, "version": "" if v == 0 else str(v), "state": state, "reason": reason})
        return out

    def _explicit_only(self) -> None:
        if not self.state.explicit_control:
            raise Unavailable("explicit model load/unload is not allowed unless --model-control-mode explicit")

    async def load(self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None) -> None:
        """RepositoryModelLoad: (re)load from the repository, or from `files` (Triton's file:<path> parameters,
        which need a config). Answers INVALID_ARGUMENT when the load asked for did not happen, even while an older
        version keeps serving."""
        self._explicit_only()
        if files and config_json is None:
            raise InvalidArgument(f"load of {name!r}: model files need the config parameter too (as in Triton)")
        try:
            override = parse_json(config_json, "parameter config") if config_json is not None else None
            result = await self.registry.load(name, override, files or None)
        except ModelLoadError as exc:
            raise InvalidArgument(f"failed to load {name!r}: {exc}") from None
        self.state.changed()
        if result.failures:
            raise InvalidArgument(result.error())

    async def unload(self, name: str) -> None:
        self._explicit_only()
        await self.registry.unload(name)
        self.state.changed()

    # --- shared memory (Triton's extensions; service.shm has the safety rules) ----------------------------------
    def system_shared_memory_status(self, name: str = "") -> list[dict]:
        """[{name, key, offset, byte_size}] for one region or, with no name, every region."""
        return self.shm.status(name)

    def system_shared_memory_register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self.shm.register(name, key, offset, byte_size)

    def system_shared_memory_unregister(self, name: str = "") -> None:
        """One region, or all of them with no name; a region in use is closed when its requests finish."""
        self.shm.unregister(name)

    # CUDA shared memory: no region can be registered, so status and unregister answer for none, as a Triton built
    # without GPUs does (perf_analyzer --shared-memory system unregisters CUDA regions too, and reports an error
    # when that fails); register is UNIMPLEMENTED.
    def cuda_shared_memory_status(self, name: str = "") -> list[dict]:
        if name:
            raise NotFound(f"CUDA shared memory region {name!r} is not registered (CUDA shared memory is not "
                           "supported by this server)")
        return []

    def cuda_shared_memory_register(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        raise Unimplemented(f"CUDA shared memory region {name!r}: CUDA shared memory is not supported by this "
                            "server; use system shared memory (--allow-shared-memory) or send tensors in the request")

    def cuda_shared_memory_unregister(self, name: str = "") -> None:
        """Nothing is ever registered: a no-op, as system shared memory's unregister of an unknown name."""

    # --- inference ----------------------------------------------------------------------------------------------
    def admit(self) -> None:
        """Admission, for every request that runs a model (inflight is already counted)."""
        if self.state.draining:
            raise Unavailable("the server is shutting down")
        if self.max_inflight and self.inflight > self.max_inflight:
            raise Unavailable(f"server busy: {self.inflight - 1} requests in flight (--max-inflight); retry later")

    def generate(self, model: str, version: str, text: str | bytes, params: dict, request_id: str = ""
                 ) -> AsyncIterator[str]:
        """Text chunks of one generation (Triton's generate extension), for both front ends."""
        return decoupled.generate(self, model, version, text, params, request_id)

    def stream_infer(self, request: InferRequest, trace: Trace | None = None) -> AsyncIterator[InferResponse]:
        """ModelStreamInfer: one response for a plain model, N for a decoupled one (service.decoupled)."""
        return decoupled.stream_infer(self, request, trace)

    # --- trace and log settings (Triton's trace and logging extensions) ----------------------------------------
    def trace_settings(self, model: str = "", update: dict | None = None) -> dict:
        """Get, or update then get, the global (model "") or one model's trace settings, in Triton's JSON shape:
        {"trace_level": [..], "trace_rate": "N", ...}. Update values: a string, a list of strings, or None / []
        to clear. A model must be ready, as Triton asks."""
        if model and not self.model_ready(model):
            raise InvalidArgument(f"trace settings: unknown model {model!r} (no ready version)")
        return self.tracing.update(model, update) if update else self.tracing.get(model)

    def log_settings(self, update: dict | None = None) -> dict:
        """Get, or update then get, Triton's log settings: {"log_file": "", "log_info": bool, "log_warning": bool,
        "log_error": bool, "log_verbose_level": int, "log_format": str}; None values leave a setting as it is."""
        return logs.update_settings(update) if update else logs.get_settings()

    # --- inference ----------------------------------------------------------------------------------------------
    async def infer(self, request: InferRequest, trace: Trace | None = None) -> InferResponse:
        """`trace`: the front end's handle from Tracing.begin when this request is traced, else None (the
        untraced path costs one `is None` test per layer). One coroutine, no helper layers: it runs per request."""
        self.inflight += 1
        code, version = "OK", request.version
        t0 = time.perf_counter_ns()
        try:
            if trace is not None:
                trace.span.set_attribute("request_id", request.id)
            self.admit()
            waited_ns = 0
            try:
                mv = self.registry.lookup(request.model, request.version)
            except (NotFound, Unavailable):
                if not self.registry.loads_on_demand(request.model):
                    raise
                mv = await self._load_on_demand(request)
                waited_ns = time.perf_counter_ns() - t0
            if mv.generator is not None:
                raise Unimplemented(f"model {mv.name!r} is decoupled (generation): ModelInfer and /infer do not "
                                    "support models with a decoupled transaction policy, as in Triton; use "
                                    f"ModelStreamInfer or /v2/models/{mv.name}/generate(_stream)")
            version = mv.version_str  # the version that serves it, also when the request named none
            rec = mv.recorder
            rec.arrived()
            mv.active += 1  # no await since the lookup: a version about to serve is never seen idle
            self._touch(mv.name)
            lease = self.shm.lease() if request.shared_memory else None
            try:
                feeds, rows = decode_request(request, mv, self.max_elements, lease)
                wanted = requested_outputs(request, mv, lease)
                timeout_us = _timeout_us(request, mv.name) if request.parameters else 0
                if timeout_us and waited_ns:  # the wait for a lazy load came out of it
                    timeout_us = max(1, timeout_us - waited_ns // 1000)
                if trace is not None:
                    trace.admitted(version, rows, request.inputs)
                if mv.sequences is None:
                    outputs = await mv.batcher.submit(feeds, rows, timeout_us, trace)
                else:
                    outputs = await mv.sequences.step(feeds, rows, request.parameters, timeout_us, trace)
                response = InferResponse(mv.name, version, request.id, _outputs(mv, outputs, wanted, lease))
                if trace is not None:
                    trace.answered(response.outputs)
            except BaseException as exc:
                rec.request_raised(t0, exc)
                raise
            finally:
                rec.left()
                mv.active -= 1
                if lease is not None:
                    lease.release()
            rec.request_ok(time.perf_counter_ns() - t0, rows)
            return response
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = kind_of(exc)
            raise
        finally:
            self.inflight -= 1
            if self.access_log:
                log.info("infer", extra={"request_id": request.id, "model": request.model, "version": version,
                                         "status": code,
                                         "duration_ms": round((time.perf_counter_ns() - t0) / 1e6, 3)})

    async def _load_on_demand(self, request: InferRequest) -> ModelVersion:
        """Lazy mode, the lookup missed: wait for the model's (shared) load within the request's timeout, then
        look it up again with no await in between, so the caller counts the request before anything can evict
        what just loaded."""
        timeout_us = _timeout_us(request, request.model)
        await self.registry.ensure(request.model, timeout_us)
        return self.registry.lookup(request.model, request.version)


def _timeout_us(request: InferRequest, model: str) -> int:
    if "timeout" not in request.parameters:
        return 0
    value = parameter_int(request.parameters, "timeout", f"model {model!r}")
    if value < 0:
        raise InvalidArgument(f"model {model!r}: parameter timeout must be >= 0 microseconds, got {value}")
    return value


SIGNATURES_KEPT = 1024  # request signatures remembered per model version (a variable-shape model can make many)


def decode_request(request: InferRequest, mv: ModelVersion, max_elements: int = 0, lease: Lease | None = None
                   ) -> tuple[dict[str, np.ndarray], int]:
    """Inputs as numpy arrays in the model's input order, and the batch size (rows) they share. Inputs that name a
    shared memory region are views of it (`lease` holds the regions).

    A request of raw numeric inputs whose signature (names, datatypes, shapes, in order) passed every check before
    only has its byte counts checked: the checks depend on nothing else (the element limit is part of the key)."""
    inputs = request.inputs
    if lease is None and mv.text is None:
        key = (max_elements, *[(t.name, t.datatype, t.shape) for t in inputs])
        known = mv.signatures.get(key)
        if known is not None:
            feeds = {}
            for i, name, dtype, nbytes in known[0]:
                t = inputs[i]
                raw = t.raw
                if raw is None or len(raw) != nbytes:
                    break  # the full checks say what is wrong
                feeds[name] = np.frombuffer(raw, dtype).reshape(t.shape)
            else:
                return feeds, known[1]
        feeds, rows = _decode_request(request, mv, max_elements, lease)
        if all(t.raw is not None for t in inputs) and all(a.dtype != object for a in feeds.values()):
            index = {t.name: i for i, t in enumerate(inputs)}
            if len(mv.signatures) >= SIGNATURES_KEPT:
                mv.signatures.clear()
            mv.signatures[key] = ([(index[n], n, a.dtype, a.nbytes) for n, a in feeds.items()], rows)
        return feeds, rows
    return _decode_request(request, mv, max_elements, lease)


def _decode_request(request: InferRequest, mv: ModelVersion, max_elements: int, lease: Lease | None
                    ) -> tuple[dict[str, np.ndarray], int]:
    where = f"model {mv.name!r}"
    if not request.inputs:
        raise InvalidArgument(f"{where}: the request has no inputs; expected {_names(mv.inputs)}")
    decoded: dict[str, np.ndarray] = {}
    text = mv.text
    used = 0  # elements decoded so far: --max-elements bounds the whole request
    for tensor in request.inputs:
        name = tensor.name
        if lease is not None and REGION in tensor.parameters:
            lease.read_input(tensor, f"{where} input {name!r}")
        if text is not None and name == text.name:
            if text.target in decoded:
                raise InvalidArgument(f"{where}: send {text.name!r} or {text.target!r}, not both, and once")
            arr = decoded[text.target] = text.decode(f"{where} input {name!r}", tensor, mv.max_batch, max_elements,
                                                     used)
        else:
            spec = mv.inputs.get(name)
            if spec is None:
                raise InvalidArgument(f"{where}: unknown input {name!r}; expected {_names(mv.inputs)}")
            if name in decoded:
                if text is not None and name == text.target:
                    raise InvalidArgument(f"{where}: send {text.name!r} or {text.target!r}, not both")
                raise InvalidArgument(f"{where}: input {name!r} appears twice")
            arr = decoded[name] = decode_input(f"{where} input {name!r}", spec, tensor, mv.max_batch, max_elements,
                                               used)
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


def requested_outputs(request: InferRequest, mv: ModelVersion, lease: Lease | None = None) -> list[RequestedOutput]:
    """What to answer, in request order; every output when none is named. An output's shared memory region is
    checked here, before the model runs."""
    requested = request.outputs
    if not requested:
        return [RequestedOutput(n, binary=request.binary_outputs) for n in mv.outputs]
    for out in requested:
        if out.name not in mv.outputs:
            raise InvalidArgument(f"model {mv.name!r}: unknown output {out.name!r}; the model has "
                                  f"{_names(mv.outputs)}")
        k = out.classification
        if isinstance(k, bool) or not isinstance(k, int) or k < 0 or (k == 0 and "classification" in out.parameters):
            raise InvalidArgument(f"model {mv.name!r} output {out.name!r}: classification must be a positive "
                                  f"int64 (top k), got {k!r}")
        if lease is not None and REGION in out.parameters:
            where = f"model {mv.name!r} output {out.name!r}"
            lease.check(*region_args(out.parameters, where), where)
    return requested


def _outputs(mv: ModelVersion, outputs: dict[str, np.ndarray], wanted: list[RequestedOutput],
             lease: Lease | None = None) -> list[OutputTensor]:
    """The reply's outputs, in request order; those requested in shared memory are written there and marked with
    their region parameters (the front ends then send no contents for them)."""
    out = []
    for w in wanted:
        arr = outputs[w.name]
        if w.classification:
            arr = classify(arr, w.classification, mv.labels.get(w.name) or _labels_like(mv, arr.shape[-1]), mv,
                           w.name)
            dtype = BYTES
        else:
            dtype = mv.outputs[w.name].dtype
        tensor = OutputTensor(w.name, dtype.wire, arr.shape, arr, w.binary)
        if lease is not None and REGION in w.parameters:
            where = f"model {mv.name!r} output {w.name!r}"
            data = encode_bytes(arr) if dtype is BYTES else \
                np.ascontiguousarray(arr, dtype=dtype.numpy).reshape(-1).view(np.uint8)
            tensor.parameters = lease.write_output(w.parameters, data, where)
        out.append(tensor)
    return out


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
