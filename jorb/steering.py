"""Steering a running exec: changes from Python (any thread) and from the run's inbox (the
command line) go through the journal like any transition, then into the lanes."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

import orjson

from . import control
from .errors import JorbError, StateError
from .model import Job, apply_record

if TYPE_CHECKING:
    from pathlib import Path

    from .model import Run
    from .processor import Processor

_LINE = orjson.OPT_APPEND_NEWLINE


class Steering:
    """Pause, resume, redrive and add jobs, before an exec or while it runs.

    ``steering.submit("pause", {"name": "fetch"})`` from any thread: applied at once if an exec
    runs, else queued for the next one.
    """

    __slots__ = ("applied", "exec_number", "in_transit", "lock", "loop", "proc", "queued")

    def __init__(self, proc: Processor) -> None:
        self.proc = proc
        self.queued: list[dict[str, Any]] = []  # changes asked for before exec
        self.lock = threading.Lock()  # steering may be called from any thread
        self.in_transit = 0  # steering calls sent to the executing loop, not yet applied
        self.exec_number = 0  # which exec they were sent to
        #: The loop steering calls are sent to: set once exec runs, cleared when it stops.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.applied: set[str] = set()  # ids of the requests applied to the run

    def __repr__(self) -> str:
        return f"<Steering queued={len(self.queued)} in_transit={self.in_transit}>"

    # -- from Python, any thread ---------------------------------------------------------------

    def submit(self, op: str, args: dict[str, Any]) -> None:
        states = self.proc.states
        for key in ("name", "to", "state"):
            name = args.get(key)
            if key in args and name not in states and not (op == "cancel" and name is None):
                raise StateError(f"{op}: no state {name!r} declared (states: {list(states)})")
        if op in ("pause", "resume") and states[args["name"]].terminal:
            raise StateError(f"{op}: state {args['name']!r} is terminal: it starts no execs")
        if op == "add":
            for ctx in args["ctxs"]:
                try:
                    orjson.dumps(ctx)
                except TypeError as e:
                    raise JorbError(f"add_jobs: a ctx is not JSON: {e}") from None
        req = control.new_request(op, args)
        with self.lock:
            loop = self.loop
            if loop is None:
                self.queued.append(req)  # applied when the next exec starts
                return
            self.in_transit += 1  # the exec does not end with a change on its way to it
            loop.call_soon_threadsafe(self._steer_soon, req, self.exec_number)

    def apply_waiting(self, run: Run) -> list[tuple[Any, dict[str, Any]]]:
        """Apply the changes that waited for this exec to the run, offline: the inbox's, then
        those asked for from Python. Returns the answers owed to the commands that sent them."""
        applied = self.applied = control.applied_ids(run)  # grows as applied
        answers = control.apply_inbox(run, applied)
        with self.lock:
            queued, self.queued = self.queued, []
        for req in queued:
            control.apply_one(run, req, applied)
        return answers

    def edit_kept(self, aside: Path) -> None:
        """The run file was edited while this exec runs it: say where the edit is kept."""
        store = self.proc._store
        self.proc._note(
            f"{store.path if store else 'the run file'} was edited while this "
            f"process runs it; this process is its only writer, so the edit is not applied: "
            f"it is kept in {aside}. While a process runs, change the run with `jorb redrive`, "
            f"`jorb add`, `jorb pause`; edit the file once it has stopped"
        )

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """From now on, steering calls go to this loop."""
        with self.lock:
            self.loop = loop
            self.exec_number += 1
            self.in_transit = 0

    def stop(self) -> None:
        """Steering calls from now on wait for the next exec."""
        with self.lock:
            self.loop = None

    def _steer_soon(self, req: dict[str, Any], number: int) -> None:
        with self.lock:
            if number != self.exec_number:  # sent to an exec that ended before it arrived
                self.queued.append(req)
                return
            if self.loop is None or self.proc._ending():
                self.queued.append(req)  # the exec is stopping: keep it for the next one
                self.in_transit -= 1
                return
            self.proc._spawn(self._steer(req))

    async def _steer(self, req: dict[str, Any]) -> None:
        proc = self.proc
        try:
            answer = await self.change(req)
        except (JorbError, TypeError, KeyError, ValueError) as e:
            answer = {"error": str(e)}
            if proc._store is not None and proc._store.failure is not None:
                raise  # the run cannot checkpoint: stop the exec
        finally:
            with self.lock:
                self.in_transit -= 1
        if "error" in answer:
            proc._note(f"change refused: {answer['error']}")
        elif req["op"] in ("redrive", "cancel"):
            _say_left(proc, req, answer["result"])
        proc._check_finished()  # (a refused change leaves nothing to run)

    # -- from the command line, through the inbox ----------------------------------------------

    async def watch_inbox(self) -> None:
        proc = self.proc
        run = proc._run
        assert run is not None and run.path is not None
        while True:
            await asyncio.sleep(proc.poll_interval)
            for file, req in control.pending(run.path):
                if proc._ending():
                    return  # the rest wait in the inbox: applied offline once the lock is free
                try:
                    answer = await self.change(req)
                except (JorbError, TypeError, KeyError, ValueError) as e:
                    answer = {"error": f"could not apply the change: {e}"}
                control.reply(file, answer)
                if proc._store is not None and proc._store.failure is not None:
                    raise proc._store.failure  # the run cannot checkpoint: stop the exec

    # -- applying one change -------------------------------------------------------------------

    async def change(self, req: dict[str, Any]) -> dict[str, Any]:
        """Apply one change through the journal and the lanes; returns the command's answer."""
        proc = self.proc
        run, store, lanes = proc._run, proc._store, proc._lanes
        assert run is not None and store is not None
        if req.get("id") in self.applied:
            return control.previous(run, req["id"])
        executing = lanes.executing
        try:
            record = control.plan(
                run,
                req,
                busy=lambda ident: run.jobs[ident] in lanes.running,
                executing=executing.__contains__,
                live=True,
            )
        except JorbError as e:
            return {"error": str(e)}
        except control.Unchanged as e:
            return {"result": e.result}
        op = record["op"]
        moved = [run.jobs[i] for i in record["jobs"]] if op in ("redrive", "cancel") else []
        before = {job.id: job.state for job in moved}
        self._detach(moved)
        if op == "cancel":
            for ident in record["change"]["result"]["running"]:
                lanes.cancel_exec(ident)  # its outcome is never settled: the job moves here
        proc._commits.prepare()  # (successes applied before it go first, in the journal too)
        record["seq"] = run.seq + 1
        data = orjson.dumps(record, option=_LINE)
        apply_record(run, record)
        self.applied.add(req["id"])
        added = record["jobs"] if op == "add" else []
        for job in added:
            lanes.count_in(job.state)
        ended = []  # parents whose child the redrive ends: they may join once it is on disk
        for job in moved:
            lanes.count_out(before[job.id])
            lanes.count_in(job.state)
            if proc._joins and job.parent is not None:
                was_open, is_open = before[job.id] in lanes.by_name, job.state in lanes.by_name
                if is_open and not was_open:  # the parent waits for it again, from now on
                    proc._waiting.reopened(job.parent)
                elif was_open and not is_open:
                    ended.append(job.parent)
        for job in [*added, *moved]:
            lanes.running.add(job)  # busy until placed: another change must not move it
        lanes.placing.update(moved)  # (even if a cancelled exec of theirs ends meanwhile)
        if op == "pause":
            lanes.by_name[record["name"]].paused = True
        await asyncio.shield(store.append(data))
        # On disk: the jobs may start, and a join waiting for a moved child may be released.
        lanes.placing.difference_update(moved)
        now = proc._now()
        for job in [*added, *moved]:
            if job.id in executing:  # a cancelled exec still ending: busy until it has ended
                continue  # (lanes._dropped frees it; a cancel's state is terminal: no lane)
            lanes.running.discard(job)
            lane = lanes.by_name.get(job.state)
            if lane is not None:
                lanes.enqueue(lane, job, now)
                lanes.wake(lane)
        for parent in ended:
            proc._waiting.child_ended(parent)
        if op == "resume":
            lane = lanes.by_name[record["name"]]
            lane.paused = record["name"] in run.paused  # a pause applied meanwhile stands
            lanes.wake(lane)
        proc._note(f"applied: {record['change']['what']} (by {req.get('who')})")
        proc._check_finished()
        return {"result": record["change"]["result"]}

    def _detach(self, jobs: list[Job]) -> None:
        """Take jobs out of the lanes' queues (a redrive is about to move them)."""
        ids = {job.id for job in jobs}
        if not ids:
            return
        for lane in self.proc._lanes.by_name.values():
            lane.ready.discard(ids)
        self.proc._waiting.detach(ids)


def _say_left(proc: Processor, req: dict[str, Any], result: dict[str, Any]) -> None:
    """A redrive or cancel asked for from Python left jobs (busy, or already finished): say
    so, as `jorb redrive` and `jorb cancel` do (the call itself returns nothing)."""
    op, args = req["op"], req["args"]
    said = control.left_said(op, result)
    if not said:
        return
    if op == "redrive":
        what = f"processor.redrive({args['from']!r}, {args['to']!r}): moved {result['moved']:,}"
    else:
        cancelled = result["cancelled"]
        what = f"processor.cancel(): cancelled {cancelled:,} job(s) (now in {args['to']!r})"
    proc._note(what + said)
