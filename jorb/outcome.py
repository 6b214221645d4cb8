"""Turning what an exec did into a journal record: the rules for success, failure and retry.

Pure functions over a job and an outcome; the processor applies the record and writes it.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from .errors import ExecResultError, NoRetry, RateLimited, TimedOut
from .model import Job, Kick, Next
from .states import State, exec_name
from .tracebacks import user_traceback, where_stopped

__all__ = ["failure", "not_json", "success"]


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
        ctx, next_state, kicks = _unpack(result, states.get(job.state))
    if type(next_state) is Next:
        return _next(states, job, ctx, next_state, kicks, next_id, started, now, keys)
    if next_state not in states:
        raise _undeclared(states, job, f"returned undeclared state {next_state!r}", next_state)
    next_state = states[next_state].name  # (a StrEnum member: its plain str, as declared)
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
        raise _undeclared(states, job, f"returned jorb.Next to undeclared state {to!r}", str(to))
    to = states[to].name
    if delay is not None and (type(delay) not in (int, float) or not 0 <= delay < 1e12):
        what = f"returned a jorb.Next whose delay must be seconds >= 0, not {delay!r}"
        raise _bad(states.get(job.state), what)
    if priority is not None and type(priority) is not int:
        what = f"returned a jorb.Next whose priority must be an int, not {priority!r}"
        raise _bad(states.get(job.state), what)
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
            _close_if_coroutine(kick)
            raise _bad(states.get(job.state), f"kicks must be jorb.Kick objects, not {_kind(kick)}")
        if kick.state not in states:
            what = f"kicked a job into undeclared state {kick.state!r}"
            raise _undeclared(states, job, what, kick.state)
        if not isinstance(kick.ctx, dict):
            what = f"a kick's ctx must be a dict, not {_kind(kick.ctx)}"
            raise _bad(states.get(job.state), what)
        if type(kick.priority) is not int:
            what = f"a kick's priority must be an int, not {kick.priority!r}"
            raise _bad(states.get(job.state), what)
        delay = kick.delay
        if delay is not None and (type(delay) not in (int, float) or not 0 <= delay < 1e12):
            raise _bad(states.get(job.state), f"a kick's delay must be seconds >= 0, not {delay!r}")
        key = kick.key
        if key is not None:
            if type(key) is not str or not key:
                what = f"a kick's key must be a non-empty string, not {key!r}"
                raise _bad(states.get(job.state), what)
            if key in kicked_keys or key in keys():
                continue  # at most one job per key
            kicked_keys.add(key)
        not_before = now + kick.delay if kick.delay else None
        state = states[kick.state].name
        kid = Job(str(next_id), state, kick.ctx, job.id, kick.priority, not_before, key=key)
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
    stay: bool = False,
) -> tuple[dict[str, Any], bool]:
    """The record of a failed attempt, and whether the job gave up (was routed away).

    A ``RateLimited`` uses the separate ``rate_limit_retries`` budget, a ``NoRetry`` gives up
    at once, anything else uses the state's ``retries``; an ``ExecResultError`` (a bug) is
    never retried. ``retry_in`` is the backoff before the next attempt (None: at once).
    ``stay``: the exec stops at this bug, so the job stays in its state as it was (the error
    recorded, no attempt used up).
    """
    limited = isinstance(error, RateLimited)
    attempts, throttled = job.attempts, job.throttled
    if limited:
        throttled += 1
        give_up = throttled > state.rate_limit_retries
    else:
        attempts += 1
        give_up = attempts > state.retries or isinstance(error, NoRetry)
    if isinstance(error, ExecResultError):
        give_up = True  # a bug in the script: another attempt would only repeat it
    details: dict[str, Any] = {
        "message": _message(error),
        "type": _type_name(error),
        "traceback": user_traceback(error),
        "time": now,
        "attempt": job.attempts + job.throttled + 1,
        "rate_limited": limited,
    }
    if isinstance(error, RateLimited):
        details.update(status=error.status, retry_after=error.retry_after)
    record: dict[str, Any] = {"job": job.id, "in": state.name, "error": details}
    if stay:
        record.update(to=state.name, attempts=job.attempts, throttled=job.throttled)
        return record, False
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


def not_json(state: State, result: Any) -> ExecResultError:
    """The error for an answer orjson refused: which ctx (the job's, or a kick's) and which
    key holds what JSON cannot represent."""
    ctx, _, kicks = _unpack(result, state)
    where = _unwritable(ctx, "ctx")
    if where is not None:
        return _bad(state, f"returned a ctx that is not JSON: {where}")
    for n, kick in enumerate(kicks):
        where = _unwritable(kick.ctx, f"kicks[{n}].ctx")
        if where is not None:
            return _bad(
                state, f"returned a kick (into {kick.state!r}) whose ctx is not JSON: {where}"
            )
    return _bad(state, "returned a ctx that is not JSON")


def _unwritable(value: Any, where: str) -> str | None:
    """Where in ``value`` orjson fails, as ``ctx["when"][2] is a set``; None if it does not."""
    try:
        orjson.dumps(value)
    except TypeError:
        pass
    else:
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where} has a key that is not a string: {key!r}"
            inner = _unwritable(item, f"{where}[{key!r}]")
            if inner is not None:
                return inner
    elif isinstance(value, list | tuple):
        for n, item in enumerate(value):
            inner = _unwritable(item, f"{where}[{n}]")
            if inner is not None:
                return inner
    elif isinstance(value, int):
        return f"{where} is an integer too large for JSON ({value.bit_length()} bits)"
    return f"{where} is {_kind(value)}, which JSON cannot hold"


def _unpack(result: Any, state: State | None) -> tuple[dict[str, Any], str | Next, Sequence[Kick]]:
    if inspect.isawaitable(result):
        _close_if_coroutine(result)
        raise _bad(state, f"returned {_kind(result)} instead of its answer: a forgotten `await`?")
    if not isinstance(result, tuple | list) or len(result) not in (2, 3):
        raise _bad(
            state,
            f"must return (ctx, next_state) or (ctx, next_state, kicks), not {_describe(result)}",
        )
    ctx, next_state = result[0], result[1]
    kicks = result[2] if len(result) == 3 else ()
    for n, part in enumerate(result):
        if inspect.isawaitable(part):
            _close_if_coroutine(part)
            which = ("ctx", "next state", "kicks")[n]
            what = f"returned {_kind(part)} as its {which}: a forgotten `await`?"
            raise _bad(state, what)
    if not isinstance(ctx, dict):
        raise _bad(state, f"returned a ctx that is {_kind(ctx)}; the ctx must be a dict")
    if not isinstance(next_state, str | Next):
        what = (
            f"returned a next state that is {_kind(next_state)}; the next state must be a str "
            f"or a jorb.Next"
        )
        raise _bad(state, what)
    if kicks is None:
        kicks = ()
    if not isinstance(kicks, list | tuple):
        raise _bad(state, f"returned kicks as {_kind(kicks)}, not a list of jorb.Kick")
    return ctx, next_state, kicks


def _bad(state: State | None, what: str) -> ExecResultError:
    """An ExecResultError naming the exec and where it is defined: ``fetch (crawl.py:12) ...``."""
    if state is None or state.exec is None:
        return ExecResultError(f"the exec {what}")
    return ExecResultError(f"exec {exec_name(state.exec)} {what}")


def _undeclared(states: Mapping[str, State], job: Job, what: str, name: str) -> ExecResultError:
    close = difflib.get_close_matches(name, [s for s in states if s != job.state], n=1)
    if not close and name.lower() in {s.lower() for s in states}:  # ("Done" for "done")
        close = [s for s in states if s.lower() == name.lower()]
    hint = f"; did you mean {close[0]!r}?" if close else f" (states: {', '.join(states)})"
    return _bad(states.get(job.state), what + hint)


def _kind(value: Any) -> str:
    """What a value is, in words, without a memory address (so one bug is one kind of error)."""
    if inspect.iscoroutine(value):
        return f"a coroutine ({value.__qualname__})"
    if inspect.isawaitable(value):
        return f"an awaitable {type(value).__name__}"
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


def _close_if_coroutine(value: Any) -> None:
    """Close a coroutine nobody will await (else Python warns it was never awaited)."""
    if inspect.iscoroutine(value):
        value.close()


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    text = repr(value)
    if " at 0x" in text:  # <function f at 0x7f...>: the address would make each one unique
        return _kind(value)
    return f"{_kind(value)} {text[:60]}{'...' if len(text) > 60 else ''}"


def _message(error: BaseException) -> str:
    try:
        message = str(error) or type(error).__name__
    except Exception:  # an error type whose __str__ fails must not take the run down with it
        return f"{type(error).__name__} (its message could not be read)"
    if isinstance(error, TimedOut):
        where = where_stopped(error)
        if where is not None:
            message += f", at {where}"
    return message


def _type_name(error: BaseException) -> str:
    kind = type(error)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"
