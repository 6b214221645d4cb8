"""Edge cases a review found in the engine, each once a real bug: a run stuck forever, a job
run twice, a change lost, a process that would not exit."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import DONE, MakeRun, errors_of, process, process_fake_clock

import jorb
from jorb import control

Ctx = dict[str, Any]


def test_an_exec_that_lets_a_cancelled_error_out_fails_its_job_and_the_run_goes_on(
    make_run: MakeRun,
) -> None:
    async def call(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        if ctx["n"] == 0:
            gone = asyncio.get_running_loop().create_future()
            gone.cancel()
            await gone  # a client library's cancelled future: CancelledError escapes the exec
        return ctx, "done"

    run = process([jorb.State("new", exec=call), DONE], make_run([{"n": 0}, {"n": 1}]))

    assert run.counts() == {"failed": 1, "done": 1}
    assert "CancelledError" in errors_of(run)["1"][0]


def test_a_join_waits_for_open_children_when_a_sibling_is_born_terminal(
    make_run: MakeRun,
) -> None:
    seen: list[list[tuple[str, str]]] = []

    async def split(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        kicks = [jorb.Kick("work", {}), jorb.Kick("done", {}), jorb.Kick("work", {})]
        return ctx, "gather", kicks

    async def work(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        await asyncio.sleep(0.01)
        return ctx, "done"

    def gather(app: Any, overall: Ctx, ctx: Ctx, children: list[jorb.Child]) -> Any:
        seen.append([(c.id, c.state) for c in children])
        return ctx, "done"

    states = [
        jorb.State("new", exec=split),
        jorb.State("work", exec=work),
        jorb.State("gather", exec=gather, join=True),
        DONE,
    ]
    process(states, make_run([{}]))

    assert seen == [[("2", "done"), ("3", "done"), ("4", "done")]]


@pytest.mark.parametrize("kick", [{"priority": 1.5}, {"priority": "high"}, {"delay": "5"}])
def test_a_kick_with_a_bad_priority_or_delay_is_the_jobs_error_and_the_run_reloads(
    make_run: MakeRun, kick: dict[str, Any]
) -> None:
    async def split(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        return ctx, "done", [jorb.Kick("done", {}, **kick)]

    run = process([jorb.State("new", exec=split), DONE], make_run([{}]), stop_on_bug=False)

    assert run.counts() == {"failed": 1}
    field = next(iter(kick))
    assert f"a kick's {field} must be" in errors_of(run)["1"][0]
    assert jorb.Run.load(run.path).counts() == {"failed": 1}  # type: ignore[arg-type]


def test_redriving_a_job_listed_twice_moves_it_once(make_run: MakeRun) -> None:
    run = make_run([{}, {}], state="failed")
    run.declared = [{"name": "failed", "terminal": True}, {"name": "new", "terminal": False}]
    req = control.new_request("redrive", {"from": "failed", "to": "new", "jobs": ["1", "1"]})
    assert control.plan(run, req)["jobs"] == ["1"]
    for bad in ("12", [1], {"1": True}):
        req = control.new_request("redrive", {"from": "failed", "to": "new", "jobs": bad})
        with pytest.raises(jorb.JorbError, match="list of strings"):
            control.plan(run, req)


def test_a_malformed_inbox_request_is_answered_and_the_run_still_executes(
    make_run: MakeRun,
) -> None:
    run = make_run([{}])
    run.save()
    assert run.path is not None
    inbox = control.inbox_path(run.path)
    inbox.mkdir()
    (inbox / "0-bad.json").write_bytes(orjson.dumps({"op": "pause", "args": {}}))  # no id

    process([jorb.State("new", exec=lambda app, overall, ctx: (ctx, "done")), DONE], run)

    assert run.counts() == {"done": 1}
    answer = orjson.loads((inbox / "0-bad.reply").read_bytes())
    assert "malformed request" in answer["error"]


def test_steering_from_python_outside_an_exec_waits_for_the_next_one(make_run: MakeRun) -> None:
    states = [jorb.State("new", exec=lambda app, overall, ctx: (ctx, "done")), DONE]
    processor = jorb.Processor(None, states, progress=False)
    run = make_run([{}], state="nowhere")
    with pytest.raises(jorb.StateError):
        processor.exec(run)  # refused before any work
    processor.pause("new")  # queued, not lost on the failed exec's closed loop
    with pytest.raises(jorb.JorbError, match="not JSON"):
        processor.add_jobs([{"tags": {"a", "b"}}])  # refused at once, to the caller
    fresh = make_run([{}], name="second.json")
    processor.resume("new")
    processor.exec(fresh)
    assert fresh.paused == set()  # pause then resume, applied in order at exec start
    assert [c["what"] for c in fresh.changes] == ["paused 'new'", "resumed 'new'"]


def test_a_def_exec_stuck_past_its_timeout_does_not_keep_the_process_alive(
    tmp_path: Path,
) -> None:
    script = textwrap.dedent(
        """
        import sys, threading, jorb
        def stuck(app, overall, ctx):
            threading.Event().wait(60)  # never returns in time
            return ctx, "done"
        run = jorb.Run.open(sys.argv[1]); run.add_job({})
        jorb.Processor(None, [jorb.State("new", exec=stuck, timeout=0.2),
                              jorb.State("done", terminal=True)], progress=False).exec(run)
        print(run.counts(), flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=30,  # the bug: the interpreter waited 60 s for the abandoned thread at exit
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{'failed': 1}"


def test_the_resume_hint_is_the_command_as_the_script_left_its_argv(tmp_path: Path) -> None:
    # A script that consumed a one-off flag (examples/migrate.py's --fresh) by removing it from
    # sys.argv must not be told, after Ctrl-C, to run it again with that flag.
    script = tmp_path / "script.py"
    script.write_text(
        "import sys\n"
        "sys.argv.remove('--fresh')\n"
        "from jorb.stops import command_line\n"
        "print(command_line())\n"
    )
    done = subprocess.run(
        [sys.executable, "-X", "dev", str(script), "--fresh", "--repos", "5"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.stdout.split() == [sys.executable, "-X", "dev", str(script), "--repos", "5"]


def test_a_rate_limited_with_a_header_string_is_taken_as_seconds(make_run: MakeRun) -> None:
    # Passing the Retry-After header as it came (a str) is natural; it once crashed settling
    # and stopped the whole exec. It is taken as seconds: the job is retried and ends done.
    calls: list[tuple[int, float]] = []

    async def call(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        calls.append((ctx["n"], asyncio.get_running_loop().time()))
        if calls == [(0, 0.0)]:
            raise jorb.RateLimited(retry_after="2")
        return ctx, "done"

    states = [jorb.State("call", exec=call, concurrency=2, rate=jorb.Rate(10)), DONE]
    run = make_run([{"n": i} for i in range(3)], state="call")

    process_fake_clock(states, run)

    assert run.counts() == {"done": 3}, errors_of(run)
    (limited,) = [job for job in run.jobs.values() if job.ctx["n"] == 0]
    assert limited.errors["call"][0]["rate_limited"]
    assert [n for n, _ in calls] == [0, 1, 2, 0]
    assert calls[-1][1] >= 2.0  # the 2 s the service asked for, as a number


def test_an_exception_whose_str_fails_is_recorded_not_fatal(make_run: MakeRun) -> None:
    # An exec raises an exception whose __str__ itself raises (a library's buggy error type).
    # The failure is recorded (with a stand-in message) and the job routed, not the exec
    # stopped by that secondary error.
    class Weird(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no message for you")

    async def work(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        if ctx["n"] == 0:
            raise Weird()
        return ctx, "done"

    states = [jorb.State("new", exec=work), DONE, jorb.State("failed", terminal=True)]
    run = make_run([{"n": i} for i in range(3)])

    process_fake_clock(states, run)

    assert run.counts() == {"done": 2, "failed": 1}, errors_of(run)
    (failed,) = [job for job in run.jobs.values() if job.state == "failed"]
    assert failed.errors["new"][0]["message"] == "Weird (its message could not be read)"


def test_closing_an_abandoned_runs_workers_records_no_error_on_their_jobs(
    make_run: MakeRun,
) -> None:
    """A loop dropped mid-run (a notebook closed): the garbage collector closes the coroutines
    that were waiting, each with a GeneratorExit. That is not an exec raising one: the jobs
    whose execs were waiting record nothing, and each coroutine closes cleanly."""
    run = make_run([{"n": 0}, {"n": 1}])
    loop = asyncio.new_event_loop()
    waiting: list[int] = []
    both = asyncio.Event()

    async def hang(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        waiting.append(ctx["n"])
        if len(waiting) == 2:
            both.set()
        await asyncio.Event().wait()  # for ever

    processor = jorb.Processor(
        None, [jorb.State("new", exec=hang, concurrency=2), DONE], progress=False
    )
    main = loop.create_task(processor.aexec(run))
    try:
        loop.run_until_complete(asyncio.wait_for(both.wait(), 5))
        workers = [t for t in asyncio.all_tasks(loop) if "Lanes._work" in repr(t.get_coro())]
        assert len(workers) == 2
        for worker in workers:  # (what the collector does, outside the loop)
            worker.get_coro().close()  # raises if a coroutine goes on after GeneratorExit

        assert errors_of(run) == {}
    finally:
        main.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(main)
        loop.close()
