"""Turning what an exec did into a journal record: the rules for success, failure and retry.

Pure functions over a job and an outcome; the processor applies the record and writes it.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import ExecResultError, NoRetry, RateLimited
from .model import Job, Kick, Next
from .states import State

__all__ = ["failure", "success"]


def success(
    states: Mapping[str, State],
    job: Job,
    result: Any,
    next_id: int,
    started: float,
    now: float,
    keys: Callable[[], Mapping[str, str]] = dict,
) -> tuple[dict[str, Any], list[Job]]:
    """The record of an exec that returned; raises ExecResultError if the value is unusable.

    Children get ids from ``next_id`` on; they are created but not registered in the run. A
    success leaves no attempts, throttles or backoff behind, so its record names none of them
    (a :class:`Next` with a delay sets the job's ``not_before``). ``keys()`` gives the run's
    job ids by key: a kick whose key is there (or earlier in the same answer) adds nothing.
    """
    kicks: Sequence[Kick]
    usual = type(result) is tuple and len(result) == 2  # (ctx, next_state), checked cheaply
    if usual and type(result[0]) is dict and type(result[1]) is str:
        (ctx, next_state), kicks = result, ()
    else:
        ctx, next_state, kicks = _unpack(result)
    if type(next_state) is Next:
        return _next(states, job, ctx, next_state, kicks, next_id, started, now, keys)
    if next_state not in states:
        raise ExecResultError(f"returned undeclared state {next_state!r}")
    record: dict[str, Any] = {
        "job": job.id,
        "to": next_state,
        "ctx": ctx,
        # The history entry as ``step`` makes it, written out: this runs once per transition.
        "history": {"from": job.state, "to": next_state, "time": now, "duration": now - started},
    }
    if not kicks:
        return record, []
    return _kick(states, job, record, kicks, next_id, now, keys)


def _next(
    states: Mapping[str, State],
    job: Job,
    ctx: dict[str, Any],
    go: Next,
    kicks: Sequence[Kick],
    next_id: int,
    started: float,
    now: float,
    keys: Callable[[], Mapping[str, str]],
) -> tuple[dict[str, Any], list[Job]]:
    """The record of an exec that returned a :class:`Next`: a transition with a delay, and a
    poll (back to the job's own state) counted instead of entered in the history."""
    to, delay, priority = go.state, go.delay, go.priority
    if not isinstance(to, str) or to not in states:
        raise ExecResultError(f"returned jorb.Next to undeclared state {to!r}")
    if delay is not None and (type(delay) not in (int, float) or not 0 <= delay < 1e12):
        raise ExecResultError(f"jorb.Next's delay must be seconds >= 0, not {delay!r}")
    if priority is not None and type(priority) is not int:
        raise ExecResultError(f"jorb.Next's priority must be an int, not {priority!r}")
    record: dict[str, Any] = {"job": job.id, "to": to, "ctx": ctx}
    if to == job.state:
        record["polls"] = job.polls + 1
    else:
        record["history"] = step(job.state, to, now, started)
    if delay:
        record["not_before"] = now + delay
    if priority is not None:
        record["priority"] = priority
    if not kicks:
        return record, []
    return _kick(states, job, record, kicks, next_id, now, keys)


def _kick(
    states: Mapping[str, State],
    job: Job,
    record: dict[str, Any],
    kicks: Sequence[Kick],
    next_id: int,
    now: float,
    keys: Callable[[], Mapping[str, str]],
) -> tuple[dict[str, Any], list[Job]]:
    """Add the children an exec kicked to its record (those whose key exists are left out)."""
    kids: list[Job] = []
    kicked_keys: set[str] = set()
    for kick in kicks:
        if not isinstance(kick, Kick):
            raise ExecResultError(f"kicks must be jorb.Kick objects, got {type(kick).__name__}")
        if kick.state not in states:
            raise ExecResultError(f"kicked a job into undeclared state {kick.state!r}")
        if not isinstance(kick.ctx, dict):
            raise ExecResultError(f"a kick's ctx must be a dict, not {type(kick.ctx).__name__}")
        if type(kick.priority) is not int:
            raise ExecResultError(f"a kick's priority must be an int, not {kick.priority!r}")
        delay = kick.delay
        if delay is not None and (type(delay) not in (int, float) or not 0 <= delay < 1e12):
            raise ExecResultError(f"a kick's delay must be seconds >= 0, not {delay!r}")
        key = kick.key
        if key is not None:
            if type(key) is not str or not key:
                raise ExecResultError(f"a kick's key must be a non-empty string, not {key!r}")
            if key in kicked_keys or key in keys():
                continue  # at most one job per key
            kicked_keys.add(key)
        not_before = now + kick.delay if kick.delay else None
        kid = Job(str(next_id), kick.state, kick.ctx, job.id, kick.priority, not_before, key=key)
        kids.append(kid)
        next_id += 1
    if not kids:
        return record, []
    record["kids"] = kids
    record["next_id"] = next_id
    return record, kids


def failure(
    state: State,
    job: Job,
    error: Exception,
    *,
    error_state: str,
    retry_in: float | None,
    started: float,
    now: float,
) -> tuple[dict[str, Any], bool]:
    """The record of a failed attempt, and whether the job gave up (was routed away).

    A ``RateLimited`` uses the separate ``rate_limit_retries`` budget, a ``NoRetry`` gives up
    at once, anything else uses the state's ``retries``. ``retry_in`` is the backoff before the
    next attempt (None: at once).
    """
    limited = isinstance(error, RateLimited)
    attempts, throttled = job.attempts, job.throttled
    if limited:
        throttled += 1
        give_up = throttled > state.rate_limit_retries
    else:
        attempts += 1
        give_up = attempts > state.retries or isinstance(error, NoRetry)
    record: dict[str, Any] = {
        "job": job.id,
        "in": state.name,
        "error": {
            "message": _message(error),
            "type": _type_name(error),
            "traceback": "".join(traceback.format_exception(error)),
            "time": now,
            "attempt": job.attempts + job.throttled + 1,
            "rate_limited": limited,
        },
    }
    if give_up:  # routed away: like a success, it resets (so leaves out) the counts and backoff
        to = state.on_error or error_state
        record.update(to=to, history=step(state.name, to, now, started))
    else:
        not_before = None if retry_in is None else now + retry_in
        record.update(to=state.name, attempts=attempts, throttled=throttled, not_before=not_before)
    return record, give_up


def step(source: str, to: str, now: float, started: float) -> dict[str, Any]:
    """A record's history entry, as the file writes it (applied, it becomes a plain tuple)."""
    return {"from": source, "to": to, "time": now, "duration": now - started}


def _unpack(result: Any) -> tuple[dict[str, Any], str | Next, Sequence[Kick]]:
    if not isinstance(result, tuple | list) or len(result) not in (2, 3):
        raise ExecResultError(
            f"an exec must return (ctx, next_state) or (ctx, next_state, kicks), "
            f"not {_describe(result)}"
        )
    ctx, next_state = result[0], result[1]
    kicks = result[2] if len(result) == 3 else ()
    if not isinstance(ctx, dict):
        raise ExecResultError(f"the returned ctx must be a dict, not {type(ctx).__name__}")
    if not isinstance(next_state, str | Next):
        raise ExecResultError(
            f"the returned next state must be a str or a jorb.Next, not {next_state!r}"
        )
    if kicks is None:
        kicks = ()
    if not isinstance(kicks, list | tuple):
        raise ExecResultError(f"kicks must be a list of jorb.Kick, not {type(kicks).__name__}")
    return ctx, next_state, kicks


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _message(error: BaseException) -> str:
    try:
        return str(error) or type(error).__name__
    except Exception:  # an error type whose __str__ fails must not take the run down with it
        return f"{type(error).__name__} (its message could not be read)"


def _type_name(error: BaseException) -> str:
    kind = type(error)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"
