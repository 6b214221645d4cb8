"""The Processor: one coordinator drives every job of a run through its states.

Shape of the machine. Each non-terminal state is a *lane*: a priority/FIFO heap of ready jobs
and at most ``concurrency`` worker tasks, created on demand and parked when the lane is empty.
A worker takes a job, waits for the state's Rate, runs the exec through the executor seam, and
hands the outcome to ``_settle``, which turns it into one journal record (new state, ctx,
history, error, kicked children) and applies it to the run. The worker then waits for the
record to be on disk (group commit) before it releases its slot and the job's next step and
children become ready. Everything runs on one event loop, so nothing is locked: the run is only
ever touched from the loop, and workers only hand results to the coordinator.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from .checkpoint import Store
from .errors import ExecResultError, JorbError, RateLimited, RunFileError, StateError
from .executor import Executor, LocalExecutor
from .model import Job, Kick, Run, apply_record
from .states import Rate, State, validate
from .status import StateStatus, Status, StatusListener

__all__ = ["Processor"]


class _Lane:
    """A non-terminal state at run time: its ready jobs, its workers and its counters."""

    __slots__ = (
        "delayed",
        "done",
        "errors",
        "failed",
        "idle",
        "jobs",
        "paused",
        "rate",
        "ready",
        "running",
        "state",
        "workers",
    )

    def __init__(self, state: State, rate: Rate | None) -> None:
        self.state = state
        self.rate = rate
        self.ready: list[tuple[int, int, Job]] = []  # (-priority, order, job): a heap
        self.workers = 0
        self.idle: list[asyncio.Future[None]] = []  # parked workers
        self.paused = False
        self.jobs = self.delayed = self.running = self.done = self.errors = self.failed = 0

    def __repr__(self) -> str:
        return (
            f"<Lane {self.state.name} ready={len(self.ready)} running={self.running} "
            f"workers={self.workers}/{self.state.concurrency}>"
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
        self._executor = executor
        self._run: Run | None = None
        self._store: Store | None = None
        self._lanes: dict[str, _Lane] = {}
        self._counts: dict[str, int] = {}  # jobs per terminal state
        self._delayed: list[tuple[float, int, Job]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._order = itertools.count()
        self._active = 0  # non-terminal jobs
        self._transitions = 0
        self._finished: asyncio.Future[None] | None = None
        self._stopping = False
        self._interrupted = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_exec: set[asyncio.Task[None]] = set()
        self._wall0 = 0.0
        self._mono0 = 0.0
        self._started = 0.0

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
                f"Resume by running the same command again: {_command_line()}",
                file=sys.stderr,
            )
            raise SystemExit(130)
        return run

    async def aexec(self, run: Run) -> Run:
        """Async twin of :meth:`exec`; cancelling it checkpoints and re-raises."""
        loop = asyncio.get_running_loop()
        self._prepare(run, loop)
        store = self._store
        assert store is not None
        listeners = self._all_listeners()
        ticker = None
        try:
            for listener in listeners:
                listener.start(self.statistics())
                for name in sorted(run.paused):
                    listener.note(f"state {name!r} is paused (`jorb resume {run.path} {name}`)")
            if listeners:
                ticker = loop.create_task(self._tick(listeners))
            self._start_lanes()
            self._check_finished()
            assert self._finished is not None
            await self._finished
        except asyncio.CancelledError:
            await self._shutdown(grace=0.0)
            raise
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
            rows.append(
                StateStatus(
                    name,
                    False,
                    lane.jobs,
                    waiting=max(0, lane.jobs - lane.running - lane.delayed),
                    delayed=lane.delayed,
                    running=lane.running,
                    done=lane.done,
                    errors=lane.errors,
                    failed=lane.failed,
                    paused=lane.paused,
                    concurrency=state.concurrency,
                    rate=None if rate is None or rate.n == math.inf else rate.current / rate.per,
                )
            )
        finished = sum(self._counts.values())
        total = finished + sum(lane.jobs for lane in self._lanes.values())
        elapsed = time.monotonic() - self._started if self._started else 0.0
        return Status(tuple(rows), total, finished, elapsed, self._transitions)

    # -- setup -----------------------------------------------------------------------------------

    def _prepare(self, run: Run, loop: asyncio.AbstractEventLoop) -> None:
        """Check the run against the declarations, take its lock, write the first checkpoint."""
        if run.path is None:
            raise RunFileError("the run has no path; create it with jorb.Run.open(path)")
        unknown: dict[str, list[str]] = {}
        for job in run.jobs.values():
            if job.state not in self.states:
                unknown.setdefault(job.state, []).append(job.id)
        if unknown:
            detail = "; ".join(
                f"{state!r} (jobs {', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})"
                for state, ids in sorted(unknown.items())
            )
            raise StateError(
                f"{run.path}: jobs are in states the script does not declare: {detail}. "
                f"Declare them, or edit the run file (`jorb redrive {run.path} --from S --to T`)"
            )
        store = run._holder
        if store is None:
            store = run._holder = Store(run.path, durable=self.durable)
        store.durable = self.durable
        self._run, self._store = run, store
        run.declared = [{"name": s.name, "terminal": s.terminal} for s in self.states.values()]
        store.begin(run)  # every added job and the declarations reach disk here
        self._executor = self._executor or LocalExecutor(self.states.values())
        self._finished = loop.create_future()
        self._stopping = self._interrupted = False
        self._active = self._transitions = 0
        self._delayed = []
        self._wall0, self._mono0 = time.time(), loop.time()
        self._started = time.monotonic()
        unlimited: dict[str, Rate] = {}
        self._lanes = {}
        self._counts = {}
        for name, state in self.states.items():
            if state.terminal:
                self._counts[name] = 0
            else:
                rate = state.rate or unlimited.setdefault(name, Rate.unlimited())
                self._lanes[name] = lane = _Lane(state, rate)
                lane.paused = name in run.paused

    def _start_lanes(self) -> None:
        run = self._run
        assert run is not None
        now = self._now()
        for job in run.jobs.values():
            lane = self._lanes.get(job.state)
            if lane is None:
                self._counts[job.state] += 1
                continue
            lane.jobs += 1
            self._active += 1
            self._enqueue(lane, job, now)

    def _all_listeners(self) -> list[StatusListener]:
        listeners = list(self.listeners)
        if self.progress:
            from .progress import make_progress  # the only place rich is imported

            listeners.append(make_progress())
        return listeners

    async def _tick(self, listeners: list[StatusListener]) -> None:
        while True:
            await asyncio.sleep(self.status_interval)
            status = self.statistics()
            for listener in listeners:
                listener.update(status)

    # -- queues and workers ------------------------------------------------------------------

    def _now(self) -> float:
        """Unix time, read from the event loop's clock (so a fake loop clock fakes it too)."""
        return self._wall0 + asyncio.get_running_loop().time() - self._mono0

    def _enqueue(self, lane: _Lane, job: Job, now: float) -> None:
        if job.not_before is not None and job.not_before > now:
            lane.delayed += 1
            heapq.heappush(self._delayed, (job.not_before, next(self._order), job))
            if self._delayed[0][2] is job:
                self._arm_timer(now)
            return
        heapq.heappush(lane.ready, (-job.priority, next(self._order), job))
        self._wake(lane)

    def _wake(self, lane: _Lane) -> None:
        if lane.paused or self._stopping:
            return
        if lane.idle:
            idle = lane.idle.pop()
            if not idle.done():
                idle.set_result(None)
        elif lane.workers < lane.state.concurrency:
            lane.workers += 1
            self._spawn(self._work(lane))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[None]) -> None:
        """A worker ended: a failure (a checkpoint error, a bug) stops the whole exec."""
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        if self._finished is not None and not self._finished.done():
            self._finished.set_exception(task.exception())  # type: ignore[arg-type]

    def _arm_timer(self, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, self._delayed[0][0] - now), self._release_delayed)

    def _release_delayed(self) -> None:
        self._timer = None
        now = self._now()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, job = heapq.heappop(self._delayed)
            lane = self._lanes[job.state]
            lane.delayed -= 1
            heapq.heappush(lane.ready, (-job.priority, next(self._order), job))
            self._wake(lane)
        if self._delayed:
            self._arm_timer(now)

    async def _work(self, lane: _Lane) -> None:
        """One worker of a lane: take, throttle, run, settle, wait for disk; repeat."""
        loop = asyncio.get_running_loop()
        rate = lane.rate
        assert rate is not None and self._store is not None
        try:
            while not self._stopping:
                if not lane.ready or lane.paused:
                    parked: asyncio.Future[None] = loop.create_future()
                    lane.idle.append(parked)
                    await parked
                    continue
                entry = heapq.heappop(lane.ready)
                if rate.paused_until or rate.n != math.inf:
                    try:
                        await rate.acquire()
                    except asyncio.CancelledError:
                        heapq.heappush(lane.ready, entry)
                        raise
                    if self._stopping or lane.paused:
                        heapq.heappush(lane.ready, entry)
                        continue
                await self._attempt(lane, entry[2], loop)
        finally:
            lane.workers -= 1

    async def _attempt(self, lane: _Lane, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        run, store, executor = self._run, self._store, self._executor
        assert run is not None and store is not None and executor is not None
        lane.running += 1
        task = asyncio.current_task()
        assert task is not None
        self._in_exec.add(task)
        started = self._now()
        try:
            try:
                result = await executor.call(lane.state, self.app, run.overall, dict(job.ctx))
                error: Exception | None = None
            except Exception as e:
                result, error = None, e
            finally:
                self._in_exec.discard(task)
            record, kids = self._settle(lane, job, result, error, started)
            # Shielded: a cancelled worker must not cancel the batch other workers wait on.
            await asyncio.shield(store.append(record))
        finally:
            lane.running -= 1
        # The transition is on disk: the job's next step and its children may start.
        now = self._now()
        self._after_commit(job, now)
        for kid in kids:
            self._after_commit(kid, now, new=True)
        self._check_finished()

    def _after_commit(self, job: Job, now: float, *, new: bool = False) -> None:
        lane = self._lanes.get(job.state)
        if lane is not None:
            self._enqueue(lane, job, now)
        elif not new:
            self._active -= 1

    def _check_finished(self) -> None:
        if self._active == 0 and self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    # -- settling an attempt into one journal record ------------------------------------------

    def _settle(
        self, lane: _Lane, job: Job, result: Any, error: Exception | None, started: float
    ) -> tuple[bytes, list[Job]]:
        """Turn an exec's outcome into a record, apply it to the run, and return its bytes."""
        run = self._run
        assert run is not None
        now = self._now()
        seq = run.seq + 1
        kids: list[Job] = []
        if error is None:
            try:
                record, kids = self._success(run, job, result, started, now)
                record["seq"] = seq
                data = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
            except ExecResultError as e:
                error = e
            except TypeError as e:  # orjson: a ctx holds something JSON cannot represent
                error = ExecResultError(f"the returned ctx or a kick's ctx is not JSON: {e}")
            if error is not None:
                kids = []
        if error is not None:
            record = self._failure(run, lane, job, error, started, now)
            record["seq"] = seq
            data = orjson.dumps(record, default=repr, option=orjson.OPT_APPEND_NEWLINE)
        else:
            lane.done += 1
            assert lane.rate is not None
            lane.rate.succeeded(asyncio.get_running_loop().time())
        old = job.state
        apply_record(run, record)
        self._transitions += 1
        if job.state != old:
            lane.jobs -= 1
            self._count_in(job.state)
        for kid in kids:
            self._count_in(kid.state)
            if kid.state in self._lanes:
                self._active += 1
        return data, kids

    def _count_in(self, state: str) -> None:
        lane = self._lanes.get(state)
        if lane is None:
            self._counts[state] += 1
        else:
            lane.jobs += 1

    def _success(
        self, run: Run, job: Job, result: Any, started: float, now: float
    ) -> tuple[dict[str, Any], list[Job]]:
        ctx, next_state, kicks = _unpack(result)
        if next_state not in self.states:
            raise ExecResultError(f"returned undeclared state {next_state!r}")
        kids: list[Job] = []
        next_id = run.next_id
        for kick in kicks:
            if not isinstance(kick, Kick):
                raise ExecResultError(f"kicks must be jorb.Kick objects, got {type(kick).__name__}")
            if kick.state not in self.states:
                raise ExecResultError(f"kicked a job into undeclared state {kick.state!r}")
            if not isinstance(kick.ctx, dict):
                raise ExecResultError(f"a kick's ctx must be a dict, not {type(kick.ctx).__name__}")
            delay = kick.delay
            not_before = now + delay if delay else None
            kids.append(Job(str(next_id), kick.state, kick.ctx, job.id, kick.priority, not_before))
            next_id += 1
        record: dict[str, Any] = {
            "job": job.id,
            "to": next_state,
            "ctx": ctx,
            "attempts": 0,
            "throttled": 0,
            "not_before": None,
            "history": {
                "from": job.state,
                "to": next_state,
                "time": now,
                "duration": now - started,
            },
        }
        if kids:
            record["kids"] = kids
            record["next_id"] = next_id
        return record, kids

    def _failure(
        self, run: Run, lane: _Lane, job: Job, error: Exception, started: float, now: float
    ) -> dict[str, Any]:
        state = lane.state
        lane.errors += 1
        limited = isinstance(error, RateLimited)
        attempts, throttled = job.attempts, job.throttled
        not_before: float | None = None
        if limited:
            assert lane.rate is not None and isinstance(error, RateLimited)
            lane.rate.limited(asyncio.get_running_loop().time(), error.retry_after)
            throttled += 1
            give_up = throttled > state.rate_limit_retries
            if not give_up and error.retry_after is None and lane.rate.n == math.inf:
                not_before = now + state.retry_delay(throttled, random.random())
        else:
            attempts += 1
            give_up = attempts > state.retries
            if not give_up and state.backoff > 0:
                not_before = now + state.retry_delay(attempts, random.random())
        record: dict[str, Any] = {
            "job": job.id,
            "in": state.name,
            "error": {
                "message": str(error) or type(error).__name__,
                "type": _type_name(error),
                "traceback": "".join(traceback.format_exception(error)),
                "time": now,
                "attempt": job.attempts + job.throttled + 1,
                "rate_limited": limited,
            },
            "to": state.name,
            "attempts": attempts,
            "throttled": throttled,
            "not_before": not_before,
        }
        if give_up:
            lane.failed += 1
            to = state.on_error or self.error_state
            record.update(to=to, attempts=0, throttled=0, not_before=None)
            record["history"] = {
                "from": state.name,
                "to": to,
                "time": now,
                "duration": now - started,
            }
        return record

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
            os.write(2, b"\njorb: stopped at once; running execs will run again on resume\n")
            os._exit(130)
        self._interrupted = True
        running = sum(lane.running for lane in self._lanes.values())
        os.write(
            2,
            f"\njorb: stopping: waiting up to {self.grace:g}s for {running} running exec(s); "
            f"Ctrl-C again to stop at once\n".encode(),
        )
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    async def _shutdown(self, grace: float) -> None:
        """Stop starting execs, let running ones finish (up to ``grace``), fold the journal in."""
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for lane in self._lanes.values():
            for parked in lane.idle:
                if not parked.done():
                    parked.set_result(None)
            lane.idle.clear()
        # Workers not inside an exec are only waiting (for a rate or a slot): cancel them now.
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


def _unpack(result: Any) -> tuple[dict[str, Any], str, Sequence[Kick]]:
    if not isinstance(result, tuple | list) or len(result) not in (2, 3):
        raise ExecResultError(
            f"an exec must return (ctx, next_state) or (ctx, next_state, kicks), "
            f"not {_describe(result)}"
        )
    ctx, next_state = result[0], result[1]
    kicks = result[2] if len(result) == 3 else ()
    if not isinstance(ctx, dict):
        raise ExecResultError(f"the returned ctx must be a dict, not {type(ctx).__name__}")
    if not isinstance(next_state, str):
        raise ExecResultError(f"the returned next state must be a str, not {next_state!r}")
    if kicks is None:
        kicks = ()
    if not isinstance(kicks, list | tuple):
        raise ExecResultError(f"kicks must be a list of jorb.Kick, not {type(kicks).__name__}")
    return ctx, next_state, kicks


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _type_name(error: BaseException) -> str:
    kind = type(error)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def _command_line() -> str:
    args = [os.path.basename(sys.executable), *sys.argv] if sys.argv and sys.argv[0] else ["python"]
    return " ".join(args)
