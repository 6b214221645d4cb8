"""``jorb cancel`` and ``processor.cancel``: jobs moved to a terminal state, running execs stopped.

Live tests run tests/scripts_steer/jobqueue.py in a subprocess (its execs log to an effects file
and wait on gate files the test creates) and kill it for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DONE, MakeRun, errors_of
from scripts_steer.harness import STUCK, Script
from typer.testing import CliRunner

import jorb
import jorb.testing
from jorb import control
from jorb.cli import app as cli_app

Ctx = dict[str, Any]


class Queue:
    """One jobqueue.py run over ``tmp/run.json``: its effects, its gates, and its scripts."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.path = tmp / "run.json"
        self.effects = tmp / "effects.log"
        self.gates = tmp / "gates"
        self.gates.mkdir()
        self.scripts: list[Script] = []

    def start(self, *options: Any) -> Script:
        script = Script(self.tmp, "jobqueue.py", self.path, self.effects, self.gates, *options)
        self.scripts.append(script)
        return script

    def open_gate(self, name: str | int) -> None:
        (self.gates / str(name)).touch()

    def log(self) -> list[str]:
        return self.effects.read_text().splitlines()


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    q = Queue(tmp_path)
    yield q
    for script in q.scripts:
        script.stop()


def _steps(job: jorb.Job) -> list[tuple[str, str]]:
    return [(step["from"], step["to"]) for step in job.steps()]


# -- live, through the running process ------------------------------------------------------------


def test_cancel_a_running_async_exec_then_kill_9(queue: Queue) -> None:
    script = queue.start("--jobs", 2)
    script.until(lambda lines: "start 0" in lines and "start 1" in lines)

    result = control.cancel(queue.path, job_ids=["1"], timeout=STUCK)

    assert result == {"cancelled": 1, "running": ["1"], "skipped": []}
    note = "note applied: cancelled 1 job(s) -> 'cancelled' (1 running) (by "
    script.until(lambda lines: any(line.startswith(note) for line in lines))
    script.kill()  # job 2 is still running; the cancel of job 1 was on disk when it returned

    run = jorb.Run.load(queue.path)
    assert {job.id: job.state for job in run.jobs.values()} == {"1": "cancelled", "2": "new"}
    (change,) = run.changes
    assert run.jobs["1"].steps()[0]["redrive"] == change["id"]  # recorded like a redrive
    assert _steps(run.jobs["1"]) == [("new", "cancelled")]

    again = queue.start("--jobs", 2)  # the same enqueue: the keys add nothing
    queue.open_gate("all")
    lines = again.finish()
    assert "jobs 2" in lines
    log = queue.log()
    assert log.count("start 0") == 1  # cancelled mid-exec: never ran again, never ended
    assert "end 0" not in log
    assert log.count("start 1") == 2  # mid-exec at the kill: it ran again
    final = jorb.Run.load(queue.path)
    assert final.counts() == {"cancelled": 1, "done": 1}


def test_cancel_a_running_def_exec_abandons_its_thread(queue: Queue) -> None:
    script = queue.start("--jobs", 2, "--state", "sync", "--concurrency", 1)
    script.saw("sync start 0")

    result = control.cancel(queue.path, state="sync", timeout=STUCK)

    # Job 1 runs in a thread (abandoned: it cannot be killed), job 2 waits: both cancelled.
    assert result == {"cancelled": 2, "running": ["1"], "skipped": []}
    queue.open_gate(0)  # the abandoned thread now ends; what it returns is not used
    script.finish()
    # (The effects file, not stdout: the abandoned thread prints as the script ends, and two
    # threads' prints can interleave; a line in the file is one write.)
    log = queue.log()
    assert "finished [('cancelled', 2)]" in log
    assert "sync start 1" not in log  # job 2 never started
    run = jorb.Run.load(queue.path)
    assert [(_steps(job), job.ctx) for job in run.jobs.values()] == [
        ([("sync", "cancelled")], {"n": 0}),
        ([("sync", "cancelled")], {"n": 1}),
    ]


