"""Per-state timeouts: ``State(timeout=s)`` bounds each attempt of an exec.

``async def`` execs run on jorb.testing's virtual clock: the exec is cancelled at the deadline
and sees CancelledError, at no cost in real time. ``def`` execs run in threads, which the
virtual clock waits for in real time (it cannot jump while a thread works), so their tests run
on a real loop with a timeout of half a second (room for a loaded CI machine): the wait *is*
the timeout under test.
"""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Any

import pytest
from conftest import DONE, STUCK, MakeRun, process, process_fake_clock

import jorb

Ctx = dict[str, Any]


def _only(run: jorb.Run) -> jorb.Job:
    (job,) = run.jobs.values()
    return job


# -- async execs: cancelled ---------------------------------------------------------------------


def test_a_slow_async_exec_is_cancelled_at_the_timeout_and_retried(make_run: MakeRun) -> None:
    starts: list[float] = []
    cancelled_at: list[float] = []

    async def fetch(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        loop = asyncio.get_running_loop()
        starts.append(loop.time())
        if len(starts) == 1:
            try:
                await asyncio.sleep(3600)  # hangs
            except asyncio.CancelledError:
                cancelled_at.append(loop.time())
                raise
        # The second attempt takes 4 s: under the 5 s timeout, though more than 5 s have
        # passed since the first attempt began: each attempt gets a window of its own.
        await asyncio.sleep(4)
        ctx["fetched"] = len(starts)
        return ctx, "done"

    states = [jorb.State("fetch", exec=fetch, timeout=5, retries=1, backoff=1.0), DONE]
    run = make_run([{"url": "u"}], state="fetch")

    process_fake_clock(states, run)

    job = _only(run)
    assert job.state == "done"
    assert job.ctx == {"url": "u", "fetched": 2}
    assert cancelled_at == pytest.approx([5.0])  # the exec saw the cancellation, on time
    assert len(starts) == 2
    assert 5.0 + 0.5 <= starts[1] <= 5.0 + 1.0  # after the retry's backoff (with jitter)
    (error,) = job.errors["fetch"]
    # It says where the exec was when it was stopped: the line of this file that awaited.
    where = r"timed out after 5s, at tests/test_timeouts\.py:\d+ in \w+"
    assert re.fullmatch(where, error["message"])
    assert error["type"] == "jorb.errors.TimedOut"
    assert error["attempt"] == 1
    assert error["rate_limited"] is False


def test_timeouts_use_up_retries_then_route_to_on_error(make_run: MakeRun) -> None:
    starts: list[float] = []

    async def hang(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        starts.append(asyncio.get_running_loop().time())
        await asyncio.sleep(3600)
        return ctx, "done"

    states = [
        jorb.State("call", exec=hang, timeout=2.5, retries=2, backoff=0, on_error="too_slow"),
        jorb.State("too_slow", terminal=True),
        DONE,
    ]
    run = make_run([{}], state="call")

    process_fake_clock(states, run)

    job = _only(run)
    assert job.state == "too_slow"
    assert starts == pytest.approx([0.0, 2.5, 5.0])  # three attempts, each cut at 2.5 s
    errors = job.errors["call"]
    assert [e["message"].split(",")[0] for e in errors] == ["timed out after 2.5s"] * 3
    assert all(e["message"].endswith(" in hang") for e in errors)
    assert [e["attempt"] for e in errors] == [1, 2, 3]
    assert job.steps()[-1]["from"] == "call" and job.steps()[-1]["to"] == "too_slow"
    assert job.steps()[-1]["duration"] == pytest.approx(2.5, abs=0.01)


def test_the_timeout_counts_from_the_exec_start_not_the_wait_for_a_rate(
    make_run: MakeRun,
) -> None:
    starts: list[float] = []

    async def call(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        starts.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.5)
        return ctx, "done"

    # One start per 10 s, a 1 s timeout: the second job waits 10 s for the Rate, then runs.
    rate = jorb.Rate(1, per=10.0)
    states = [jorb.State("call", exec=call, concurrency=2, rate=rate, timeout=1), DONE]
    run = make_run([{}, {}], state="call")

    process_fake_clock(states, run)

    assert run.counts() == {"done": 2}
    assert starts == pytest.approx([0.0, 10.0])
    assert all(job.errors == {} for job in run.jobs.values())


def test_a_fast_exec_under_a_timeout_is_untouched(make_run: MakeRun) -> None:
    async def quick(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        await asyncio.sleep(0.999)
        return {"ok": True}, "done"

    states = [jorb.State("new", exec=quick, timeout=1, concurrency=4), DONE]
    run = make_run([{} for _ in range(8)])

    process_fake_clock(states, run)

    assert run.counts() == {"done": 8}
    assert all(job.ctx == {"ok": True} and not job.errors for job in run.jobs.values())


# -- the exec's own TimeoutError is not ours ----------------------------------------------------


def test_an_async_exec_raising_its_own_timeout_error_is_not_our_timeout(
    make_run: MakeRun,
) -> None:
    async def upstream(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        if ctx["how"] == "raise":
            raise TimeoutError("upstream did not answer")
        async with asyncio.timeout(1):  # the exec's own, shorter deadline expires
            await asyncio.sleep(3600)
        return ctx, "done"

    states = [jorb.State("call", exec=upstream, timeout=30), DONE]
    run = make_run([{"how": "raise"}, {"how": "inner"}], state="call")

    process_fake_clock(states, run)

    assert run.counts() == {"failed": 2}
    raised, inner = (job.errors["call"][0] for job in run.jobs.values())
    assert raised["type"] == "TimeoutError"
    assert raised["message"] == "upstream did not answer"
    assert inner["type"] == "TimeoutError"
    assert "timed out after" not in inner["message"]


def test_a_sync_exec_raising_its_own_timeout_error_is_not_our_timeout(make_run: MakeRun) -> None:
    def upstream(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        raise TimeoutError("socket timed out")

    states = [jorb.State("call", exec=upstream, timeout=30), DONE]
    run = make_run([{}], state="call")

    process(states, run)

    (error,) = _only(run).errors["call"]
    assert error["type"] == "TimeoutError"
    assert error["message"] == "socket timed out"


# -- sync execs: abandoned ---------------------------------------------------------------------


def test_a_sync_exec_is_abandoned_and_its_late_result_ignored(make_run: MakeRun) -> None:
    gate = threading.Event()  # holds the first attempt's thread
    late_returned = threading.Event()
    threads: list[str] = []

    def fetch(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        threads.append(threading.current_thread().name)
        if len(threads) == 1:
            gate.wait(STUCK)  # hangs past the timeout
            late_returned.set()
            return {"late": True}, "elsewhere"
        # The retry, on another thread: let the abandoned attempt finish now, while the job
        # is still in the run, so that its late result has every chance to be (wrongly) used.
        gate.set()
        assert late_returned.wait(STUCK), "the abandoned thread never returned"
        ctx["second"] = True
        return ctx, "done"

    states = [
        jorb.State("fetch", exec=fetch, concurrency=2, timeout=0.5, retries=1, backoff=0),
        jorb.State("elsewhere", terminal=True),
        DONE,
    ]
    run = make_run([{"url": "u"}], state="fetch")
    try:
        process(states, run)
    finally:
        gate.set()

    assert late_returned.is_set()  # the first thread ran on to the end: it was not killed
    assert len(threads) == 2 and threads[0] != threads[1]
    job = _only(run)
    assert job.state == "done"
    assert job.ctx == {"url": "u", "second": True}  # nothing of the late {"late": True}
    assert [(h["from"], h["to"]) for h in job.steps()] == [("fetch", "done")]
    (error,) = job.errors["fetch"]
    assert error["type"] == "jorb.errors.TimedOut"
    assert error["message"].startswith("timed out after 0.5s")
    assert run.counts() == {"done": 1}
    reloaded = jorb.Run.load(run.path) if run.path is not None else None
    assert reloaded is not None and reloaded.jobs[job.id].ctx == job.ctx


class _TimedOut:
    """A listener that sets ``event`` once a state has counted an error (the timeout)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def start(self, status: jorb.Status) -> None: ...

    def update(self, status: jorb.Status) -> None:
        if any(row.errors for row in status.states):
            self.event.set()

    def note(self, message: str) -> None: ...

    def stop(self, status: jorb.Status) -> None: ...


def test_an_abandoned_sync_exec_keeps_its_slot_until_its_thread_ends(make_run: MakeRun) -> None:
    # concurrency=1: the retry of a timed-out attempt runs once the abandoned thread has ended,
    # never beside it. (Before: a retry started at once, beside the thread still running.)
    timed_out = _TimedOut()
    events: list[str] = []

    def fetch(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        events.append("start")
        if len(events) == 1:
            timed_out.event.wait(STUCK)  # runs on until its timeout has been recorded
            events.append("the abandoned attempt ends")
            return ctx, "done"
        return {"retried": True}, "done"

    states = [jorb.State("fetch", exec=fetch, timeout=0.2, retries=1, backoff=0), DONE]
    run = make_run([{}], state="fetch")
    try:
        process(states, run, listeners=[timed_out], status_interval=0.01)
    finally:
        timed_out.event.set()

    job = _only(run)
    assert events == ["start", "the abandoned attempt ends", "start"]
    assert job.state == "done"
    assert job.ctx == {"retried": True}
    (error,) = job.errors["fetch"]
    assert error["message"].startswith("timed out after 0.2s")


# -- validation ---------------------------------------------------------------------------------


async def _noop(app: Any, overall: Ctx, ctx: Ctx) -> Any:
    return ctx, "done"


@pytest.mark.parametrize("timeout", [0, -1, -0.5, "5"])
def test_a_timeout_must_be_a_positive_number(timeout: Any) -> None:
    states = [jorb.State("call", exec=_noop, timeout=timeout), DONE]

    with pytest.raises(jorb.StateError, match=r"'call'.*timeout"):
        jorb.Processor(None, states, progress=False)


def test_a_terminal_state_cannot_have_a_timeout() -> None:
    states = [jorb.State("call", exec=_noop), jorb.State("done", terminal=True, timeout=5)]

    with pytest.raises(jorb.StateError, match=r"'done'.*timeout"):
        jorb.Processor(None, states, progress=False)


def test_timed_out_is_a_jorb_error() -> None:
    assert issubclass(jorb.errors.TimedOut, jorb.JorbError)


def test_ctrl_c_does_not_wait_for_an_exec_waiting_on_an_abandoned_threads_slot(
    make_run: MakeRun,
) -> None:
    # Job 1 hangs past its timeout (abandoned, its thread keeps the one slot); job 2's exec
    # waits for that slot. Ctrl-C's grace period is for execs that run: job 2's never started,
    # so the exec stops at once (before: after the whole grace period, here a minute, which
    # the test's watchdog would call a hang).
    hung = threading.Event()
    release = threading.Event()
    starts: list[int] = []

    def fetch(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        starts.append(ctx["n"])
        if ctx["n"] == 1:
            hung.set()
            release.wait(STUCK * 2)
        return ctx, "done"

    class Waiting:
        """Set once job 1 has timed out and job 2's exec is in flight (waiting for the slot)."""

        def __init__(self) -> None:
            self.event = threading.Event()

        def start(self, status: jorb.Status) -> None: ...

        def update(self, status: jorb.Status) -> None:
            (row,) = [row for row in status.states if row.name == "fetch"]
            if row.errors and row.running:
                self.event.set()

        def note(self, message: str) -> None: ...

        def stop(self, status: jorb.Status) -> None: ...

    waiting = Waiting()

    async def interrupt(app: jorb.Processor, overall: Ctx, ctx: Ctx) -> Any:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, waiting.event.wait, STUCK)
        app._stops.interrupt()  # what Ctrl-C does
        return ctx, "done"

    states = [
        jorb.State("fetch", exec=fetch, timeout=0.1, retries=0),
        jorb.State("interrupt", exec=interrupt),
        DONE,
    ]
    run = make_run([{"n": 1}, {"n": 2}], state="fetch")
    run.add_job({}, "interrupt")
    processor = jorb.Processor(
        None, states, progress=False, grace=60, listeners=[waiting], status_interval=0.01
    )
    processor.app = processor
    # If the exec is still stopping after STUCK seconds, job 1's thread is let go: job 2 then
    # gets its slot and runs, which fails the test (rather than hanging it for the grace).
    guard = threading.Timer(STUCK, release.set)
    guard.start()
    try:
        with pytest.raises(SystemExit):
            processor.exec(run)
    finally:
        guard.cancel()
        release.set()

    assert starts == [1]  # job 2 never ran
    assert hung.is_set()
    assert run.path is not None
    assert jorb.Run.load(run.path).jobs["2"].state == "fetch"  # it runs when the run resumes
