"""States and Rates: what a user declares, and the checks made before any work starts."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiolimiter import AsyncLimiter

from .errors import StateError
from .model import plain_name

if TYPE_CHECKING:
    from .executor import Pool
    from .model import Run

__all__ = ["CANCELLED", "ExecFn", "Rate", "State", "check_jobs", "exec_name", "validate"]

#: The terminal state ``jorb cancel`` moves jobs to unless told otherwise (declared for you).
CANCELLED = "cancelled"

_RESOLUTION = time.get_clock_info("monotonic").resolution

#: ``(app, overall, ctx) -> (ctx, next_state[, kicks])``, plain or ``async``.
ExecFn = Callable[[Any, dict[str, Any], dict[str, Any]], Any | Awaitable[Any]]


class Rate:
    """``n`` exec starts per ``per`` seconds (burst of ``n``), adapting to "slow down" answers.

    ``api = jorb.Rate(5, per=1.0)`` then ``State("call", exec=call, rate=api)``; give the same
    object to several states and they share one budget.

    The rate adapts (AIMD): when an exec raises :class:`~jorb.RateLimited` it is halved (cuts
    within ``interval`` seconds of the last count as one), never below ``floor`` (default
    ``n / 32``); after each ``interval`` (default 1 s) with successes it climbs by ``step``
    (default ``n / 10``) back toward ``n``. The burst shrinks with the rate. A ``retry_after``
    pauses every state sharing the Rate; when the pause ends, starts resume one at a time at
    the current rate, without a burst. A pause is never longer than ``max_pause`` seconds
    (default 300): a server asking for a day is taken at its word for five minutes, and jorb
    says so. A plain error (a 500, a timeout) never slows a Rate: jorb cannot tell overload
    from a bug, the exec can, and raises ``RateLimited`` when it means "slow down". Time is
    the event loop's clock, so tests can fake it; a Rate used on a new event loop keeps its
    current rate but forgets pauses timed on the old one.
    """

    __slots__ = (
        "_last_cut",
        "_last_step",
        "_limiter",
        "_loop",
        "current",
        "floor",
        "interval",
        "max_pause",
        "n",
        "paused_until",
        "per",
        "step",
    )

    def __init__(
        self,
        n: float,
        per: float = 1.0,
        *,
        floor: float | None = None,
        step: float | None = None,
        interval: float = 1.0,
        max_pause: float = 300.0,
    ) -> None:
        if not (isinstance(n, int | float) and 0 < n < math.inf):
            raise StateError(f"Rate(n={n!r}): n must be a positive number of starts")
        if not (isinstance(per, int | float) and 0 < per < math.inf):
            raise StateError(f"Rate(per={per!r}): per must be a positive number of seconds")
        floor = n / 32 if floor is None else floor
        step = n / 10 if step is None else step
        if not 0 < floor <= n:
            raise StateError(f"Rate(floor={floor!r}): the floor must be > 0 and <= n={n}")
        if step <= 0 or interval <= 0:
            raise StateError("Rate: step and interval must be positive")
        if not (isinstance(max_pause, int | float) and 0 <= max_pause < math.inf):
            raise StateError(f"Rate(max_pause={max_pause!r}): a number of seconds >= 0")
        #: The configured (maximum) number of starts per ``per`` seconds.
        self.n = float(n)
        #: The period, in seconds.
        self.per = float(per)
        #: The lowest the adaptive rate goes, in starts per ``per``.
        self.floor = float(floor)
        #: How much the rate climbs back per ``interval`` of successes.
        self.step = float(step)
        #: Seconds between two adjustments (one cut or one step at most per interval).
        self.interval = float(interval)
        #: The rate in force now, in starts per ``per`` (between ``floor`` and ``n``).
        self.current = float(n)
        #: Loop time until which no start may happen (set by ``retry_after``).
        self.paused_until = 0.0
        #: The longest pause a ``retry_after`` may impose, in seconds.
        self.max_pause = float(max_pause)
        self._last_cut = -math.inf
        self._last_step = -math.inf
        self._limiter: AsyncLimiter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def unlimited(cls) -> Rate:
        """A lane of its own for a state without a Rate: no limit, but it can be paused."""
        rate = cls(1.0)
        rate.n = rate.current = math.inf
        return rate

    def __repr__(self) -> str:
        if self.n == math.inf:
            return "<Rate unlimited>"
        return f"<Rate {self.current:g}/{self.per:g}s (max {self.n:g}, floor {self.floor:g})>"

    async def acquire(self) -> None:
        """Wait until a start is allowed: past any pause, then within the rate."""
        loop = asyncio.get_running_loop()
        self._follow(loop)
        while True:
            # (Within the clock's resolution counts as over: asyncio fires timers that early,
            # and waiting again would spin without the clock moving.)
            while (wait := self.paused_until - loop.time()) > _RESOLUTION:
                await asyncio.sleep(wait)
            if self._limiter is None:
                return
            await self._limiter.acquire()
            if self.paused_until <= loop.time():
                return
            # A pause began while this start waited for the rate: it waits the pause out too.

    def limited(self, now: float, retry_after: float | None) -> float | None:
        """Record a "slow down" at loop time ``now``: cut the rate, pause for ``retry_after``
        (at most ``max_pause``). Returns the pause taken, in seconds (None if none asked)."""
        self._follow(None)
        if retry_after is not None:
            retry_after = min(retry_after, self.max_pause)
        if now - self._last_cut >= self.interval and self.n != math.inf:
            self.current = max(self.floor, self.current / 2)
            self._last_cut = self._last_step = now
            self._apply()
        if retry_after is not None and retry_after > 0 and now + retry_after > self.paused_until:
            self.paused_until = now + retry_after
            self._hold()
        return retry_after

    def succeeded(self, now: float) -> None:
        """Record a success at loop time ``now``: climb one step if an interval has passed."""
        self._follow(None)
        if self.current >= self.n or now - self._last_step < self.interval:
            return
        self.current = min(self.n, self.current + self.step)
        self._last_step = now
        self._apply()

    def _follow(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Bind to the running loop; times kept from another loop's clock mean nothing here."""
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # called outside any loop (a unit test): keep only the numbers
                self._loop = self._limiter = None
                return
        if loop is self._loop:
            return
        self._loop = loop
        self.paused_until = 0.0
        self._last_cut = self._last_step = -math.inf
        self._limiter = None
        if self.n != math.inf:
            self._limiter = AsyncLimiter(self.n, self.per)
            self._apply()

    def _apply(self) -> None:
        # aiolimiter drains its bucket at _rate_per_sec and allows a burst of max_rate: both
        # follow the current rate (a burst of at least one start). The room left in the bucket
        # is kept, so a change of rate never opens a burst by itself.
        limiter = self._limiter
        if limiter is not None:
            burst = max(1.0, self.current)
            limiter._leak()
            limiter._level = max(0.0, limiter._level + burst - limiter.max_rate)
            limiter.max_rate = burst
            limiter.time_period = self.per * burst / self.current
            limiter._rate_per_sec = self.current / self.per

    def _hold(self) -> None:
        # Fill the bucket so that it drains to "one start allowed" exactly when the pause
        # ends: starts then resume at the current rate instead of in a burst.
        limiter = self._limiter
        if limiter is not None:
            limiter._leak()
            ahead = (self.paused_until - limiter._last_check) * limiter._rate_per_sec
            limiter._level = max(limiter._level, limiter.max_rate - 1 + ahead)


