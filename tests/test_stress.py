"""Randomized stress of the processor: many small random workflows on the virtual clock.

Each seed builds a workflow of three working states (``a``, ``b``, ``c``) and a terminal ``done``,
with random concurrency, a Rate shared by some states, retries and backoff, a timeout, fan-in
(``c`` may join), and random jobs (delays, priorities). Its execs wait random virtual times,
fail, raise ``RateLimited`` (with or without ``retry_after``), kick children (delays,
priorities), and steer the run with every live operation: ``pause`` (with a ``resume`` later),
``resume``, ``redrive`` from any state to any state (all jobs or named ones), and ``add_jobs``.
Steering also comes from outside the execs, at random virtual times, some of them after the
exec has ended (the change must then wait for the next exec, which the test runs).

Every job carries a unique ``key`` in its ctx, so the test finds it on disk without knowing its
id. The run is read from disk (``Run.load``, what a restart would see) at every exec start, and
the contract is checked there:

- **Concurrency.** Execs of a state in flight never exceed its ``concurrency``.
- **Durability.** The job's current state and ctx are on disk before its exec starts: nothing
  starts from a transition a crash could lose.
- **Crash bound.** Attempts of a state started and not yet recorded on disk never exceed its
  ``concurrency`` plus its share of ``max_pending`` less one: that is all a crash can make run
  again. (``max_pending`` is drawn per seed; with one per state the bound is ``concurrency``.)
- **Pause.** No exec starts in a state that is paused on disk.
- **Rate.** Over any window of ``T`` seconds the starts of the states sharing a Rate stay
  within its burst plus ``n * T / per``; and after a ``RateLimited(retry_after=r)`` nothing
  sharing that lane starts for ``r`` seconds.
- **Fan-in.** A joining exec starts once every child of its job is terminal on disk, and it
  is handed exactly those children.

And once every exec has returned:

- **Completion.** Every job is terminal.
- **Exactly once.** Every job created (before exec, by ``add_jobs``, by a kick) is on the disk
  once, kids with their parent; each job's history and errors record every attempt its exec
  saw, no more and no fewer (successes as transitions, failures and timeouts as errors).

The suite runs a fixed set of seeds (``SEEDS``). To run many more, outside CI::

    JORB_STRESS_SEEDS=2000 .venv/bin/python -m pytest tests/test_stress.py -q       # 0..1999
    JORB_STRESS_SEEDS=5000-8000 JORB_STRESS_BIG=40 .venv/bin/python -m pytest tests/test_stress.py

``JORB_STRESS_BIG`` adds that much to every state's concurrency and more jobs. A failure names
its seed (and ``big``); rerunning that one test reproduces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import RUN_LIMIT, watchdog

import jorb
import jorb.testing
from jorb.checkpoint import journal_path

Ctx = dict[str, Any]

#: The seeds every test run covers: enough to catch most regressions in a few seconds.
SEEDS = range(36)
#: States with an exec; "done" and the error state "failed" are terminal.
WORKING = ("a", "b", "c")
TERMINAL = ("done", "failed")
#: At most this many steering calls per run, so redrives cannot make a run grow without end.
MAX_STEERS = 12
#: Slack for comparing virtual times (the fake clock ticks by a nanosecond).
EPSILON = 1e-6


def _seeds() -> list[Any]:
    """``SEEDS``, or the range ``JORB_STRESS_SEEDS`` names (``N``: 0..N-1, ``A-B``: A..B-1)."""
    spec = os.environ.get("JORB_STRESS_SEEDS")
    big = int(os.environ.get("JORB_STRESS_BIG", "0"))
    seeds: range = SEEDS
    if spec:
        low, _, high = spec.partition("-")
        seeds = range(int(low), int(high)) if high else range(int(low))
    suffix = f"-big{big}" if big else ""
    return [pytest.param(seed, big, id=f"seed{seed}{suffix}") for seed in seeds]


@pytest.mark.parametrize(("seed", "big"), _seeds())
def test_random_workflow_keeps_the_contract(seed: int, big: int, tmp_path: Path) -> None:
    problems = Stress(seed, big, tmp_path / "run.json").run()
    assert not problems, f"seed {seed} (JORB_STRESS_BIG={big}):\n" + "\n".join(problems[:10])


class Stress:
    """One random workflow, the execs that drive it, and the checks made along the way."""

    def __init__(self, seed: int, big: int, path: Path) -> None:
        self.seed = seed
        self.rng = rng = random.Random(seed)
        self.path = path
        self.problems: list[str] = []
        self.concurrency = {s: rng.randint(1, 4 + big) for s in WORKING}
        self.rate = jorb.Rate(rng.choice([2, 5, 20]), per=1.0) if rng.random() < 0.5 else None
        shares = {"a": True, "b": rng.random() < 0.5, "c": False}
        #: The lane each state's Rate pauses for a retry_after: the shared Rate, or its own.
        self.lane = {s: "rate" if self.rate and shares[s] else s for s in WORKING}
        self.join = rng.random() < 0.3
        self.steering = rng.random() < 0.5
        self.states = [
            self._state("a", retries=2, backoff=rng.choice([0, 0.5])),
            self._state("b", retries=1, backoff=0),
            self._state("c", retries=1, join=self.join, timeout=rng.choice([None, 1.0])),
            jorb.State("done", terminal=True),
        ]
        # durable=False skips only the fsyncs: what a reload reads is the same, and faster.
        # Drawn apart from the workflow's stream, so each seed keeps the workflow it had.
        self.pending = random.Random(f"pending {seed}").choice([3, 6, 12, 4096])
        #: Attempts of a state that may be started and not on disk: the crash bound.
        self.again = {
            s: n + max(1, self.pending // len(WORKING)) - 1 for s, n in self.concurrency.items()
        }
        self.processor = jorb.Processor(
            None, self.states, progress=False, durable=False, max_pending=self.pending
        )
        self.initial = rng.randint(1, 60 + 3 * big)
        self.max_kicks = 40 + 3 * big
        self.keys = 0
        #: Every job the test created or had created, by key: the key of its parent (or None).
        self.created: dict[str, str | None] = {}
        #: What each job's exec saw, by key: attempts that returned and that failed.
        self.returned: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.in_flight = dict.fromkeys(WORKING, 0)
        #: Attempts started and not yet on disk, per state: (key, the job's record count then).
        self.unrecorded: dict[str, list[tuple[str, int]]] = {s: [] for s in WORKING}
        self.starts: list[tuple[float, str]] = []  # (virtual time, state)
        self.retry_afters: list[tuple[str, float, float]] = []  # (lane, from, until)
        self.steers = 0
        self.timers: list[float] = []  # virtual times of steering calls still to come
        self._disk: tuple[Any, jorb.Run] | None = None

    def _state(self, name: str, **options: Any) -> jorb.State:
        rate = self.rate if self.lane[name] == "rate" else None
        return jorb.State(
            name, exec=self._exec(name), concurrency=self.concurrency[name], rate=rate, **options
        )

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> list[str]:
        """Build the run, execute it until nothing is left to apply, then check the end."""
        rng = self.rng
        run = jorb.Run.open(self.path)
        for _ in range(self.initial):
            state = rng.choice(WORKING)
            delay, priority = rng.choice([None, None, 1]), rng.choice([0, 1])
            run.add_job(self._new_ctx(None), state, delay=delay, priority=priority)
        saved = random.getstate()
        random.seed(self.seed)  # the processor's backoff jitter: the same on every rerun
        try:
            finished = jorb.testing.run(self._execute(run))
        finally:
            random.setstate(saved)
            run.close()
        if finished:
            self._check_end()
        return self.problems

    async def _execute(self, run: jorb.Run) -> bool:
        """Execute the run; False if the watchdog had to stop it (a hang, or a stopped clock)."""
        loop = asyncio.get_running_loop()
        try:
            # A guard against hanging the suite, far above what any seed takes (a big one, ~4 s).
            with watchdog(RUN_LIMIT):
                return await self._execute_until_quiet(run)
        except asyncio.CancelledError:
            self.problems.append(
                f"still running after {RUN_LIMIT:g} real seconds (virtual time {loop.time():g}s)"
            )
            return False

    async def _execute_until_quiet(self, run: jorb.Run) -> bool:
        loop = asyncio.get_running_loop()
        if self.steering:
            self._steer(before_exec=True)  # queued, applied as exec starts
            for _ in range(self.rng.randint(0, 3)):
                self._later(self.rng.uniform(0, 6), self._steer)
        # Steering calls made after an exec ended wait for the next one: run until none is
        # left to come (each pause has a resume after it, so none is left paused).
        for _ in range(10):
            await self.processor.aexec(run)
            self._check_complete(run)
            if not self.timers:
                return True
            await asyncio.sleep(max(self.timers) - loop.time() + EPSILON)
        self.problems.append("steering calls kept coming after 10 execs")
        return True

    def _new_ctx(self, parent: str | None) -> Ctx:
        key = f"k{self.keys}"
        self.keys += 1
        self.created[key] = parent
        return {"key": key}

    def _later(self, delay: float, call: Callable[[], None]) -> None:
        """Call ``call`` after ``delay`` virtual seconds (a steering call from outside)."""
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        self.timers.append(due)

        def fire() -> None:
            self.timers.remove(due)
            call()

        loop.call_later(delay, fire)

    # -- the execs -----------------------------------------------------------------------------

    def _exec(self, state: str) -> Callable[..., Any]:
        async def exec_(app: None, overall: Ctx, ctx: Ctx, *children: Any) -> Any:
            key = ctx["key"]
            self.in_flight[state] += 1
            try:
                self._check_start(state, ctx, children)
                result = await self._work(state, ctx)
            except BaseException:  # an error, or a timeout's cancellation
                self.failed[key] += 1
                raise
            else:
                self.returned[key] += 1
                for kick in result[2]:
                    self.created[kick.ctx["key"]] = key
                return result
            finally:
                self.in_flight[state] -= 1

        return exec_

    async def _work(self, state: str, ctx: Ctx) -> tuple[Ctx, str, list[jorb.Kick]]:
        rng = self.rng
        loop = asyncio.get_running_loop()
        draw = rng.random()
        if draw < 0.3:  # 1.0 is c's timeout: finishing just as it expires
            await asyncio.sleep(rng.choice([0, 0, 0.01, 0.5, 1.0, 2]))
        elif draw < 0.4:
            await asyncio.sleep(0)
        if self.steering and rng.random() < 0.05:
            self._steer()
        draw = rng.random()
        if draw < 0.1:
            raise ValueError("boom")
        if draw < 0.15:
            retry_after = rng.choice([None, 0.5, 3])
            if retry_after is not None:
                now = loop.time()
                self.retry_afters.append((self.lane[state], now, now + retry_after))
            raise jorb.RateLimited(retry_after=retry_after)
        ctx["n"] = ctx.get("n", 0) + 1
        target = rng.choice(["a", "b", "c", "done", "done", "done"]) if ctx["n"] <= 6 else "done"
        if state == "c" and self.join and rng.random() < 0.5:
            target = "c"  # wait for the children kicked now
        kicks = []
        if rng.random() < 0.15 and self._kicked() < self.max_kicks:
            for _ in range(rng.randint(1, 3)):
                kick_ctx = {"key": f"k{self.keys}"}  # registered if the exec returns it
                self.keys += 1
                delay, priority = rng.choice([None, None, 0.5, 3]), rng.choice([0, 0, 1])
                kicks.append(
                    jorb.Kick(
                        rng.choice([*WORKING, "done"]), kick_ctx, delay=delay, priority=priority
                    )
                )
        return ctx, target, kicks

    def _kicked(self) -> int:
        return sum(parent is not None for parent in self.created.values())

    # -- steering ------------------------------------------------------------------------------

    def _steer(self, before_exec: bool = False) -> None:
        """One random steering call; refusals (pausing a paused state, ...) are fine."""
        if self.steers >= MAX_STEERS:
            return
        self.steers += 1
        rng, processor = self.rng, self.processor
        op, state = rng.choice(["pause", "resume", "redrive", "add"]), rng.choice(WORKING)
        try:
            if op == "pause":
                processor.pause(state)
                self._later(rng.choice([0, 0.001, 0.5, 3]), lambda: self._resume(state))
            elif op == "resume":
                processor.resume(state)
            elif op == "redrive":
                source = rng.choice([*WORKING, *TERMINAL])
                target = rng.choice([*WORKING, *TERMINAL])
                processor.redrive(source, target, self._some_jobs(source, before_exec))
            else:
                count = rng.randint(1, 3)
                processor.add_jobs([self._new_ctx(None) for _ in range(count)], state)
        except jorb.JorbError:
            pass

    def _resume(self, state: str) -> None:
        with contextlib.suppress(jorb.JorbError):
            self.processor.resume(state)

    def _some_jobs(self, source: str, before_exec: bool) -> list[str] | None:
        """None (every job in ``source``) or a few ids that were in it on disk just now."""
        if before_exec or self.rng.random() < 0.6:
            return None
        ids = [job.id for job in self._load().jobs.values() if job.state == source]
        return self.rng.sample(ids, min(len(ids), self.rng.randint(1, 3))) or None

    # -- the checks ----------------------------------------------------------------------------

    def _check_start(self, state: str, ctx: Ctx, children: tuple[Any, ...]) -> None:
        key, problem = ctx["key"], self.problems.append
        now = asyncio.get_running_loop().time()
        self.starts.append((now, state))
        limit = self.concurrency[state]
        if self.in_flight[state] > limit:
            problem(f"{state}: {self.in_flight[state]} execs in flight > concurrency {limit}")
        for lane, since, until in self.retry_afters:
            if lane == self.lane[state] and since + EPSILON < now < until - EPSILON:
                problem(
                    f"{key} starts in {state} at {now:g}, inside a retry_after "
                    f"pause of its lane from {since:g} to {until:g}"
                )
        disk = self._load()
        if state in disk.paused:
            problem(f"{key} starts in {state} at {now:g}, which is paused on disk")
        jobs = {job.ctx["key"]: job for job in disk.jobs.values()}
        job = jobs.get(key)
        if job is None:
            problem(f"{key} starts in {state} but is not on disk")
            return
        if job.state != state:
            problem(f"{key} ({job.id}) starts in {state} but is in {job.state!r} on disk")
        if job.ctx != ctx:
            problem(f"{key} ({job.id}) starts with ctx {ctx}, but {job.ctx} is on disk")
        for started in self.unrecorded.values():
            started[:] = [(k, n) for k, n in started if _records(jobs[k]) <= n]
        self.unrecorded[state].append((key, _records(job)))
        if len(self.unrecorded[state]) > self.again[state]:
            problem(
                f"{state}: {len(self.unrecorded[state])} attempts not on disk > "
                f"{self.again[state]} (concurrency {limit}, max_pending {self.pending}): "
                f"{self.unrecorded[state]}"
            )
        if self.join and state == "c":
            self._check_children(job, disk, children[0] if children else [])

    def _check_children(self, job: jorb.Job, disk: jorb.Run, children: list[jorb.Child]) -> None:
        on_disk = {kid.id: kid for kid in disk.children(job.id)}
        given = {child.id: child for child in children}
        if given.keys() != on_disk.keys():
            self.problems.append(
                f"join {job.id}: handed children {sorted(given)}, "
                f"but its children on disk are {sorted(on_disk)}"
            )
        for kid in on_disk.values():
            if kid.state not in TERMINAL:
                self.problems.append(
                    f"join {job.id} starts while its child {kid.id} is in "
                    f"{kid.state!r} on disk (handed: {given.get(kid.id)})"
                )

    def _check_complete(self, run: jorb.Run) -> None:
        open_jobs = [
            f"{job.id} in {job.state}" for job in run.jobs.values() if job.state in WORKING
        ]
        if open_jobs:
            self.problems.append(f"exec returned with jobs open: {open_jobs[:10]}")

    def _check_end(self) -> None:
        problem = self.problems.append
        disk = jorb.Run.load(self.path)
        self._check_complete(disk)
        keys = Counter(job.ctx["key"] for job in disk.jobs.values())
        if twice := [k for k, n in keys.items() if n > 1]:
            problem(f"jobs on disk more than once: {twice[:10]}")
        if missing := [k for k in self.created if k not in keys]:
            problem(f"jobs created but not on disk: {missing[:10]}")
        if unknown := [k for k in keys if k not in self.created]:
            problem(f"jobs on disk the test never created: {unknown[:10]}")
        ids = {job.id: job.ctx["key"] for job in disk.jobs.values()}
        for job in disk.jobs.values():
            key = job.ctx["key"]
            parent = ids.get(job.parent) if job.parent is not None else None
            if key in self.created and parent != self.created[key]:
                problem(f"{key} ({job.id}) has parent {parent}, not {self.created[key]}")
            moves = [step for step in job.steps() if "redrive" not in step]
            errors = sum(len(records) for records in job.errors.values())
            gave_up = sum(step["to"] == "failed" for step in moves)
            if (len(moves) - gave_up, errors) != (self.returned[key], self.failed[key]):
                problem(
                    f"{key} ({job.id}): {len(moves) - gave_up} transitions and {errors} "
                    f"errors on disk, but its exec returned {self.returned[key]} times "
                    f"and failed {self.failed[key]} times"
                )
        self._check_rate()

    def _check_rate(self) -> None:
        """Starts sharing the Rate, in any window of T seconds: at most n + n * T / per."""
        rate = self.rate
        if rate is None:
            return
        times = [t for t, state in self.starts if self.lane[state] == "rate"]
        # Count in [times[i], times[j]] is j - i + 1; its excess over n * T / per is
        # (j + 1 - speed * times[j]) + (speed * times[i] - i): keep the best i so far.
        speed, best = rate.n / rate.per, -math.inf
        for j, t in enumerate(times):
            best = max(best, speed * t - j)
            excess = j + 1 - speed * t + best
            if excess > rate.n + EPSILON:
                self.problems.append(
                    f"{excess:g} starts over the rate n={rate.n:g} "
                    f"per {rate.per:g}s (window ending at {t:g})"
                )
                return

    def _load(self) -> jorb.Run:
        """The run as it is on disk now (re-read only when the files changed)."""
        stamp = (_stamp(self.path), _stamp(journal_path(self.path)))
        if self._disk is None or self._disk[0] != stamp:
            self._disk = (stamp, jorb.Run.load(self.path))
        return self._disk[1]


def _records(job: jorb.Job) -> int:
    """How many records the job's attempts and moves left: each adds a transition or error."""
    return len(job.history) + sum(len(records) for records in job.errors.values())


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns
