"""Jobs waiting for a time (delays: one timer over a heap) or for their children (fan-in joins)."""

from __future__ import annotations

import asyncio
import heapq
from typing import TYPE_CHECKING

import orjson

from .errors import RunFileError
from .model import Child, Job, Run, parent_cycle

if TYPE_CHECKING:
    from .lanes import Lane
    from .processor import Processor


class Waiting:
    """Delayed jobs (until ``not_before``) and jobs of join states waiting for open children.

    ``waiting.delay(lane, job, now)`` sets a job aside until its time; ``child_ended(parent)``
    releases a joining parent once its last open child ends.
    """

    __slots__ = ("delayed", "joining", "kids", "open_kids", "proc", "timer")

    def __init__(self, proc: Processor) -> None:
        self.proc = proc
        self.delayed: list[tuple[float, int, Job]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.kids: dict[str, list[str]] = {}  # fan-in: parent id -> child ids
        self.open_kids: dict[str, int] = {}  # fan-in: parent id -> non-terminal children
        self.joining: dict[str, Job] = {}  # fan-in: jobs waiting for their children

    def __repr__(self) -> str:
        return f"<Waiting delayed={len(self.delayed)} joining={len(self.joining)}>"

    # -- delays --------------------------------------------------------------------------------

    def delay(self, lane: Lane, job: Job, now: float) -> None:
        """Set ``job`` aside until its ``not_before``."""
        lane.delayed += 1
        heapq.heappush(self.delayed, (job.not_before or 0.0, next(self.proc._order), job))
        if self.delayed[0][2] is job:
            self._arm_timer(now)

    def _arm_timer(self, now: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        assert self.proc._loop is not None
        delay = max(0.0, self.delayed[0][0] - now)
        self.timer = self.proc._loop.call_later(delay, self._release_delayed)

    def _release_delayed(self) -> None:
        self.timer = None
        lanes = self.proc._lanes
        now = self.proc._now()
        while self.delayed and self.delayed[0][0] <= now:
            _, _, job = heapq.heappop(self.delayed)
            lane = lanes.by_name[job.state]
            lane.delayed -= 1
            lane.ready.push(job)
            lanes.wake(lane)
        if self.delayed:
            self._arm_timer(now)

    def stop(self) -> None:
        """Release nothing more (the exec is stopping)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- fan-in --------------------------------------------------------------------------------

    def check_parents(self, run: Run) -> None:
        """Refuse a run whose jobs are each other's parent (an edit of "parent" fields)."""
        if cycle := parent_cycle(run):
            raise RunFileError(
                f"{run.path}: jobs {' -> '.join([*cycle, cycle[0]])} are each other's parent (an "
                f'edit of "parent" fields): a join would wait for them forever. Fix those fields'
            )

    def index(self, run: Run) -> None:
        """Note every job's open children (at exec start, for the join states)."""
        lanes = self.proc._lanes.by_name
        for job in run.jobs.values():
            if job.parent is not None:
                self.kids.setdefault(job.parent, []).append(job.id)
                if job.state in lanes:
                    self.open_kids[job.parent] = self.open_kids.get(job.parent, 0) + 1

    def kicked(self, parent: str, kid: Job) -> None:
        """A settled exec of ``parent`` kicked ``kid``."""
        self.kids.setdefault(parent, []).append(kid.id)
        if kid.state in self.proc._lanes.by_name:
            self.open_kids[parent] = self.open_kids.get(parent, 0) + 1

    def reopened(self, parent: str) -> None:
        """A child of ``parent`` was moved back into a non-terminal state."""
        self.open_kids[parent] = self.open_kids.get(parent, 0) + 1

    def waits_for_kids(self, lane: Lane, job: Job) -> bool:
        """Put a job of a join state that still has open children aside until they end."""
        if not self.open_kids.get(job.id):
            return False
        lane.awaiting += 1
        self.joining[job.id] = job
        return True

    def child_ended(self, parent: str) -> None:
        left = self.open_kids.get(parent, 0) - 1
        if left > 0:
            self.open_kids[parent] = left
            return
        self.open_kids.pop(parent, None)
        waiting = self.joining.pop(parent, None)
        if waiting is not None:
            lanes = self.proc._lanes
            lane = lanes.by_name[waiting.state]
            lane.awaiting -= 1
            lanes.enqueue(lane, waiting, self.proc._now())
            lanes.wake(lane)

    def children(self, parent: str) -> list[Child]:
        run = self.proc._run
        assert run is not None
        kids = (run.jobs.get(i) for i in self.kids.get(parent, ()))
        return [Child(k.id, k.state, orjson.loads(orjson.dumps(k.ctx))) for k in kids if k]

    # -- a redrive takes jobs out --------------------------------------------------------------

    def detach(self, ids: set[str]) -> None:
        """Take these jobs out of the delayed heap and the joins (a redrive moves them)."""
        lanes = self.proc._lanes.by_name
        kept = []
        for entry in self.delayed:
            if entry[2].id in ids:
                lanes[entry[2].state].delayed -= 1
            else:
                kept.append(entry)
        if len(kept) != len(self.delayed):
            self.delayed = kept
            heapq.heapify(kept)
        for ident in ids & self.joining.keys():
            job = self.joining.pop(ident)
            lanes[job.state].awaiting -= 1