@dataclass(frozen=True, slots=True)
class State:
    """One state a job can be in.

    ``State("clone", exec=clone, concurrency=8, rate=api, retries=3, on_error="failed")``;
    ``State("done", terminal=True)``.
    """

    name: str
    """The state's name, as it appears in the run file."""
    exec: ExecFn | None = None
    """``(app, overall, ctx)``; ``async def`` runs on the loop, ``def`` in a worker thread."""
    terminal: bool = field(default=False, kw_only=True)
    """A terminal state has no exec; a run is complete when every job is in one."""
    concurrency: int = field(default=1, kw_only=True)
    """At most this many execs of the state in flight at once."""
    rate: Rate | None = field(default=None, kw_only=True)
    """Bounds exec starts; shared by every state given the same object."""
    retries: int = field(default=0, kw_only=True)
    """How many more attempts after a failed one, before routing to ``on_error``."""
    on_error: str | None = field(default=None, kw_only=True)
    """Where a job goes when its retries are used up (default: the processor's error state)."""
    timeout: float | None = field(default=None, kw_only=True)
    """Seconds each attempt may take; a timeout is an error like any other."""
    backoff: float = field(default=1.0, kw_only=True)
    """Seconds before the first retry; doubles each attempt, with jitter."""
    backoff_max: float = field(default=300.0, kw_only=True)
    """Longest wait between two retries, in seconds."""
    rate_limit_retries: int = field(default=100, kw_only=True)
    """How many ``RateLimited`` attempts in a row before the job is routed as failed."""
    join: bool = field(default=False, kw_only=True)
    """Fan-in: a job here waits, holding no slot, until every child it kicked is terminal;
    the exec then takes a fourth argument, ``children``: a list of :class:`~jorb.Child`."""
    pool: Pool | None = field(default=None, kw_only=True)
    """Where the execs run: None is this process; a :class:`~jorb.ProcessPool` (or
    ``jorb.dask.DaskPool``) sends them to its workers, with the app each worker made."""

    def __post_init__(self) -> None:
        # A name may be a str enum's member: the state keeps the plain str (what jobs hold and
        # the file says), so the member and its value are one state everywhere.
        object.__setattr__(self, "name", plain_name(self.name))
        object.__setattr__(self, "on_error", plain_name(self.on_error))
        if self.exec is not None and callable(self.exec):
            problem = _signature_problem(self.exec, self.join)
            if problem is not None:
                raise StateError(f"state {self.name!r}: {problem}")

    @property
    def is_async(self) -> bool:
        """Whether the exec is a coroutine function (runs on the event loop)."""
        fn: Any = self.exec
        return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
        )

    def retry_delay(self, attempt: int, jitter: float) -> float:
        """Backoff before retry number ``attempt`` (1-based); ``jitter`` in [0, 1)."""
        base: float = min(self.backoff_max, self.backoff * 2.0 ** (attempt - 1))
        return base * (0.5 + jitter / 2)