def test_cancel_a_job_waiting_out_a_delay_then_kill_9(queue: Queue) -> None:
    script = queue.start("--jobs", 2, "--state", "poll")
    script.until(lambda lines: "delayed 2" in lines)  # each polled once, back in an hour

    assert control.cancel(queue.path, job_ids=["1"], timeout=STUCK) == {
        "cancelled": 1,
        "running": [],
        "skipped": [],
    }
    script.until(lambda lines: "delayed 1" in lines)  # out of the delayed jobs
    script.kill()

    run = jorb.Run.load(queue.path)
    assert [job.state for job in run.jobs.values()] == ["cancelled", "poll"]
    assert run.jobs["1"].not_before is None  # a cancelled job waits for nothing
    again = queue.start("--jobs", 2)
    again.saw("delayed 1")  # only job 2 waits
    queue.open_gate("poll-1")
    control.redrive(queue.path, "poll", "poll", timeout=STUCK)  # job 2: poll now, and finish
    lines = again.finish()
    assert lines[-1] == "finished [('cancelled', 1), ('done', 1)]"
    assert queue.log().count("poll 0") == 1  # job 1 never polled again

    out = CliRunner().invoke(cli_app, ["show", str(queue.path), "1"], env={"COLUMNS": "120"})
    history = out.stdout.split("\nhistory\n", 1)[1].splitlines()[1:]
    (moved,) = [line.split() for line in history if line.strip()]
    assert moved[-3:] == ["poll", "cancelled", "cancel"]  # from, to, and what moved it


# -- in a process, from Python ------------------------------------------------------------------


def test_processor_cancel_stops_an_async_exec_and_its_worker_goes_on(make_run: MakeRun) -> None:
    seen: list[str] = []

    async def work(app: jorb.Processor, overall: Ctx, ctx: Ctx) -> Any:
        seen.append(f"start {ctx['n']}")
        try:
            await asyncio.sleep(3600 if ctx["n"] == 0 else 1)
        except asyncio.CancelledError:
            seen.append(f"cancelled {ctx['n']}")
            raise
        return ctx, "done"

    async def conductor(app: jorb.Processor, overall: Ctx, ctx: Ctx) -> Any:
        await asyncio.sleep(10)
        app.cancel(["1"])
        return ctx, "done"

    states = [
        jorb.State("work", exec=work, concurrency=1),
        jorb.State("conduct", exec=conductor),
        DONE,
    ]
    run = make_run([{"n": 0}, {"n": 1}, {"n": 2}], state="work")
    run.add_job({}, "conduct")
    processor = jorb.Processor(None, states, progress=False)
    processor.app = processor

    jorb.testing.run(asyncio.wait_for(processor.aexec(run), 3600))

    assert seen == ["start 0", "cancelled 0", "start 1", "start 2"], seen
    assert {job.id: job.state for job in run.jobs.values()} == {
        "1": "cancelled",
        "2": "done",
        "3": "done",
        "4": "done",
    }, errors_of(run)
    assert run.jobs["1"].errors == {}  # a cancel is not an error


def test_an_exec_that_swallows_the_cancel_still_has_its_result_dropped(
    make_run: MakeRun,
) -> None:
    async def stubborn(app: jorb.Processor, overall: Ctx, ctx: Ctx) -> Any:
        with contextlib.suppress(asyncio.CancelledError):  # a bad habit: the result below
            await asyncio.sleep(3600)  # must still never be used
        return {"late": True}, "done"

    async def conductor(app: jorb.Processor, overall: Ctx, ctx: Ctx) -> Any:
        await asyncio.sleep(1)
        app.cancel(state="slow")
        return ctx, "done"

    states = [jorb.State("slow", exec=stubborn), jorb.State("conduct", exec=conductor), DONE]
    run = make_run([{"n": 0}], state="slow")
    run.add_job({}, "conduct")
    processor = jorb.Processor(None, states, progress=False)
    processor.app = processor
    jorb.testing.run(asyncio.wait_for(processor.aexec(run), 3600))

    assert run.jobs["1"].state == "cancelled"
    assert run.jobs["1"].ctx == {"n": 0}


# -- offline, and what refuses --------------------------------------------------------------


def test_jorb_cancel_offline_moves_waiting_jobs_and_status_shows_them(make_run: MakeRun) -> None:
    states = [jorb.State("work", exec=lambda a, o, c: (c, "done")), DONE]
    run = make_run([{"n": n} for n in range(3)], state="work")
    run.add_job({"n": 9}, "done")
    run.declared = [
        {"name": s, "terminal": t}
        for s, t in [("work", False), ("done", True), ("failed", True), ("cancelled", True)]
    ]
    run.save()
    run.close()
    assert run.path is not None
    del states

    runner = CliRunner()
    out = runner.invoke(cli_app, ["cancel", str(run.path), "--state", "work"])
    assert out.exit_code == 0, out.output
    assert out.stdout.strip() == "cancelled 3 job(s) (now in 'cancelled')"
    again = runner.invoke(cli_app, ["cancel", str(run.path), "--job", "4"])
    assert again.stdout.strip().endswith("1 left: already finished (4)")  # (offline: none settles)

    status = runner.invoke(cli_app, ["status", str(run.path)], env={"COLUMNS": "120"})
    assert "cancelled 3 job(s) -> 'cancelled'" in status.stdout
    row = next(line for line in status.stdout.splitlines() if line.startswith("cancelled"))
    assert row.split()[:3] == ["cancelled", "3", "terminal"]


