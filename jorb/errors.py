"""Every error jorb raises.

The tree::

    JorbError                      base: catch this to catch anything jorb raises
    ├── StateError                 bad declarations, or a run naming states the script lacks
    ├── RunFileError               a run file (or its journal) cannot be used
    │   ├── CorruptRunError        unreadable or wrong-shaped JSON; says where
    │   └── JournalConflictError   the run file was edited while its journal held unsaved work
    ├── RunLockedError             another process holds the run
    ├── CheckpointError            writing a checkpoint failed; the last good one is intact
    ├── ExecResultError            an exec returned something jorb cannot use (recorded on the job)
    ├── TimedOut                   an exec ran past its state's timeout (recorded on the job)
    ├── WorkerLost                 the pool worker running an exec died (recorded on the job)
    ├── RateLimited                raised *by an exec*: the API said "slow down"
    └── NoRetry                    raised *by an exec*: retrying cannot fix this failure

A JorbError raised to a script (from ``Run.open``, ``exec`` and the other entry points marked
with :func:`public`) carries no traceback through jorb's own code: Python shows the script's
line that called jorb, then the message, instead of burying the message under jorb's
internals. ``JORB_TRACEBACK=1`` in the environment keeps every frame (and chained cause).
"""

from __future__ import annotations

import datetime
import functools
import inspect
import math
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "CheckpointError",
    "CorruptRunError",
    "ExecResultError",
    "JorbError",
    "JournalConflictError",
    "NoRetry",
    "RateLimited",
    "RunFileError",
    "RunLockedError",
    "StateError",
    "TimedOut",
    "WorkerLost",
]


class JorbError(Exception):
    """Base of every error jorb raises."""


F = TypeVar("F", bound=Callable[..., Any])


