"""Which model versions are serving. Lookups are dict reads on the event loop; loads run in worker threads and
swap in only when complete, so a failed (re)load never takes down the version that is serving, and a replaced
version finishes its in-flight requests before it is dropped. In lazy mode (--model-control-mode lazy) a model
loads on its first request, one load shared by every request that waits for it; residency.Residency keeps the
loaded models within --max-loaded-models / --max-loaded-bytes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service import uploads
from service._proto import model_config_pb2
from service.batcher import Batcher
from service.config import check, read_config
from service.errors import InvalidArgument, ModelLoadError, NotFound, Unavailable
from service.metrics import Metrics
from service.models import ModelVersion, load_version
from service.repository import Source, model_names, read_config_bytes, select, source
from service.residency import Residency, version_bytes

log = logging.getLogger("deepserve.registry")
READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


@dataclass
class Model:
    name: str
    ready: dict[int, ModelVersion] = field(default_factory=dict)
    state: dict[int, tuple[str, str]] = field(default_factory=dict)  # version -> (state, reason); 0 = the model
    default: ModelVersion | None = None  # the highest ready version: what a request without a version gets
    source: Source | None = None
    # Should serve: False once unloaded by request or its folder removed. As in Triton, such a model no longer
    # counts against server readiness; a (re)load makes it wanted again.
    wanted: bool = True
    sizes: dict[int, int] = field(default_factory=dict)  # version -> bytes on disk when it loaded

    def refresh_default(self) -> None:
        self.default = self.ready[max(self.ready)] if self.ready else None


@dataclass
class LoadResult:
    """What one (re)load did. A load that fails only partly still leaves the old versions serving, which is why
    a caller must look here and not only at whether something serves (RepositoryModelLoad answers an error)."""

    model: Model
    failures: list[str] = field(default_factory=list)  # "model: why" / "version N: why"; empty: all loaded

    def error(self) -> str:
        serving = sorted(self.model.ready)
        still = f"; still serving version{'s' * (len(serving) > 1)} {', '.join(map(str, serving))}" if serving \
            else ""
        return f"failed to load {self.model.name!r}: {'; '.join(self.failures)}{still}"


class Registry:
    def __init__(self, root: Path, metrics: Metrics, cores: int = 0, lazy: bool = False, max_models: int = 0,
                 max_bytes: int = 0) -> None:
        self.root = root
        self.metrics = metrics
        self.cores = cores  # this process's share of the machine, for onnxruntime's thread counts
        self.lazy = lazy  # a request for a scanned model that is not loaded loads it (ensure)
        self.models: dict[str, Model] = {}
        self.residency = Residency(self, metrics, max_models, max_bytes)
        self._locks: dict[str, asyncio.Lock] = {}
        self._on_demand: dict[str, asyncio.Task] = {}  # model -> the one lazy load its waiting requests share
        self.on_change: Callable[[], None] = lambda: None  # ServerState.changed: health follows lazy loads

    # --- the request path -------------------------------------------------------------------------------------
    def lookup(self, name: str, version: str = "") -> ModelVersion:
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"unknown model {name!r}" + (f"; serving: {', '.join(sorted(self.models))}"
                                                         if self.models else "; no model is loaded"))
        if not version:
            if model.default is None:
                raise Unavailable(f"model {name!r} is not ready: {self.reason(model)}")
            return model.default
        try:
            v = int(version)
        except ValueError:
            raise InvalidArgument(f"model {name!r}: version {version!r} is not an integer") from None
        mv = model.ready.get(v)
        if mv is None:
            if v in model.state:
                state, reason = model.state[v]
                raise Unavailable(f"model {name!r} version {v} is {state}: {reason}")
            raise NotFound(f"model {name!r} has no version {v}; serving {sorted(model.ready) or 'none'}")
        return mv

    def reason(self, model: Model) -> str:
        reasons = [f"{'model' if v == 0 else f'version {v}'} {s}: {r}" for v, (s, r) in sorted(model.state.items())
                   if s != READY]
        return "; ".join(reasons) or "no version loaded"

    @property
    def all_ready(self) -> bool:
        """Every model that should serve does (ServerReady with --strict-readiness)."""
        return all(m.default is not None for m in self.models.values() if m.wanted)

    def versions(self):
        for model in self.models.values():
            yield from model.ready.values()

    def busy_loading(self, name: str) -> bool:
        lock = self._locks.get(name)
        return lock is not None and lock.locked()

    # --- lazy mode ----------------------------------------------------------------------------------------------
    def scan(self) -> None:
        """Lazy mode's start: every model folder becomes known, none loads. A scanned model is not `wanted`: a
        load that fails on demand is that request's error, not a reason for the server to stop being ready."""
        for name in self.names_on_disk():
            self.models.setdefault(name, Model(name, wanted=False))

    def loads_on_demand(self, name: str) -> bool:
        """Whether a request for `name` that missed the lookup should load it: lazy mode, a scanned model, and
        nothing of it serving (a missing or failed version of a loaded model is an answer, not a load)."""
        model = self.models.get(name)
        return self.lazy and model is not None and not model.ready

    async def ensure(self, name: str, timeout_us: int = 0) -> None:
        """Wait for `name` to load (lazy mode), within the request's timeout (0: none). Concurrent callers share
        one load; a failed load raises UNAVAILABLE (NOT_FOUND: the folder went away) with its reason in every one
        of them, and the next request after it tries again (nothing retries on its own). A waiting request keeps
        the model from being evicted until it is queued (the caller looks it up with no await in between)."""
        task = self._on_demand.get(name)
        if task is None:
            task = self._on_demand[name] = asyncio.get_running_loop().create_task(self._load_on_demand(name))
        waiting = self.residency.waiting
        waiting[name] = waiting.get(name, 0) + 1
        try:
            failure = await asyncio.wait_for(asyncio.shield(task), timeout_us / 1e6 if timeout_us else None)
        except TimeoutError:
            raise Unavailable(f"model {name!r} is still loading after the request's timeout of {timeout_us} us; "
                              "retry") from None
        finally:
            left = waiting.pop(name) - 1
            if left:
                waiting[name] = left
        if failure is not None:
            kind, message = failure
            raise kind(message)  # a fresh exception per waiting request

    async def _load_on_demand(self, name: str) -> tuple[type[NotFound | Unavailable], str] | None:
        """One lazy load: None when something serves, else why not (returned, not raised, so that a load whose
        waiters all gave up leaves no unretrieved exception behind)."""
        try:
            result = await self.load(name)
            return (Unavailable, result.error()) if result.failures and not result.model.ready else None
        except (NotFound, Unavailable) as exc:  # the folder went away; no room to load it
            return type(exc), str(exc)
        finally:
            self._on_demand.pop(name, None)  # at once: the next request after a failure starts a new load
            self.on_change()  # once per load (and the evictions it made), not once per waiting request

    # --- control ------------------------------------------------------------------------------------------------
    def names_on_disk(self) -> list[str]:
        return model_names(self.root)

    async def load(self, name: str, override: model_config_pb2.ModelConfig | None = None,
                   files: dict[str, bytes] | None = None) -> LoadResult:
        """(Re)load every version the policy selects. New versions warm up beside the serving ones and then take
        the traffic; a version that fails keeps its serving predecessor. Raises NotFound for no such folder.
        With `files` (Triton's `file:<path>` load parameters, checked by uploads.check) the model is loaded from
        those bytes, staged in a private folder, instead of from the repository; `override` is then required."""
        if files is None and name not in self.names_on_disk():
            raise NotFound(f"no model folder {name!r} in the repository")
        checked = uploads.check(name, files) if files is not None else None  # a bad request, not a load failure
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            try:
                if checked is not None:
                    with uploads.stage(name, checked) as model_dir:
                        return await self._load(name, override, model_dir)
                return await self._load(name, override)
            except Unavailable:  # no room under --max-loaded-models / --max-loaded-bytes: the caller's answer
                raise
            except Exception as exc:  # a bug or a surprise in one model's load never takes the server down
                log.exception("model %s: unexpected load failure", name)
                model = self.models.setdefault(name, Model(name))
                return LoadResult(model, [self._failed(model, 0, f"unexpected: {exc}")])

    async def _load(self, name: str, override: model_config_pb2.ModelConfig | None,
                    model_dir: Path | None = None) -> LoadResult:
        model_dir = model_dir or self.root / name
        model = self.models.setdefault(name, Model(name))
        model.wanted = True
        # The snapshot comes first and the load works from it: a config or version that changes meanwhile differs
        # from what is remembered, so the next poll loads it; an unchanged bad config is not retried every poll.
        data = read_config_bytes(model_dir)
        model.source = source(model_dir, "model.onnx", data)
        try:
            if override is not None:
                config, explicit = override, True
                check(config, name)
            else:
                config, explicit = read_config(model_dir, data), data is not None
            filename = config.default_model_filename or "model.onnx"
            if filename != model.source.filename:
                model.source = source(model_dir, filename, data)
            wanted = select(config.version_policy, model.source.available)
            if not wanted:
                found, available = [v for v, _, _ in model.source.versions], model.source.available
                raise ModelLoadError("no version to serve: " + (
                    f"version policy selects none of {available}" if available else
                    f"version folders {found}, none holds {filename}" if found else "no version folder"))
        except ModelLoadError as exc:
            return LoadResult(model, [self._failed(model, 0, str(exc))])
        need = version_bytes(model_dir, wanted)
        try:
            await self.residency.make_room(name, need)
        except Unavailable as exc:
            log.warning("%s", exc)
            if not model.ready:  # refused for room: shown in the index, and no reason for the server to be unready
                model.state, model.wanted = {0: (UNAVAILABLE, str(exc))}, False
            raise
        try:
            return await self._load_versions(model, model_dir, config, explicit, wanted)
        finally:
            self._settle(model)

    async def _load_versions(self, model: Model, model_dir: Path, config: model_config_pb2.ModelConfig,
                             explicit: bool, wanted: list[int]) -> LoadResult:
        name, loop = model.name, asyncio.get_running_loop()
        model.state.pop(0, None)
        result = LoadResult(model)
        new: dict[int, ModelVersion] = {}
        for v in wanted:
            model.state[v] = (LOADING, "")
            try:
                mv = await loop.run_in_executor(None, load_version, model_dir, v, config, explicit, self.metrics,
                                                self.cores)
                mv.batcher = Batcher(f"{name}:{v}", mv.instances, mv.config, mv.recorder)
            except ModelLoadError as exc:
                result.failures.append(self._failed(model, v, str(exc)))
                continue
            except Exception as exc:  # a bug or an onnxruntime surprise: still never take the server down
                log.exception("model %s version %d: unexpected load failure", name, v)
                result.failures.append(self._failed(model, v, f"unexpected: {exc}"))
                continue
            mv.batcher.start()
            if mv.generator:
                mv.generator.start()
            if mv.sequences:
                mv.sequences.start(mv.batcher)
            new[v] = mv
            model.sizes[v] = version_bytes(model_dir, [v])
            model.state[v] = (READY, "")
            self.metrics.model_info.labels(name, str(v), mv.config.platform, mv.providers[0]).set(1)
        old = model.ready
        failed = bool(result.failures)
        # Old versions give way only to a complete load: if any wanted version failed, whatever served before
        # and was not replaced keeps serving (a corrupt v3 never takes v2 down).
        keep = {v: mv for v, mv in old.items() if v not in new and (failed or v in wanted)}
        model.ready = {**keep, **new}
        model.refresh_default()
        self._settle(model)
        if new:
            self.metrics.loads.labels(name).inc()
        retired = [mv for v, mv in old.items() if model.ready.get(v) is not mv]
        for mv in retired:
            if mv.version not in wanted:
                model.state.pop(mv.version, None)
            self._hand_over(mv, model, new)
        await self._retire(retired)
        return result

    def _settle(self, model: Model) -> None:
        """Hold what serves now (its real size) or release the room a load reserved; at every swap."""
        if model.ready:
            self.residency.loaded(model.name, sum(model.sizes.get(v, 0) for v in model.ready))
        else:
            self.residency.release(model.name)

    @staticmethod
    def _hand_over(old: ModelVersion, model: Model, new: dict[int, ModelVersion]) -> None:
        """A stateful version's live sequences go to the new version that takes its traffic (the same version
        number reloaded, else the new default), when their state has the same shape: a swap loses no sequence.
        Runs at the swap, with no await between, so no step can see a version in between."""
        if old.sequences is None:
            return
        successor = new.get(old.version) or next((mv for mv in new.values() if mv is model.default), None)
        live = len(old.sequences.live)
        if successor is not None and successor.sequences is not None and successor.sequences.adopt(old.sequences):
            log.info("model %s: %d live sequences handed from version %d to version %d", model.name, live,
                     old.version, successor.version)
        elif live:
            log.warning("model %s: %d live sequences end with version %d (no successor with the same state)",
                        model.name, live, old.version)

    def _failed(self, model: Model, version: int, reason: str) -> str:
        """Record a failure where RepositoryIndex, ModelReady, the log and the metric show it; returns it."""
        what = "model" if version == 0 else f"version {version}"
        log.error("model %s %s failed to load: %s", model.name, what, reason)
        self.metrics.load_failures.labels(model.name).inc()
        serving = model.ready if version == 0 else model.ready.get(version)
        model.state[version] = (READY, f"reload failed, still serving: {reason}") if serving else (UNAVAILABLE,
                                                                                                   reason)
        return f"{what}: {reason}"

    async def unload(self, name: str, why: str = "unloaded") -> None:
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"unknown model {name!r}")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            model.wanted = False
            retired = list(model.ready.values())
            model.ready, model.default = {}, None
            self.residency.release(name)
            model.state = {mv.version: (UNLOADING, "") for mv in retired}
            await self._retire(retired)
            model.state = {v: (UNAVAILABLE, why) for v in model.state} or {0: (UNAVAILABLE, why)}

    async def _retire(self, versions: list[ModelVersion]) -> None:
        """Let each version answer what it accepted, then free it. Sequence steps first (even those still waiting
        behind their sequence's lock need the batcher), then the batcher's queue."""
        for mv in versions:
            if mv.sequences:
                await mv.sequences.retire()
            if mv.batcher:
                await mv.batcher.stop()
            if mv.generator:
                await mv.generator.stop()
            info = (mv.name, mv.version_str, mv.config.platform, mv.providers[0])
            self.metrics.model_info.labels(*info).set(0)  # multiprocess mode keeps removed series: zero it first
            self.metrics.model_info.remove(*info)
            log.info("model %s version %d unloaded", mv.name, mv.version)

    def changed(self, name: str) -> bool:
        """Whether the folder differs from the snapshot its last load worked from (loaded or failed)."""
        model = self.models.get(name)
        if model is None or model.source is None or not model.wanted:  # a removed folder that came back loads
            return True
        model_dir = self.root / name
        try:
            return source(model_dir, model.source.filename, read_config_bytes(model_dir)) != model.source
        except OSError:
            return True
