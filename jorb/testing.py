"""Helpers for testing jorb workflows (and jorb itself) without waiting for real time.

``jorb.testing.run(main())`` runs a coroutine on an event loop whose clock is virtual: whenever
every task is blocked on a timer, the clock jumps straight to the next timer. Rates, delays,
backoffs and timeouts then cost no wall time, and a test can assert on ``loop.time()``. Work
handed to threads (``def`` execs, the journal writer) is waited for in real time, and the clock
does not jump while any is outstanding.
"""

from __future__ import annotations

import asyncio
import math
import selectors
import time
from collections.abc import Callable, Coroutine, Sized
from concurrent.futures import Executor
from typing import Any, TypeVar

__all__ = ["FakeClockLoop", "run", "settle"]

T = TypeVar("T")

#: The least a real monotonic clock moves between two readings that differ.
_RESOLUTION = time.get_clock_info("monotonic").resolution


class _JumpingSelector(selectors.DefaultSelector):
    """A selector that advances its loop's virtual clock instead of sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: FakeClockLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        loop = self.loop
        assert loop is not None
        ready = super().select(0)
        if ready:
            return ready
        if timeout == 0:
            if not loop.callbacks_ready():
                # Woken only by a timer due now: a real clock would have ticked meanwhile. Tick
                # too, or a timer that keeps rescheduling itself "now" (aiolimiter rounding a
                # wait down to nothing) spins forever at one instant.
                loop.tick()
            return ready
        if loop.threads_busy or timeout is None:
            # Something real is in flight (a thread) or nothing is scheduled: wait for real.
            return super().select(None if timeout is None else min(timeout, 1.0))
        loop.advance(timeout)
        return []


class FakeClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is virtual and jumps when every task is blocked."""

    def __init__(self, start: float = 0.0) -> None:
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self
        self._now = start
        #: Executor jobs (threads) started and not yet finished.
        self.threads_busy = 0

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the virtual clock forward."""
        self._now += max(0.0, seconds)

    def tick(self) -> None:
        """Move the virtual clock by the least a real clock would (its resolution, 1 ns)."""
        self._now = max(self._now + _RESOLUTION, math.nextafter(self._now, math.inf))

    def callbacks_ready(self) -> int:
        """How many callbacks are queued to run now (asyncio's own ready queue)."""
        ready: Sized = self._ready  # type: ignore[attr-defined]
        return len(ready)

    def run_in_executor(  # type: ignore[override]
        self, executor: Executor | None, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self.threads_busy += 1
        future.add_done_callback(self._thread_done)
        return future

    def _thread_done(self, _future: asyncio.Future[Any]) -> None:
        self.threads_busy -= 1


def run(main: Coroutine[Any, Any, T], *, start: float = 0.0) -> T:
    """Run ``main`` to completion on a new :class:`FakeClockLoop`."""
    with asyncio.Runner(loop_factory=lambda: FakeClockLoop(start)) as runner:
        return runner.run(main)


async def settle(rounds: int = 20) -> None:
    """Let every ready task run until the loop has nothing left to do right now."""
    for _ in range(rounds):
        await asyncio.sleep(0)
