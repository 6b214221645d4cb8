"""Lanes and workers: each non-terminal state's ready jobs, slots and the tasks running its execs.

A lane's workers are created on demand and parked when there is nothing to take. A worker waits
for the state's Rate, takes a job (and a slot), runs the exec through the executor seam and hands
the outcome to the commit path; it does not wait for the disk.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson

from .errors import JorbError
from .model import Job
from .states import Rate, State

if TYPE_CHECKING:
    from .processor import Processor


class Ready:
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


class Lane:
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
        self.ready = Ready(order)
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


class Lanes:
    """The lanes of one exec, the jobs counted per state, and the workers that run attempts.

    ``lanes.enqueue(lane, job, now)`` then ``lanes.wake(lane)`` gets a job started.
    """

    __slots__ = ("active", "by_name", "counts", "in_exec", "order", "proc", "running")

    def __init__(self, proc: Processor) -> None:
        self.proc = proc
        self.by_name: dict[str, Lane] = {}
        self.counts: dict[str, int] = {}  # jobs per terminal state
        self.active = 0  # non-terminal jobs
        # Ids of jobs a change must not move: in an attempt (exec or commit), or created or moved
        # by a record that is not on disk yet (kicked children, added or redriven jobs).
        self.running: set[str] = set()
        self.in_exec: set[asyncio.Task[None]] = set()
        self.order: Iterator[int] = proc._order

    def __repr__(self) -> str:
        return f"<Lanes {list(self.by_name.values())} active={self.active}>"

    def get(self, state: str) -> Lane | None:
        return self.by_name.get(state)

    def count_in(self, state: str) -> None:
        lane = self.by_name.get(state)
        if lane is None:
            self.counts[state] += 1
        else:
            lane.jobs += 1
            self.active += 1

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
        """Get a worker moving on the lane's ready jobs, unless one is already on its way.

        One at a time: a worker that takes a job wakes the next if jobs are left (it may wait
        in its exec), so execs that never wait are run by one worker, not one per job.
        """
        if lane.paused or self.proc._stopping or lane.waking:
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
            self.proc._spawn(self._work(lane))

    def wake_all(self) -> None:
        """Wake every lane with ready jobs (slots were freed, jobs queued)."""
        for lane in self.by_name.values():
            if lane.ready:
                self.wake(lane)

    def unpark_all(self) -> None:
        """Release every parked worker (the exec is stopping)."""
        for lane in self.by_name.values():
            for parked in lane.idle:
                if not parked.done():
                    parked.set_result(None)
            lane.idle.clear()

    async def _work(self, lane: Lane) -> None:
        """One worker of a lane: throttle, take a job and a slot, run, settle; repeat."""
        proc = self.proc
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        rate, limit = lane.rate, lane.state.concurrency
        lane.waking -= 1
        try:
            while not proc._stopping:
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
                    if proc._stopping or lane.paused or not lane.ready or lane.held >= limit:
                        continue  # the start allowed goes unused: rare, and never exceeds the Rate
                job = lane.ready.pop()
                if lane.state.join and proc._waiting.waits_for_kids(lane, job):
                    continue  # a child was redriven back to work since it was queued
                lane.held += 1
                if not lane.waking and lane.ready:  # (the test wake starts with, without a call)
                    self.wake(lane)  # another worker for the rest, in case this exec waits
                await self._attempt(lane, job, task)
        finally:
            lane.workers -= 1

    async def _attempt(self, lane: Lane, job: Job, task: asyncio.Task[None]) -> None:
        """Run one exec of ``job`` (its slot is taken), settle it and queue its record."""
        proc = self.proc
        run, executor = proc._run, proc._executor
        assert run is not None and executor is not None
        # The exec gets its own copy, exactly as it is on disk: a failed attempt that changed
        # it in place leaves nothing behind, before a restart or after.
        args: tuple[Any, ...] = (proc.app, proc._overall, orjson.loads(orjson.dumps(job.ctx)))
        if lane.state.join:
            args += (proc._waiting.children(job.id),)
        lane.running += 1
        self.running.add(job.id)
        self.in_exec.add(task)
        started = proc._clock() + proc._offset  # proc._now(), without a call (hot path)
        try:
            result = await executor.call(lane.state, args)
            error: Exception | None = None
        except Exception as e:
            result, error = None, e
        except asyncio.CancelledError as e:
            if proc._stopping or task.cancelling():
                lane.held -= 1  # we are cancelling it: the job runs again on resume
                self.running.discard(job.id)
                raise
            # The exec's own code let a CancelledError out (a cancelled future it awaited):
            # that is its failure, not ours to stop on.
            result, error = None, JorbError(f"the exec raised CancelledError: {e}")
        except (SystemExit, KeyboardInterrupt) as e:
            # sys.exit() (or an interrupt) inside an exec: the job stays where it is, the run
            # is saved, and the exec stops saying which job and exec raised it.
            lane.held -= 1
            self.running.discard(job.id)
            proc._stops.exit(job, lane.state, e)
            return
        finally:
            lane.running -= 1
            self.in_exec.discard(task)
        proc._commits.settle_and_queue(lane, job, result, error, started)
