"""The commit path: settle an attempt into one journal record, apply it, append it, and when its
group commit is on disk free the slot and start what comes next."""

from __future__ import annotations

import asyncio
import functools
import math
import random
from typing import TYPE_CHECKING, Any

import orjson

from . import outcome
from .errors import ExecResultError, RateLimited
from .model import Job, apply_record

if TYPE_CHECKING:
    from .lanes import Lane
    from .processor import Processor

_LINE = orjson.OPT_APPEND_NEWLINE


class Commits:
    """Settles attempts and follows their group commits.

    ``commits.settle_and_queue(lane, job, result, error, started)`` after every exec; the slot
    it held is freed, and the job's next step queued, once its record is durable.
    """

    __slots__ = ("batch", "batch_jobs", "proc", "transitions")

    def __init__(self, proc: Processor) -> None:
        self.proc = proc
        self.transitions = 0
        self.batch: asyncio.Future[None] | None = None  # the group commit being filled
        self.batch_jobs: list[tuple[Lane, Job, list[Job]]] = []  # settled into it

    def __repr__(self) -> str:
        return f"<Commits transitions={self.transitions} filling={len(self.batch_jobs)}>"

    def settle_and_queue(
        self, lane: Lane, job: Job, result: Any, error: Exception | None, started: float
    ) -> None:
        """Settle an attempt and queue its record for the next group commit."""
        store = self.proc._store
        assert store is not None
        data, kids = self.settle(lane, job, result, error, started)
        running = self.proc._lanes.running
        for kid in kids:  # busy, like the job, until placed: a redrive must not move them first
            running.add(kid.id)
        batch = store.append(data)
        if batch is not self.batch:  # the first record of a new group commit
            self.batch, self.batch_jobs = batch, []
            batch.add_done_callback(functools.partial(self._committed, self.batch_jobs))
        self.batch_jobs.append((lane, job, kids))

    def settle(
        self, lane: Lane, job: Job, result: Any, error: Exception | None, started: float
    ) -> tuple[bytes, list[Job]]:
        """Turn an exec's outcome into a record, apply it to the run, and return its bytes."""
        proc = self.proc
        run, lanes = proc._run, proc._lanes
        assert run is not None and proc._loop is not None
        now = proc._clock() + proc._offset  # proc._now(), without a call (hot path)
        seq = run.seq + 1
        kids: list[Job] = []
        if error is None:
            try:
                record, kids = outcome.success(proc.states, job, result, run.next_id, started, now)
                record["seq"] = seq
                data = orjson.dumps(record, option=_LINE)
            except ExecResultError as e:
                error = e
            except TypeError:  # orjson: a ctx holds something JSON cannot represent
                error = outcome.not_json(lane.state, result)
            if error is not None:
                kids = []
        if error is None:
            lane.done += 1
            if lane.state.rate is not None:  # an unlimited lane has nothing to climb back to
                lane.rate.succeeded(proc._loop.time())
        else:
            bug = error if isinstance(error, ExecResultError) and proc.stop_on_bug else None
            record, gave_up = outcome.failure(
                lane.state,
                job,
                error,
                error_state=proc.error_state,
                retry_in=self._retry_in(lane, job, error),
                started=started,
                now=now,
                stay=bug is not None,  # the exec stops at it: the job stays where it is
            )
            if bug is not None:
                proc._stops.bug(job, lane.state, bug)
            proc._stops.error(lane.state.name, record["error"])
            record["seq"] = seq
            data = orjson.dumps(record, default=repr, option=_LINE)
            lane.errors += 1
            lane.failed += gave_up
        old = job.state
        apply_record(run, record)
        self.transitions += 1
        if job.state != old:
            lane.jobs -= 1
            lanes.active -= 1
            lanes.count_in(job.state)
        for kid in kids:
            lanes.count_in(kid.state)
            if proc._joins:
                proc._waiting.kicked(job.id, kid)
        return data, kids

    def _retry_in(self, lane: Lane, job: Job, error: Exception) -> float | None:
        """Seconds before the job's next attempt; a rate limit also adapts the Rate."""
        state = lane.state
        if isinstance(error, RateLimited):
            assert self.proc._loop is not None
            lane.rate.limited(self.proc._loop.time(), error.retry_after)
            if error.retry_after is None and lane.rate.n == math.inf:
                return state.retry_delay(job.throttled + 1, random.random())
            return None  # the Rate (cut, or paused for retry_after) spaces the next start
        if state.backoff <= 0:
            return None
        return state.retry_delay(job.attempts + 1, random.random())

    def _committed(
        self, settled: list[tuple[Lane, Job, list[Job]]], batch: asyncio.Future[None]
    ) -> None:
        """A group commit is on disk: free its slots; its jobs' next steps and kids may start."""
        proc = self.proc
        finished = proc._finished
        failure = batch.exception()  # (nothing cancels a batch: no worker awaits it)
        if failure is not None:
            if finished is not None and not finished.done():
                finished.set_exception(failure)
            return  # the run cannot checkpoint: the exec stops (nothing more may start)
        lanes = proc._lanes
        by_name, running = lanes.by_name, lanes.running
        now = proc._now()
        for lane, job, kids in settled:
            lane.held -= 1
            running.discard(job.id)
            next_lane = by_name.get(job.state)  # queue its next step, or note that it ended
            if next_lane is not None:
                lanes.enqueue(next_lane, job, now)
            elif job.parent is not None and proc._joins:
                proc._waiting.child_ended(job.parent)
            for kid in kids:  # a kid born terminal was never counted open: nothing to place
                running.discard(kid.id)
                kid_lane = by_name.get(kid.state)
                if kid_lane is not None:
                    lanes.enqueue(kid_lane, kid, now)
        lanes.wake_all()
        proc._check_finished()
