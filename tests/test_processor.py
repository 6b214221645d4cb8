"""The Processor, through the public API: completion, concurrency, rates, kicks, errors, order."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections import Counter
from itertools import pairwise
from typing import Any

import pytest
from conftest import DONE, InFlight, MakeRun, errors_of, process, process_fake_clock

import jorb
import jorb.lanes

# -- completion ---------------------------------------------------------------------------------


def _step(name: str, next_state: str, *, use_async: bool) -> Any:
    """An exec that appends ``name`` to ctx["trail"] and moves on to ``next_state``."""
    if use_async:

        async def step_async(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
            await asyncio.sleep(0)
            ctx["trail"] = [*ctx.get("trail", []), name]
            return ctx, next_state

        return step_async

    def step_sync(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        ctx["trail"] = [*ctx.get("trail", []), name]
        return ctx, next_state

    return step_sync


@pytest.mark.parametrize("kind", ["async", "sync", "mixed"])
def test_every_job_walks_a_chain_of_states_to_done(make_run: MakeRun, kind: str) -> None:
    flavours = {"async": (True, True, True), "sync": (False, False, False)}
    a, b, c = flavours.get(kind, (True, False, True))
    states = [
        jorb.State("new", exec=_step("new", "fetch", use_async=a), concurrency=3),
        jorb.State("fetch", exec=_step("fetch", "transform", use_async=b), concurrency=2),
        jorb.State("transform", exec=_step("transform", "done", use_async=c), concurrency=4),
        DONE,
    ]
    run = make_run([{"n": i} for i in range(25)])

    assert process(states, run) is run

    assert run.counts() == {"done": 25}
    for job in run.jobs.values():
        assert job.ctx["trail"] == ["new", "fetch", "transform"]
        assert [(h["from"], h["to"]) for h in job.steps()] == [
            ("new", "fetch"),
            ("fetch", "transform"),
            ("transform", "done"),
        ]
        assert job.errors == {}
    assert sorted(job.ctx["n"] for job in run.jobs.values()) == list(range(25))


def test_exec_sees_overall_and_app_and_may_return_three_tuples(make_run: MakeRun) -> None:
    class App:
        greeting = "hello"

    async def greet(app: App, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        ctx["said"] = f"{app.greeting} {ctx['name']} from {overall['team']}"
        return ctx, "done", []  # an empty kick list is a plain transition

    states = [jorb.State("new", exec=greet), DONE]
    run = make_run([{"name": "ada"}, {"name": "bob"}], overall={"team": "ops"})

    process(states, run, App())

    assert sorted(job.ctx["said"] for job in run.jobs.values()) == [
        "hello ada from ops",
        "hello bob from ops",
    ]
    assert len(run.jobs) == 2


def test_runs_with_nothing_to_do_return_at_once(make_run: MakeRun) -> None:
    def never(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        raise AssertionError("no job should run")

    states = [jorb.State("new", exec=never), DONE]
    empty = make_run(name="empty.json")
    assert process(states, empty).jobs == {}

    finished = make_run([{"n": 1}, {"n": 2}], state="done", name="finished.json")
    process(states, finished)
    assert finished.counts() == {"done": 2}
    assert all(job.history == [] for job in finished.jobs.values())


# -- concurrency ------------------------------------------------------------------------------


def test_async_concurrency_is_reached_and_never_exceeded(make_run: MakeRun) -> None:
    counter = InFlight(target=3)

    async def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        with counter:
            await counter.await_full()  # the first three hold their slots until all three run
            await asyncio.sleep(0)
        return ctx, "done"

    states = [jorb.State("new", exec=work, concurrency=3), DONE]
    run = make_run([{"n": i} for i in range(12)])

    process(states, run)

    assert run.counts() == {"done": 12}, errors_of(run)
    assert counter.entered == 12
    assert counter.max == 3


def test_sync_concurrency_is_reached_and_never_exceeded(make_run: MakeRun) -> None:
    counter = InFlight(target=4)

    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        with counter:
            counter.wait_full()
            assert threading.current_thread() is not threading.main_thread()
        return ctx, "done"

    states = [jorb.State("new", exec=work, concurrency=4), DONE]
    run = make_run([{"n": i} for i in range(15)])

    process(states, run)

    assert run.counts() == {"done": 15}, errors_of(run)
    assert counter.entered == 15
    assert counter.max == 4


def test_each_sync_state_holds_its_own_bound_at_the_same_time(make_run: MakeRun) -> None:
    # Two thread-backed states at full concurrency together: neither starves the other, and
    # neither borrows the other's threads.
    both = InFlight(target=5)
    per_state = {"a": InFlight(target=2), "b": InFlight(target=3)}

    def make(name: str) -> Any:
        def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
            with per_state[name], both:
                both.wait_full()
            return ctx, "done"

        return work

    states = [
        jorb.State("a", exec=make("a"), concurrency=2),
        jorb.State("b", exec=make("b"), concurrency=3),
        DONE,
    ]
    run = make_run([{"n": i} for i in range(8)], state="a")
    for i in range(8):
        run.add_job({"n": i}, state="b")

    process(states, run)

    assert run.counts() == {"done": 16}, errors_of(run)
    assert (per_state["a"].max, per_state["b"].max, both.max) == (2, 3, 5)


# -- rates (virtual clock) --------------------------------------------------------------------


def _recording(starts: list[float], next_state: str = "done") -> Any:
    async def record(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        starts.append(asyncio.get_running_loop().time())
        return ctx, next_state

    return record


def _check_leaky_bucket(starts: list[float], n: int, per: float) -> None:
    """Starts obey a bucket of ``n`` draining at ``n/per``: a burst of n, then n per ``per``."""
    starts = sorted(starts)
    eps = 1e-6
    for i in range(len(starts)):
        for j in range(i, len(starts)):
            window = starts[j] - starts[i]
            assert j - i + 1 <= n + window * n / per + eps, (
                f"{j - i + 1} starts within {window:g}s exceed Rate({n}, per={per})"
            )
    # After the initial burst, every window of `per` seconds holds at most n starts.
    later = [t for t in starts if t > starts[0] + eps]
    for i, t in enumerate(later):
        assert sum(1 for u in later[i:] if u < t + per - eps) <= n


def test_rate_bounds_exec_starts(make_run: MakeRun) -> None:
    starts: list[float] = []
    rate = jorb.Rate(4, per=2.0)
    states = [jorb.State("new", exec=_recording(starts), concurrency=20, rate=rate), DONE]
    run = make_run([{"n": i} for i in range(20)])

    process_fake_clock(states, run)

    assert run.counts() == {"done": 20}, errors_of(run)
    assert len(starts) == 20
    starts.sort()
    assert starts[:4] == [starts[0]] * 4  # the burst
    assert starts[4] > starts[0]
    _check_leaky_bucket(starts, 4, 2.0)
    # 16 starts after the burst at 4 per 2 s: the last one 8 virtual seconds after the first.
    assert starts[-1] - starts[0] == pytest.approx(8.0, abs=1e-3)


@pytest.mark.parametrize(("shared", "elapsed"), [(True, 8.0), (False, 3.0)])
def test_a_rate_shared_by_two_states_is_one_budget(
    make_run: MakeRun, shared: bool, elapsed: float
) -> None:
    starts: list[float] = []
    rate_a = jorb.Rate(4, per=2.0)
    rate_b = rate_a if shared else jorb.Rate(4, per=2.0)
    states = [
        jorb.State("a", exec=_recording(starts), concurrency=10, rate=rate_a),
        jorb.State("b", exec=_recording(starts), concurrency=10, rate=rate_b),
        DONE,
    ]
    run = make_run([{"n": i} for i in range(10)], state="a")
    for i in range(10):
        run.add_job({"n": i}, state="b")

    process_fake_clock(states, run)

    assert run.counts() == {"done": 20}, errors_of(run)
    starts.sort()
    if shared:
        _check_leaky_bucket(starts, 4, 2.0)  # 20 starts through one bucket of 4 per 2 s
    # Shared: (20 - 4) / 2 per s = 8 s. Separate: each state (10 - 4) / 2 per s = 3 s, in parallel.
    assert starts[-1] - starts[0] == pytest.approx(elapsed, abs=1e-3)


def test_a_rate_whose_interval_is_not_a_binary_fraction(make_run: MakeRun) -> None:
    # 3 per second: starts 1/3 s apart, which floats cannot represent exactly.
    starts: list[float] = []
    rate = jorb.Rate(3, per=1.0)
    states = [jorb.State("new", exec=_recording(starts), concurrency=30, rate=rate), DONE]
    run = make_run([{"n": i} for i in range(30)])

    process_fake_clock(states, run)

    assert run.counts() == {"done": 30}, errors_of(run)
    _check_leaky_bucket(starts, 3, 1.0)
    assert max(starts) - min(starts) == pytest.approx(9.0, abs=1e-3)


def test_rate_and_concurrency_together(make_run: MakeRun) -> None:
    # concurrency 1 with execs that take 1 virtual second: the rate (10/s) never binds.
    starts: list[float] = []

    async def slow(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        starts.append(asyncio.get_running_loop().time())
        await asyncio.sleep(1.0)
        return ctx, "done"

    states = [jorb.State("new", exec=slow, concurrency=1, rate=jorb.Rate(10, per=1.0)), DONE]
    run = make_run([{"n": i} for i in range(5)])

    process_fake_clock(states, run)

    assert run.counts() == {"done": 5}
    gaps = [b - a for a, b in pairwise(sorted(starts))]
    assert gaps == pytest.approx([1.0] * 4, abs=1e-3)


# -- kicks ------------------------------------------------------------------------------------


def test_kicked_children_get_fresh_ids_record_their_parent_and_run(make_run: MakeRun) -> None:
    async def split(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        kicks = [jorb.Kick("part", {"of": ctx["name"], "part": i}) for i in range(3)]
        return ctx, "done", kicks

    def part(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        ctx["handled"] = True
        return ctx, "done"

    states = [
        jorb.State("new", exec=split, concurrency=2),
        jorb.State("part", exec=part, concurrency=3),
        DONE,
    ]
    run = make_run([{"name": "x"}, {"name": "y"}])
    parents = {job.ctx["name"]: job.id for job in run.jobs.values()}

    process(states, run)

    assert len(run.jobs) == 2 + 6
    assert sorted(int(i) for i in run.jobs) == list(range(1, 9))  # fresh, from the run's counter
    assert run.counts() == {"done": 8}
    children = [job for job in run.jobs.values() if job.parent is not None]
    assert len(children) == 6
    for child in children:
        assert child.parent == parents[child.ctx["of"]]
        assert child.ctx["handled"] is True
        assert [(h["from"], h["to"]) for h in child.steps()] == [("part", "done")]
    for name, ident in parents.items():
        kids = run.children(ident)
        assert sorted(k.ctx["part"] for k in kids) == [0, 1, 2]
        assert all(k.ctx["of"] == name for k in kids)


def test_a_job_that_kicks_on_every_pass_keeps_every_child(make_run: MakeRun) -> None:
    passes = 4

    def loop(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        ctx["pass"] = ctx.get("pass", 0) + 1
        kick = jorb.Kick("child", {"from": ctx["name"], "pass": ctx["pass"]})
        return ctx, ("loop" if ctx["pass"] < passes else "done"), [kick]

    async def child(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        # Grandchildren too: the first child of each parent kicks one more job.
        kicks = [jorb.Kick("child", {"from": ctx["from"], "pass": 0})] if ctx["pass"] == 1 else []
        return {**ctx, "ran": True}, "done", kicks

    states = [
        jorb.State("loop", exec=loop, concurrency=2),
        jorb.State("child", exec=child, concurrency=2),
        DONE,
    ]
    run = make_run([{"name": "p"}, {"name": "q"}], state="loop")

    process(states, run)

    assert len(run.jobs) == 2 + 2 * passes + 2
    assert run.counts() == {"done": len(run.jobs)}
    for parent in [j for j in run.jobs.values() if j.parent is None]:
        kids = run.children(parent.id)
        assert sorted(k.ctx["pass"] for k in kids) == list(range(1, passes + 1))
        assert all(k.ctx["ran"] and k.ctx["from"] == parent.ctx["name"] for k in kids)
        first = next(k for k in kids if k.ctx["pass"] == 1)
        (grandchild,) = run.children(first.id)
        assert grandchild.ctx == {"from": parent.ctx["name"], "pass": 0, "ran": True}
        assert len(parent.history) == passes  # loop->loop three times, then loop->done


def test_kick_delay_and_priority_are_honoured(make_run: MakeRun) -> None:
    started: dict[str, float] = {}
    order: list[str] = []

    async def parent(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        started["parent"] = asyncio.get_running_loop().time()
        kicks = [
            jorb.Kick("child", {"name": "low"}),
            jorb.Kick("child", {"name": "high"}, priority=5),
            jorb.Kick("child", {"name": "late"}, delay=30.0, priority=9),
        ]
        return ctx, "done", kicks

    async def child(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        started[ctx["name"]] = asyncio.get_running_loop().time()
        order.append(ctx["name"])
        return ctx, "done"

    states = [jorb.State("new", exec=parent), jorb.State("child", exec=child), DONE]
    run = make_run([{}])

    process_fake_clock(states, run)

    assert order == ["high", "low", "late"]
    assert started["late"] - started["parent"] == pytest.approx(30.0, abs=0.5)
    assert started["high"] - started["parent"] < 1.0
    late = next(j for j in run.jobs.values() if j.ctx.get("name") == "late")
    assert late.priority == 9


# -- errors -----------------------------------------------------------------------------------


def _failing(calls: Counter[str], *, succeed_after: int | None = None) -> Any:
    def flaky(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        calls[ctx["name"]] += 1
        if succeed_after is not None and calls[ctx["name"]] > succeed_after:
            return ctx, "done"
        raise ValueError(f"boom {ctx['name']} #{calls[ctx['name']]}")

    return flaky


def test_errors_are_recorded_retried_exactly_then_routed_to_on_error(make_run: MakeRun) -> None:
    calls: Counter[str] = Counter()
    states = [
        jorb.State("work", exec=_failing(calls), retries=2, backoff=0, on_error="dead"),
        jorb.State("dead", terminal=True),
        DONE,
    ]
    run = make_run([{"name": "a"}, {"name": "b"}], state="work")

    process(states, run)

    assert calls == {"a": 3, "b": 3}  # one attempt and exactly two retries each
    assert run.counts() == {"dead": 2}
    for job in run.jobs.values():
        assert list(job.errors) == ["work"]
        records = job.errors["work"]
        assert [e["attempt"] for e in records] == [1, 2, 3]
        for number, error in enumerate(records, 1):
            assert {"message", "type", "traceback", "time", "attempt"} <= error.keys()
            assert "state" not in error
            assert error["message"] == f"boom {job.ctx['name']} #{number}"
            assert error["type"] == "ValueError"
            assert "Traceback" in error["traceback"]
            assert f"ValueError: boom {job.ctx['name']} #{number}" in error["traceback"]
            assert "in flaky" in error["traceback"]  # the user's own frame is there
            assert isinstance(error["time"], float)
        times = [e["time"] for e in records]
        assert times == sorted(times)
        assert job.steps()[-1]["from"] == "work"
        assert job.steps()[-1]["to"] == "dead"
        assert job.steps()[-1]["time"] >= times[-1]


def test_without_on_error_jobs_go_to_an_implicit_failed_state(make_run: MakeRun) -> None:
    calls: Counter[str] = Counter()
    states = [jorb.State("work", exec=_failing(calls), backoff=0), DONE]  # "failed" undeclared
    run = make_run([{"name": "a"}], state="work")

    process(states, run)

    assert calls == {"a": 1}  # retries defaults to 0
    assert run.counts() == {"failed": 1}
    (job,) = run.jobs.values()
    assert len(job.errors["work"]) == 1
    reloaded = jorb.Run.load(run.path)  # type: ignore[arg-type]
    assert {"name": "failed", "terminal": True} in reloaded.declared


def test_the_processor_error_state_can_be_renamed(make_run: MakeRun) -> None:
    calls: Counter[str] = Counter()
    states = [
        jorb.State("work", exec=_failing(calls), retries=1, backoff=0),
        jorb.State("broken", terminal=True),
        DONE,
    ]
    run = make_run([{"name": "a"}, {"name": "b"}], state="work")

    process(states, run, error_state="broken")

    assert calls == {"a": 2, "b": 2}
    assert run.counts() == {"broken": 2}


def test_a_retry_that_succeeds_keeps_the_earlier_errors(make_run: MakeRun) -> None:
    calls: Counter[str] = Counter()
    states = [jorb.State("work", exec=_failing(calls, succeed_after=2), retries=5, backoff=0), DONE]
    run = make_run([{"name": "a"}], state="work")

    process(states, run)

    assert calls == {"a": 3}
    (job,) = run.jobs.values()
    assert job.state == "done"
    assert [e["attempt"] for e in job.errors["work"]] == [1, 2]
    assert [(h["from"], h["to"]) for h in job.steps()] == [("work", "done")]
    assert job.attempts == 0


def test_an_error_in_one_job_does_not_stop_the_others(make_run: MakeRun) -> None:
    async def picky(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        if ctx["n"] % 3 == 0:
            raise RuntimeError("not this one")
        return ctx, "done"

    states = [jorb.State("new", exec=picky, concurrency=4, backoff=0), DONE]
    run = make_run([{"n": i} for i in range(30)])

    process(states, run)

    assert run.counts() == {"done": 20, "failed": 10}
    for job in run.jobs.values():
        assert (job.state == "failed") == (job.ctx["n"] % 3 == 0)


class Oops(BaseException):
    """A script's own exception class, derived from BaseException rather than Exception."""


