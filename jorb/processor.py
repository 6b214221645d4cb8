"""The Processor: one coordinator drives every job of a run through its states.

Shape of the machine. Each non-terminal state is a *lane*: its ready jobs (by priority, FIFO),
``concurrency`` slots and at most that many worker tasks, created on demand and parked when
there is nothing to take. A worker waits for the state's Rate, takes a job (and a slot), runs
the exec through the executor seam, and hands the outcome to ``_settle``, which turns it into
one journal record (new state, ctx, history, error, kicked children: see ``outcome``), applies
it to the run and queues it for the next group commit. The worker does not wait for the disk:
it goes on to the next job while it has a free slot. When a batch is on disk, ``_committed``
releases its slots and makes each job's next step and its children ready. So a slot is held
from the start of an exec until its record is durable: at most ``concurrency`` execs of a state
can be lost to a crash, and a lane of execs that never wait settles a whole batch per wake-up.
Changes from the command line (``control``) go through the same journal. Everything runs on
one event loop, so nothing is locked: the run is only ever touched from the loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import heapq
import itertools
import logging
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson

from . import control, outcome
from .checkpoint import Store
from .errors import ExecResultError, JorbError, RateLimited, RunFileError, StateError
from .executor import Executor, LocalExecutor
from .model import Child, Job, Run, apply_record, parent_cycle
from .states import Rate, State, validate
from .status import StateStatus, Status, StatusListener

__all__ = ["Processor"]

_LINE = orjson.OPT_APPEND_NEWLINE
logger = logging.getLogger("jorb")


class _Ready:
    """A lane's ready jobs: higher priority first, first in first out among equals.

    Nearly every job has priority 0: those wait in a deque (no entry object per job, O(1) each
    way); the others in a heap of ``(-priority, order, job)``. A million queued jobs are then a
    million deque slots, not a million tuples the garbage collector walks again and again.
    """

    __slots__ = ("order", "plain", "ranked")

    def __init__(self, order: Iterator[int]) -> None:
        self.plain: collections.deque[Job] = collections.deque()
        self.ranked: list[tuple[int, int, Job]] = []
        self.order = order

    def __len__(self) -> int:
        return len(self.plain) + len(self.ranked)

    def __repr__(self) -> str:
        return f"<Ready {len(self.plain)} plain, {len(self.ranked)} ranked>"

    def push(self, job: Job) -> None:
        if job.priority:
            heapq.heappush(self.ranked, (-job.priority, next(self.order), job))
        else:
            self.plain.append(job)

    def pop(self) -> Job:
        """The next job to start (the caller knows one is ready)."""
        ranked = self.ranked
        if ranked and (ranked[0][0] < 0 or not self.plain):  # above 0, or nothing at 0 left
            return heapq.heappop(ranked)[2]
        return self.plain.popleft()

    def discard(self, ids: set[str]) -> None:
        """Take the jobs with these ids out (a redrive is about to move them)."""
        if any(job.id in ids for job in self.plain):
            self.plain = collections.deque(job for job in self.plain if job.id not in ids)
        if any(entry[2].id in ids for entry in self.ranked):
            self.ranked = [entry for entry in self.ranked if entry[2].id not in ids]
            heapq.heapify(self.ranked)


class _Lane:
    """A non-terminal state at run time: its ready jobs, its workers and its counters."""

    __slots__ = (
        "awaiting",
        "claims",
        "delayed",
        "done",
        "errors",
        "failed",
        "held",
        "idle",
        "jobs",
        "paused",
        "rate",
        "ready",
        "running",
        "state",
        "waking",
        "workers",
    )

    def __init__(self, state: State, rate: Rate, paused: bool, order: Iterator[int]) -> None:
        self.state = state
        self.rate = rate
        self.paused = paused
        self.ready = _Ready(order)
        self.idle: list[asyncio.Future[None]] = []  # parked workers
        self.workers = self.jobs = self.delayed = self.awaiting = self.running = 0
        self.held = 0  # slots taken: jobs in an exec, or settled and waiting for the disk
        self.claims = 0  # workers waiting for the Rate, each about to take a ready job
        self.waking = 0  # workers woken (or spawned) that have not run yet
        self.done = self.errors = self.failed = 0

    def __repr__(self) -> str:
        return (
            f"<Lane {self.state.name} ready={len(self.ready)} running={self.running} "
            f"held={self.held}/{self.state.concurrency} workers={self.workers}>"
        )


class Processor:
    """Drives every job of a run through the states until all are terminal.

    ``jorb.Processor(app, states).exec(run)`` blocks and returns the run;
    ``await processor.aexec(run)`` is the same inside an event loop. ``app`` is handed to every
    exec and never written to disk.
    """

    def __init__(
        self,
        app: Any,
        states: Sequence[State],
        *,
        error_state: str = "failed",
        progress: bool = True,
        listeners: Iterable[StatusListener] = (),
        durable: bool = True,
        grace: float = 30.0,
        status_interval: float = 0.2,
        poll_interval: float = 0.25,
        executor: Executor | None = None,
    ) -> None:
        #: The app context given to every exec.
        self.app = app
        #: Declared states by name, in declaration order (the error state added if undeclared).
        self.states = validate(states, error_state)
        #: Where a job goes when its retries are used up and its state names no ``on_error``.
        self.error_state = error_state
        #: Whether to show live progress (rich bars on a terminal, plain lines otherwise).
        self.progress = progress
        #: Status listeners, told at start, a few times a second, and at the end.
        self.listeners = list(listeners)
        #: fsync every group commit (power-loss safe); False still survives ``kill -9``.
        self.durable = durable
        #: Seconds running execs may take to finish after Ctrl-C before they are cancelled.
        self.grace = grace
        #: Seconds between two status updates to listeners.
        self.status_interval = status_interval
        #: Seconds between two looks at the run's inbox for changes from the command line.
        self.poll_interval = poll_interval
        self._executor = executor
        self._joins = any(s.join for s in self.states.values())
        self._queued: list[dict[str, Any]] = []  # changes asked for before exec
        self._submit_lock = threading.Lock()  # steering may be called from any thread
        self._in_transit = 0  # steering calls sent to the executing loop, not yet applied
        self._exec_number = 0  # which exec they were sent to
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The loop steering calls are sent to: set once exec runs, cleared when it stops.
        self._steering: asyncio.AbstractEventLoop | None = None
        self._reset()

    def _reset(self) -> None:
        self._run: Run | None = None
        self._store: Store | None = None
        self._lanes: dict[str, _Lane] = {}
        self._counts: dict[str, int] = {}  # jobs per terminal state
        self._delayed: list[tuple[float, int, Job]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._order = itertools.count()
        self._active = 0  # non-terminal jobs
        self._transitions = 0
        # Ids of jobs a change must not move: in an attempt (exec or commit), or created or moved
        # by a record that is not on disk yet (kicked children, added or redriven jobs).
        self._running: set[str] = set()
        self._batch: asyncio.Future[None] | None = None  # the group commit being filled
        self._batch_jobs: list[tuple[_Lane, Job, list[Job]]] = []  # settled into it
        self._kids: dict[str, list[str]] = {}  # fan-in: parent id -> child ids
        self._open_kids: dict[str, int] = {}  # fan-in: parent id -> non-terminal children
        self._joining: dict[str, Job] = {}  # fan-in: jobs waiting for their children
        self._applied: set[str] = set()
        self._finished: asyncio.Future[None] | None = None
        self._stopping = self._interrupted = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_exec: set[asyncio.Task[None]] = set()
        self._listeners: list[StatusListener] = []
        self._clock = time.monotonic
        self._offset = self._started = 0.0

    def __repr__(self) -> str:
        return f"<Processor states={list(self.states)} lanes={list(self._lanes.values())}>"

    # -- public entry points -----------------------------------------------------------------

    def exec(self, run: Run) -> Run:
        """Drive ``run`` until every job is terminal; Ctrl-C stops cleanly (see README)."""
        try:
            asyncio.run(self._exec_with_signals(run))
        except KeyboardInterrupt:
            self._interrupted = True
        if self._interrupted:
            print(
                f"jorb: interrupted; progress is saved in {run.path}. "
                f"Run the script again to resume: {_command_line()}",
                file=sys.stderr,
            )
            raise SystemExit(130)
        return run

    async def aexec(self, run: Run) -> Run:
        """Async twin of :meth:`exec`; cancelling it checkpoints and re-raises."""
        self._reset()
        loop = asyncio.get_running_loop()
        answers = self._prepare(run, loop)
        self._loop = loop
        with self._submit_lock:
            self._steering = loop  # from now on, steering calls go to this loop
            self._exec_number += 1
            self._in_transit = 0
        self._listeners = listeners = self._all_listeners()
        ticker = loop.create_task(self._tick()) if listeners else None
        try:
            for file, answer in answers:
                control.reply(file, answer)
            self._start_lanes()  # queues the jobs; nothing runs before the first await
            for listener in listeners:
                listener.start(self.statistics())
            for name in sorted(run.paused):
                self._note(f"state {name!r} is paused (`jorb resume {run.path} {name}`)")
            self._spawn(self._watch_inbox())  # reaped: if it dies, the exec says so
            self._check_finished()
            assert self._finished is not None
            await self._finished
        except BaseException:
            await self._shutdown(grace=0.0)
            raise
        else:
            await self._shutdown(grace=self.grace)
        finally:
            if ticker is not None:
                ticker.cancel()
            for listener in listeners:
                listener.stop(self.statistics())
            run.remember_file()
            run.close()  # no longer executing: commands may now edit the file directly
        return run

    def statistics(self) -> Status:
        """A frozen snapshot of every state's counters (cheap: no scan of the jobs)."""
        rows = []
        for name, state in self.states.items():
            lane = self._lanes.get(name)
            if lane is None:
                rows.append(StateStatus(name, True, self._counts.get(name, 0)))
                continue
            rate = lane.rate
            busy = lane.running + lane.delayed + lane.awaiting
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
                )
            )
        finished = sum(self._counts.values())
        total = finished + sum(lane.jobs for lane in self._lanes.values())
        elapsed = time.monotonic() - self._started if self._started else 0.0
        return Status(tuple(rows), total, finished, elapsed, self._transitions)

    # -- steering from Python (the command line goes through the run's inbox) -----------------

    def pause(self, state: str) -> None:
        """Stop new exec starts in ``state``; applied at once if executing, else at exec start."""
        self._submit("pause", {"name": state})

    def resume(self, state: str) -> None:
        """Let ``state`` start execs again."""
        self._submit("resume", {"name": state})

    def redrive(self, source: str, target: str, job_ids: list[str] | None = None) -> None:
        """Move the jobs in ``source`` (or only ``job_ids``) to ``target``."""
        self._submit("redrive", {"from": source, "to": target, "jobs": job_ids})

    def add_jobs(self, ctxs: list[dict[str, Any]], state: str = "new") -> None:
        """Add jobs to the run being executed (from any thread)."""
        self._submit("add", {"ctxs": ctxs, "state": state})

    def _submit(self, op: str, args: dict[str, Any]) -> None:
        for key in ("name", "to", "state"):
            name = args.get(key)
            if key in args and name not in self.states:
                raise StateError(f"{op}: no state {name!r} declared (states: {list(self.states)})")
        if op in ("pause", "resume") and self.states[args["name"]].terminal:
            raise StateError(f"{op}: state {args['name']!r} is terminal: it starts no execs")
        if op == "add":
            for ctx in args["ctxs"]:
                try:
                    orjson.dumps(ctx)
                except TypeError as e:
                    raise JorbError(f"add_jobs: a ctx is not JSON: {e}") from None
        req = control.new_request(op, args)
        with self._submit_lock:
            loop = self._steering
            if loop is None:
                self._queued.append(req)  # applied when the next exec starts
                return
            self._in_transit += 1  # the exec does not end with a change on its way to it
            loop.call_soon_threadsafe(self._steer_soon, req, self._exec_number)

    def _steer_soon(self, req: dict[str, Any], number: int) -> None:
        with self._submit_lock:
            if number != self._exec_number:  # sent to an exec that ended before it arrived
                self._queued.append(req)
                return
            if self._steering is None or self._ending():
                self._queued.append(req)  # the exec is stopping: keep it for the next one
                self._in_transit -= 1
                return
            self._spawn(self._steer(req))

    async def _steer(self, req: dict[str, Any]) -> None:
        try:
            answer = await self._change(req)
        except (JorbError, TypeError, KeyError, ValueError) as e:
            answer = {"error": str(e)}
            if self._store is not None and self._store.failure is not None:
                raise  # the run cannot checkpoint: stop the exec
        finally:
            with self._submit_lock:
                self._in_transit -= 1
        if "error" in answer:
            self._note(f"change refused: {answer['error']}")
        self._check_finished()  # (a refused change leaves nothing to run)

    # -- setup -----------------------------------------------------------------------------------

    def _prepare(
        self, run: Run, loop: asyncio.AbstractEventLoop
    ) -> list[tuple[Any, dict[str, Any]]]:
        """Apply waiting changes, check the run against the declarations, take its lock and
        write the first checkpoint. Returns the answers owed to waiting commands."""
        if run.path is None:
            raise RunFileError("the run has no path; create it with jorb.Run.open(path)")
        store = run._holder
        if store is None:
            store = Store(run.path, durable=self.durable)
            try:
                run.check_file()
            except JorbError:
                store.close()
                raise
            run._holder = store
        store.durable = self.durable
        run.path = store.path  # the real file (a Run made by name may name a symlink)
        run.declared = [{"name": s.name, "terminal": s.terminal} for s in self.states.values()]
        self._applied = control.applied_ids(run)  # grows as changes are applied
        answers = control.apply_inbox(run, self._applied)
        with self._submit_lock:
            queued, self._queued = self._queued, []
        for req in queued:
            control.apply_one(run, req, self._applied)
        self._check_states(run)
        if self._joins and (cycle := parent_cycle(run)):
            raise RunFileError(
                f"{run.path}: jobs {' -> '.join([*cycle, cycle[0]])} are each other's parent (an "
                f'edit of "parent" fields): a join would wait for them forever. Fix those fields'
            )
        self._run, self._store = run, store
        store.begin(run)  # every added job, change and the declarations reach disk here
        self._executor = self._executor or LocalExecutor(self.states.values())
        self._finished = loop.create_future()
        # The loop's clock, so a fake loop clock fakes history times too (read directly when
        # it is the usual one: it is read twice per transition).
        base_time = type(loop).time is asyncio.BaseEventLoop.time
        self._clock = time.monotonic if base_time else loop.time
        self._offset = time.time() - self._clock()
        self._started = time.monotonic()
        unlimited: dict[str, Rate] = {}
        for name, state in self.states.items():
            if state.terminal:
                self._counts[name] = 0
            else:
                rate = state.rate or unlimited.setdefault(name, Rate.unlimited())
                self._lanes[name] = _Lane(state, rate, name in run.paused, self._order)
        return answers

    def _check_states(self, run: Run) -> None:
        unknown: dict[str, list[str]] = {}
        for job in run.jobs.values():
            if job.state not in self.states:
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

    def _start_lanes(self) -> None:
        run = self._run
        assert run is not None
        if self._joins:
            for job in run.jobs.values():
                if job.parent is not None:
                    self._kids.setdefault(job.parent, []).append(job.id)
                    if job.state in self._lanes:
                        self._open_kids[job.parent] = self._open_kids.get(job.parent, 0) + 1
        now = self._now()
        for job in run.jobs.values():
            self._count_in(job.state)
            lane = self._lanes.get(job.state)
            if lane is not None:
                self._enqueue(lane, job, now)
        for lane in self._lanes.values():
            if lane.ready:
                self._wake(lane)

    def _all_listeners(self) -> list[StatusListener]:
        listeners = list(self.listeners)
        if self.progress:
            from .progress import make_progress  # the only place rich is imported

            listeners.append(make_progress())
        return listeners

    def _note(self, message: str) -> None:
        """Tell the user something: through the listeners, or the "jorb" logger if none."""
        if not self._listeners:
            logger.warning("jorb: %s", message)
        for listener in self._listeners:
            listener.note(message)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.status_interval)
            status = self.statistics()
            for listener in self._listeners:
                listener.update(status)

    # -- queues and workers ------------------------------------------------------------------

    def _now(self) -> float:
        """Unix time, read from the event loop's clock (so a fake loop clock fakes it too)."""
        return self._clock() + self._offset

    def _count_in(self, state: str) -> None:
        lane = self._lanes.get(state)
        if lane is None:
            self._counts[state] += 1
        else:
            lane.jobs += 1
            self._active += 1

    def _count_out(self, state: str) -> None:
        lane = self._lanes.get(state)
        if lane is None:
            self._counts[state] -= 1
        else:
            lane.jobs -= 1
            self._active -= 1

    def _enqueue(self, lane: _Lane, job: Job, now: float) -> None:
        """Queue a job of the lane: ready, delayed, or waiting for its children. The caller
        then wakes the lane (once, after queueing all it has: that is a call per job less)."""
        if lane.state.join and self._waits_for_kids(lane, job):
            return
        if job.not_before is not None and job.not_before > now:
            lane.delayed += 1
            heapq.heappush(self._delayed, (job.not_before, next(self._order), job))
            if self._delayed[0][2] is job:
                self._arm_timer(now)
            return
        lane.ready.push(job)

    def _waits_for_kids(self, lane: _Lane, job: Job) -> bool:
        """Put a job of a join state that still has open children aside until they end."""
        if not self._open_kids.get(job.id):
            return False
        lane.awaiting += 1
        self._joining[job.id] = job
        return True

    def _wake(self, lane: _Lane) -> None:
        """Get a worker moving on the lane's ready jobs, unless one is already on its way.

        One at a time: a worker that takes a job wakes the next if jobs are left (it may wait
        in its exec), so execs that never wait are run by one worker, not one per job.
        """
        if lane.paused or self._stopping or lane.waking:
            return
        if lane.held + lane.claims >= lane.state.concurrency:
            return  # every slot is taken: a commit frees them and wakes the lane
        while lane.idle:
            parked = lane.idle.pop()
            if not parked.done():  # (a worker cancelled while parked left a cancelled one)
                lane.waking += 1
                parked.set_result(None)
                return
        if lane.workers < lane.state.concurrency:
            lane.workers += 1
            lane.waking += 1
            self._spawn(self._work(lane))

    def _spawn(self, coro: Any) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[None]) -> None:
        """A task ended: a failure (a checkpoint error, a bug) stops the whole exec."""
        self._tasks.discard(task)
        if task.cancelled():
            if self._stopping:
                return
            failure: BaseException = JorbError(f"a jorb task was cancelled unexpectedly: {task}")
        else:
            exception = task.exception()
            if exception is None:
                return
            failure = exception
        if self._finished is not None and not self._finished.done():
            self._finished.set_exception(failure)

    def _arm_timer(self, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        delay = max(0.0, self._delayed[0][0] - now)
        self._timer = self._loop.call_later(delay, self._release_delayed)

    def _release_delayed(self) -> None:
        self._timer = None
        now = self._now()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, job = heapq.heappop(self._delayed)
            lane = self._lanes[job.state]
            lane.delayed -= 1
            lane.ready.push(job)
            self._wake(lane)
        if self._delayed:
            self._arm_timer(now)

    async def _work(self, lane: _Lane) -> None:
        """One worker of a lane: throttle, take a job and a slot, run, settle; repeat."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        rate, limit = lane.rate, lane.state.concurrency
        lane.waking -= 1
        try:
            while not self._stopping:
                # Park unless a ready job is left that no worker waiting for the Rate will
                # take, and a slot is free for it.
                if (
                    len(lane.ready) <= lane.claims
                    or lane.held + lane.claims >= limit
                    or lane.paused
                ):
                    parked: asyncio.Future[None] = loop.create_future()
                    lane.idle.append(parked)
                    await parked
                    lane.waking -= 1
                    continue
                if rate.paused_until or rate.n != math.inf:
                    # Wait for the Rate *before* taking a job, so the job taken is the best one
                    # when the start is allowed, and a queued job can still be redriven.
                    lane.claims += 1
                    try:
                        await rate.acquire()
                    finally:
                        lane.claims -= 1
                    if self._stopping or lane.paused or not lane.ready or lane.held >= limit:
                        continue  # the start allowed goes unused: rare, and never exceeds the Rate
                job = lane.ready.pop()
                if lane.state.join and self._waits_for_kids(lane, job):
                    continue  # a child was redriven back to work since it was queued
                lane.held += 1
                if not lane.waking and lane.ready:  # (the test _wake starts with, without a call)
                    self._wake(lane)  # another worker for the rest, in case this exec waits
                await self._attempt(lane, job, task)
        finally:
            lane.workers -= 1

    async def _attempt(self, lane: _Lane, job: Job, task: asyncio.Task[None]) -> None:
        """Run one exec of ``job`` (its slot is taken), settle it and queue its record."""
        run, store, executor = self._run, self._store, self._executor
        assert run is not None and store is not None and executor is not None
        # The exec gets its own copy, exactly as it is on disk: a failed attempt that changed
        # it in place leaves nothing behind, before a restart or after.
        args: tuple[Any, ...] = (self.app, run.overall, orjson.loads(orjson.dumps(job.ctx)))
        if lane.state.join:
            args += (self._children(job.id),)
        lane.running += 1
        self._running.add(job.id)
        self._in_exec.add(task)
        started = self._clock() + self._offset  # self._now(), without a call (hot path)
        try:
            result = await executor.call(lane.state, args)
            error: Exception | None = None
        except Exception as e:
            result, error = None, e
        except asyncio.CancelledError as e:
            if self._stopping or task.cancelling():
                lane.held -= 1  # we are cancelling it: the job runs again on resume
                self._running.discard(job.id)
                raise
            # The exec's own code let a CancelledError out (a cancelled future it awaited):
            # that is its failure, not ours to stop on.
            result, error = None, ExecResultError(f"the exec raised CancelledError: {e}")
        finally:
            lane.running -= 1
            self._in_exec.discard(task)
        data, kids = self._settle(lane, job, result, error, started)
        for kid in kids:  # busy, like the job, until placed: a redrive must not move them first
            self._running.add(kid.id)
        batch = store.append(data)
        if batch is not self._batch:  # the first record of a new group commit
            self._batch, self._batch_jobs = batch, []
            batch.add_done_callback(functools.partial(self._committed, self._batch_jobs))
        self._batch_jobs.append((lane, job, kids))

    def _committed(
        self, settled: list[tuple[_Lane, Job, list[Job]]], batch: asyncio.Future[None]
    ) -> None:
        """A group commit is on disk: free its slots; its jobs' next steps and kids may start."""
        failure = batch.exception()  # (nothing cancels a batch: no worker awaits it)
        if failure is not None:
            if self._finished is not None and not self._finished.done():
                self._finished.set_exception(failure)
            return  # the run cannot checkpoint: the exec stops (nothing more may start)
        now = self._now()
        for lane, job, kids in settled:
            lane.held -= 1
            self._running.discard(job.id)
            next_lane = self._lanes.get(job.state)  # queue its next step, or note that it ended
            if next_lane is not None:
                self._enqueue(next_lane, job, now)
            elif job.parent is not None and self._joins:
                self._child_ended(job.parent)
            for kid in kids:  # a kid born terminal was never counted open: nothing to place
                self._running.discard(kid.id)
                kid_lane = self._lanes.get(kid.state)
                if kid_lane is not None:
                    self._enqueue(kid_lane, kid, now)
        for lane in self._lanes.values():
            if lane.ready:
                self._wake(lane)  # slots were freed, jobs queued
        self._check_finished()

    def _child_ended(self, parent: str) -> None:
        left = self._open_kids.get(parent, 0) - 1
        if left > 0:
            self._open_kids[parent] = left
            return
        self._open_kids.pop(parent, None)
        waiting = self._joining.pop(parent, None)
        if waiting is not None:
            lane = self._lanes[waiting.state]
            lane.awaiting -= 1
            self._enqueue(lane, waiting, self._now())
            self._wake(lane)

    def _children(self, parent: str) -> list[Child]:
        run = self._run
        assert run is not None
        kids = (run.jobs.get(i) for i in self._kids.get(parent, ()))
        return [Child(k.id, k.state, orjson.loads(orjson.dumps(k.ctx))) for k in kids if k]

    def _check_finished(self) -> None:
        finished = self._finished
        if finished is None or finished.done() or self._active or self._in_transit:
            return
        finished.set_result(None)

    def _ending(self) -> bool:
        """Whether the exec's end is decided (every job terminal, a signal, or a failure): a
        change applied now could leave a job open, so changes wait for the next exec."""
        return self._finished is None or self._finished.done()

    # -- settling an attempt into one journal record ------------------------------------------

    def _settle(
        self, lane: _Lane, job: Job, result: Any, error: Exception | None, started: float
    ) -> tuple[bytes, list[Job]]:
        """Turn an exec's outcome into a record, apply it to the run, and return its bytes."""
        run = self._run
        assert run is not None and self._loop is not None
        now = self._clock() + self._offset  # self._now(), without a call (hot path)
        seq = run.seq + 1
        kids: list[Job] = []
        if error is None:
            try:
                record, kids = outcome.success(self.states, job, result, run.next_id, started, now)
                record["seq"] = seq
                data = orjson.dumps(record, option=_LINE)
            except ExecResultError as e:
                error = e
            except TypeError as e:  # orjson: a ctx holds something JSON cannot represent
                error = ExecResultError(f"the returned ctx or a kick's ctx is not JSON: {e}")
            if error is not None:
                kids = []
        if error is None:
            lane.done += 1
            if lane.state.rate is not None:  # an unlimited lane has nothing to climb back to
                lane.rate.succeeded(self._loop.time())
        else:
            record, gave_up = outcome.failure(
                lane.state,
                job,
                error,
                error_state=self.error_state,
                retry_in=self._retry_in(lane, job, error),
                started=started,
                now=now,
            )
            record["seq"] = seq
            data = orjson.dumps(record, default=repr, option=_LINE)
            lane.errors += 1
            lane.failed += gave_up
        old = job.state
        apply_record(run, record)
        self._transitions += 1
        if job.state != old:
            lane.jobs -= 1
            self._active -= 1
            self._count_in(job.state)
        for kid in kids:
            self._count_in(kid.state)
            if self._joins:
                self._kids.setdefault(job.id, []).append(kid.id)
                if kid.state in self._lanes:
                    self._open_kids[job.id] = self._open_kids.get(job.id, 0) + 1
        return data, kids

    def _retry_in(self, lane: _Lane, job: Job, error: Exception) -> float | None:
        """Seconds before the job's next attempt; a rate limit also adapts the Rate."""
        state = lane.state
        if isinstance(error, RateLimited):
            assert self._loop is not None
            lane.rate.limited(self._loop.time(), error.retry_after)
            if error.retry_after is None and lane.rate.n == math.inf:
                return state.retry_delay(job.throttled + 1, random.random())
            return None  # the Rate (cut, or paused for retry_after) spaces the next start
        if state.backoff <= 0:
            return None
        return state.retry_delay(job.attempts + 1, random.random())

    # -- changes from outside (command line, Python API) ---------------------------------------

    async def _watch_inbox(self) -> None:
        run = self._run
        assert run is not None and run.path is not None
        while True:
            await asyncio.sleep(self.poll_interval)
            for file, req in control.pending(run.path):
                if self._ending():
                    return  # the rest wait in the inbox: applied offline once the lock is free
                try:
                    answer = await self._change(req)
                except (JorbError, TypeError, KeyError, ValueError) as e:
                    answer = {"error": f"could not apply the change: {e}"}
                control.reply(file, answer)
                if self._store is not None and self._store.failure is not None:
                    raise self._store.failure  # the run cannot checkpoint: stop the exec

    async def _change(self, req: dict[str, Any]) -> dict[str, Any]:
        """Apply one change through the journal and the lanes; returns the command's answer."""
        run, store = self._run, self._store
        assert run is not None and store is not None
        if req.get("id") in self._applied:
            return control.previous(run, req["id"])
        try:
            record = control.plan(run, req, busy=self._running.__contains__)
        except JorbError as e:
            return {"error": str(e)}
        except control.Unchanged as e:
            return {"result": e.result}
        op = record["op"]
        moved = [run.jobs[i] for i in record["jobs"]] if op == "redrive" else []
        before = {job.id: job.state for job in moved}
        self._detach(moved)
        record["seq"] = run.seq + 1
        data = orjson.dumps(record, option=_LINE)
        apply_record(run, record)
        self._applied.add(req["id"])
        added = record["jobs"] if op == "add" else []
        for job in added:
            self._count_in(job.state)
        ended = []  # parents whose child the redrive ends: they may join once it is on disk
        for job in moved:
            self._count_out(before[job.id])
            self._count_in(job.state)
            if self._joins and job.parent is not None:
                was_open, is_open = before[job.id] in self._lanes, job.state in self._lanes
                if is_open and not was_open:  # the parent waits for it again, from now on
                    self._open_kids[job.parent] = self._open_kids.get(job.parent, 0) + 1
                elif was_open and not is_open:
                    ended.append(job.parent)
        for job in [*added, *moved]:
            self._running.add(job.id)  # busy until placed: another change must not move it
        if op == "pause":
            self._lanes[record["name"]].paused = True
        await asyncio.shield(store.append(data))
        # On disk: the jobs may start, and a join waiting for a moved child may be released.
        now = self._now()
        for job in [*added, *moved]:
            self._running.discard(job.id)
            lane = self._lanes.get(job.state)
            if lane is not None:
                self._enqueue(lane, job, now)
                self._wake(lane)
        for parent in ended:
            self._child_ended(parent)
        if op == "resume":
            lane = self._lanes[record["name"]]
            lane.paused = record["name"] in run.paused  # a pause applied meanwhile stands
            self._wake(lane)
        self._note(f"applied: {record['change']['what']} (by {req.get('who')})")
        self._check_finished()
        return {"result": record["change"]["result"]}

    def _detach(self, jobs: list[Job]) -> None:
        """Take jobs out of the lanes' queues (a redrive is about to move them)."""
        ids = {job.id for job in jobs}
        if not ids:
            return
        for lane in self._lanes.values():
            lane.ready.discard(ids)
        kept = []
        for entry in self._delayed:
            if entry[2].id in ids:
                self._lanes[entry[2].state].delayed -= 1
            else:
                kept.append(entry)
        if len(kept) != len(self._delayed):
            self._delayed = kept
            heapq.heapify(kept)
        for ident in ids & self._joining.keys():
            job = self._joining.pop(ident)
            self._lanes[job.state].awaiting -= 1

    # -- stopping ------------------------------------------------------------------------------

    async def _exec_with_signals(self, run: Run) -> None:
        loop = asyncio.get_running_loop()
        installed = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, self._on_signal)
                installed.append(signum)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or no signals here: Ctrl-C raises KeyboardInterrupt
        try:
            await self.aexec(run)
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    def _on_signal(self) -> None:
        if self._interrupted:
            # Second signal: stop at once. The run file and journal are always loadable.
            show_cursor = b"\x1b[?25h" if os.isatty(1) else b""  # a live display hid it
            os.write(
                2,
                show_cursor
                + f"\njorb: stopped at once; running execs run again when you "
                f"resume: {_command_line()}\n".encode(),
            )
            os._exit(130)
        self._interrupted = True
        running = sum(lane.running for lane in self._lanes.values())
        message = (
            f"stopping: waiting up to {self.grace:g}s for {running} running exec(s); "
            f"Ctrl-C again to stop at once"
            if running
            else "stopping: no exec is running; saving the run"
        )
        if self._listeners:
            self._note(message)  # a live display prints it above its bars
        else:
            os.write(2, f"\njorb: {message}\n".encode())
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    async def _shutdown(self, grace: float) -> None:
        """Stop starting execs, let running ones finish (up to ``grace``), fold the journal in."""
        self._stopping = True
        with self._submit_lock:
            self._steering = None  # steering calls from now on wait for the next exec
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for lane in self._lanes.values():
            for parked in lane.idle:
                if not parked.done():
                    parked.set_result(None)
            lane.idle.clear()
        # Tasks not inside an exec are only waiting (for a rate, a slot, the disk): cancel now.
        for task in list(self._tasks):
            if task not in self._in_exec:
                task.cancel()
        if self._in_exec and grace > 0:
            await asyncio.wait(set(self._in_exec), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        store, executor = self._store, self._executor
        if executor is not None:
            executor.close()
            self._executor = None if isinstance(executor, LocalExecutor) else executor
        if store is not None:
            with contextlib.suppress(JorbError):
                await store.drain()
            store.finish()
            if store.failure is not None:
                raise store.failure


def _command_line() -> str:
    """The command that ran this script: the interpreter as invoked, then ``sys.argv``.

    ``sys.argv`` as the script left it, so a script that consumed a one-off flag (``--fresh``)
    by removing it is not told to start over.
    """
    if not sys.orig_argv or not sys.argv or not sys.argv[0]:
        return "your script"
    script = sys.argv[0]
    if script != "-c" and script in sys.orig_argv[1:]:
        interpreter = sys.orig_argv[: sys.orig_argv.index(script, 1)]
        return shlex.join([*interpreter, *sys.argv])
    return shlex.join(sys.orig_argv)  # python -c / -m: as invoked
