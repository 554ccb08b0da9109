"""The asyncio event loop the server (and the bench's ceilings, so that they measure the same loop) runs on."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], event_loop: str = "uvloop") -> T:
    """Run `main` on the chosen event loop. uvloop (libuv) does the loop's own per-request work (callbacks, futures,
    polling) in C: interleaved A/B on digits_cnn with perf_analyzer, main-thread CPU per request 1,073 -> 857 us
    over gRPC at 32 in flight, 390 -> 315 us over HTTP at 32 and 647 -> 443 us at 4 (2026-12-02). grpc.aio and
    uvicorn both run on it; `--event-loop asyncio` is the standard library's loop."""
    factory = None
    if event_loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