def public(fn: F) -> F:
    """Mark an entry point of jorb's API: a JorbError leaving it loses jorb's own frames.

    The error then reads, under the caller's own line, as one line: its message. Set
    ``JORB_TRACEBACK=1`` to keep the whole traceback (debugging jorb itself).
    """
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def jorb_api_async(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except JorbError as error:
                if os.environ.get("JORB_TRACEBACK"):
                    raise
                raise error.with_traceback(None) from None  # (JORB_TRACEBACK=1 shows jorb's frames)

        return jorb_api_async  # type: ignore[return-value]

    @functools.wraps(fn)
    def jorb_api(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except JorbError as error:
            if os.environ.get("JORB_TRACEBACK"):
                raise
            raise error.with_traceback(None) from None  # (JORB_TRACEBACK=1 shows jorb's frames)

    return jorb_api  # type: ignore[return-value]


def exec_error(raised: BaseException) -> Exception:
    """The job's error for what an exec raised: an ``Exception`` is itself; any other exception
    (``GeneratorExit``, ``CancelledError``, a class derived from ``BaseException``) becomes a
    ``JorbError`` naming its type and message, with its traceback. A ``StopIteration``, which
    an asyncio future refuses, becomes a ``RuntimeError`` (as Python makes of one a coroutine
    raises).

    The caller has kept out what is not the job's: the engine's own cancellation, and a
    ``SystemExit`` or ``KeyboardInterrupt`` raised in the script's process (they stop the run;
    one raised in a pool's worker process is that job's error, and comes here).
    """
    error: Exception
    if isinstance(raised, StopIteration):
        error = RuntimeError("exec raised StopIteration")
    elif isinstance(raised, Exception):
        return raised
    else:
        try:
            said = str(raised)
        except Exception:  # (a __str__ that fails must not take the run down)
            said = ""
        kind = type(raised)
        name = kind.__qualname__
        if kind.__module__ != "builtins":
            name = f"{kind.__module__}.{name}"
        error = JorbError(f"the exec raised {name}{': ' if said else ''}{said}")
    error.__context__ = raised  # (kept for whoever looks, but the traceback shows the exec's
    error.__suppress_context__ = True  # frames once, as the error's own)
    return error.with_traceback(raised.__traceback__)


class StateError(JorbError):
    """State declarations are invalid, or a run names states that are not declared."""


class RunFileError(JorbError):
    """A run file or its journal cannot be used as it is."""


class CorruptRunError(RunFileError):
    """A run file is not valid JSON of the expected shape."""


class JournalConflictError(RunFileError):
    """The run file changed after a crash, before its journal was folded into it."""


class RunLockedError(JorbError):
    """Another process holds the run file."""


class CheckpointError(JorbError):
    """A checkpoint could not be written; the previous one on disk is intact."""


class ExecResultError(JorbError):
    """An exec returned a value jorb cannot use (bad shape, undeclared state, non-JSON ctx)."""


def _header_seconds(text: str) -> float | None:
    """A Retry-After header's text as seconds: a number ("2"), or an HTTP date (seconds from
    now, at least 0); None for anything else, which a server may well send."""
    try:
        return float(text)
    except ValueError:
        pass
    import email.utils  # (here: only a date needs it, and it is a heavy import)

    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # (RFC 9110 dates are GMT)
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - time.time())


class TimedOut(JorbError):
    """An exec attempt ran longer than its state's ``timeout``."""

    #: Where a ``def`` exec's thread was when it timed out (a ``traceback.StackSummary``), if
    #: known; an ``async def`` exec's place is in the cancellation it was given.
    stack: Any = None


class WorkerLost(JorbError):
    """The pool worker running an exec attempt died (killed, out of memory, a lost machine).

    Recorded on the job and retried or routed like any other error; the pool replaces the
    worker.
    """


class RateLimited(JorbError):
    """Raise from an exec when the service it calls says "slow down".

    The state's :class:`~jorb.Rate` is cut (halved, never below its floor), ``retry_after``
    seconds (when given) pause every state sharing that Rate, and the job is retried without
    using up its ``retries``::

        except httpx.HTTPStatusError as e:
            if e.response.status_code == 429:
                wait = e.response.headers.get("retry-after")
                raise jorb.RateLimited(retry_after=wait) from e
    """

    def __init__(
        self,
        retry_after: float | str | None = None,
        message: str = "rate limited",
        *,
        status: int | None = None,
    ) -> None:
        seconds = _header_seconds(retry_after) if isinstance(retry_after, str) else retry_after
        if seconds is not None:
            # Anything else that is not a number of seconds is the exec's mistake, raised
            # where it is made.
            if type(seconds) not in (int, float):
                raise TypeError(f"RateLimited(retry_after=...) takes seconds, not {seconds!r}")
            if not 0 <= seconds < math.inf:
                raise ValueError(f"RateLimited(retry_after=...) must be >= 0 s, not {seconds}")
            seconds = float(seconds)
        said = [f"HTTP {status}" if status is not None else "", ""]
        if seconds is not None:
            said[1] = f"retry after {seconds:g}s"
        details = ", ".join(part for part in said if part)
        super().__init__(f"{message} ({details})" if details else message)
        #: Seconds the service asked us to wait before calling again, if it said.
        self.retry_after: float | None = seconds
        #: The HTTP status (or other code) the service answered with, if the exec gave it.
        self.status = status
        self._said = message  # (the message as given, before the details were added)

    def __reduce__(self) -> tuple[Any, ...]:
        # (So one raised in a pool's worker process arrives with its retry_after and status.)
        return _rate_limited, (self.retry_after, self._said, self.status)


def _rate_limited(retry_after: float | None, message: str, status: int | None) -> RateLimited:
    return RateLimited(retry_after, message, status=status)


class NoRetry(JorbError):
    """Raise from an exec for a failure that retrying cannot fix (a 404, invalid input).

    The attempt is recorded like any error and the job is routed at once (to its state's
    ``on_error``, or the error state), its remaining ``retries`` unused::

        if response.status_code == 404:
            raise jorb.NoRetry(f"{ctx['repo']} does not exist")
    """
