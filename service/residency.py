"""Which models are held in memory, and room for one more under --max-loaded-models / --max-loaded-bytes.

A load that would exceed a limit first unloads the least recently used idle models. "Idle" is read from counters
the data plane already keeps per version (requests in flight or queued, live sequences) and from the requests
waiting for a lazy load, so deciding costs no lock on the request path; the LRU order is one OrderedDict
move_to_end per request (O(1), no allocation).

Bytes are the model files' size on disk (every file in the served version folders): known before the load, the same
on every machine and every run, and for ONNX models the weights dominate what onnxruntime keeps resident (RSS
would be a better measure only if one process held one model; here all share one heap and one arena)."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import Unavailable
from service.metrics import Metrics

if TYPE_CHECKING:
    from service.registry import Registry

log = logging.getLogger("deepserve.residency")
EVICTED = "unloaded: least recently used"


def version_bytes(model_dir: Path, versions: list[int]) -> int:
    """What the listed version folders hold on disk (model file, external weights, card): the load's size."""
    total = 0
    for v in versions:
        folder = model_dir / str(v)
        if folder.is_dir():
            total += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return total


class Residency:
    def __init__(self, registry: Registry, metrics: Metrics, max_models: int = 0, max_bytes: int = 0) -> None:
        self.registry = registry
        self.metrics = metrics
        self.max_models = max_models  # 0: no limit
        self.max_bytes = max_bytes
        self.held: dict[str, int] = {}  # model -> bytes, for every model in memory or being loaded into it
        self.recent: OrderedDict[str, None] = OrderedDict()  # loaded models, least recently used first
        self.waiting: dict[str, int] = {}  # model -> requests waiting for its (lazy) load: not idle
        self._room = asyncio.Lock()  # one decision at a time, so two loads never count the same free slot

    @property
    def bounded(self) -> bool:
        return bool(self.max_models or self.max_bytes)

    def touch(self, name: str) -> None:
        """A request used `name`: it goes to the back of the eviction order."""
        try:  # noqa: SIM105 - contextlib.suppress would build an object per request
            self.recent.move_to_end(name)
        except KeyError:  # a version retiring after its model was unloaded: nothing to order
            pass

    def idle(self, name: str) -> bool:
        """No request in flight or queued, none waiting for it to load, no live sequence, no (re)load under way."""
        model = self.registry.models.get(name)
        if model is None:
            return True
        if self.waiting.get(name) or self.registry.busy_loading(name):
            return False
        return all(mv.active == 0 and not (mv.sequences and mv.sequences.live) for mv in model.ready.values())

    async def make_room(self, name: str, need: int) -> None:
        """Unload least recently used idle models until `name` (`need` bytes) fits, then count it as held, so a
        concurrent load sees it. Raises Unavailable, with the reason, when nothing idle is left to unload."""
        if not self.bounded:
            self._hold(name, need)
            return
        async with self._room:
            if self.max_bytes and need > self.max_bytes:
                raise Unavailable(f"cannot load {name!r}: it needs {need} bytes, more than --max-loaded-bytes "
                                  f"{self.max_bytes}")
            while (why := self._over(name, need)) is not None:
                victim = next((n for n in self.recent if n != name and self.idle(n)), None)
                if victim is None:
                    raise Unavailable(f"cannot load {name!r}: {why}, all busy")
                log.info("model %s unloaded to make room for %s (%s)", victim, name, why)
                self.metrics.evictions.labels(victim).inc()
                await self.registry.unload(victim, EVICTED)
            self._hold(name, need)

    def _over(self, name: str, need: int) -> str | None:
        """Why `name` does not fit now, or None when it does (its own current bytes give way to the new ones)."""
        others = {n: b for n, b in self.held.items() if n != name}
        if self.max_models and len(others) + 1 > self.max_models:
            return f"{len(others)} model{'s' * (len(others) != 1)} loaded (--max-loaded-models {self.max_models})"
        if self.max_bytes and sum(others.values()) + need > self.max_bytes:
            return (f"it needs {need} bytes and {sum(others.values())} of {self.max_bytes} are held "
                    f"(--max-loaded-bytes {self.max_bytes})")
        return None

    def _hold(self, name: str, nbytes: int) -> None:
        self.held[name] = nbytes
        self._publish()

    def loaded(self, name: str, nbytes: int) -> None:
        """A load ended with versions serving: hold their real size, as the most recently used model."""
        self._hold(name, nbytes)
        self.recent[name] = None
        self.recent.move_to_end(name)

    def release(self, name: str) -> None:
        """The model serves nothing any more (unloaded, or its load failed)."""
        self.held.pop(name, None)
        self.recent.pop(name, None)
        self._publish()

    def _publish(self) -> None:
        self.metrics.loaded_models.set(len(self.held))
        self.metrics.loaded_bytes.set(sum(self.held.values()))
