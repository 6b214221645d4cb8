"""Adaptive rates: AIMD on Rate itself, Retry-After pauses, and rate limits through the Processor.

Every test runs on jorb.testing's virtual clock: a pause of five seconds costs no real time.
"""

from __future__ import annotations

import asyncio
import datetime
import math
import time
from itertools import pairwise
from typing import Any

import pytest
from conftest import DONE, STUCK, MakeRun, Notes, process_fake_clock, watchdog

import jorb
import jorb.testing
from jorb import report

Ctx = dict[str, Any]


# -- AIMD on Rate directly ------------------------------------------------------------------------


def test_defaults_are_documented_fractions_of_n() -> None:
    rate = jorb.Rate(64, per=2.0)

    assert rate.n == 64 and rate.per == 2.0
    assert rate.current == 64  # starts at the ceiling
    assert rate.floor == 64 / 32
    assert rate.step == 64 / 10
    assert rate.interval == 1.0
    assert rate.paused_until == 0.0


def test_limited_halves_the_rate() -> None:
    rate = jorb.Rate(40)

    rate.limited(10.0, None)
    assert rate.current == 20
    rate.limited(11.0, None)
    assert rate.current == 10
    rate.limited(12.5, None)
    assert rate.current == 5


def test_the_rate_never_falls_below_the_floor() -> None:
    rate = jorb.Rate(100, floor=7)

    for second in range(20):
        rate.limited(float(second), None)
        assert rate.current >= 7

    assert rate.current == 7  # 100, 50, 25, 12.5, then held at the floor


def test_cuts_within_one_interval_coalesce_into_one() -> None:
    rate = jorb.Rate(80, interval=2.0)

    # A burst of concurrent 429s: ten limited() calls within the interval are one cut.
    for i in range(10):
        rate.limited(5.0 + i * 0.19, None)
    assert rate.current == 40

    rate.limited(6.99, None)  # still within 2 s of the cut at 5.0
    assert rate.current == 40
    rate.limited(7.0, None)  # a full interval later: a new cut
    assert rate.current == 20


def test_successes_climb_one_step_per_interval() -> None:
    rate = jorb.Rate(50, step=4, interval=1.0)
    rate.limited(0.0, None)
    assert rate.current == 25

    # Many successes within one interval of the cut: no climb yet.
    for i in range(50):
        rate.succeeded(i * 0.0199)
    assert rate.current == 25

    rate.succeeded(1.0)
    assert rate.current == 29
    # A thousand successes in the next interval: still at most one step.
    for i in range(1000):
        rate.succeeded(1.0 + i * 0.000999)
    assert rate.current == 29
    rate.succeeded(2.0)
    assert rate.current == 33


def test_the_climb_stops_at_n() -> None:
    rate = jorb.Rate(10, step=3)
    rate.limited(0.0, None)
    seen = []
    for second in range(1, 10):
        rate.succeeded(float(second))
        seen.append(rate.current)

    assert seen == [8, 10, 10, 10, 10, 10, 10, 10, 10]
    assert max(seen) <= rate.n


def test_no_successes_no_climb() -> None:
    rate = jorb.Rate(10)
    rate.limited(0.0, None)

    # Time passing alone does not raise the rate: it climbs on successes.
    rate.limited(0.5, None)  # coalesced, but still not a success
    assert rate.current == 5


def test_retry_after_sets_paused_until_and_never_shortens_it() -> None:
    rate = jorb.Rate(10)

    rate.limited(100.0, 5.0)
    assert rate.paused_until == 105.0
    rate.limited(101.0, 1.0)  # asks for less than what is left: the longer pause stands
    assert rate.paused_until == 105.0
    rate.limited(102.0, 10.0)
    assert rate.paused_until == 112.0
    rate.limited(103.0, None)
    assert rate.paused_until == 112.0


def test_a_lane_without_a_rate_pauses_but_never_limits() -> None:
    lane = jorb.Rate.unlimited()

    lane.limited(3.0, 2.0)
    lane.succeeded(9.0)

    assert lane.paused_until == 5.0
    assert lane.current == math.inf


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0},
        {"n": -1},
        {"n": math.inf},
        {"n": 5, "per": 0},
        {"n": 5, "floor": 0},
        {"n": 5, "floor": 6},
        {"n": 5, "step": 0},
        {"n": 5, "interval": 0},
    ],
)
def test_bad_rate_arguments_are_jorb_errors(kwargs: dict[str, float]) -> None:
    with pytest.raises(jorb.StateError):
        jorb.Rate(**kwargs)