#: What an exec may raise that is not an ``Exception`` (or that an asyncio future refuses), and
#: the error its job records: type, and the start of the message.
NOT_EXCEPTIONS: dict[str, tuple[type[BaseException], str, str]] = {
    "GeneratorExit": (GeneratorExit, "jorb.errors.JorbError", "the exec raised GeneratorExit"),
    "BaseException": (Oops, "jorb.errors.JorbError", "the exec raised test_processor.Oops: "),
    "StopIteration": (StopIteration, "RuntimeError", ""),  # (as Python makes of it in a coroutine)
    "StopAsyncIteration": (StopAsyncIteration, "StopAsyncIteration", "no more rows"),
}


def _raising(how: str, raised: type[BaseException], calls: Counter[int]) -> Any:
    """An exec that raises ``raised("no more rows")`` for job n=1, ``how`` it is written."""

    def fail(ctx: dict[str, Any]) -> None:
        calls[ctx["n"]] += 1
        if ctx["n"] == 1:
            raise raised("no more rows")

    async def at_once(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        fail(ctx)
        return ctx, "done"

    async def after_waiting(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        await asyncio.sleep(0)
        fail(ctx)
        return ctx, "done"

    async def in_a_thread(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        await asyncio.to_thread(fail, ctx)  # (it reaches the exec through an asyncio future)
        return ctx, "done"

    def in_def(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        fail(ctx)
        return ctx, "done"

    if how == "async":
        return at_once
    if how.startswith("async-waits"):
        return after_waiting
    return in_a_thread if how == "to_thread" else in_def


#: How the exec is written, each against each of NOT_EXCEPTIONS, but for one pair: asyncio
#: cannot set a StopIteration on a future, so ``asyncio.to_thread`` of a function raising one
#: never returns (asyncio's, not jorb's: a state's ``timeout`` is what ends such an exec).
RAISERS = [
    (how, name)
    for how in ("async", "async-waits", "async-waits-timeout", "to_thread", "def", "def-timeout")
    for name in NOT_EXCEPTIONS
    if (how, name) != ("to_thread", "StopIteration")
]


@pytest.mark.parametrize(("how", "name"), RAISERS)
def test_an_exec_raising_what_is_not_an_exception_fails_its_job_not_the_run(
    make_run: MakeRun, how: str, name: str
) -> None:
    """GeneratorExit, a BaseException of the script's own, StopIteration: the job's error,
    recorded with its type, message and traceback, and retried like any other; the run goes
    on. (SystemExit and KeyboardInterrupt keep their meaning: they stop the run.)"""
    raised, kind, message = NOT_EXCEPTIONS[name]
    calls: Counter[int] = Counter()
    exec_ = _raising(how, raised, calls)
    timeout = 60.0 if how.endswith("timeout") else None  # (the exec then runs in a wrapper)
    new = jorb.State("new", exec=exec_, concurrency=4, retries=1, backoff=0, timeout=timeout)
    run = make_run([{"n": n} for n in range(4)])

    process([new, DONE], run)

    assert {job.ctx["n"]: job.state for job in run.jobs.values()} == {
        0: "done",
        1: "failed",
        2: "done",
        3: "done",
    }, errors_of(run)
    assert calls[1] == 2  # retried once, as the state says
    on_disk = jorb.Run.load(run.path)  # type: ignore[arg-type]
    for view in (run, on_disk):
        records = next(j for j in view.jobs.values() if j.ctx["n"] == 1).errors["new"]
        assert [(e["type"], e["attempt"]) for e in records] == [(kind, 1), (kind, 2)]
        for record in records:
            assert record["message"].startswith(message), record["message"]
            assert raised.__name__ in record["message"] + record["traceback"]
            if how != "to_thread" or raised is not GeneratorExit:
                # (asyncio turns one from a future into a close: its frames are gone)
                assert "in fail" in record["traceback"], record["traceback"]


def test_backoff_grows_between_retries(make_run: MakeRun) -> None:
    times: list[float] = []

    async def always(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        times.append(asyncio.get_running_loop().time())
        raise ConnectionError("down")

    states = [jorb.State("work", exec=always, retries=4, backoff=1.0), DONE]
    run = make_run([{}], state="work")

    process_fake_clock(states, run)

    assert len(times) == 5
    gaps = [b - a for a, b in pairwise(times)]
    assert gaps[0] > 0, gaps
    assert all(b > a for a, b in pairwise(gaps)), gaps  # every wait longer than the last
    assert gaps[-1] > 4 * gaps[0], gaps  # exponentially: 4 doublings, jitter aside
    (job,) = run.jobs.values()
    assert job.state == "failed"
    assert len(job.errors["work"]) == 5


def test_backoff_is_capped_by_backoff_max(make_run: MakeRun) -> None:
    times: list[float] = []

    async def always(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        times.append(asyncio.get_running_loop().time())
        raise ConnectionError("down")

    states = [jorb.State("work", exec=always, retries=6, backoff=1.0, backoff_max=2.0), DONE]
    run = make_run([{}], state="work")

    process_fake_clock(states, run)

    gaps = [b - a for a, b in pairwise(times)]
    assert len(gaps) == 6
    assert max(gaps) <= 2.0 + 1e-6, gaps


# -- malformed results ------------------------------------------------------------------------


class Opaque:
    """Something orjson cannot serialize."""


MALFORMED: dict[str, tuple[Any, str]] = {
    "none": (None, "must return (ctx, next_state)"),
    "one-tuple": (({"x": 1},), "must return (ctx, next_state)"),
    "four-tuple": (({}, "done", [], "extra"), "must return (ctx, next_state)"),
    "bare-ctx": ({"x": 1}, "must return (ctx, next_state)"),
    "ctx-not-dict": (("oops", "done"), "ctx must be a dict"),
    "state-not-str": (({}, 3), "next state must be a str"),
    "undeclared-next": (({}, "nowhere"), "undeclared state 'nowhere'"),
    "kick-undeclared": (({}, "done", [jorb.Kick("nowhere", {})]), "undeclared state 'nowhere'"),
    "kick-not-kick": (({}, "done", ["child"]), "jorb.Kick"),
    "kick-ctx-not-dict": (({}, "done", [jorb.Kick("done", [1])]), "ctx must be a dict"),  # type: ignore[arg-type]
    "set-in-ctx": (({"tags": {"a", "b"}}, "done"), "not JSON"),
    "object-in-ctx": (({"obj": Opaque()}, "done"), "not JSON"),
    "int-keys": (({1: "one"}, "done"), "not JSON"),
    "set-in-kick": (({}, "done", [jorb.Kick("done", {"s": {1}})]), "not JSON"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.parametrize("use_async", [True, False], ids=["async", "sync"])
def test_malformed_results_become_job_errors_and_the_run_goes_on(
    make_run: MakeRun, case: str, use_async: bool
) -> None:
    result, fragment = MALFORMED[case]

    def answer(ctx: dict[str, Any]) -> Any:
        return result if ctx["case"] == case else (ctx, "done")

    async def work_async(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        return answer(ctx)

    def work_sync(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        return answer(ctx)

    work = work_async if use_async else work_sync
    states = [jorb.State("new", exec=work, concurrency=2), DONE]
    run = make_run([{"case": "good"}, {"case": case}, {"case": "good"}])

    process(states, run, stop_on_bug=False)  # (the default stops at the first: test_mistakes.py)

    assert len(run.jobs) == 3  # nothing kicked by the bad result
    bad = run.jobs["2"]
    assert bad.state == "failed"
    assert bad.ctx == {"case": case}  # the unusable ctx was not kept
    (error,) = bad.errors["new"]
    assert error["type"].endswith("ExecResultError")
    assert fragment in error["message"]
    assert [run.jobs["1"].state, run.jobs["3"].state] == ["done", "done"]
    reloaded = jorb.Run.load(run.path)  # type: ignore[arg-type]
    assert reloaded.jobs["2"].errors == bad.errors
    assert reloaded.counts() == {"done": 2, "failed": 1}


def test_malformed_results_are_never_retried(make_run: MakeRun) -> None:
    calls = Counter[str]()

    def unserializable(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        calls["n"] += 1
        return {"when": {1, 2}}, "done"

    states = [
        jorb.State("new", exec=unserializable, retries=2, backoff=0, on_error="bad"),
        jorb.State("bad", terminal=True),
        DONE,
    ]
    run = make_run([{}])

    process(states, run, stop_on_bug=False)

    assert calls["n"] == 1  # a bug in the script: another attempt would only repeat it
    (job,) = run.jobs.values()
    assert job.state == "bad"
    assert [e["attempt"] for e in job.errors["new"]] == [1]


# -- order: priority, FIFO, re-entry ----------------------------------------------------------


def _order_recorder(order: list[str], *, loops: int = 1) -> Any:
    async def record(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        order.append(ctx["name"])
        ctx["seen"] = ctx.get("seen", 0) + 1
        return ctx, ("work" if ctx["seen"] < loops else "done")

    return record


def test_higher_priority_starts_first_fifo_among_equals(make_run: MakeRun) -> None:
    order: list[str] = []
    states = [jorb.State("work", exec=_order_recorder(order), concurrency=1), DONE]
    run = make_run(state="work")
    for name, priority in [("a", 0), ("b", 5), ("c", 0), ("d", 10), ("e", 5), ("f", 0), ("g", -1)]:
        run.add_job({"name": name}, "work", priority=priority)

    process(states, run)

    assert order == ["d", "b", "e", "a", "c", "f", "g"]


def test_a_job_that_re_enters_its_state_goes_to_the_back(make_run: MakeRun) -> None:
    order: list[str] = []
    states = [jorb.State("work", exec=_order_recorder(order, loops=3), concurrency=1), DONE]
    run = make_run([{"name": n} for n in "abc"], state="work")

    process(states, run)

    assert order == list("abcabcabc")
    assert run.counts() == {"done": 3}


# -- aexec ------------------------------------------------------------------------------------


def test_aexec_runs_inside_a_running_loop_alongside_other_tasks(make_run: MakeRun) -> None:
    run = make_run([{"n": i} for i in range(5)])

    async def main() -> tuple[jorb.Run, list[str]]:
        started, gate = asyncio.Event(), asyncio.Event()
        seen: list[str] = []

        async def waits_for_gate(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
            seen.append("exec started")
            started.set()
            await gate.wait()  # opened by a task of the caller's, on the same loop
            return ctx, "done"

        async def opener() -> None:
            await started.wait()
            seen.append("gate opened")
            gate.set()

        states = [jorb.State("new", exec=waits_for_gate, concurrency=5), DONE]
        processor = jorb.Processor(None, states, progress=False)
        result, _ = await asyncio.gather(processor.aexec(run), opener())
        return result, seen

    result, seen = asyncio.run(main())

    assert result is run
    assert run.counts() == {"done": 5}
    assert seen[0] == "exec started" and "gate opened" in seen


# -- status snapshots -------------------------------------------------------------------------


def test_listeners_get_frozen_per_state_snapshots(make_run: MakeRun) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.started: list[jorb.Status] = []
            self.stopped: list[jorb.Status] = []

        def start(self, status: jorb.Status) -> None:
            self.started.append(status)

        def update(self, status: jorb.Status) -> None:
            pass

        def note(self, message: str) -> None:
            pass

        def stop(self, status: jorb.Status) -> None:
            self.stopped.append(status)

    calls: Counter[str] = Counter()
    states = [
        jorb.State("work", exec=_failing(calls, succeed_after=1), retries=1, backoff=0),
        jorb.State("edge", exec=_failing(calls), backoff=0),
        DONE,
    ]
    run = make_run([{"name": n} for n in "abc"], state="work")
    run.add_job({"name": "z"}, state="edge")
    recorder = Recorder()

    process(states, run, listeners=[recorder])

    (first,), (last,) = recorder.started, recorder.stopped
    before = {s.name: s for s in first.states}
    after = {s.name: s for s in last.states}
    assert list(after) == ["work", "edge", "done", "failed", "cancelled"]
    assert (first.jobs, first.finished, first.complete) == (4, 0, False)
    assert (before["work"].jobs, before["edge"].jobs, before["done"].jobs) == (3, 1, 0)
    assert (last.jobs, last.finished, last.complete) == (4, 4, True)
    work, edge = after["work"], after["edge"]
    assert (work.jobs, work.running, work.done, work.errors, work.failed) == (0, 0, 3, 3, 0)
    assert (edge.jobs, edge.done, edge.errors, edge.failed) == (0, 0, 1, 1)
    assert (after["done"].jobs, after["failed"].jobs) == (3, 1)
    assert after["done"].terminal and not work.terminal
    with pytest.raises(AttributeError):
        last.jobs = 0  # type: ignore[misc]


def test_a_first_ctrl_c_with_no_exec_running_does_not_offer_to_wait_for_none(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # (Every job waiting out a backoff or a delay, say: "waiting up to 30s for 0 running
    # exec(s)" read as if something were running.)
    processor = jorb.Processor(None, [jorb.State("a", exec=lambda *a: None), DONE], progress=False)
    processor._stops.interrupt()
    assert capfd.readouterr().err == "\njorb: stopping: no exec is running; saving the run\n"


# -- the garbage collector ------------------------------------------------------------------


@pytest.mark.parametrize("failing", [False, True], ids=["returns", "raises"])
def test_an_exec_collects_young_garbage_less_often_and_restores_the_threshold(
    make_run: MakeRun, failing: bool
) -> None:
    seen: list[tuple[int, int, int]] = []

    async def look(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        seen.append(gc.get_threshold())
        if failing:
            raise KeyboardInterrupt  # the exec ends with an exception, not a return
        return ctx, "done"

    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        run = make_run([{}])
        if failing:
            with pytest.raises(KeyboardInterrupt):
                states = [jorb.State("new", exec=look), DONE]
                asyncio.run(jorb.Processor(None, states, progress=False).aexec(run))
        else:
            process([jorb.State("new", exec=look), DONE], run)
        assert seen == [(50_000, 10, 10)]
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*before)


def test_execs_that_never_wait_let_the_loop_turn_between_batches(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lane of execs that return without awaiting runs them a batch (its free slots) at a
    time, inline; past ``INLINE_SECONDS`` (here: at once) it lets other tasks run in between."""
    monkeypatch.setattr(jorb.lanes, "INLINE_SECONDS", -1.0)
    turns = 0
    seen: list[int] = []

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    async def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        seen.append(turns)  # never awaits: CPU work in an async def
        return ctx, "done"

    async def main() -> None:
        counter = asyncio.create_task(count_turns())
        states = [jorb.State("new", exec=work, concurrency=2), DONE]
        await jorb.Processor(None, states, progress=False).aexec(run)
        counter.cancel()

    run = make_run([{"n": i} for i in range(6)])
    asyncio.run(main())
    assert run.counts() == {"done": 6}
    assert seen[0::2] == seen[1::2], "a batch of two runs inline, in one turn"
    assert seen[0] < seen[2] < seen[4], "other tasks ran between the batches"


def test_no_exec_kind_leaves_a_running_count_a_slot_or_a_busy_job_behind(
    make_run: MakeRun,
) -> None:
    """Execs that return at once (in a batch) or wait, succeed, fail, raise GeneratorExit (at
    once, or through a future: asyncio then closes the coroutines), time out, run in a thread,
    kick, or are cancelled while they wait: while the waiting ones wait, ``statistics()``
    counts them running; once the run is done every state says 0 running, every slot is free
    and no job is left busy (a busy job can never be redriven)."""
    seen: dict[str, int] = {}
    gate = asyncio.Event()
    blocked: list[int] = []

    def gen_exit() -> None:
        raise GeneratorExit("through a future")

    async def mixed(app: jorb.Processor, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        n = ctx["n"]
        kind = n % 8
        if kind == 1:
            raise ValueError("at once")
        if kind == 2:
            raise GeneratorExit("at once")
        if kind == 3:
            await asyncio.sleep(0)
            raise ValueError("after waiting")
        if kind == 4:
            await asyncio.to_thread(gen_exit)
        if kind == 5:
            blocked.append(n)
            await gate.wait()
        if kind == 6:
            return ctx, "done", [jorb.Kick("thread", {"n": n + 1000})]
        return ctx, "thread"

    def in_thread(app: jorb.Processor, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        if ctx["n"] % 3 == 0:
            raise GeneratorExit("in a thread")
        return ctx, "slow"

    async def slow(app: jorb.Processor, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        if ctx["n"] % 2:
            await asyncio.sleep(3600)  # its timeout ends it
        return ctx, "done"

    async def watch(app: jorb.Processor, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        # (virtual time) until only the three blocked execs are left in 'new'
        while len(blocked) < 3 or any(
            job.state == "new" and job.ctx.get("n", 0) % 8 != 5 for job in run.jobs.values()
        ):
            await asyncio.sleep(1)
        states = {s.name: s for s in app.statistics().states}
        seen["waiting execs"] = states["new"].running
        seen["itself"] = states["watch"].running
        app.cancel([ids[blocked[0]]])
        while run.jobs[ids[blocked[0]]].state != "cancelled":
            await asyncio.sleep(1)
        gate.set()
        return ctx, "done"

    states = [
        jorb.State("new", exec=mixed, concurrency=8, retries=1, backoff=0, on_error="failed"),
        jorb.State("thread", exec=in_thread, concurrency=3, on_error="failed"),
        jorb.State("slow", exec=slow, concurrency=4, timeout=60, on_error="failed"),
        jorb.State("watch", exec=watch),
        DONE,
        jorb.State("failed", terminal=True),
    ]
    run = make_run([])
    ids = {n: run.add_job({"n": n}).id for n in range(24)}  # (three of each kind)
    run.add_job({}, "watch")
    processor = jorb.Processor(None, states, progress=False)
    processor.app = processor

    jorb.testing.run(asyncio.wait_for(processor.aexec(run), 3600))

    assert seen == {"waiting execs": 3, "itself": 1}
    assert run.counts() == {"done": 8, "failed": 19, "cancelled": 1}, errors_of(run)
    assert {s.name: s.running for s in processor.statistics().states if s.running} == {}
    lanes = processor._lanes
    assert {name: lane.held for name, lane in lanes.by_name.items() if lane.held} == {}
    assert lanes.running == set()


def test_each_exec_of_a_batch_is_timed_from_the_end_of_the_one_before(make_run: MakeRun) -> None:
    """Execs that return at once run one after the other in a batch, each timed from when the
    one before it ended and was settled (success, failure, give-up), or from the batch's start;
    one that waits takes its wait into its duration, and the next batch is timed afresh. The
    virtual clock moves only by what each exec costs: every step's duration is its exec's cost,
    and its time is when it ended."""
    cost = {0: 1.0, 1: 2.0, 2: 4.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0, 7: 128.0}
    tries: Counter[int] = Counter()

    async def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        n = ctx["n"]
        tries[n] += 1
        asyncio.get_running_loop().advance(cost[n])  # (CPU time, as the clock sees it)
        if n == 2 and tries[n] == 1:
            raise ValueError("once")  # retried at once, in a later batch
        if n == 5:
            raise jorb.NoRetry("never")  # gives up: a step to 'failed'
        if n == 4:
            await asyncio.sleep(256)  # waits: the jobs after it go back to the lane
        return ctx, "done"

    new = jorb.State("new", exec=work, concurrency=8, retries=1, backoff=0, on_error="failed")
    run = make_run([{"n": n} for n in range(8)])

    process_fake_clock([new, DONE, jorb.State("failed", terminal=True)], run)

    ends = {}
    for job in run.jobs.values():
        n = job.ctx["n"]
        (step,) = job.steps()
        took = cost[n] + (256 if n == 4 else 0)
        assert step["duration"] == pytest.approx(took, abs=1e-6), (n, job.history)
        ends[n] = step["time"]
    # The first batch, inline one after the other: each ended its own cost after the one
    # before it, the failed attempt of job 2 included (stamped when it ended).
    (failed_at,) = [error["time"] for error in run.jobs["3"].errors["new"]]
    assert ends[1] - ends[0] == pytest.approx(cost[1], abs=1e-6)
    assert failed_at - ends[1] == pytest.approx(cost[2], abs=1e-6)
    assert ends[3] - failed_at == pytest.approx(cost[3], abs=1e-6)
    assert run.counts() == {"done": 7, "failed": 1}, errors_of(run)
