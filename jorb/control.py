"""Changing a run from outside: add jobs, pause and resume states, redrive and cancel jobs.

With no process holding the run, a change is applied to the file directly, under the run's
lock. With one, the change is handed over through an inbox directory beside the run
(``x.json.inbox/``): the command writes a request file atomically and waits; the process picks
it up within a poll interval, applies it through its journal (it stays the only writer of the
run), records it in the run's ``changes`` and answers with a reply file. Every request carries a
unique id that is recorded with the change, so a crash between applying and answering never
applies it twice; a request left behind by a process that exited is applied by the next one to
take the lock (a later exec, or the waiting command itself).

    jorb.control.pause(Path("runs/x.json"), "push")      # what `jorb pause` calls
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from .checkpoint import Store, atomic_write, is_locked, read_run, resolve
from .errors import JorbError, RunLockedError, StateError
from .model import Job, Run, apply_record, check_key
from .states import CANCELLED

__all__ = [
    "add",
    "apply_inbox",
    "cancel",
    "inbox_path",
    "pause",
    "plan",
    "redrive",
    "request",
    "resume",
    "waiting",
    "withdraw",
]

#: How often a waiting command looks for its reply, in seconds.
POLL = 0.05
REPLY = ".reply"
#: A request the process applying it has claimed (renamed from ``.json``): no longer withdrawable.
TAKEN = ".taken"


def inbox_path(path: Path) -> Path:
    """The inbox directory beside a run file."""
    return path.with_name(path.name + ".inbox")


# -- the changes -------------------------------------------------------------------------------


def add(
    path: Path,
    ctxs: list[dict[str, Any]],
    state: str = "new",
    *,
    keys: list[str] | None = None,
    priority: int = 0,
    delay: float | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Add one job per ctx in ``state``; the result's ``"ids"`` are the new job ids.

    ``keys`` (one per ctx): a ctx whose key a job of the run already has (or an earlier ctx
    of the same call) is not added; the result's ``"skipped"`` counts them.
    """
    args: dict[str, Any] = {"ctxs": ctxs, "state": state}
    if keys is not None:
        args["keys"] = keys
    if priority:
        args["priority"] = priority
    if delay is not None:
        args["delay"] = delay
    return request(path, "add", args, timeout)


def pause(path: Path, state: str, *, timeout: float | None = None) -> dict[str, Any]:
    """Stop new exec starts in ``state`` (running execs finish); kept across restarts."""
    return request(path, "pause", {"name": state}, timeout)


def resume(path: Path, state: str, *, timeout: float | None = None) -> dict[str, Any]:
    """Let ``state`` start execs again."""
    return request(path, "resume", {"name": state}, timeout)


