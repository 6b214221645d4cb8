"""Delayed jobs, retry backoff and priorities, on jorb.testing's virtual clock.

A delay is stored on the job as ``not_before`` (Unix time) and holds no slot; retry backoff uses
the same field. Within a state, higher ``priority`` starts first, FIFO among equals. Both are in
the run file, so they survive a restart and can be edited there.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import DONE, MakeRun, process_fake_clock

import jorb
import jorb.testing

Ctx = dict[str, Any]


def _started(job: jorb.Job, index: int = -1) -> float:
    """Unix time at which the exec behind ``job.history[index]`` started."""
    step = job.steps()[index]
    return float(step["time"] - step["duration"])


def _by_name(run: jorb.Run, name: str) -> jorb.Job:
    (job,) = [j for j in run.jobs.values() if j.ctx.get("name") == name]
    return job


def _file_jobs(path: Path) -> dict[str, dict[str, Any]]:
    """The jobs as the run file on disk holds them."""
    return {raw["id"]: raw for raw in json.loads(path.read_text())["jobs"]}


class App:
    """Gives execs the processor (for statistics) and a record of exec starts."""

    def __init__(self) -> None:
        self.processor: jorb.Processor | None = None
        self.starts: list[tuple[float, str]] = []

    def start(self, ctx: Ctx) -> float:
        now = asyncio.get_running_loop().time()
        self.starts.append((now, ctx["name"]))
        return now

    def row(self, state: str) -> jorb.StateStatus:
        assert self.processor is not None
        (row,) = [s for s in self.processor.statistics().states if s.name == state]
        return row

    def order(self) -> list[str]:
        return [name for _, name in self.starts]

    def exec(self, states: list[jorb.State], run: jorb.Run, **options: Any) -> jorb.Run:
        self.processor = jorb.Processor(self, states, progress=False, **options)
        return jorb.testing.run(self.processor.aexec(run))


# -- delays ------------------------------------------------------------------------------------


def test_a_kicked_delay_holds_no_slot(make_run: MakeRun) -> None:
    seen: list[jorb.StateStatus] = []
    due: list[float | None] = []

    async def parent(app: App, overall: Ctx, ctx: Ctx) -> Any:
        app.start(ctx)
        kicks = [
            jorb.Kick("work", {"name": "late"}, delay=10, priority=9),
            jorb.Kick("work", {"name": "now"}),
        ]
        return ctx, "done", kicks

    async def work(app: App, overall: Ctx, ctx: Ctx) -> Any:
        app.start(ctx)
        if ctx["name"] == "now":
            seen.append(app.row("work"))
            due.append(_by_name(run, "late").not_before)
        await asyncio.sleep(3)
        return ctx, "done"

    states = [jorb.State("new", exec=parent), jorb.State("work", exec=work, concurrency=1), DONE]
    run = make_run([{"name": "parent"}])
    run.add_job({"name": "busy"}, state="work")
    app = App()

    app.exec(states, run)

    assert run.counts() == {"done": 4}
    starts = {name: t for t, name in app.starts}
    # The one slot of "work" goes to "busy", then to "now", although "late" was kicked first
    # and with a higher priority: waiting out its delay, it holds nothing.
    assert starts["busy"] == pytest.approx(0.0)
    assert starts["now"] == pytest.approx(3.0)
    assert starts["late"] == pytest.approx(starts["parent"] + 10.0)
    (row,) = seen
    assert (row.running, row.delayed, row.waiting, row.jobs) == (1, 1, 0, 2)
    late = _by_name(run, "late")
    (not_before,) = due  # while it waited, its not-before time was on the job
    assert not_before == pytest.approx(_started(_by_name(run, "parent")) + 10.0, abs=0.01)
    assert _started(late) >= not_before


def test_add_job_delay_holds_the_job_and_is_in_the_run_file(make_run: MakeRun) -> None:
    async def work(app: App, overall: Ctx, ctx: Ctx) -> Any:
        app.start(ctx)
        await asyncio.sleep(1)
        return ctx, "done"

    states = [jorb.State("new", exec=work, concurrency=1), DONE]
    run = make_run()
    before = time.time()
    later = run.add_job({"name": "later"}, delay=20)
    first = run.add_job({"name": "first"})
    absolute = run.add_job({"name": "absolute"}, not_before=before + 40)
    run.save()

    assert later.not_before is not None and before + 20 <= later.not_before <= time.time() + 20
    assert run.path is not None
    on_disk = _file_jobs(run.path)
    assert on_disk[later.id]["not_before"] == later.not_before
    assert "not_before" not in on_disk[first.id]  # the file leaves defaults out
    assert on_disk[absolute.id]["not_before"] == before + 40

    due = {job.id: job.not_before for job in (later, absolute)}
    app = App()
    app.exec(states, run)

    assert app.order() == ["first", "later", "absolute"]
    starts = {name: t for t, name in app.starts}
    assert starts["first"] == pytest.approx(0.0)
    assert starts["later"] == pytest.approx(20.0, abs=0.5)
    assert starts["absolute"] == pytest.approx(40.0, abs=0.5)
    for job in (later, absolute):
        not_before = due[job.id]
        assert not_before is not None and _started(job) >= not_before
    assert all(job.not_before is None for job in run.jobs.values())  # cleared once done


def test_delays_are_checked_when_added(make_run: MakeRun) -> None:
    run = make_run()

    with pytest.raises(jorb.JorbError, match="delay"):
        run.add_job({}, delay=-1)
    with pytest.raises(jorb.JorbError, match="not both"):
        run.add_job({}, delay=1, not_before=time.time() + 5)
    assert run.jobs == {}


def test_a_delay_survives_a_restart(make_run: MakeRun, tmp_path: Path) -> None:
    calls: list[str] = []

    async def parent(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        calls.append("parent")
        return ctx, "done", [jorb.Kick("work", {"name": "child"}, delay=3600)]

    async def work(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        calls.append(ctx["name"])
        ctx["ran_at"] = asyncio.get_running_loop().time()
        return ctx, "done"

    states = [jorb.State("new", exec=parent), jorb.State("work", exec=work), DONE]
    run = make_run([{"name": "parent"}], name="delayed.json")
    path = run.path
    assert path is not None

    # Process A: the parent runs and kicks its child with an hour's delay; ten (virtual)
    # seconds later A is interrupted. aexec checkpoints and re-raises the cancellation.
    async def process_a() -> None:
        processor = jorb.Processor(None, states, progress=False)
        task = asyncio.ensure_future(processor.aexec(run))
        await asyncio.sleep(10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    jorb.testing.run(process_a())
    run.close()

    assert calls == ["parent"]  # the child did not start in A
    child_id = next(j.id for j in run.jobs.values() if j.parent is not None)
    on_disk = _file_jobs(path)[child_id]
    assert on_disk["state"] == "work"
    not_before = on_disk["not_before"]
    assert not_before == pytest.approx(time.time() + 3600, abs=60)

    # Process B: a fresh exec of the same file. The clock jumps, but not past not_before.
    # (An inbox look every 10 virtual minutes, not every 0.25 s: an hour costs no real time.)
    again = jorb.Run.open(path)
    try:
        process_fake_clock(states, again, poll_interval=600)
    finally:
        again.close()

    assert calls == ["parent", "child"]
    child = again.jobs[child_id]
    assert child.state == "done"
    assert _started(child) >= not_before
    assert child.ctx["ran_at"] == pytest.approx(not_before - time.time(), abs=60)


def test_a_saved_delay_survives_reopening(make_run: MakeRun) -> None:
    run = make_run(name="saved.json")
    job = run.add_job({"name": "x"}, delay=120)
    run.save()
    run.close()

    assert run.path is not None
    again = jorb.Run.open(run.path)
    try:
        assert again.jobs[job.id].not_before == job.not_before
        starts: list[float] = []

        async def work(app: Any, overall: Ctx, ctx: Ctx) -> Any:
            starts.append(asyncio.get_running_loop().time())
            return ctx, "done"

        process_fake_clock([jorb.State("new", exec=work), DONE], again)
    finally:
        again.close()

    assert starts == [pytest.approx(120.0, abs=1.0)]
    assert job.not_before is not None and _started(again.jobs[job.id]) >= job.not_before


def test_retry_backoff_is_a_not_before_that_grows_with_jitter(make_run: MakeRun) -> None:
    seen: list[tuple[float, float | None, float | None]] = []  # (loop time, not_before, on disk)
    delayed: list[int] = []

    class Watch:
        def start(self, status: jorb.Status) -> None: ...

        def update(self, status: jorb.Status) -> None:
            delayed.append(next(s.delayed for s in status.states if s.name == "call"))

        def note(self, message: str) -> None: ...

        def stop(self, status: jorb.Status) -> None: ...

    run = make_run([{}], state="call")
    path = run.path
    assert path is not None

    async def call(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        (job,) = run.jobs.values()
        on_disk = jorb.Run.load(path).jobs[job.id].not_before
        seen.append((asyncio.get_running_loop().time(), job.not_before, on_disk))
        if len(seen) <= 4:
            raise ConnectionError("try later")
        return ctx, "done"

    states = [jorb.State("call", exec=call, retries=4, backoff=2.0, backoff_max=100), DONE]

    process_fake_clock(states, run, listeners=[Watch()], status_interval=0.25)

    (job,) = run.jobs.values()
    assert job.state == "done"
    assert job.not_before is None  # cleared once it moved on
    errors = job.errors["call"]
    assert len(errors) == 4 and len(seen) == 5
    # Unix time = loop time + offset (the exec raised at once, when its error was stamped).
    offset = errors[0]["time"] - seen[0][0]
    for k in range(4):
        failed_at = errors[k]["time"]
        _, not_before, on_disk = seen[k + 1]
        assert not_before is not None
        assert on_disk == not_before  # the backoff is in the run's journal, not only in memory
        wait = not_before - failed_at
        base = 2.0 * 2**k  # 2, 4, 8, 16 s
        assert 0.5 * base - 1e-6 <= wait <= base + 1e-6, (k, wait)
        started = seen[k + 1][0] + offset
        assert started == pytest.approx(not_before, abs=1e-3)  # not before, and no later
    assert seen[0][1] is None
    assert max(delayed) == 1 and delayed.count(1) >= 10  # the status shows it waiting


# -- priorities --------------------------------------------------------------------------------


async def _record(app: App, overall: Ctx, ctx: Ctx) -> Any:
    app.start(ctx)
    await asyncio.sleep(1)
    return ctx, "done"


def test_add_job_priority_orders_starts_fifo_among_equals(make_run: MakeRun) -> None:
    run = make_run()
    for name, priority in [
        ("a0", 0),
        ("b5", 5),
        ("c0", 0),
        ("d5", 5),
        ("e1", 1),
        ("f-2", -2),
        ("g0", 0),
        ("h5", 5),
    ]:
        run.add_job({"name": name}, priority=priority)
    app = App()

    app.exec([jorb.State("new", exec=_record, concurrency=1), DONE], run)

    assert app.order() == ["b5", "d5", "h5", "e1", "a0", "c0", "g0", "f-2"]


def test_kick_priority_orders_the_children(make_run: MakeRun) -> None:
    async def parent(app: App, overall: Ctx, ctx: Ctx) -> Any:
        kicks = [
            jorb.Kick("work", {"name": name}, priority=priority)
            for name, priority in [("p1", 1), ("p3", 3), ("q1", 1), ("p0", 0), ("q3", 3)]
        ]
        return ctx, "done", kicks

    states = [
        jorb.State("new", exec=parent),
        jorb.State("work", exec=_record, concurrency=1),
        DONE,
    ]
    run = make_run([{"name": "parent"}])
    app = App()

    app.exec(states, run)

    assert app.order() == ["p3", "q3", "p1", "q1", "p0"]
    kids = {job.ctx["name"]: job.priority for job in run.jobs.values() if job.parent}
    assert kids == {"p1": 1, "p3": 3, "q1": 1, "p0": 0, "q3": 3}
    assert run.path is not None
    on_disk = _file_jobs(run.path)
    assert {raw["ctx"]["name"]: raw.get("priority", 0) for raw in on_disk.values()} == {
        "parent": 0,
        **kids,
    }


def test_a_priority_edited_in_the_run_file_is_honoured(make_run: MakeRun) -> None:
    run = make_run([{"name": f"j{i}"} for i in range(1, 6)], name="edit.json")
    run.save()
    run.close()
    path = run.path
    assert path is not None

    # The user edits the file by hand: job 4 first, then job 2.
    text = path.read_text()
    doc = json.loads(text)
    assert not any("priority" in raw for raw in doc["jobs"])  # 0, the default: left out
    for raw in doc["jobs"]:
        raw["priority"] = {"j4": 10, "j2": 3}.get(raw["ctx"]["name"], 0)
    path.write_text(json.dumps(doc, indent=2))

    again = jorb.Run.open(path)
    try:
        app = App()
        app.exec([jorb.State("new", exec=_record, concurrency=1), DONE], again)
    finally:
        again.close()

    assert app.order() == ["j4", "j2", "j1", "j3", "j5"]
    assert {raw["ctx"]["name"]: raw.get("priority", 0) for raw in _file_jobs(path).values()} == {
        "j1": 0,
        "j2": 3,
        "j3": 0,
        "j4": 10,
        "j5": 0,
    }


def test_a_delayed_job_once_due_goes_ahead_of_lower_priorities(make_run: MakeRun) -> None:
    run = make_run([{"name": f"low{i}"} for i in range(8)])
    run.add_job({"name": "urgent"}, delay=4.5, priority=9)
    app = App()

    app.exec([jorb.State("new", exec=_record, concurrency=1), DONE], run)

    order = app.order()
    # Due at 4.5 s, while low4 runs (4..5 s): it takes the slot next, before low5.
    assert order == ["low0", "low1", "low2", "low3", "low4", "urgent", "low5", "low6", "low7"]
    starts = {name: t for t, name in app.starts}
    assert starts["urgent"] == pytest.approx(5.0, abs=0.1)


def test_a_high_priority_retry_goes_ahead_of_waiting_jobs(make_run: MakeRun) -> None:
    attempts: list[str] = []

    async def once_flaky(app: App, overall: Ctx, ctx: Ctx) -> Any:
        attempts.append(ctx["name"])
        if ctx["name"] == "vip" and attempts.count("vip") == 1:
            raise ConnectionError("blip")
        await asyncio.sleep(1)
        return ctx, "done"

    run = make_run([{"name": f"n{i}"} for i in range(3)])
    run.add_job({"name": "vip"}, priority=1)
    app = App()

    app.exec([jorb.State("new", exec=once_flaky, retries=1, backoff=0), DONE], run)

    assert attempts == ["vip", "vip", "n0", "n1", "n2"]


def test_priorities_sort_within_each_state_not_across(make_run: MakeRun) -> None:
    run = make_run([{"name": "a-low"}], state="a")
    run.add_job({"name": "b-high"}, state="b", priority=100)
    run.add_job({"name": "a-high"}, state="a", priority=5)
    app = App()
    states = [
        jorb.State("a", exec=_record, concurrency=1),
        jorb.State("b", exec=_record, concurrency=1),
        DONE,
    ]

    app.exec(states, run)

    starts = {name: t for t, name in app.starts}
    # Each state has its own slot: b's priority 100 does not hold back state a.
    assert starts["a-high"] == starts["b-high"] == pytest.approx(0.0)
    assert starts["a-low"] == pytest.approx(1.0)


def test_a_higher_priority_job_overtakes_jobs_waiting_for_the_rate(make_run: MakeRun) -> None:
    # Four workers wait for one token per second. (Once a bug: each took its low-priority job
    # before waiting, so a high-priority job ready meanwhile started behind all of them.)
    run = make_run([{"name": f"low{i}"} for i in range(6)])
    run.add_job({"name": "vip"}, delay=0.5, priority=9)
    app = App()
    states = [jorb.State("new", exec=_record, concurrency=4, rate=jorb.Rate(1, per=1.0)), DONE]

    app.exec(states, run)

    # One start per second: low0 at 0; vip is due at 0.5 and must take the next token, at 1.
    starts = {name: t for t, name in app.starts}
    assert app.order()[:2] == ["low0", "vip"], app.starts
    assert starts["vip"] == pytest.approx(1.0)
