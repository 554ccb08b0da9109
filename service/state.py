"""What ServerLive / ServerReady / health report, in one place, for both front ends. Listeners (the gRPC health
service) are told after every change, so nothing polls it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from service.registry import Registry


@dataclass
class ServerState:
    registry: Registry
    strict: bool = True  # ready only when every model that should serve does (--strict-readiness)
    explicit_control: bool = False  # --model-control-mode explicit: the repository load/unload calls are allowed
    live: bool = True
    loaded: bool = False  # the start-up load (or scan, in lazy mode) has finished
    stopping: bool = False  # SIGTERM seen: not ready any more
    draining: bool = False  # grace period over: new requests are refused
    listeners: list[Callable[[ServerState], None]] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.loaded and not self.stopping and (self.registry.all_ready or not self.strict)

    def model_serving(self, name: str) -> bool:
        model = self.registry.models.get(name)
        return model is not None and model.default is not None and not self.stopping

    def changed(self) -> None:
        for listener in self.listeners:
            listener(self)
