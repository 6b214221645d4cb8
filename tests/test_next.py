"""``jorb.Next``: come back later (a delay that holds no slot), and polls that keep history short.

On jorb.testing's virtual clock an hour of polling costs no real time; a kill -9 during a
delay is tested with a real subprocess (tests/scripts_steer/jobqueue.py).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import DONE, MakeRun, errors_of, process_fake_clock
from scripts_steer.harness import STUCK, Script
from typer.testing import CliRunner

import jorb
from jorb import control
from jorb.cli import app as cli_app

Ctx = dict[str, Any]


def _steps(job: jorb.Job) -> list[tuple[str, str]]:
    return [(step["from"], step["to"]) for step in job.steps()]


def test_an_hour_of_polling_holds_no_slot_and_keeps_history_and_file_small(
    make_run: MakeRun,
) -> None:
    # 20 jobs poll "CI" every 30 s for an hour, each poll taking 1 s, through ONE slot: that
    # fits only because a job waiting out its delay holds no slot (20 × 31 s would not).
    polls: dict[int, list[float]] = {}

    async def wait_ci(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        loop = asyncio.get_running_loop()
        polls.setdefault(ctx["n"], []).append(loop.time())
        await asyncio.sleep(1)  # the call to CI
        if loop.time() >= 3600:
            ctx["ci"] = "success"
            return ctx, "done"
        return ctx, jorb.Next("wait_ci", delay=30)

    states = [jorb.State("wait_ci", exec=wait_ci, concurrency=1), DONE]
    run = make_run([{"n": n} for n in range(20)], state="wait_ci")

    # (durable=False: on the virtual clock each poll is a group commit of its own, and its
    # fsync would be most of the real time spent; bench/next_poll.py measures both.)
    process_fake_clock(states, run, poll_interval=60, durable=False)

    assert run.counts() == {"done": 20}, errors_of(run)
    total = sum(len(times) for times in polls.values())
    assert total > 2_000
    for times in polls.values():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= 31  # 1 s of call, then 30 s of delay
        assert max(gaps) < 31 + 20  # ... and then its turn in the one slot, soon
    for job in run.jobs.values():
        assert _steps(job) == [("wait_ci", "done")]  # one entry, not one per poll
        assert job.polls == len(polls[job.ctx["n"]]) - 1  # the last answer was not a poll
        assert job.not_before is None
    assert run.path is not None
    assert run.path.stat().st_size < 20 * 400  # bounded: no history entry per poll
    on_disk = json.loads(run.path.read_text())["jobs"][0]
    assert on_disk["polls"] == run.jobs["1"].polls


def test_next_moves_on_with_a_delay_and_a_priority(make_run: MakeRun) -> None:
    starts: list[tuple[float, str]] = []

    async def first(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        if ctx["name"] == "urgent":
            return ctx, jorb.Next("second", delay=10, priority=5)
        return ctx, jorb.Next("second", delay=10)

    async def second(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        starts.append((asyncio.get_running_loop().time(), ctx["name"]))
        await asyncio.sleep(1)
        return ctx, "done"

    states = [
        jorb.State("first", exec=first, concurrency=2),
        jorb.State("second", exec=second),
        DONE,
    ]
    run = make_run([{"name": "plain"}, {"name": "urgent"}], state="first")

    process_fake_clock(states, run, poll_interval=60)

    assert run.counts() == {"done": 2}, errors_of(run)
    # Both due at 10 s; the priority Next gave decides who goes first through the one slot.
    assert [name for _, name in starts] == ["urgent", "plain"]
    assert starts[0][0] == pytest.approx(10.0, abs=0.01)
    urgent = next(j for j in run.jobs.values() if j.ctx["name"] == "urgent")
    assert urgent.priority == 5
    assert _steps(urgent) == [("first", "second"), ("second", "done")]  # moves stay in history
    assert urgent.polls == 0


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (jorb.Next("nowhere"), "jorb.Next to undeclared state 'nowhere'"),
        (jorb.Next("done", delay=-1), "delay must be seconds >= 0"),
        (jorb.Next("done", priority="high"), "priority must be an int"),  # type: ignore[arg-type]
    ],
)
def test_a_wrong_next_is_an_exec_result_error(
    make_run: MakeRun, answer: jorb.Next, message: str
) -> None:
    async def work(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        return ctx, answer

    run = make_run([{}], state="work")
    process_fake_clock([jorb.State("work", exec=work), DONE], run, stop_on_bug=False)

    (job,) = run.jobs.values()
    assert job.state == "failed"
    (error,) = job.errors["work"]
    assert error["type"] == "jorb.errors.ExecResultError"
    assert message in error["message"]


def test_a_poll_waiting_out_its_delay_survives_kill_9(tmp_path: Path) -> None:
    path, effects, gates = tmp_path / "run.json", tmp_path / "effects.log", tmp_path / "gates"
    gates.mkdir()
    first = Script(tmp_path, "jobqueue.py", path, effects, gates, "--jobs", 1, "--state", "poll")
    try:
        first.saw("delayed 1")  # polled once; its Next is on disk, due in an hour
        before_kill = time.time()
        first.kill()

        run = jorb.Run.load(path)
        (job,) = run.jobs.values()
        assert (job.state, job.polls, job.history) == ("poll", 1, [])
        assert job.not_before is not None
        assert before_kill + 3500 < job.not_before < time.time() + 3600

        again = Script(tmp_path, "jobqueue.py", path, effects, gates, "--jobs", 1)
        again.saw("delayed 1")  # still waiting, not polled again on restart
        (gates / "poll-0").touch()
        # Let it out early: a redrive back to its state clears the not-before time.
        control.redrive(path, "poll", "poll", timeout=STUCK)
        lines = again.finish()
        assert lines[-1] == "finished [('done', 1)]"
        assert effects.read_text().splitlines().count("poll 0") == 2
    finally:
        first.stop()


def test_jorb_show_gives_the_polls_and_the_key(make_run: MakeRun) -> None:
    async def work(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        ctx["n"] = ctx.get("n", 0) + 1
        return ctx, "done" if ctx["n"] == 3 else jorb.Next("work", delay=5)

    run = make_run()
    run.add_job({}, "work", key="repo:acme/x")
    process_fake_clock([jorb.State("work", exec=work), DONE], run, poll_interval=60)
    assert run.path is not None

    out = CliRunner().invoke(cli_app, ["show", str(run.path), "1"], env={"COLUMNS": "120"})

    lines = [line.split(None, 1) for line in out.stdout.splitlines() if line.strip()]
    facts = {words[0]: words[1].strip() for words in lines[:5] if len(words) == 2}
    assert facts["key"] == "repo:acme/x"
    assert facts["polls"].startswith("2 ")