def exec_name(fn: Any) -> str:
    """How to name an exec to its author: ``fetch (crawl.py:12)``, where it is defined."""
    name = str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)
    name = name.rpartition("<locals>.")[2]  # (a function defined in a function)
    code = getattr(inspect.unwrap(fn), "__code__", None)
    if code is None:  # an object with a __call__, or a functools.partial
        inner = getattr(fn, "func", None) or getattr(type(fn), "__call__", None)  # noqa: B004
        code = getattr(inner, "__code__", None)
    if code is None:
        return name
    return f"{name} ({short_path(code.co_filename)}:{code.co_firstlineno})"


def short_path(filename: str) -> str:
    """A file's path relative to the current directory when it is below it."""
    try:
        relative = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if relative.startswith("..") else relative


def _signature_problem(fn: Any, join: bool) -> str | None:
    """Why ``fn`` cannot be called as an exec (``join``: with ``children`` too), or None."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # (a callable written in C may have no signature to read: it is called)
    wanted = ("app", "overall", "ctx", "children") if join else ("app", "overall", "ctx")
    try:
        signature.bind(*wanted)
    except TypeError:
        pass
    else:
        return None
    call = f"({', '.join(wanted)})"
    if not join:
        with contextlib.suppress(TypeError):
            signature.bind(*wanted, "children")
            return (
                f"exec {exec_name(fn)} takes {signature} but is called as {call}; a fourth "
                f"argument, children, is given only in a state declared with join=True"
            )
    why = " (a join state's exec also receives its children)" if join else ""
    return f"exec {exec_name(fn)} takes {signature} but is called as {call}{why}"


def validate(states: Iterable[State], error_state: str) -> dict[str, State]:
    """Check declarations and return them by name; the error state and ``cancelled`` are added
    (terminal) if undeclared.

    Raises :class:`StateError` naming every culprit.
    """
    declared = list(states)
    by_name: dict[str, State] = {}
    problems: list[str] = []
    for state in declared:
        if not isinstance(state, State):
            raise StateError(f"expected jorb.State, got {type(state).__name__}: {state!r}")
        if state.name in by_name:
            problems.append(f"state {state.name!r} is declared twice")
        by_name.setdefault(state.name, state)
    if error_state not in by_name:
        by_name[error_state] = State(error_state, terminal=True)
        declared.append(by_name[error_state])
    elif not by_name[error_state].terminal:
        problems.append(f"error state {error_state!r} must be terminal")
    if CANCELLED not in by_name:  # where `jorb cancel` moves jobs unless told otherwise
        by_name[CANCELLED] = State(CANCELLED, terminal=True)
        declared.append(by_name[CANCELLED])
    for state in declared:
        problems.extend(_check(state, by_name))
    if problems:
        raise StateError("invalid states: " + "; ".join(problems))
    return by_name


def _check(state: State, by_name: dict[str, State]) -> Iterable[str]:
    name = state.name
    if not isinstance(name, str) or not name:
        yield f"state name {name!r} must be a non-empty string"
    if state.terminal:
        if state.exec is not None:
            yield f"terminal state {name!r} has an exec"
        if state.timeout is not None:
            yield f"terminal state {name!r} has a timeout"
        if state.join:
            yield f"terminal state {name!r} cannot join (it has no exec to receive children)"
        if state.pool is not None:
            yield f"terminal state {name!r} has a pool (it has no exec to run there)"
        return
    if state.exec is None or not callable(state.exec):
        yield f"state {name!r} is not terminal and has no callable exec"
    if not isinstance(state.concurrency, int) or state.concurrency < 1:
        yield f"state {name!r}: concurrency must be an int >= 1, not {state.concurrency!r}"
    if not isinstance(state.retries, int) or state.retries < 0:
        yield f"state {name!r}: retries must be an int >= 0, not {state.retries!r}"
    if state.pool is not None and not all(
        callable(getattr(state.pool, m, None)) for m in ("start", "call", "close")
    ):
        yield (
            f"state {name!r}: pool must be a jorb.ProcessPool or jorb.dask.DaskPool, "
            f"not {type(state.pool).__name__}"
        )
    if state.rate is not None and not isinstance(state.rate, Rate):
        yield f"state {name!r}: rate must be a jorb.Rate, not {type(state.rate).__name__}"
    if state.on_error is not None and state.on_error not in by_name:
        yield f"state {name!r}: on_error names undeclared state {state.on_error!r}"
    if state.timeout is not None and not (
        isinstance(state.timeout, int | float) and state.timeout > 0
    ):
        yield f"state {name!r}: timeout must be a positive number of seconds"
    if state.backoff < 0 or state.backoff_max < 0:
        yield f"state {name!r}: backoff and backoff_max must be >= 0"
    if state.rate_limit_retries < 0:
        yield f"state {name!r}: rate_limit_retries must be >= 0"


def check_jobs(run: Run, states: Mapping[str, State]) -> None:
    """Check that every job of ``run`` is in a declared state; raises :class:`StateError`
    naming the others and how to move them."""
    unknown: dict[str, list[str]] = {}
    for job in run.jobs.values():
        if job.state not in states:
            unknown.setdefault(job.state, []).append(job.id)
    if unknown:
        detail = "; ".join(
            f"{state!r} (jobs {', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})"
            for state, ids in sorted(unknown.items())
        )
        if run.path is not None and run.path.exists():
            fix = f"move the jobs (`jorb redrive {run.path} --from S --to T`)"
        else:  # only in memory so far: nothing on disk to redrive
            fix = "add the jobs in a declared state (`run.add_job(ctx, state=...)`)"
        if "new" in unknown:
            fix += "; `add_job` puts a job in 'new' unless it is given a state"
        raise StateError(
            f"{run.path}: jobs are in states the script does not declare: {detail}. "
            f"Declare them, or {fix}"
        )