def test_cancel_refuses_a_state_that_is_not_terminal(make_run: MakeRun) -> None:
    run = make_run([{}], state="work")
    run.declared = [{"name": "work", "terminal": False}, {"name": "cancelled", "terminal": True}]
    run.save()
    run.close()
    assert run.path is not None

    with pytest.raises(jorb.JorbError, match="not terminal"):
        control.cancel(run.path, job_ids=["1"], to="work")
    with pytest.raises(jorb.JorbError, match="job ids or a state"):
        control.cancel(run.path)
    assert jorb.Run.load(run.path).jobs["1"].state == "work"


def test_an_abandoned_def_exec_keeps_its_slot_after_a_cancel(make_run: MakeRun) -> None:
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def body(app: jorb.Processor, overall: Ctx, ctx: Ctx) -> Any:
        order.append(f"start {ctx['n']}")
        if ctx["n"] == 0:
            started.set()
            release.wait(STUCK)
            order.append("end 0")
        return ctx, "done"

    async def conductor(app: jorb.Processor, overall: Ctx, ctx: Ctx) -> Any:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, started.wait, STUCK)
        app.cancel(["1"])
        for _ in range(100):  # until the cancel is applied, and then some
            await asyncio.sleep(0)
        assert run.jobs["1"].state == "cancelled"
        order.append("released")  # only now may job 2 start: job 1's thread held the slot
        release.set()
        return ctx, "done"

    states = [jorb.State("work", exec=body), jorb.State("conduct", exec=conductor), DONE]
    run = make_run([{"n": 0}, {"n": 1}], state="work")
    run.add_job({}, "conduct")
    processor = jorb.Processor(None, states, progress=False)
    processor.app = processor

    asyncio.run(asyncio.wait_for(processor.aexec(run), STUCK))

    assert order == ["start 0", "released", "end 0", "start 1"]
    assert [run.jobs[i].state for i in ("1", "2", "3")] == ["cancelled", "done", "done"]


def test_cancel_ends_the_worker_process_of_a_pooled_exec(make_run: MakeRun) -> None:
    fork = multiprocessing.get_context("fork")
    spinning, started = fork.Value("i", 0), fork.Event()

    def work(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        if ctx["i"] == 0:
            spinning.value = os.getpid()
            started.set()
            while True:  # pure Python that never returns: no thread could be stopped here
                pass
        try:
            os.kill(spinning.value, 0)
            ctx["previous"] = "alive"
        except ProcessLookupError:
            ctx["previous"] = "gone"
        return ctx, "done"

    async def conductor(app: jorb.Processor, overall: Ctx, ctx: Ctx) -> Any:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, started.wait, STUCK)
        app.cancel(["1"])
        return ctx, "done"

    pool = jorb.ProcessPool(1)
    states = [
        jorb.State("new", exec=work, pool=pool),
        jorb.State("conduct", exec=conductor),
        DONE,
    ]
    run = make_run([{"i": 0}, {"i": 1}])
    run.add_job({}, "conduct")
    processor = jorb.Processor(None, states, progress=False)
    processor.app = processor
    asyncio.run(asyncio.wait_for(processor.aexec(run), STUCK))

    assert [run.jobs[i].state for i in ("1", "2")] == ["cancelled", "done"], errors_of(run)
    assert run.jobs["1"].errors == {}
    assert run.jobs["2"].ctx["previous"] == "gone"  # the spinning worker process was ended


def _conduct(run: jorb.Run, work: Any, conductor: Any) -> None:
    """Execute ``run`` (its jobs in 'work', two at a time) with one more job, in 'conduct',
    whose exec steers it (the processor is its app), on the virtual clock."""
    run.add_job({}, "conduct")
    states = [
        jorb.State("work", exec=work, concurrency=2),
        jorb.State("conduct", exec=conductor),
        DONE,
    ]
    processor = jorb.Processor(None, states, progress=False)
    processor.app = processor
    jorb.testing.run(asyncio.wait_for(processor.aexec(run), 3600))


