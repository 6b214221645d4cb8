"""Status snapshots and the listener protocol.

The processor keeps per-state counters as it goes (in its ``Lanes``) and hands listeners frozen
snapshots of them, made by :func:`snapshot`: a progress display or a metrics exporter reads only
these, never the jobs themselves. Imports nothing of jorb's at run time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import asyncio

    from .lanes import Lanes
    from .states import State

__all__ = ["StateStatus", "Status", "StatusListener", "snapshot"]


@dataclass(frozen=True, slots=True)
class StateStatus:
    """One state at one moment."""

    name: str
    """The state's name."""
    terminal: bool
    """Whether the state is terminal (it then only counts jobs)."""
    jobs: int
    """Jobs in the state now."""
    waiting: int = 0
    """Jobs ready to start (not delayed, not running)."""
    delayed: int = 0
    """Jobs held back by a delay or a retry's backoff."""
    awaiting: int = 0
    """Jobs waiting for their children to finish (fan-in: ``State(..., join=True)``)."""
    running: int = 0
    """Execs in flight (including ones whose result is being written)."""
    done: int = 0
    """Execs that finished and moved their job on, since this process started."""
    errors: int = 0
    """Failed attempts (including rate limits and timeouts), since this process started."""
    failed: int = 0
    """Jobs routed out of the state after using up their retries."""
    paused: bool = False
    """Whether new starts in the state are paused."""
    concurrency: int = 0
    """The state's concurrency limit (0 for terminal states)."""
    rate: float | None = None
    """The state's current adaptive rate in starts per second, if it has a Rate."""
    paused_until: float | None = None
    """Unix time until which the server's ``retry_after`` pauses the state's starts, while it
    does (see ``Rate(max_pause=...)``)."""


@dataclass(frozen=True, slots=True)
class Status:
    """The whole run at one moment: a row per declared state, in declaration order."""

    states: tuple[StateStatus, ...]
    """Per-state snapshots."""
    jobs: int
    """All jobs in the run."""
    finished: int
    """Jobs in terminal states."""
    elapsed: float
    """Seconds since this exec started."""
    transitions: int
    """Execs settled (successes and failures) since this exec started."""

    @property
    def complete(self) -> bool:
        """Whether every job is in a terminal state."""
        return self.finished == self.jobs


class StatusListener(Protocol):
    """What a processor tells a listener (a progress display, a test, a metrics exporter)."""

    def start(self, status: Status) -> None:
        """The exec began; ``status`` is the run as loaded."""

    def update(self, status: Status) -> None:
        """Periodically while running (a few times a second at most)."""

    def note(self, message: str) -> None:
        """A one-line notice for the user (a paused state, a change applied)."""

    def stop(self, status: Status) -> None:
        """The exec ended (complete, interrupted or failed); ``status`` is the last word."""


def snapshot(
    states: Mapping[str, State],
    lanes: Lanes,
    transitions: int,
    started: float,
    loop: asyncio.AbstractEventLoop | None,
    now: Callable[[], float],
) -> Status:
    """The counters of ``lanes`` as a frozen ``Status`` (cheap: no scan of the jobs).

    ``started`` is when the exec started (``time.monotonic()``, 0 if it has not), ``loop`` the
    exec's loop (None if none runs) and ``now()`` Unix time, read from that loop's clock.
    """
    rows = []
    for name, state in states.items():
        lane = lanes.by_name.get(name)
        if lane is None:
            rows.append(StateStatus(name, True, lanes.counts.get(name, 0)))
            continue
        rate = lane.rate
        busy = lane.running + lane.delayed + lane.awaiting
        paused_until = None
        if rate.paused_until and loop is not None:
            left = rate.paused_until - loop.time()
            paused_until = now() + left if left > 0 else None
        rows.append(
            StateStatus(
                name,
                False,
                lane.jobs,
                waiting=max(0, lane.jobs - busy),
                delayed=lane.delayed,
                awaiting=lane.awaiting,
                running=lane.running,
                done=lane.done,
                errors=lane.errors,
                failed=lane.failed,
                paused=lane.paused,
                concurrency=state.concurrency,
                rate=None if rate.n == math.inf else rate.current / rate.per,
                paused_until=paused_until,
            )
        )
    finished = sum(lanes.counts.values())
    total = finished + sum(lane.jobs for lane in lanes.by_name.values())
    elapsed = time.monotonic() - started if started else 0.0
    return Status(tuple(rows), total, finished, elapsed, transitions)
