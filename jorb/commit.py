"""The commit path: settle an attempt into a journal record, apply it, append it, and when its
group commit is on disk start what comes next.

Plain successes (an exec that returned ``(ctx, next_state)`` with nothing unusual) settled during
one turn of the event loop become ONE record, ``{"seq": n, "ok": [[id, to, ctx, time, duration],
...]}``: each worker's batch of them is encoded (one ``orjson.dumps``) and applied to the run
(``model.apply_ok``) as it settles, while its jobs are fresh in the CPU's caches, and the
turn's batches are joined into the record, with its ``seq``, when the turn's group commit is
written (``Store.prepare``). Anything else (errors, kicks, rate limits) becomes a record of its
own at once. Either way the record on disk is what ``model.apply_record``, the function replay
uses, applies to the same effect.

A plain success that leaves its state frees its slot at once; anything else keeps it until
its record is on disk. Either way the job's next step and its children wait for the disk. What
a crash can make run again is then bounded by the execs running plus the transitions settled
and not yet on disk, at most ``Processor(max_pending=...)``: each lane stops starting execs
while its share of that many is waiting for the disk.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import operator
import random
from typing import TYPE_CHECKING, Any

import orjson

from . import outcome
from .errors import ExecResultError, RateLimited
from .model import Job, apply_ok, apply_record

if TYPE_CHECKING:
    from .lanes import Lane
    from .processor import Processor

_LINE = orjson.OPT_APPEND_NEWLINE
_NO_KIDS: tuple[Job, ...] = ()
_OK_START = len(b'{"ok":[')  # where the entries start in a batch's encoded part
_TO = operator.itemgetter(1)  # an ok entry's state
# Attempts settled into a group commit: their lane, their jobs, the kids they made, and whether
# their slots are still held until it is on disk (True; False: freed at settle; None: held by
# those that stayed in the lane's state, the rest freed).
_Settled = tuple["Lane", list[Job], tuple[Job, ...] | list[Job], bool | None]

#: Failed attempts (INFO), give-ups (WARNING) and rate-limit pauses (INFO), with ``extra``
#: fields; silent until the application configures logging (a NullHandler, in ``jorb``).
log = logging.getLogger("jorb.exec")
log.addHandler(logging.NullHandler())  # (the stdlib's way to leave the choice to the app)


class Commits:
    """Settles attempts and follows their group commits.

    ``commits.settle(lane, job, result, error, started)`` after an exec (or ``settle_ok`` for a
    batch of plain successes); the job's next step is queued once its record is durable.
    """

    __slots__ = ("batch", "batch_jobs", "ok", "ok_parts", "ok_settled", "proc", "transitions")

    def __init__(self, proc: Processor) -> None:
        self.proc = proc
        self.transitions = 0
        self.batch: asyncio.Future[None] | None = None  # the group commit being filled
        self.batch_jobs: list[_Settled] = []  # settled into it
        self.ok = 0  # plain successes settled (and applied), not yet in a record
        self.ok_parts: list[bytes] = []  # their entries, a list encoded per batch, in order
        self.ok_settled: list[tuple[Lane, list[Job]]] = []  # their lanes and jobs, in order

    def __repr__(self) -> str:
        return (
            f"<Commits transitions={self.transitions} filling={len(self.batch_jobs)} ok={self.ok}>"
        )

    def settle(
        self, lane: Lane, job: Job, result: Any, error: Exception | None, started: float
    ) -> None:
        """Settle one attempt and queue its transition for the next commit."""
        if error is None and type(result) is tuple and len(result) == 2:
            ctx, to = result
            proc = self.proc
            if type(ctx) is dict and type(to) is str and (to := proc._names.get(to)) is not None:
                now = proc._clock() + proc._offset  # proc._now(), without a call (hot path)
                self.settle_ok(lane, [[job.id, to, ctx, now, now - started]], [job])
                return
        lane.unsynced += 1
        self._settle_one(lane, job, result, error, started, True)

    def settle_ok(self, lane: Lane, entries: list[list[Any]], jobs: list[Job]) -> None:
        """Settle plain successes of ``lane`` (``[id, to, ctx, time, duration]`` each): they are
        applied now and go out as one record with the turn's others, when its group commit is
        written.

        A plain success that leaves the state frees its slot at once. Anything else keeps it
        until its record is on disk (a retry or a job staying in its state then competes for
        the slot as it always did: by priority, then arrival).
        """
        proc = self.proc
        run = proc._run
        assert run is not None
        try:
            part = orjson.dumps({"ok": entries})  # (nested as deep as in the record)
        except TypeError:  # a returned ctx holds something JSON cannot represent
            entries, jobs = self._weed(lane, entries, jobs)
            if not entries:
                return
            part = orjson.dumps({"ok": entries})
        apply_ok(run, entries, jobs)
        n = len(entries)
        lane.unsynced += n
        lane.done += n
        if lane.state.rate is not None:  # an unlimited lane has nothing to climb back to
            assert proc._loop is not None
            now = proc._loop.time()
            for _ in range(n):
                lane.rate.succeeded(now)
        if not self.ok:
            store = proc._store
            assert store is not None
            store.pending()  # written at the end of this turn, by prepare()
        self.ok += n
        self.ok_parts.append(part)
        self.ok_settled.append((lane, jobs))
        name = lane.state.name
        targets = set(map(_TO, entries))  # (usually one: the exec's next state)
        if len(targets) == 1:
            to = targets.pop()
            moved = {to: n} if to != name else {}
        else:
            moved = {}
            for entry in entries:
                to = entry[1]
                if to != name:
                    moved[to] = moved.get(to, 0) + 1
        if moved:  # counted where they are now; their slots are free
            lanes = proc._lanes
            for to, k in moved.items():
                lane.held -= k
                lane.jobs -= k
                lanes.active -= k
                lanes.count_many(to, k)

    def prepare(self) -> None:
        """Append the plain successes settled (and applied) so far as one record: the store
        calls this first thing in each flush, and so does anything about to apply a record of
        its own meanwhile, so that the journal holds them in the order they were applied."""
        if not self.ok:
            return
        n, parts, settled = self.ok, self.ok_parts, self.ok_settled
        self.ok, self.ok_parts, self.ok_settled = 0, [], []
        proc = self.proc
        run, store = proc._run, proc._store
        assert run is not None and store is not None
        run.seq += 1  # (what apply_record does with the record's seq; its entries are applied)
        # The bytes orjson.dumps({"seq": ..., "ok": [every entry]}) gives, without encoding
        # the entries again: each part is '{"ok":[[...],[...]]}'. One join copies them (a
        # turn's record is a few hundred KB: slicing, joining and formatting copied it thrice).
        pieces: list[bytes | memoryview] = [b'{"seq":%d,"ok":[' % run.seq]
        for part in parts:
            pieces.append(memoryview(part)[_OK_START:-2])
            pieces.append(b",")
        pieces[-1] = b"]}\n"
        data = b"".join(pieces)
        self.transitions += n
        self._join(store.append(data, n), [(lane, jobs, _NO_KIDS, None) for lane, jobs in settled])

    def _weed(
        self, lane: Lane, entries: list[list[Any]], jobs: list[Job]
    ) -> tuple[list[list[Any]], list[Job]]:
        """Settle the successes whose ctx is not JSON as the errors they are; keep the rest."""
        kept: list[list[Any]] = []
        kept_jobs = []
        for entry, job in zip(entries, jobs, strict=True):
            try:
                orjson.dumps({"ok": [entry]})
            except TypeError:
                error = outcome.not_json(lane.state, (entry[2], entry[1]))
                lane.unsynced += 1
                self._settle_one(lane, job, None, error, entry[3] - entry[4], True)
                continue
            kept.append(entry)
            kept_jobs.append(job)
        return kept, kept_jobs

    def _settle_one(
        self,
        lane: Lane,
        job: Job,
        result: Any,
        error: Exception | None,
        started: float,
        holds: bool,
    ) -> None:
        """Settle an attempt into a record of its own and append it; ``holds``: whether its
        slot stays taken until the record is on disk."""
        store = self.proc._store
        assert store is not None
        self.prepare()  # the successes applied before it go first: the journal keeps that order
        data, kids = self._record(lane, job, result, error, started)
        running = self.proc._lanes.running
        for kid in kids:  # busy, like the job, until placed: a redrive must not move them first
            running.add(kid)
        self._join(store.append(data), [(lane, [job], kids, holds)])

    def _join(
        self,
        batch: asyncio.Future[None],
        settled: list[_Settled],
    ) -> None:
        if batch is not self.batch:  # the first record of a new group commit
            self.batch, self.batch_jobs = batch, []
            batch.add_done_callback(functools.partial(self._committed, self.batch_jobs))
        self.batch_jobs += settled

    def _record(
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
                record, kids = outcome.success(
                    proc.states, job, result, run.next_id, started, now, run.keyed
                )
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
            rate = lane.rate
            if rate.paused_until and isinstance(error, RateLimited) and error.retry_after:
                # When the pause ends, as Unix time: `jorb status` says so while it lasts.
                until = now + rate.paused_until - proc._loop.time()
                record["error"]["paused_until"] = until
            data = orjson.dumps(record, default=repr, option=_LINE)
            lane.errors += 1
            lane.failed += gave_up
            if log.isEnabledFor(logging.WARNING if gave_up else logging.INFO):
                _log_failure(job, record, gave_up)
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
            taken = lane.rate.limited(self.proc._loop.time(), error.retry_after)
            asked = error.retry_after
            if asked is not None and taken is not None and taken < asked:
                self.proc._note(
                    f"{state.name}: the server asked for a pause of {asked:g}s; pausing "
                    f"{taken:g}s, the Rate's max_pause (jorb.Rate(..., max_pause=...))"
                )
            if taken and log.isEnabledFor(logging.INFO):
                log.info(
                    "%s: rate limited; no new starts for %.1fs",
                    state.name,
                    taken,
                    extra={
                        "state": state.name,
                        "job": job.id,
                        "retry_after": asked,
                        "pause": taken,
                    },
                )
            if error.retry_after is None and lane.rate.n == math.inf:
                return state.retry_delay(job.throttled + 1, random.random())
            return None  # the Rate (cut, or paused for retry_after) spaces the next start
        if state.backoff <= 0:
            return None
        return state.retry_delay(job.attempts + 1, random.random())

    def _committed(
        self,
        settled: list[_Settled],
        batch: asyncio.Future[None],
    ) -> None:
        """A group commit is on disk: its jobs' next steps and kids may start, and the slots
        still held for them are freed."""
        proc = self.proc
        finished = proc._finished
        failure = batch.exception()  # (nothing cancels a batch: no worker awaits it)
        if failure is not None:
            if finished is not None and not finished.done():
                finished.set_exception(failure)
            return  # the run cannot checkpoint: the exec stops (nothing more may start)
        lanes = proc._lanes
        by_name, queue, running, joins = lanes.by_name, lanes.queue, lanes.running, proc._joins
        now = proc._now()
        for lane, jobs, kids, holds in settled:
            lane.unsynced -= len(jobs)
            running.difference_update(jobs)
            name = lane.state.name
            for job in jobs:
                state = job.state
                if holds or (holds is None and state == name):
                    lane.held -= 1
                # Queue its next step, or note that it ended.
                add = queue.get(state)
                if add is not None and job.not_before is None and not job.priority:
                    add(job)
                    continue
                next_lane = by_name.get(state)
                if next_lane is not None:
                    lanes.enqueue(next_lane, job, now)
                elif job.parent is not None and joins:
                    proc._waiting.child_ended(job.parent)
            for kid in kids:  # a kid born terminal was never counted open: nothing to place
                running.discard(kid)
                kid_lane = by_name.get(kid.state)
                if kid_lane is not None:
                    lanes.enqueue(kid_lane, kid, now)
        lanes.wake_all()
        proc._check_finished()


def _log_failure(job: Job, record: dict[str, Any], gave_up: bool) -> None:
    """One line per failed attempt, its facts also as ``extra`` fields for structured logs."""
    error = record["error"]
    state = record["in"]
    first = str(error.get("message", "")).strip().partition("\n")[0]
    fields = {
        "job": job.id,
        "state": state,
        "attempt": error["attempt"],
        "error_type": error["type"],
        "error": first,
        "rate_limited": error["rate_limited"],
        "gave_up": gave_up,
        "to": record["to"],
        "not_before": record.get("not_before"),
    }
    kind = error["type"].rpartition(".")[2]
    if gave_up:
        log.warning(
            "job %s gave up in %s after attempt %d (%s: %s); moved to %s",
            job.id,
            state,
            error["attempt"],
            kind,
            first,
            record["to"],
            extra=fields,
        )
    else:
        log.info(
            "job %s failed in %s, attempt %d (%s: %s)%s",
            job.id,
            state,
            error["attempt"],
            kind,
            first,
            "; rate limited" if error["rate_limited"] else "",
            extra=fields,
        )