def _acquire_times(rate: jorb.Rate, count: int, before: Any = None) -> list[float]:
    """Loop times of ``count`` successive ``rate.acquire()`` on the virtual clock."""

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        if before is not None:
            before(rate, loop.time())
        times = []
        for _ in range(count):
            await rate.acquire()
            times.append(loop.time())
        return times

    return jorb.testing.run(main())


def test_acquire_waits_out_a_pause_then_keeps_the_cut_rate() -> None:
    rate = jorb.Rate(10, per=1.0)

    times = _acquire_times(rate, 21, before=lambda r, now: r.limited(now, 3.0))

    assert rate.current == 5
    assert times[0] == pytest.approx(3.0)  # nothing before the pause ends
    # Then 5 per second, not 10: the API just said "slow down", so no burst either.
    gaps = [b - a for a, b in pairwise(times)]
    assert gaps == pytest.approx([0.2] * 20, abs=1e-6)


def test_acquire_follows_the_rate_down_and_back_up() -> None:
    rate = jorb.Rate(10, per=1.0, step=5)

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        loop.call_at(1.0, rate.limited, 1.0, None)  # 10 -> 5 per second
        loop.call_at(3.0, rate.succeeded, 3.0)  # 5 -> 10 per second
        times = []
        for _ in range(60):
            await rate.acquire()
            times.append(loop.time())
        return times

    times = jorb.testing.run(main())

    def gaps(start: float, end: float) -> list[float]:
        inside = [t for t in times if start <= t <= end]
        return [b - a for a, b in pairwise(inside)]

    assert times[:10] == [0.0] * 10  # the burst of n
    eps = 1e-6
    assert gaps(0.1 - eps, 1.0 + eps) == pytest.approx([0.1] * 9, abs=eps)  # n per second
    assert gaps(1.0 - eps, 3.0 - eps) == pytest.approx([0.2] * 9, abs=eps)  # halved
    # Climbing back is no burst: straight from one start per 0.2 s to one per 0.1 s.
    assert gaps(2.8 - eps, times[-1]) == pytest.approx([0.2] + [0.1] * 30, abs=eps)


def test_a_start_waiting_for_the_rate_also_waits_out_a_pause_set_meanwhile() -> None:
    rate = jorb.Rate(1, per=1.0)

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        await rate.acquire()  # t=0: the burst of one
        waiter = asyncio.ensure_future(rate.acquire())  # due at t=1 at 1 per second
        await asyncio.sleep(0.5)
        rate.limited(loop.time(), 5.0)  # t=0.5: the API says "not before 5.5"
        await waiter
        return [loop.time()]

    (started,) = jorb.testing.run(main())

    assert started >= 5.5


def test_a_rate_reused_on_a_new_loop_starts_afresh() -> None:
    # Each exec runs on its own loop; a pause timed on an old loop's clock means nothing there.
    rate = jorb.Rate(4, per=1.0)
    _acquire_times(rate, 1, before=lambda r, now: r.limited(now, 1000.0))

    assert rate.current == 2

    times = _acquire_times(rate, 3)

    assert times == pytest.approx([0.0, 0.0, 0.5])  # no stale pause; the learned rate is kept


# -- through the Processor ------------------------------------------------------------------------


class Recorder:
    """Remembers when each exec started: ``(loop time, state, name)``."""

    def __init__(self) -> None:
        self.starts: list[tuple[float, str, str]] = []

    def start(self, state: str, ctx: Ctx) -> float:
        now = asyncio.get_running_loop().time()
        self.starts.append((now, state, ctx["name"]))
        return now

    def times(self, state: str | None = None, name: str | None = None) -> list[float]:
        return [
            t
            for t, s, n in self.starts
            if (state is None or s == state) and (name is None or n == name)
        ]