def test_a_cancelled_exec_still_ending_keeps_its_job_from_a_redrive(make_run: MakeRun) -> None:
    # Job 1's exec is cancelled and takes a while to end (its cleanup awaits, then it lets
    # the cancel out). Its cancel is on disk long before that. Until the exec ends, the job
    # is still running: a redrive back to 'work' must leave it, not start a second attempt
    # alongside the first (the run then died with a KeyError). Once the exec has ended, a
    # redrive moves it and it runs again.
    answers: list[dict[str, Any]] = []
    log: list[str] = []
    inside: list[int] = []

    def redrive(app: jorb.Processor) -> Any:
        request = control.new_request("redrive", {"from": "cancelled", "to": "work", "jobs": None})
        return app._steering.change(request)  # (what the inbox's watcher does)

    async def work(app: jorb.Processor, overall: Ctx, ctx: Ctx) -> Any:
        inside.append(1)
        log.append(f"start, {len(inside)} inside")
        try:
            await asyncio.sleep(3600 if len(log) == 1 else 1)
        except asyncio.CancelledError:
            await asyncio.sleep(30)  # (virtual) its cleanup
            log.append("cancelled and cleaned up")
            raise
        finally:
            inside.pop()
        return ctx, "done"

    async def conductor(app: jorb.Processor, overall: Ctx, ctx: Ctx) -> Any:
        await asyncio.sleep(1)
        app.cancel(["1"])
        await asyncio.sleep(5)  # the cancel is on disk, the exec still cleans up
        assert jorb.Run.load(run.path).jobs["1"].state == "cancelled"  # type: ignore[arg-type]
        answers.append(await redrive(app))
        await asyncio.sleep(60)  # it has ended now
        answers.append(await redrive(app))
        return ctx, "done"

    run = make_run([{"n": 0}], state="work")

    _conduct(run, work, conductor)

    assert answers == [
        {"result": {"moved": 0, "skipped": ["1"]}},  # (running, not settling: no "settling")
        {"result": {"moved": 1, "skipped": []}},
    ]
    assert log == ["start, 1 inside", "cancelled and cleaned up", "start, 1 inside"]
    assert _steps(run.jobs["1"]) == [("work", "cancelled"), ("cancelled", "work"), ("work", "done")]
    assert run.counts() == {"done": 2}, errors_of(run)


def test_a_job_whose_cancel_is_not_on_disk_yet_is_not_redriven(make_run: MakeRun) -> None:
    # Job 1's exec is cancelled; it ends at once, in the next turn, before the cancel's record
    # is on disk. Until the record is, the job is busy (its last move is being written): a
    # redrive asked in between must leave it. (It moved it, and each change, once on disk,
    # queued the job in 'work': it ran twice at once.) Asked again later, it moves it once.
    answers: list[dict[str, Any]] = []
    inside: list[int] = []
    most: list[int] = [0]
    starts: list[str] = []

    def change(app: jorb.Processor, op: str, args: dict[str, Any]) -> Any:
        return app._steering.change(control.new_request(op, args))  # (as the inbox's watcher)

    async def work(app: jorb.Processor, overall: Ctx, ctx: Ctx) -> Any:
        inside.append(1)
        most[0] = max(most[0], len(inside))
        starts.append("first" if not starts else "again")
        try:
            await asyncio.sleep(3600 if len(starts) == 1 else 1)
        finally:
            inside.pop()
        return ctx, "done"

    async def conductor(app: jorb.Processor, overall: Ctx, ctx: Ctx) -> Any:
        await asyncio.sleep(1)
        cancel = asyncio.ensure_future(change(app, "cancel", {"jobs": ["1"], "state": None}))
        await asyncio.sleep(0)  # the cancel is applied, its record on its way to disk
        await asyncio.sleep(0)  # the exec has ended; the record is not on disk yet
        redrive = {"from": "cancelled", "to": "work", "jobs": ["1"]}
        answers.append(await change(app, "redrive", redrive))
        answers.append(await cancel)
        await asyncio.sleep(10)
        answers.append(await change(app, "redrive", redrive))
        return ctx, "done"

    run = make_run([{"n": 0}], state="work")

    _conduct(run, work, conductor)

    # (busy, not running: settling, as `jorb redrive` then says)
    assert answers[0] == {"result": {"moved": 0, "skipped": ["1"], "settling": ["1"]}}
    assert answers[1] == {"result": {"cancelled": 1, "running": ["1"], "skipped": []}}
    assert answers[2] == {"result": {"moved": 1, "skipped": []}}
    assert (starts, most[0]) == (["first", "again"], 1)
    assert _steps(run.jobs["1"]) == [("work", "cancelled"), ("cancelled", "work"), ("work", "done")]
    assert run.counts() == {"done": 2}, errors_of(run)
