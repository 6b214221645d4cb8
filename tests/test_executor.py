"""The exec seam: where execs run (loop or thread), timeouts, and swapping the executor."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from conftest import DONE, STUCK, InFlight, MakeRun, errors_of, process, process_fake_clock

import jorb
from jorb.executor import LocalExecutor


def test_async_execs_run_on_the_loop_and_def_execs_in_worker_threads(make_run: MakeRun) -> None:
    seen: dict[str, set[str]] = {"on_loop": set(), "in_thread": set()}

    async def on_loop(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        asyncio.get_running_loop()  # there is one, in this thread
        seen["on_loop"].add(threading.current_thread().name)
        return ctx, "in_thread"

    def in_thread(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        seen["in_thread"].add(threading.current_thread().name)
        return ctx, "done"

    states = [
        jorb.State("on_loop", exec=on_loop, concurrency=2),
        jorb.State("in_thread", exec=in_thread, concurrency=2),
        DONE,
    ]
    run = make_run([{"n": i} for i in range(6)], state="on_loop")

    process(states, run)

    assert run.counts() == {"done": 6}
    assert seen["on_loop"] == {threading.main_thread().name}
    assert seen["in_thread"] and threading.main_thread().name not in seen["in_thread"]


def test_every_exec_goes_through_the_executor_given_to_the_processor(make_run: MakeRun) -> None:
    class Counting:
        """A stand-in executor: counts calls, delegates to the local one."""

        def __init__(self, states: list[jorb.State]) -> None:
            self.inner = LocalExecutor(states)
            self.calls: list[str] = []
            self.closed = False

        async def call(self, state: jorb.State, *args: Any) -> Any:
            self.calls.append(state.name)
            return await self.inner.call(state, *args)

        def close(self) -> None:
            self.closed = True
            self.inner.close()

    async def first(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        return ctx, "second"

    def second(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        return ctx, "done"

    states = [jorb.State("new", exec=first), jorb.State("second", exec=second), DONE]
    executor = Counting(states)
    run = make_run([{"n": i} for i in range(4)])

    process(states, run, executor=executor)

    assert run.counts() == {"done": 4}
    assert sorted(executor.calls) == ["new"] * 4 + ["second"] * 4
    assert executor.closed


def test_an_executor_may_answer_with_any_awaitable(make_run: MakeRun) -> None:
    """A call that returns a Future (done at once, or later) instead of a coroutine."""

    class Futures:
        def call(self, state: jorb.State, args: tuple[Any, ...]) -> asyncio.Future[Any]:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[Any] = loop.create_future()
            ctx = args[2]
            answer = ({**ctx, state.name: True}, "later" if state.name == "new" else "done")
            if state.name == "new":
                future.set_result(answer)  # done before it is awaited
            else:
                loop.call_soon(future.set_result, answer)  # done a turn later
            return future

        def close(self) -> None:
            pass

    states = [jorb.State("new", exec=_never), jorb.State("later", exec=_never), DONE]
    run = make_run([{"n": i} for i in range(5)])

    process(states, run, executor=Futures())

    assert run.counts() == {"done": 5}
    assert all(job.ctx["new"] and job.ctx["later"] for job in run.jobs.values())


async def _never(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
    raise AssertionError("the executor runs nothing")


# -- timeouts ---------------------------------------------------------------------------------


def test_an_async_exec_past_its_timeout_is_cancelled_and_retried(make_run: MakeRun) -> None:
    starts: list[float] = []
    cancelled: list[float] = []

    async def hangs(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        starts.append(loop.time())
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(loop.time())
            raise
        return ctx, "done"

    states = [jorb.State("new", exec=hangs, timeout=2.0, retries=1, backoff=0), DONE]
    run = make_run([{}])

    process_fake_clock(states, run)

    (job,) = run.jobs.values()
    assert job.state == "failed"
    assert [e["message"].split(",")[0] for e in job.errors["new"]] == ["timed out after 2s"] * 2
    assert all(e["type"].endswith("TimedOut") for e in job.errors["new"])
    assert [c - s for s, c in zip(starts, cancelled, strict=True)] == [2.0, 2.0]


def test_an_exec_that_finishes_in_time_is_unaffected_by_its_timeout(make_run: MakeRun) -> None:
    async def quick(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        await asyncio.sleep(1.0)
        return {**ctx, "ok": True}, "done"

    run = make_run([{}, {}])
    process_fake_clock([jorb.State("new", exec=quick, timeout=1.5, concurrency=2), DONE], run)
    assert [(j.state, j.ctx, j.errors) for j in run.jobs.values()] == [
        ("done", {"ok": True}, {})
    ] * 2


def test_an_execs_own_timeout_error_is_not_reported_as_a_jorb_timeout(make_run: MakeRun) -> None:
    async def async_call(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        raise TimeoutError("the API read timed out")

    def sync_call(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        raise TimeoutError("the API read timed out")

    states = [
        jorb.State("new", exec=async_call, timeout=60.0),
        jorb.State("sync", exec=sync_call, timeout=60.0),
        DONE,
    ]
    run = make_run([{}])
    run.add_job({}, state="sync")

    process(states, run)

    for job in run.jobs.values():
        (error,) = next(iter(job.errors.values()))
        assert (error["type"], error["message"]) == ("TimeoutError", "the API read timed out")


def test_abandoned_def_execs_never_exceed_the_states_concurrency(make_run: MakeRun) -> None:
    # A thread cannot be killed: a timed-out exec runs on, and keeps its slot until it ends.
    # (Before: concurrency=1 saw 4 exec bodies alive at once.)
    bodies = InFlight(2)

    def call(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        with bodies:
            time.sleep(0.3)  # the work: longer than the timeout
        return ctx, "done"

    states = [jorb.State("new", exec=call, timeout=0.05, concurrency=2), DONE]
    run = make_run([{"n": i} for i in range(6)])

    process(states, run)

    assert bodies.entered == 6
    assert bodies.max == 2  # reached, never exceeded
    assert run.counts() == {"failed": 6}
    for job in run.jobs.values():
        (error,) = job.errors["new"]
        assert error["message"].startswith("timed out after 0.05s")


def test_def_exec_threads_are_started_as_needed(make_run: MakeRun) -> None:
    # One job in a state of concurrency 3000 starts one thread, not 3000 (which took 1.85 s).
    before = set(threading.enumerate())
    started: list[set[threading.Thread]] = []

    def call(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        new = set(threading.enumerate()) - before
        started.append({t for t in new if t.name.startswith("jorb-exec")})
        return ctx, "second" if ctx["step"] == 1 else "done"

    def second(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        return call(app, overall, {"step": 2})

    states = [
        jorb.State("new", exec=call, concurrency=3000),
        jorb.State("second", exec=second, concurrency=3000),
        DONE,
    ]
    run = make_run([{"step": 1}])
    process(states, run)

    assert run.counts() == {"done": 1}
    first, then = started
    assert [t.name for t in first] == ["jorb-exec_1"]
    assert then == first  # the next exec, of another state, found that thread idle


def test_a_timeout_never_stalls_the_event_loop(make_run: MakeRun) -> None:
    # Before: each def timeout built a fresh pool of as many threads as the def states'
    # concurrency, on the loop's thread (5.4 s for 3,000): timers could not fire meanwhile.
    # A timer on the loop counts the times it fired a second or more late (before: 1.3-4.5 s,
    # once per timeout; a loaded machine alone delays it by far less).
    stalls: list[float] = []

    def call(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        time.sleep(0.2)  # the work: longer than the timeout
        return ctx, "done"

    async def main(run: jorb.Run) -> None:
        loop = asyncio.get_running_loop()
        due = [loop.time() + 0.01]

        def tick() -> None:
            late = loop.time() - due[0]
            if late >= 1.0:
                stalls.append(late)
            due[0] = loop.time() + 0.01
            loop.call_later(0.01, tick)

        loop.call_later(0.01, tick)
        states = [jorb.State("new", exec=call, timeout=0.05, concurrency=3000), DONE]
        await jorb.Processor(None, states, progress=False).aexec(run)

    run = make_run([{"n": i} for i in range(3)])
    asyncio.run(main(run))

    assert run.counts() == {"failed": 3}
    assert stalls == []


def test_a_def_exec_ending_after_its_deadline_is_timed_out_even_if_noticed_late(
    make_run: MakeRun,
) -> None:
    # The loop is blocked (by a faulty async exec) past a def exec's deadline, and the exec
    # returns meanwhile: when the loop comes back, its result is there before its timeout is.
    # It is still a timeout: a late result is never accepted.
    go = threading.Event()

    async def block(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        go.set()
        threading.Event().wait(0.6)  # blocks the loop (the fault this test survives)
        return ctx, "done"

    def call(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        go.wait(STUCK)
        time.sleep(0.2)  # the work: it ends past its deadline, while the loop is blocked
        return ctx, "done"

    states = [
        jorb.State("call", exec=call, timeout=0.1, concurrency=4),
        jorb.State("block", exec=block),
        DONE,
    ]
    run = make_run([{"n": i} for i in range(4)], state="call")
    run.add_job({}, "block")
    process(states, run)

    called = [job for job in run.jobs.values() if "n" in job.ctx]
    assert [job.state for job in called] == ["failed"] * 4, errors_of(run)


def test_a_def_exec_that_raises_stop_iteration_fails_its_attempt(make_run: MakeRun) -> None:
    """StopIteration cannot be set on an asyncio future: raised by a ``def`` exec in its thread,
    it must still fail the attempt (as it does in an ``async def``), not leave the job hanging."""

    def check(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        if ctx["n"] == 2:
            raise StopIteration  # (a next() on an empty iterator, not caught)
        return ctx, "done"

    run = make_run([{"n": 1}, {"n": 2}, {"n": 3}])
    states = [jorb.State("new", exec=check, retries=0), DONE, jorb.State("failed", terminal=True)]
    processor = jorb.Processor(None, states, progress=False)

    async def guarded() -> jorb.Run:
        task = asyncio.current_task()
        assert task is not None
        guard = asyncio.get_running_loop().call_later(STUCK, task.cancel)  # a hang fails
        try:
            return await processor.aexec(run)
        finally:
            guard.cancel()

    try:
        asyncio.run(guarded())
    except asyncio.CancelledError:
        raise AssertionError(f"the run was still going after {STUCK:g}s") from None
    assert {job.id: job.state for job in run.jobs.values()} == {
        "1": "done",
        "2": "failed",
        "3": "done",
    }
    assert "StopIteration" in errors_of(run)["2"][0]