def test_retry_after_pauses_every_state_sharing_the_rate(make_run: MakeRun) -> None:
    rec = Recorder()
    limited_at: list[float] = []

    async def call(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        now = rec.start("a", ctx)
        await asyncio.sleep(0.2)
        if ctx["name"] == "a1" and not limited_at:
            limited_at.append(now + 0.2)
            raise jorb.RateLimited(retry_after=5)
        return ctx, "done"

    async def other(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        rec.start("b", ctx)
        await asyncio.sleep(0.5)
        return ctx, "done"

    api = jorb.Rate(100, per=1.0)
    states = [
        jorb.State("a", exec=call, rate=api),
        jorb.State("b", exec=other, rate=api),
        DONE,
    ]
    run = make_run([{"name": "a1"}, {"name": "a2"}], state="a")
    for name in ("b1", "b2", "b3"):
        run.add_job({"name": name}, state="b")

    process_fake_clock(states, run)

    assert run.counts() == {"done": 5}
    (t_limit,) = limited_at
    assert t_limit == pytest.approx(0.2)
    # a1 and b1 started at 0; after the 429 at 0.2, no exec of either state starts for 5 s...
    early = [(s, n) for t, s, n in rec.starts if t < t_limit + 5.0]
    assert sorted(early) == [("a", "a1"), ("b", "b1")]
    # ...and both states start again as soon as the pause ends.
    assert min(rec.times("a", "a1")[1:] + rec.times("a", "a2")) == pytest.approx(5.2, abs=0.05)
    assert min(rec.times("b", "b2")) == pytest.approx(5.2, abs=0.05)


def test_a_state_without_a_rate_is_a_lane_of_its_own(make_run: MakeRun) -> None:
    rec = Recorder()

    async def flaky(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        rec.start("lonely", ctx)
        if ctx["name"] == "l1" and len(rec.times("lonely", "l1")) == 1:
            raise jorb.RateLimited(retry_after=5)
        await asyncio.sleep(0.1)
        return ctx, "done"

    async def steady(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        rec.start(ctx["lane"], ctx)
        await asyncio.sleep(1.0)
        return ctx, "done"

    states = [
        jorb.State("lonely", exec=flaky),
        jorb.State("free", exec=steady),
        jorb.State("metered", exec=steady, rate=jorb.Rate(10)),
        DONE,
    ]
    run = make_run([{"name": "l1"}, {"name": "l2"}], state="lonely")
    for i in range(4):
        run.add_job({"name": f"f{i}", "lane": "free"}, state="free")
        run.add_job({"name": f"m{i}", "lane": "metered"}, state="metered")

    process_fake_clock(states, run)

    assert run.counts() == {"done": 10}
    # The lane that got the 429 waits 5 s...
    assert rec.times("lonely") == pytest.approx([0.0, 5.0, 5.1])
    # ...while the others keep going, one exec per second each (concurrency 1).
    assert rec.times("free") == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert rec.times("metered") == pytest.approx([0.0, 1.0, 2.0, 3.0])


def test_a_pause_stops_the_rest_of_a_batch_of_execs_that_do_not_wait(make_run: MakeRun) -> None:
    """Execs that return at once run a worker's batch inline: when one of them asks for a pause
    (a quota checked locally, no request made), the batch's other jobs wait it out too."""
    rec = Recorder()

    async def check_quota(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        rec.start("quota", ctx)
        if ctx["name"] == "q0" and len(rec.times("quota", "q0")) == 1:
            raise jorb.RateLimited(retry_after=5)
        return ctx, "done"

    states = [jorb.State("quota", exec=check_quota, concurrency=8), DONE]
    run = make_run([{"name": f"q{i}"} for i in range(6)], state="quota")

    process_fake_clock(states, run)

    assert run.counts() == {"done": 6}
    assert rec.times("quota", "q0") == pytest.approx([0.0, 5.0])
    assert min(t for t, _, name in rec.starts if name != "q0") == pytest.approx(5.0)


def test_rate_limited_does_not_use_up_retries(make_run: MakeRun) -> None:
    calls: list[float] = []

    async def call(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        calls.append(asyncio.get_running_loop().time())
        if len(calls) <= 3:
            raise jorb.RateLimited(retry_after=2.0)
        ctx["answered"] = True
        return ctx, "done"

    states = [jorb.State("call", exec=call, retries=0, rate=jorb.Rate(10)), DONE]
    run = make_run([{"q": 1}], state="call")

    process_fake_clock(states, run)

    (job,) = run.jobs.values()
    assert job.state == "done"
    assert job.ctx == {"q": 1, "answered": True}
    records = job.errors["call"]
    assert len(records) == 3
    assert all(r["rate_limited"] is True for r in records)
    assert all(r["type"] == "jorb.errors.RateLimited" for r in records)
    assert [r["attempt"] for r in records] == [1, 2, 3]
    assert job.attempts == 0 and job.throttled == 0
    assert calls == pytest.approx([0.0, 2.0, 4.0, 6.0])  # each retry waited out its Retry-After


def test_an_ordinary_error_still_uses_retries_after_rate_limits(make_run: MakeRun) -> None:
    calls = 0

    async def call(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise jorb.RateLimited()
        raise ValueError("bad request")

    states = [
        jorb.State("call", exec=call, retries=0, on_error="broken", rate=jorb.Rate(10)),
        jorb.State("broken", terminal=True),
        DONE,
    ]
    run = make_run([{}], state="call")

    process_fake_clock(states, run)

    (job,) = run.jobs.values()
    assert job.state == "broken"
    assert [r["rate_limited"] for r in job.errors["call"]] == [True, True, False]
    assert calls == 3


def test_rate_limit_retries_caps_a_job_that_is_rate_limited_forever(make_run: MakeRun) -> None:
    calls = 0

    async def call(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        nonlocal calls
        calls += 1
        raise jorb.RateLimited(retry_after=1.0)

    states = [
        jorb.State(
            "call",
            exec=call,
            retries=10,
            rate_limit_retries=4,
            on_error="gave_up",
            rate=jorb.Rate(10),
        ),
        jorb.State("gave_up", terminal=True),
        DONE,
    ]
    run = make_run([{}], state="call")

    process_fake_clock(states, run)

    (job,) = run.jobs.values()
    assert job.state == "gave_up"
    assert calls == 5  # the first attempt and 4 rate-limited retries; `retries` untouched
    assert len(job.errors["call"]) == 5
    assert all(r["rate_limited"] for r in job.errors["call"])
    assert job.steps()[-1]["from"] == "call" and job.steps()[-1]["to"] == "gave_up"


def test_the_default_rate_limit_cap_is_generous() -> None:
    assert jorb.State("x", exec=lambda *a: None).rate_limit_retries >= 50


def test_the_current_rate_is_in_the_statistics(make_run: MakeRun) -> None:
    seen: list[float | None] = []

    class App:
        processor: jorb.Processor

    app = App()

    async def call(app: App, overall: Ctx, ctx: Ctx) -> Any:
        (row,) = [s for s in app.processor.statistics().states if s.name == "call"]
        seen.append(row.rate)
        if len(seen) == 1:
            raise jorb.RateLimited()
        return ctx, "done"

    api = jorb.Rate(10, per=2.0)
    states = [jorb.State("call", exec=call, rate=api), jorb.State("plain", exec=call), DONE]
    app.processor = jorb.Processor(app, states, progress=False)
    run = make_run([{}], state="call")

    jorb.testing.run(app.processor.aexec(run))

    assert seen == [5.0, 2.5]  # 10 per 2 s, then halved: in starts per second
    rows = {s.name: s for s in app.processor.statistics().states}
    assert rows["call"].rate == 2.5
    assert rows["plain"].rate is None  # no Rate, no number
    assert rows["done"].rate is None


def test_a_job_waiting_for_the_rate_can_be_redriven_without_running(make_run: MakeRun) -> None:
    # j2 waits 10 s for the Rate while j1 redrives it. (Once a bug: a worker took j2 before
    # waiting for the Rate, so the redrive moved it and the worker then ran "slow"'s exec on
    # it anyway, taking it out of the terminal state it had been redriven to.)
    ran: list[str] = []

    class App:
        processor: jorb.Processor

    app = App()

    async def slow(app: App, overall: Ctx, ctx: Ctx) -> Any:
        ran.append(ctx["name"])
        if ctx["name"] == "j1":
            app.processor.redrive("slow", "parked", ["2"])
            await asyncio.sleep(1)
        return ctx, "done"

    async def long(app: App, overall: Ctx, ctx: Ctx) -> Any:
        await asyncio.sleep(30)  # keeps the run going past j2's token at t=10
        return ctx, "done"

    states = [
        jorb.State("slow", exec=slow, concurrency=2, rate=jorb.Rate(1, per=10.0)),
        jorb.State("long", exec=long),
        jorb.State("parked", terminal=True),
        DONE,
    ]
    app.processor = jorb.Processor(app, states, progress=False)
    run = make_run([{"name": "j1"}, {"name": "j2"}], state="slow")
    run.add_job({"name": "keeps-going"}, state="long")

    jorb.testing.run(app.processor.aexec(run))

    history = [(h["from"], h["to"]) for h in run.jobs["2"].steps()]
    assert ran == ["j1"], f"execs ran for {ran}; j2's history: {history}"
    assert run.jobs["2"].state == "parked"


def test_two_starts_waiting_out_a_pause_do_not_freeze_the_virtual_clock() -> None:
    # Two workers (say of two states sharing one Rate) wait out a retry_after pause that ends
    # less than the clock's resolution (1 ns) from now, one loop turn apart. asyncio fires a
    # timer up to that resolution early; Rate.acquire sees the pause not over and sleeps the
    # rest again; the other worker's wake-up is always queued, so the virtual clock never
    # ticks: the two wake each other forever at one instant and the run never ends.
    async def main() -> float:
        loop = asyncio.get_running_loop()
        rate = jorb.Rate(2)
        rate.limited(loop.time(), 1.0)  # a retry_after of 1 s: paused until t=1
        await asyncio.sleep(1.0 - 5e-10)  # something else ran until just before the end
        first = asyncio.create_task(rate.acquire())
        await asyncio.sleep(0)
        second = asyncio.create_task(rate.acquire())
        await asyncio.gather(first, second)
        return loop.time()

    async def guarded() -> float:
        try:
            with watchdog(STUCK):
                return await main()
        except asyncio.CancelledError:
            raise AssertionError("the virtual clock froze: two Rate waiters spin") from None

    assert jorb.testing.run(guarded()) >= 1.0


# -- Retry-After: capped, visible; plain errors ---------------------------------------------------


def test_a_server_pause_is_capped_at_max_pause_and_says_so(make_run: MakeRun) -> None:
    starts: list[float] = []

    async def call(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        starts.append(asyncio.get_running_loop().time())
        if len(starts) == 1:
            raise jorb.RateLimited(retry_after=1e9)  # "come back in 31 years"
        return ctx, "done"

    notes = Notes()
    api = jorb.Rate(10, max_pause=60)
    states = [jorb.State("call", exec=call, rate=api), DONE]
    run = make_run([{}], state="call")

    process_fake_clock(states, run, listeners=[notes], poll_interval=30)

    assert run.counts() == {"done": 1}
    assert starts[1] - starts[0] == pytest.approx(60, abs=0.5)
    assert notes.notes == [
        "call: the server asked for a pause of 1e+09s; pausing 60s, the Rate's max_pause "
        "(jorb.Rate(..., max_pause=...))"
    ]
    (error,) = run.jobs["1"].errors["call"]
    assert error["paused_until"] - error["time"] == pytest.approx(60, abs=0.01)
    assert jorb.Rate(1).max_pause == 300  # the default: five minutes


def test_a_server_pause_shows_in_the_statistics_and_in_jorb_status(make_run: MakeRun) -> None:
    from typer.testing import CliRunner

    from jorb.cli import app as cli

    seen: list[jorb.StateStatus] = []

    class App:
        processor: jorb.Processor

    async def call(app: App, overall: Ctx, ctx: Ctx) -> Any:
        raise jorb.RateLimited(retry_after=200)

    async def look(app: App, overall: Ctx, ctx: Ctx) -> Any:
        await asyncio.sleep(10)
        seen.extend(s for s in app.processor.statistics().states if s.name == "call")
        return ctx, "done"

    app = App()
    api = jorb.Rate(10)
    states = [jorb.State("call", exec=call, rate=api), jorb.State("look", exec=look), DONE]
    app.processor = jorb.Processor(app, states, progress=False, poll_interval=60)
    run = make_run([{}], state="call")
    run.add_job({}, "look")

    async def ten_seconds_then_stop() -> None:
        task = asyncio.ensure_future(app.processor.aexec(run))
        await asyncio.sleep(20)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    jorb.testing.run(ten_seconds_then_stop())
    run.close()

    (row,) = seen
    assert row.paused_until is not None
    assert row.paused_until == pytest.approx(time.time() + 190, abs=30)
    assert run.path is not None
    out = CliRunner().invoke(cli, ["status", str(run.path)], env={"COLUMNS": "120"})
    until = datetime.datetime.fromtimestamp(row.paused_until).strftime("%Y-%m-%d %H:%M:%S")
    assert f"call: paused by the server until {until} (its Retry-After)" in out.stdout
    later = report.server_pauses(jorb.Run.load(run.path), now=row.paused_until + 1)
    assert later == {}  # once it is over, nothing is said


def test_plain_errors_never_slow_a_rate(make_run: MakeRun) -> None:
    # Decided: a 500 or a timeout may be a bug, not overload; an exec that knows a 503 means
    # "slow down" raises RateLimited. So a run of plain errors leaves the Rate alone.
    async def call(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        raise ConnectionResetError("503 from upstream")

    api = jorb.Rate(10)
    states = [jorb.State("call", exec=call, rate=api, retries=2, backoff=0), DONE]
    run = make_run([{"n": n} for n in range(20)], state="call")

    process_fake_clock(states, run)

    assert run.counts() == {"failed": 20}
    assert sum(len(job.errors["call"]) for job in run.jobs.values()) == 60
    assert api.current == 10


def test_max_pause_must_be_seconds() -> None:
    with pytest.raises(jorb.StateError, match="max_pause"):
        jorb.Rate(1, max_pause=-1)
    assert jorb.Rate(1, max_pause=5).limited(0.0, 100.0) == 5.0
