"""Lanes and workers: each non-terminal state's ready jobs, slots and the tasks running its execs.

A lane's workers are created on demand and parked when there is nothing to take. A worker waits
for the state's Rate, takes a job (and a slot), runs the exec through the executor seam and hands
the outcome to the commit path; it does not wait for the disk.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import math
import operator
import time
import types
from collections.abc import Callable, Collection, Coroutine, Generator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from .errors import exec_error
from .model import Job
from .states import Rate, State

if TYPE_CHECKING:
    from .executor import Executor
    from .processor import Processor


#: How long a worker runs execs that never wait, batch after batch, before it lets the loop turn.
INLINE_SECONDS = 0.02


_STATE = operator.attrgetter("state")


def _direct(executor: Executor, state: State) -> Callable[..., Any] | None:
    """The exec to call directly, one coroutine less, where the executor offers that (an async
    def with nothing around it: ``LocalExecutor.direct``); else None: go through ``call``."""
    offer = getattr(executor, "direct", None)
    return offer(state) if offer is not None else None


class Ready:
    """A lane's ready jobs: higher priority first, first in first out among equals.

    Nearly every job has priority 0: those wait in a deque (no entry object per job, O(1) each
    way); the others in a heap of ``(-priority, order, job)``. A million queued jobs are then a
    million deque slots, not a million tuples the garbage collector walks again and again.
    """

    __slots__ = ("front", "order", "plain", "ranked")

    def __init__(self, order: Iterator[int]) -> None:
        self.plain: collections.deque[Job] = collections.deque()
        self.ranked: list[tuple[int, int, Job]] = []
        self.order = order
        self.front = itertools.count(-1, -1)  # orders before every pushed job

    def __len__(self) -> int:
        return len(self.plain) + len(self.ranked)

    def __repr__(self) -> str:
        return f"<Ready {len(self.plain)} plain, {len(self.ranked)} ranked>"

    def push(self, job: Job) -> None:
        if job.priority:
            heapq.heappush(self.ranked, (-job.priority, next(self.order), job))
        else:
            self.plain.append(job)

    def push_front(self, job: Job) -> None:
        """Put back a job taken but not started: it is the next of its priority to start."""
        if job.priority:
            heapq.heappush(self.ranked, (-job.priority, next(self.front), job))
        else:
            self.plain.appendleft(job)

    def pop(self) -> Job:
        """The next job to start (the caller knows one is ready)."""
        ranked = self.ranked
        if ranked and (ranked[0][0] < 0 or not self.plain):  # above 0, or nothing at 0 left
            return heapq.heappop(ranked)[2]
        return self.plain.popleft()

    def discard(self, ids: set[str]) -> None:
        """Take the jobs with these ids out (a redrive is about to move them)."""
        plain = self.plain  # (changed in place: Lanes.queue holds its append)
        if any(job.id in ids for job in plain):
            kept = [job for job in plain if job.id not in ids]
            plain.clear()
            plain.extend(kept)
        if any(entry[2].id in ids for entry in self.ranked):
            self.ranked = [entry for entry in self.ranked if entry[2].id not in ids]
            heapq.heapify(self.ranked)


class Lane:
    """A non-terminal state at run time: its ready jobs, its workers and its counters."""

    __slots__ = (
        "awaiting",
        "budget",
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
        "unsynced",
        "waits",
        "waking",
        "workers",
    )

    def __init__(
        self, state: State, rate: Rate, paused: bool, order: Iterator[int], budget: int
    ) -> None:
        self.state = state
        self.rate = rate
        self.paused = paused
        self.ready = Ready(order)
        self.idle: list[asyncio.Future[None]] = []  # parked workers
        self.workers = self.jobs = self.delayed = self.awaiting = self.running = 0
        self.held = 0  # slots taken: jobs taken by a worker and not settled yet
        self.unsynced = 0  # transitions settled whose group commit is not on disk yet
        self.budget = budget  # no exec starts while this many are (the lane's crash bound)
        self.waits = False  # whether its last exec waited (then refills are made in bulk)
        self.claims = 0  # workers waiting for the Rate, each about to take a ready job
        self.waking = 0  # workers woken (or spawned) that have not run yet
        self.done = self.errors = self.failed = 0

    def __repr__(self) -> str:
        return (
            f"<Lane {self.state.name} ready={len(self.ready)} running={self.running} "
            f"held={self.held}/{self.state.concurrency} unsynced={self.unsynced} "
            f"workers={self.workers}>"
        )


class Lanes:
    """The lanes of one exec, the jobs counted per state, and the workers that run attempts.

    ``lanes.enqueue(lane, job, now)`` then ``lanes.wake(lane)`` gets a job started.
    """

    __slots__ = (
        "active",
        "by_name",
        "cancelled",
        "counts",
        "executing",
        "in_exec",
        "placing",
        "proc",
        "queue",
        "running",
    )

    def __init__(self, proc: Processor) -> None:
        self.proc = proc
        self.by_name: dict[str, Lane] = {}
        self.counts: dict[str, int] = {}  # jobs per terminal state
        self.active = 0  # non-terminal jobs
        # Jobs a change must not move: in an attempt (exec or commit), or created or moved by a
        # record that is not on disk yet (kicked children, added or redriven jobs). The Job
        # objects, not their ids: a job hashes by identity, without reading its id string.
        self.running: set[Job] = set()
        self.in_exec: set[asyncio.Task[None]] = set()
        # Execs that wait, by job id (one that never waits cannot be interrupted anyway).
        self.executing: dict[str, asyncio.Task[None]] = {}
        self.cancelled: set[str] = set()  # jobs whose exec `jorb cancel` is cancelling
        # Jobs a change has moved whose record is not on disk yet: they stay in ``running``
        # until it is, even if a cancelled exec of theirs ends first (the change frees them).
        self.placing: set[Job] = set()
        #: For each lane whose state does not join, the append of its plain ready queue: a job
        #: with no delay and no priority goes there (what ``enqueue`` does, without a call).
        self.queue: dict[str, Callable[[Job], None]] = {}

    def __repr__(self) -> str:
        return f"<Lanes {list(self.by_name.values())} active={self.active}>"

    def open(self, states: Mapping[str, State], paused: Collection[str], max_pending: int) -> None:
        """Make a lane per non-terminal state, each with its share of ``max_pending``."""
        lanes = sum(not state.terminal for state in states.values())
        budget = max(1, max_pending // max(1, lanes))
        for name, state in states.items():
            if state.terminal:
                self.counts[name] = 0
            else:
                rate = state.rate or Rate.unlimited()
                lane = self.by_name[name] = Lane(
                    state, rate, name in paused, self.proc._order, budget
                )
                if not state.join:
                    self.queue[name] = lane.ready.plain.append

    def load(self, jobs: Collection[Job], now: float) -> None:
        """Count and queue the jobs of a run as loaded, then wake the lanes."""
        by_name = self.by_name
        for state, n in collections.Counter(map(_STATE, jobs)).items():
            self.count_many(state, n)
        queue = self.queue
        for job in jobs:
            add = queue.get(job.state)
            if add is not None and job.not_before is None and not job.priority:
                add(job)
            elif job.state in by_name:
                self.enqueue(by_name[job.state], job, now)
        self.wake_all()

    def count_in(self, state: str) -> None:
        lane = self.by_name.get(state)
        if lane is None:
            self.counts[state] += 1
        else:
            lane.jobs += 1
            self.active += 1

    def count_many(self, state: str, n: int) -> None:
        """``count_in(state)`` ``n`` times."""
        lane = self.by_name.get(state)
        if lane is None:
            self.counts[state] += n
        else:
            lane.jobs += n
            self.active += n

    def count_out(self, state: str) -> None:
        lane = self.by_name.get(state)
        if lane is None:
            self.counts[state] -= 1
        else:
            lane.jobs -= 1
            self.active -= 1

    def enqueue(self, lane: Lane, job: Job, now: float) -> None:
        """Queue a job of the lane: ready, delayed, or waiting for its children. The caller
        then wakes the lane (once, after queueing all it has: that is a call per job less)."""
        waiting = self.proc._waiting
        if lane.state.join and waiting.waits_for_kids(lane, job):
            return
        if job.not_before is not None and job.not_before > now:
            waiting.delay(lane, job, now)
            return
        lane.ready.push(job)

    def wake(self, lane: Lane) -> None:
        """Get workers moving on the lane's ready jobs, unless enough are on their way.

        A lane whose execs return without waiting gets one worker at a time: it takes a batch
        of jobs, up to the free slots, and runs them inline. A lane whose execs wait gets a
        worker per free slot at once (each takes a job), so freed slots refill in one turn.
        """
        if lane.paused or self.proc._stopping:
            return
        free = lane.state.concurrency - lane.held - lane.claims
        if free <= 0 or lane.unsynced >= lane.budget:
            return  # a commit frees them and wakes the lane
        if lane.waits and lane.rate.n == math.inf and not lane.rate.paused_until:
            want = min(len(lane.ready), free) - lane.waking
        else:
            want = 0 if lane.waking else 1
        idle = lane.idle
        while want > 0:
            while idle:
                parked = idle.pop()
                if not parked.done():  # (a worker cancelled while parked left a cancelled one)
                    lane.waking += 1
                    parked.set_result(None)
                    break
            else:
                if lane.workers >= lane.state.concurrency:
                    return
                lane.workers += 1
                lane.waking += 1
                self.proc._spawn(self._work(lane))
            want -= 1

    def wake_all(self) -> None:
        """Wake every lane with ready jobs (slots were freed, jobs queued)."""
        for lane in self.by_name.values():
            if lane.ready:
                self.wake(lane)

    def cancel_exec(self, ident: str) -> None:
        """Cancel the running exec of job ``ident`` (a ``jorb cancel`` has moved the job): an
        ``async def`` sees CancelledError, a pool ends the worker process running it, a ``def``
        in a thread is abandoned; whatever it returns is never settled."""
        self.cancelled.add(ident)
        self.executing[ident].cancel()

    def unpark_all(self) -> None:
        """Release every parked worker (the exec is stopping)."""
        for lane in self.by_name.values():
            for parked in lane.idle:
                if not parked.done():
                    parked.set_result(None)
            lane.idle.clear()

    async def _work(self, lane: Lane) -> None:
        """One worker of a lane: throttle, take jobs and slots, run, settle; repeat."""
        proc = self.proc
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        rate, limit, ready = lane.rate, lane.state.concurrency, lane.ready
        join = lane.state.join
        lane.waking -= 1
        since = time.monotonic()  # when this worker last let the loop turn
        try:
            while not proc._stopping:
                # Park unless a ready job is left that no worker waiting for the Rate will
                # take, a slot is free for it, and the lane's commits keep up.
                if (
                    len(ready) <= lane.claims
                    or lane.held + lane.claims >= limit
                    or lane.paused
                    or lane.unsynced >= lane.budget
                ):
                    parked: asyncio.Future[None] = loop.create_future()
                    lane.idle.append(parked)
                    await parked
                    lane.waking -= 1
                    since = time.monotonic()
                    continue
                if rate.paused_until or rate.n != math.inf:
                    # Wait for the Rate *before* taking a job, so the job taken is the best one
                    # when the start is allowed, and a queued job can still be redriven.
                    lane.claims += 1
                    try:
                        await rate.acquire()
                    finally:
                        lane.claims -= 1
                    if (
                        proc._stopping
                        or lane.paused
                        or not ready
                        or lane.held >= limit
                        or lane.unsynced >= lane.budget
                    ):
                        continue  # the start allowed goes unused: rare, and never exceeds the Rate
                    take = 1
                elif lane.waits:
                    take = 1  # its execs wait: each worker takes one (wake sent enough)
                else:
                    take = min(len(ready), limit - lane.held, lane.budget - lane.unsynced)
                if not join and not ready.ranked:  # the usual case: priority 0, no fan-in
                    plain = ready.plain
                    jobs = [plain.popleft() for _ in range(take)]
                else:
                    jobs = []
                    for _ in range(take):
                        job = ready.pop()
                        if join and proc._waiting.waits_for_kids(lane, job):
                            continue  # a child was redriven back to work since it was queued
                        jobs.append(job)
                    if not jobs:
                        continue
                lane.held += len(jobs)
                if not lane.waking and ready:  # (the test wake starts with, without a call)
                    self.wake(lane)  # another worker for the rest, in case these execs wait
                try:
                    await self._attempts(lane, jobs, task)
                except GeneratorExit:
                    # An exec awaited a future holding a GeneratorExit: asyncio threw it into
                    # this task, which closed the coroutines under it (_wait_for settled the
                    # attempt as the job's error). The worker goes on, unless its coroutine is
                    # being closed from outside the task (a loop abandoned): then it ends.
                    if asyncio.current_task(loop) is not task:
                        raise
                if lane.waits:  # its last exec waited: the loop turned meanwhile
                    since = time.monotonic()
                elif time.monotonic() - since > INLINE_SECONDS:
                    # Execs that never wait but take long (CPU work in an async def): let the
                    # loop turn (commits, timers, Ctrl-C, the progress display) between batches.
                    await asyncio.sleep(0)
                    since = time.monotonic()
        finally:
            lane.workers -= 1

    async def _attempts(self, lane: Lane, jobs: list[Job], task: asyncio.Task[None]) -> None:
        """Run the execs of ``jobs`` (their slots are taken) one after the other, and settle
        each. Execs that return without waiting all run inside one coroutine (``_inline``), so
        one that returns costs no StopIteration of its own; at the first that waits, the jobs
        not started yet go back to the lane (other workers take them) and this worker waits
        for it. Plain successes are settled together, once per batch."""
        self.running.update(jobs)
        # Each exec gets its own copy, exactly as it is on disk: a failed attempt that changed
        # it in place leaves nothing behind, before a restart or after. One round trip for all.
        if len(jobs) == 1:  # (a lane whose execs wait: a job per worker)
            await self._attempt(lane, jobs[0], orjson.loads(orjson.dumps(jobs[0].ctx)), task)
            return
        copies = orjson.loads(orjson.dumps([job.ctx for job in jobs]))
        ok: list[list[Any]] = []  # plain successes: [id, to, ctx, time, duration]
        ok_jobs: list[Job] = []
        at: list[Any] = [0, 0.0, False]  # the exec running: its index, its start, if it waited
        inline = self._inline(lane, jobs, copies, task, ok, ok_jobs, at)
        try:
            yielded = inline.send(None)
        except StopIteration:
            return  # none waited: all settled (or the exec is stopping)
        # One waits: the jobs not started go back to the lane, for other workers.
        i, started = at[0], at[1]
        at[2] = True
        lane.running += 1
        if ok:
            self.proc._commits.settle_ok(lane, ok, ok_jobs)
        self._give_back(lane, jobs[i + 1 :])
        lane.waits = True
        if lane.ready:
            self.wake(lane)
        await self._wait_for(lane, jobs[i], task, inline, yielded, started)

    async def _attempt(self, lane: Lane, job: Job, copy: Any, task: asyncio.Task[None]) -> None:
        """``_attempts`` for one job: its exec is started by hand, so one that waits goes on in
        ``_wait_for`` with no coroutine of ours around it (cheaper where every exec waits)."""
        proc = self.proc
        executor = proc._executor
        assert executor is not None
        state = lane.state
        args: tuple[Any, ...] = (proc.app, proc._overall, copy)
        if state.join:
            args += (proc._waiting.children(job.id),)
        direct = _direct(executor, state)
        started = proc._clock() + proc._offset  # proc._now(), without a call (hot path)
        coro = executor.call(state, args) if direct is None else direct(*args)
        if type(coro) is not types.CoroutineType:  # an executor's call returned another
            coro = _awaiting(coro)  # awaitable (a Future, a Cython coroutine): drive that
        lane.running += 1
        try:
            yielded = coro.send(None)
        except StopIteration as stop:  # it returned without waiting
            result, error = stop.value, None
        except Exception as e:
            result, error = None, e
        except asyncio.CancelledError as e:
            if proc._stopping or task.cancelling():
                lane.running -= 1
                lane.held -= 1  # we are cancelling it: the job runs again on resume
                self.running.discard(job)
                raise
            result, error = None, exec_error(e)
        except (SystemExit, KeyboardInterrupt) as e:
            lane.running -= 1
            self._exited(lane, job, e)
            return
        except BaseException as e:  # (GeneratorExit, a class of the user's): the job's error
            result, error = None, exec_error(e)
        else:  # it waits
            lane.waits = True
            if lane.ready:
                self.wake(lane)
            await self._wait_for(lane, job, task, coro, yielded, started)
            return
        lane.running -= 1
        proc._commits.settle(lane, job, result, error, started)
        lane.waits = False

    async def _inline(
        self,
        lane: Lane,
        jobs: list[Job],
        copies: list[Any],
        task: asyncio.Task[None],
        ok: list[list[Any]],
        ok_jobs: list[Job],
        at: list[Any],
    ) -> Any:
        """The execs of ``_attempts``, each settled as it returns (plain successes into
        ``ok``). Once ``at[2]`` says the exec running waited, what it returns or raises is
        passed on as it is, for ``_wait_for`` to settle, and no other exec starts.

        An exec counts in ``lane.running`` only once it waits (``_attempts`` counts it then):
        one that returns without waiting ran while nothing on the loop could look."""
        proc = self.proc
        executor = proc._executor
        assert executor is not None
        state, app, overall, join = lane.state, proc.app, proc._overall, lane.state.join
        commits, call, names = proc._commits, executor.call, proc._names
        direct = _direct(executor, state)
        plain = direct if not join else None  # (the usual exec: called with three arguments)
        clock, offset = proc._clock, proc._offset
        # When the previous exec ended and was settled (proc._now(), without a call: hot path):
        # the next one starts then, so one clock read serves both.
        now = clock() + offset
        for i, job in enumerate(jobs):
            if plain is None:
                args: tuple[Any, ...] = (app, overall, copies[i])
                if join:
                    args += (proc._waiting.children(job.id),)
            started = now
            at[0] = i
            at[1] = started
            try:
                if plain is not None:
                    result = await plain(app, overall, copies[i])
                else:
                    # (An executor's call may return any awaitable: a Future, a Cython coroutine.)
                    result = await (call(state, args) if direct is None else direct(*args))
            except Exception as e:
                if at[2]:
                    raise
                commits.settle(lane, job, None, e, started)
                if proc._stopping:  # a bug in the script stopped the exec: start no more
                    break
                if lane.rate.paused_until > asyncio.get_running_loop().time():  # a RateLimited
                    break  # paused the lane: the jobs not started go back and wait it out
                now = clock() + offset
                continue
            except asyncio.CancelledError as e:
                if at[2]:
                    raise
                if proc._stopping or task.cancelling():
                    if ok:
                        commits.settle_ok(lane, ok, ok_jobs)
                    self._give_back(lane, jobs[i + 1 :])
                    lane.held -= 1  # we are cancelling it: the job runs again on resume
                    self.running.discard(job)
                    raise
                commits.settle(lane, job, None, exec_error(e), started)
                now = clock() + offset
                continue
            except (SystemExit, KeyboardInterrupt) as e:
                if at[2]:
                    raise
                if ok:
                    commits.settle_ok(lane, ok, ok_jobs)
                self._give_back(lane, jobs[i + 1 :])
                self._exited(lane, job, e)
                return None
            except BaseException as e:  # (GeneratorExit, a class of the user's): the job's error
                if at[2]:
                    raise
                commits.settle(lane, job, None, exec_error(e), started)
                now = clock() + offset
                continue
            if at[2]:
                return result  # it waited: _wait_for settles it
            if type(result) is tuple and len(result) == 2:  # (ctx, next_state)?
                ctx, to = result
                if type(ctx) is dict and type(to) is str and (to := names.get(to)) is not None:
                    now = clock() + offset
                    ok.append([job.id, to, ctx, now, now - started])
                    ok_jobs.append(job)
                    continue
            commits.settle(lane, job, result, None, started)
            if proc._stopping:
                break
            now = clock() + offset
        else:
            i = len(jobs)
        if ok:
            commits.settle_ok(lane, ok, ok_jobs)
        self._give_back(lane, jobs[i + 1 :])  # (after a stop: the jobs not started)
        lane.waits = False
        return None

    async def _wait_for(
        self,
        lane: Lane,
        job: Job,
        task: asyncio.Task[None],
        coro: Coroutine[Any, Any, Any],
        yielded: Any,
        started: float,
    ) -> None:
        """Go on with an exec that waits (counted running already), then settle it."""
        self.in_exec.add(task)
        self.executing[job.id] = task
        cancelled = self.cancelled
        try:
            result = await _resume(coro, yielded)
            error: Exception | None = None
        except Exception as e:
            result, error = None, e
        except asyncio.CancelledError as e:
            if cancelled and job.id in cancelled and not self.proc._stopping:
                result, error = None, None  # `jorb cancel`: dropped just below
            elif self.proc._stopping or task.cancelling():
                lane.held -= 1  # we are cancelling it: the job runs again on resume
                self.running.discard(job)
                cancelled.discard(job.id)
                raise
            else:
                # The exec's own code let a CancelledError out (a cancelled future it
                # awaited): that is its failure, not ours to stop on.
                result, error = None, exec_error(e)
        except (SystemExit, KeyboardInterrupt) as e:
            self._exited(lane, job, e)
            return
        except BaseException as e:  # (GeneratorExit, a class of the user's): the job's error,
            if asyncio.current_task(task.get_loop()) is not task:  # unless the coroutine is
                raise  # being closed (a GeneratorExit thrown in from outside the task)
            result, error = None, exec_error(e)
        finally:
            lane.running -= 1
            self.in_exec.discard(task)
            del self.executing[job.id]
        if cancelled and job.id in cancelled:
            self._dropped(lane, job, task)
            return
        self.proc._commits.settle(lane, job, result, error, started)

    def _dropped(self, lane: Lane, job: Job, task: asyncio.Task[None]) -> None:
        """The exec of a job ``jorb cancel`` moved away ended (cancelled, or it returned first):
        its outcome is not used, its slot is free, and the worker goes on."""
        self.cancelled.discard(job.id)
        if task.cancelling():  # (ours: one cancel, caught here or swallowed by the exec)
            task.uncancel()
        lane.held -= 1
        if job not in self.placing:  # (else the cancel is not on disk yet: it frees the job)
            self.running.discard(job)

    def _exited(self, lane: Lane, job: Job, raised: BaseException) -> None:
        """sys.exit() (or an interrupt) inside an exec: the job stays where it is (its slot is
        freed, nothing recorded), the run is saved, and the exec stops saying which job and
        exec raised it."""
        lane.held -= 1
        self.running.discard(job)
        self.proc._stops.exit(job, lane.state, raised)

    def _give_back(self, lane: Lane, jobs: list[Job]) -> None:
        """Free the slots of jobs taken but not settled; those not started go back in line."""
        if not jobs:
            return
        lane.held -= len(jobs)
        self.running.difference_update(jobs)
        if not self.proc._stopping:
            for job in reversed(jobs):
                lane.ready.push_front(job)


async def _awaiting(awaitable: Any) -> Any:
    return await awaitable


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Await the rest of a coroutine started by hand (``send(None)``) that yielded ``yielded``.

    What the task running it sends or throws in goes on to the coroutine, as if the task had
    awaited it from the start (so a cancellation, a timeout, reaches the exec's own code).
    """
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:
            try:
                yielded = coro.throw(e)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value