def redrive(
    path: Path,
    source: str,
    target: str,
    job_ids: list[str] | None = None,
    *,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Move the jobs in ``source`` (or just ``job_ids``) to ``target``, keeping history and errors.

    The result says how many ``"moved"``; jobs busy at that moment are ``"skipped"``: running,
    or ``"settling"`` (also listed there: their last move, an attempt's or a change's, is being
    written; redrive them again).
    """
    return request(path, "redrive", {"from": source, "to": target, "jobs": job_ids}, timeout)


def cancel(
    path: Path,
    *,
    job_ids: list[str] | None = None,
    state: str | None = None,
    to: str = CANCELLED,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Move jobs (``job_ids``, or every job in ``state``) to the terminal state ``to``.

    A job whose exec is running has it cancelled by the process running the run: an
    ``async def`` is cancelled, a pool's worker process ended, a ``def`` in a thread
    abandoned. The result says how many were ``"cancelled"``, which were ``"running"``, and
    which were ``"skipped"`` (already in a terminal state, or between an exec and its
    checkpoint at that moment).
    """
    return request(path, "cancel", {"jobs": job_ids, "state": state, "to": to}, timeout)


# -- turning a request into a journal record ---------------------------------------------------


def new_request(op: str, args: dict[str, Any]) -> dict[str, Any]:
    """A request with a fresh id, saying who asked and when."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    who = f"{user}@{socket.gethostname()} pid {os.getpid()}"
    return {"id": uuid.uuid4().hex, "op": op, "args": args, "time": time.time(), "who": who}


def plan(
    run: Run,
    req: dict[str, Any],
    busy: Callable[[str], bool] = lambda _id: False,
    executing: Callable[[str], bool] = lambda _id: False,
    *,
    live: bool = False,
) -> dict[str, Any]:
    """Check ``req`` against ``run`` and build its journal record (without ``seq``).

    ``busy(job_id)`` says whether a job is mid-attempt (a redrive skips those), and
    ``executing(job_id)`` whether its exec is running now (a cancel moves those: the caller
    cancels the exec); a job busy but not executing is *settling*: its attempt (or the
    change that placed it) has ended and its record is on its way to the disk. ``live``: a
    processor executing the run applies it, so a redrive may only go to a declared state;
    otherwise it may go to a state the file does not know yet (a rename: the script will
    declare it). Raises a JorbError with a one-line reason for a request that cannot apply,
    and :class:`Unchanged` (with its answer) for one that would change nothing, so nothing is
    recorded.
    """
    op, args = req.get("op"), req.get("args") or {}
    now = time.time()
    declared = {s["name"]: bool(s.get("terminal")) for s in run.declared}
    record: dict[str, Any]
    if op == "add":
        state = args.get("state", "new")
        _known(run, declared, state)
        jobs, existing = _new_jobs(run, args, state, now)
        if not jobs and not existing:
            raise JorbError("nothing to add: give at least one ctx")
        result: dict[str, Any] = {"ids": [job.id for job in jobs]}
        if existing:
            result["skipped"] = existing
        if not jobs:
            raise Unchanged(result)  # every key exists: nothing to record
        record = {"op": "add", "jobs": jobs, "next_id": run.next_id + len(jobs)}
        what = f"added {len(jobs)} job(s) in {state!r}"
        if existing:
            what += f" ({existing} skipped: their key exists)"
    elif op in ("pause", "resume"):
        name = args.get("name")
        if not isinstance(name, str) or name not in declared:
            raise StateError(f"no state {name!r} declared in {run.path} (states: {_names(run)})")
        if declared[name]:
            raise StateError(f"state {name!r} is terminal: it starts no execs to {op}")
        if (name in run.paused) == (op == "pause"):
            already = "already paused" if op == "pause" else "not paused"
            raise JorbError(f"state {name!r} is {already} (paused: {_listed(run.paused)})")
        record = {"op": op, "name": name}
        result = {"paused": sorted(run.paused | {name} if op == "pause" else run.paused - {name})}
        what = f"{op}d {name!r}"
    elif op == "redrive":
        source, target, wanted = args.get("from"), args.get("to"), args.get("jobs")
        _known(run, declared if live else {}, target)
        if source == target and declared.get(target):
            raise JorbError(f"{target!r} is terminal: redriving it to itself changes nothing")
        if source not in declared and not any(j.state == source for j in run.jobs.values()):
            raise StateError(f"no state {source!r} in {run.path} (states: {_names(run)})")
        if wanted is not None and (
            not isinstance(wanted, list) or not all(isinstance(i, str) for i in wanted)
        ):
            raise JorbError(f"job ids must be a list of strings, not {wanted!r}")
        if wanted is not None:
            wanted = list(dict.fromkeys(wanted))  # each job moves once
            missing = [i for i in wanted if i not in run.jobs]
            if missing:
                raise JorbError(f"no job {', '.join(missing[:5])} in {run.path}")
            elsewhere = [i for i in wanted if run.jobs[i].state != source]
            if elsewhere:
                raise JorbError(
                    f"job {', '.join(elsewhere[:5])} is not in state {source!r} "
                    f"(it is in {run.jobs[elsewhere[0]].state!r})"
                )
            candidates = list(wanted)
        else:
            candidates = [job.id for job in run.jobs.values() if job.state == source]
        moved = [i for i in candidates if not busy(i)]
        skipped = [i for i in candidates if busy(i)]
        result = {"moved": len(moved), "skipped": skipped}
        settling = [i for i in skipped if not executing(i)]
        if settling:  # its attempt ended, its record is not on disk yet: in a moment it is free
            result["settling"] = settling  # (the rest of "skipped" are running)
        if not moved:  # no job there, or every one mid-exec
            raise Unchanged(result)
        record = {"op": "redrive", "to": target, "jobs": moved, "time": now}
        if declared and target not in declared:
            result["undeclared"] = target  # (the script must declare it before its next exec)
        what = f"redrove {len(moved)} job(s) {source!r} -> {target!r}"
    elif op == "cancel":
        record, result, what = _cancel(run, declared, args, busy, executing, now)
    else:
        raise JorbError(f"unknown change {op!r}")
    record["change"] = {
        "id": req["id"],
        "what": what,
        "time": req["time"],
        "applied": now,
        "who": req.get("who"),
        "result": result,
    }
    return record


def left_said(op: str, result: dict[str, Any]) -> str:
    """What the answer of a ``"redrive"`` or ``"cancel"`` says of the jobs it left, as the end
    of a line: running (a redrive) or already finished (a cancel), or settling (their last
    move is being written: ask again). Empty if it left none."""
    settling = result.get("settling") or []
    others = [i for i in result.get("skipped") or [] if i not in settling]
    said = ""
    if others:
        why = "running right now were left" if op == "redrive" else "left: already finished"
        said += f"; {len(others):,} {why} ({', '.join(others[:5])})"
    if settling:
        said += (
            f"; {len(settling):,} left: settling right now (its last move is being written), "
            f"{op} again ({', '.join(settling[:5])})"
        )
    return said


class Unchanged(Exception):  # (an answer, not an error)
    """A request that would change nothing: it is answered with ``result`` and not recorded."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(result)
        self.result = result


def _new_jobs(run: Run, args: dict[str, Any], state: str, now: float) -> tuple[list[Job], int]:
    """The jobs an ``add`` request makes (not yet registered), and how many it skips because
    their key exists."""
    ctxs = args.get("ctxs") or []
    keys, priority, delay = args.get("keys"), args.get("priority", 0), args.get("delay")
    if keys is not None and (not isinstance(keys, list) or len(keys) != len(ctxs)):
        raise JorbError("keys must be a list with one key per ctx")
    if type(priority) is not int:
        raise JorbError(f"priority must be an int, not {priority!r}")
    if delay is not None and (type(delay) not in (int, float) or not 0 <= delay < 1e12):
        raise JorbError(f"delay must be seconds >= 0, not {delay!r}")
    not_before = now + delay if delay else None
    index = run.keyed() if keys is not None else {}
    seen: set[str] = set()
    jobs: list[Job] = []
    for n, ctx in enumerate(ctxs):
        key = None if keys is None else check_key(keys[n])
        if key is not None:
            if key in index or key in seen:
                continue
            seen.add(key)
        jobs.append(run_job(run, ctx, state, len(jobs), key, priority, not_before))
    return jobs, len(ctxs) - len(jobs)


def run_job(
    run: Run,
    ctx: Any,
    state: str,
    offset: int,
    key: str | None = None,
    priority: int = 0,
    not_before: float | None = None,
) -> Job:
    """A job for an ``add`` request, with the id it will get (not yet registered)."""
    if not isinstance(ctx, dict):
        raise JorbError(f"each ctx must be a JSON object, not {type(ctx).__name__}")
    try:
        data = orjson.dumps(ctx)
    except TypeError as e:
        raise JorbError(f"a ctx to add is not JSON: {e}") from None
    # The job's own copy, as journaled: a caller that goes on using its dict changes nothing.
    ctx = orjson.loads(data)
    return Job(str(run.next_id + offset), state, ctx, None, priority, not_before, key=key)


def _cancel(
    run: Run,
    declared: dict[str, bool],
    args: dict[str, Any],
    busy: Callable[[str], bool],
    executing: Callable[[str], bool],
    now: float,
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The record, answer and description of a ``cancel`` request."""
    wanted, source, target = args.get("jobs"), args.get("state"), args.get("to", CANCELLED)
    _known(run, declared, target)
    if declared and not declared[target]:
        raise StateError(
            f"{target!r} is not terminal: cancel moves jobs to a terminal state "
            f"(`jorb redrive` moves them anywhere)"
        )
    if (wanted is None) == (source is None):
        raise JorbError("cancel takes job ids or a state, one of the two")
    if wanted is not None:
        if not isinstance(wanted, list) or not all(isinstance(i, str) for i in wanted):
            raise JorbError(f"job ids must be a list of strings, not {wanted!r}")
        wanted = list(dict.fromkeys(wanted))
        missing = [i for i in wanted if i not in run.jobs]
        if missing:
            raise JorbError(f"no job {', '.join(missing[:5])} in {run.path}")
        candidates = wanted
    else:
        if source not in declared and not any(j.state == source for j in run.jobs.values()):
            raise StateError(f"no state {source!r} in {run.path} (states: {_names(run)})")
        if isinstance(source, str) and declared.get(source):
            raise JorbError(f"{source!r} is terminal: its jobs are finished, nothing to cancel")
        candidates = [job.id for job in run.jobs.values() if job.state == source]
    finished = {name for name, terminal in declared.items() if terminal}
    moved, running, skipped, settling = [], [], [], []
    for ident in candidates:
        if run.jobs[ident].state in finished:
            skipped.append(ident)
        elif executing(ident):
            moved.append(ident)
            running.append(ident)
        elif busy(ident):
            skipped.append(ident)
            settling.append(ident)  # between its exec and its checkpoint: not moved
        else:
            moved.append(ident)
    result: dict[str, Any] = {"cancelled": len(moved), "running": running, "skipped": skipped}
    if settling:
        result["settling"] = settling  # (the rest of "skipped" are finished already)
    if not moved:
        raise Unchanged(result)
    record = {"op": "cancel", "to": target, "jobs": moved, "time": now}
    what = f"cancelled {len(moved)} job(s) -> {target!r}"
    if running:
        what += f" ({len(running)} running)"
    return record, result, what


def _known(run: Run, declared: dict[str, bool], state: Any) -> None:
    if not isinstance(state, str) or not state:
        raise StateError(f"a state must be a non-empty string, not {state!r}")
    if declared and state not in declared:
        raise StateError(f"no state {state!r} declared in {run.path} (states: {_names(run)})")


def _listed(names: set[str]) -> str:
    return ", ".join(sorted(names)) or "none"


def _names(run: Run) -> str:
    return ", ".join(s["name"] for s in run.declared) or "none recorded yet"


def applied_ids(run: Run) -> set[str]:
    """Ids of every change already applied to ``run``."""
    return {change["id"] for change in run.changes if isinstance(change, dict) and "id" in change}


# -- the inbox ---------------------------------------------------------------------------------


def pending(path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Requests waiting in the inbox, oldest first (unreadable ones are answered as errors).

    Each is claimed first (renamed to ``.taken``), so that a command withdrawing it (``jorb
    pause --timeout``) either gets it back before it is applied, or finds it taken. One taken
    by a process that died before answering is yielded again (its id keeps it from being
    applied twice).
    """
    inbox = inbox_path(path)
    try:
        names = sorted(n for n in os.listdir(inbox) if n.endswith((".json", TAKEN)))
    except FileNotFoundError:
        return
    for name in names:
        file = inbox / name
        if name.endswith(".json"):
            taken = file.with_suffix(TAKEN)
            try:
                os.rename(file, taken)
            except FileNotFoundError:
                continue  # withdrawn meanwhile
            file = taken
        try:
            req = orjson.loads(file.read_bytes())
        except FileNotFoundError:
            continue
        except orjson.JSONDecodeError:
            reply(file, {"error": f"unreadable request {name}"})
            continue
        if (
            not isinstance(req, dict)
            or not isinstance(req.get("id"), str)
            or not isinstance(req.get("op"), str)
            or not isinstance(req.get("args", {}), dict)
        ):
            reply(file, {"error": f"malformed request {name} (needs a str id and op, dict args)"})
            continue
        yield file, req


def reply(file: Path, answer: dict[str, Any]) -> None:
    """Answer a request and remove it (the answer first, so a waiter never misses it)."""
    atomic_write(file.with_suffix(REPLY), orjson.dumps(answer), durable=False)
    with contextlib.suppress(FileNotFoundError):
        file.unlink()


def apply_inbox(run: Run, done: set[str] | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Apply every waiting request to ``run`` in memory (no process is executing it).

    ``done`` holds the ids of changes already applied (default: those in ``run.changes``);
    each one applied here is added to it. Returns the (request file, answer) pairs to send
    with :func:`reply` once the run is saved.
    """
    assert run.path is not None
    done = applied_ids(run) if done is None else done
    answers = []
    for file, req in pending(run.path):
        answers.append((file, apply_one(run, req, done)))
    return answers


def apply_one(run: Run, req: dict[str, Any], done: set[str]) -> dict[str, Any]:
    """Apply one request to ``run`` in memory, unless ``done`` says it already was."""
    if req.get("id") in done:
        return previous(run, req["id"])
    try:
        record = plan(run, req)
    except JorbError as e:
        return {"error": str(e)}
    except Unchanged as e:
        return {"result": e.result}
    record["seq"] = run.seq + 1
    apply_record(run, record)
    done.add(req["id"])
    return {"result": record["change"]["result"]}


def previous(run: Run, ident: str) -> dict[str, Any]:
    """The answer recorded for a change that was applied before."""
    for change in run.changes:
        if change.get("id") == ident:
            return {"result": change.get("result", {})}
    return {"result": {}}


def request(
    path: Path, op: str, args: dict[str, Any], timeout: float | None = None
) -> dict[str, Any]:
    """Apply one change to the run at ``path``, directly or through its running process.

    Returns the change's result; raises JorbError if it could not apply, or TimeoutError if
    ``timeout`` passed first (the request then stays queued and is applied later).
    """
    path = resolve(Path(path))  # the inbox is the real file's, whatever name it was given
    if not path.exists() and not is_locked(path):
        raise JorbError(f"{path}: no such run file")
    req = new_request(op, args)
    inbox = inbox_path(path)
    inbox.mkdir(exist_ok=True)
    file = inbox / f"{time.time_ns():020d}-{req['id']}.json"
    atomic_write(file, orjson.dumps(req), durable=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    answer_file = file.with_suffix(REPLY)
    withdrawn = False
    while True:
        if answer_file.exists():
            answer = orjson.loads(answer_file.read_bytes())
            answer_file.unlink()
            if "error" in answer:
                raise JorbError(answer["error"])
            result: dict[str, Any] = answer["result"]
            return result
        if not is_locked(path):
            _apply_offline(path, file)
            continue
        if deadline is not None and time.monotonic() > deadline and not withdrawn:
            if withdraw(file):
                raise TimeoutError(
                    f"the process running {path} did not pick the change up within "
                    f"{timeout:g}s (is it stopped?); the change was withdrawn: nothing changed"
                )
            withdrawn = True  # taken meanwhile: the answer is on its way
            deadline = time.monotonic() + max(timeout or 0.0, 1.0)
        elif deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"the process running {path} took the change but has not answered within "
                f"{timeout:g}s; it may still apply it (see `jorb status {path}`)"
            )
        time.sleep(POLL)  # waiting on another process's reply file: nothing to await


def waiting(path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The requests in the inbox that no process has taken yet, oldest first (unclaimed)."""
    inbox = inbox_path(path)
    try:
        names = sorted(n for n in os.listdir(inbox) if n.endswith(".json"))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        try:
            req = orjson.loads((inbox / name).read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            continue
        if isinstance(req, dict):
            found.append((inbox / name, req))
    return found


def withdraw(file: Path) -> bool:
    """Take a request back out of the inbox: True if it was still waiting (it will never be
    applied), False if a process has taken it (it is being applied, or was)."""
    try:
        file.unlink()
    except FileNotFoundError:
        return False
    return True


def _apply_offline(path: Path, mine: Path) -> None:
    """Take the lock and apply every waiting request directly to the file.

    If the run does not load (a damaged file, a journal conflict) or cannot be saved, the
    request ``mine`` is withdrawn before the error goes up: the command reports a failure, so
    the next process to open the run must not apply it. Holding the lock, nobody else is
    applying it now.
    """
    try:
        store = Store(path)
    except RunLockedError:
        return  # someone took it meanwhile: they will apply it
    with store:
        try:
            run = read_run(path)
            answers = apply_inbox(run)
            if answers:
                store.compact(run, finish=True)
        except BaseException:
            mine.unlink(missing_ok=True)
            mine.with_suffix(TAKEN).unlink(missing_ok=True)
            raise
        for file, answer in answers:
            reply(file, answer)
