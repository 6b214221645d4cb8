"""Unique keys (at most one job per key in a run) and ``jorb.NoRetry``.

Keys make an enqueue script safe to rerun: ``run.add_job(ctx, key=...)``, ``jorb.Kick(...,
key=...)``, ``processor.add_jobs(..., key=...)`` and ``jorb add --key FIELD`` add nothing for a
key the run already has, and keys survive restarts.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import DONE, MakeRun, errors_of, process_fake_clock
from scripts_steer.harness import STUCK, Script
from typer.testing import CliRunner

import jorb
from jorb import control
from jorb.checkpoint import atomic_write
from jorb.cli import app as cli_app

Ctx = dict[str, Any]


def test_add_job_with_a_key_the_run_has_returns_that_job(make_run: MakeRun) -> None:
    run = make_run()
    first = run.add_job({"repo": "a"}, key="repo:a")
    again = run.add_job({"repo": "a", "other": 1}, "elsewhere", key="repo:a")
    plain = run.add_job({"repo": "a"})  # no key: no uniqueness

    assert again is first
    assert [job.id for job in run.jobs.values()] == [first.id, plain.id]
    with pytest.raises(jorb.JorbError, match="key must be a non-empty string"):
        run.add_job({}, key="")


def test_keys_survive_a_restart_so_an_enqueue_script_can_be_rerun(make_run: MakeRun) -> None:
    def enqueue(run: jorb.Run) -> None:
        for repo in ("a", "b", "c"):
            run.add_job({"repo": repo}, key=f"repo:{repo}")

    run = make_run()
    enqueue(run)
    run.save()
    run.close()
    assert run.path is not None

    again = jorb.Run.open(run.path)
    try:
        enqueue(again)
        assert [job.ctx["repo"] for job in again.jobs.values()] == ["a", "b", "c"]
        assert again.jobs["2"].key == "repo:b"
    finally:
        again.close()


def test_rerunning_the_enqueue_after_kill_9_adds_nothing_and_no_retry_is_final(
    tmp_path: Path,
) -> None:
    # jobqueue.py adds its jobs with keys on every start. Its "check" state raises NoRetry
    # (with retries=5): the job is failed at the first attempt, and stays so after a kill.
    path, effects, gates = tmp_path / "run.json", tmp_path / "effects.log", tmp_path / "gates"
    gates.mkdir()
    first = Script(tmp_path, "jobqueue.py", path, effects, gates, "--jobs", 3, "--state", "check")
    try:
        first.until(lambda lines: lines.count("check 0") + lines.count("check 2") == 2)
        first.saw("check 1")
        first.kill()
        second = Script(tmp_path, "jobqueue.py", path, effects, gates, "--jobs", 3)
        lines = second.finish()
    finally:
        first.stop()

    assert lines[0] == "jobs 3"  # the rerun enqueue added nothing
    run = jorb.Run.load(path)
    assert [job.key for job in run.jobs.values()] == ["job-0", "job-1", "job-2"]
    log = effects.read_text().splitlines()
    for n in range(3):
        job = run.jobs[str(n + 1)]
        assert job.state == "failed"
        (error,) = job.errors["check"]  # one attempt: its 5 retries unused
        assert error["type"] == "jorb.errors.NoRetry"
        assert error["message"] == f"job {n} can never pass"
        assert 1 <= log.count(f"check {n}") <= 2  # twice only if the kill came before its record


def test_a_key_kicked_twice_in_one_batch_makes_one_job(make_run: MakeRun) -> None:
    async def split(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        # No await: both parents settle in the same loop turn, into one group commit.
        kicks = [jorb.Kick("work", {"by": ctx["n"], "i": i}, key="shared") for i in range(2)]
        kicks.append(jorb.Kick("work", {"by": ctx["n"]}, key=f"own-{ctx['n']}"))
        return ctx, "done", kicks

    async def work(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        return ctx, "done"

    states = [
        jorb.State("split", exec=split, concurrency=2),
        jorb.State("work", exec=work),
        DONE,
    ]
    run = make_run([{"n": 0}, {"n": 1}], state="split")
    run.add_job({"old": True}, "work", key="own-1")  # a key the run already had

    process_fake_clock(states, run)

    kids = {job.key: job for job in run.jobs.values() if job.parent is not None}
    assert sorted(kids) == ["own-0", "shared"], errors_of(run)
    assert kids["shared"].ctx == {"by": 0, "i": 0}  # the first kick of the key won
    assert run.counts() == {"done": 5}
    reloaded = jorb.Run.load(run.path) if run.path is not None else None
    assert reloaded is not None
    assert sorted(j.key for j in reloaded.jobs.values() if j.key) == ["own-0", "own-1", "shared"]


def test_processor_add_jobs_takes_keys_priority_and_delay(make_run: MakeRun) -> None:
    starts: list[tuple[float, str]] = []

    async def work(app: jorb.Processor, overall: Ctx, ctx: Ctx) -> Any:
        starts.append((asyncio.get_running_loop().time(), ctx["name"]))
        return ctx, "done"

    async def enqueue(app: jorb.Processor, overall: Ctx, ctx: Ctx) -> Any:
        ctxs = [{"name": "x"}, {"name": "y"}, {"name": "x"}]
        app.add_jobs(ctxs, "work", key=lambda c: c["name"], priority=3, delay=50)
        app.add_jobs(ctxs, "work", key=lambda c: c["name"])  # adds nothing
        return ctx, "done"

    states = [jorb.State("work", exec=work), jorb.State("enqueue", exec=enqueue), DONE]
    run = make_run([{}], state="enqueue")
    processor = jorb.Processor(None, states, progress=False)
    processor.app = processor
    jorb.testing.run(asyncio.wait_for(processor.aexec(run), 3600))

    assert [name for _, name in starts] == ["x", "y"], errors_of(run)
    assert all(when >= 50 for when, _ in starts)
    added = [job for job in run.jobs.values() if job.key]
    assert [(job.key, job.priority) for job in added] == [("x", 3), ("y", 3)]
    what = [change["what"] for change in run.changes]
    assert what == ["added 2 job(s) in 'work' (1 skipped: their key exists)"]


def test_jorb_add_with_a_key_field_twice_adds_nothing_the_second_time(
    make_run: MakeRun, tmp_path: Path
) -> None:
    run = make_run()
    run.declared = [{"name": "new", "terminal": False}, {"name": "done", "terminal": True}]
    run.save()
    run.close()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"repo": "a"}\n{"repo": "b"}\n{"repo": "a"}\n')
    runner = CliRunner()
    args = ["add", str(run.path), "--file", str(jobs), "--key", "repo"]

    first = runner.invoke(cli_app, [*args, "--priority", "2", "--delay", "60"])
    second = runner.invoke(cli_app, args)

    assert first.stdout.strip() == (
        "added 2 job(s) in 'new': 1, 2; skipped 1 whose key the run already has"
    )
    assert second.stdout.strip() == (
        "added 0 job(s) in 'new'; skipped 3 whose key the run already has"
    )
    assert run.path is not None
    loaded = jorb.Run.load(run.path)
    assert [(j.key, j.priority, j.not_before is not None) for j in loaded.jobs.values()] == [
        ("a", 2, True),
        ("b", 2, True),
    ]
    missing = runner.invoke(cli_app, ["add", str(run.path), "--ctx", "{}", "--key", "repo"])
    assert missing.exit_code == 2
    assert "no string or number 'repo'" in missing.stderr


def test_a_change_no_process_picks_up_is_withdrawn_at_its_timeout(tmp_path: Path) -> None:
    # A process holds the run but never looks at its inbox (hold.py, like a SIGSTOPped one).
    run = jorb.Run.open(tmp_path / "run.json")
    run.save()
    run.close()
    assert run.path is not None
    hold = Path(__file__).parent / "scripts" / "hold.py"
    holder = subprocess.Popen(
        [sys.executable, str(hold), str(run.path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        with pytest.raises(TimeoutError, match="withdrawn: nothing changed"):
            control.add(run.path, [{"n": 1}], timeout=0.2)
        assert not list(control.inbox_path(run.path).iterdir())  # nothing left to apply
        cli = CliRunner().invoke(cli_app, ["pause", str(run.path), "work", "--timeout", "0.2"])
        assert cli.exit_code == 1
        last = cli.stderr.splitlines()[-1]
        assert last.startswith("jorb: error: the process running")
        assert last.endswith(
            "within 0.2s (is it stopped?); the change was withdrawn: nothing changed"
        )
        assert not list(control.inbox_path(run.path).iterdir())
        # A change left queued (its command interrupted): `jorb withdraw` takes it back.
        req = control.new_request("pause", {"name": "work"})
        atomic_write(control.inbox_path(run.path) / f"1-{req['id']}.json", orjson.dumps(req))
        out = CliRunner().invoke(cli_app, ["withdraw", str(run.path)])
        assert out.stdout.splitlines()[0] == "withdrew 1 change(s); none was applied:"
        assert out.stdout.splitlines()[1].startswith("  pause name='work'  (asked ")
        assert not list(control.inbox_path(run.path).iterdir())
    finally:
        holder.kill()
        holder.wait()
    assert jorb.Run.load(run.path).jobs == {}  # and the next opener finds nothing


def test_no_retry_routes_at_once_to_on_error(make_run: MakeRun) -> None:
    calls: list[int] = []

    async def fetch(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        calls.append(1)
        raise jorb.NoRetry("404: no such repository")

    states = [
        jorb.State("fetch", exec=fetch, retries=5, on_error="missing"),
        jorb.State("missing", terminal=True),
        DONE,
    ]
    run = make_run([{}], state="fetch")
    process_fake_clock(states, run)

    (job,) = run.jobs.values()
    assert job.state == "missing"
    assert len(calls) == 1
    (error,) = job.errors["fetch"]
    assert (error["type"], error["message"]) == ("jorb.errors.NoRetry", "404: no such repository")
    assert issubclass(jorb.NoRetry, jorb.JorbError)


def test_jorb_add_with_keys_through_the_running_process(tmp_path: Path) -> None:
    path, effects, gates = tmp_path / "run.json", tmp_path / "effects.log", tmp_path / "gates"
    gates.mkdir()
    script = Script(tmp_path, "jobqueue.py", path, effects, gates, "--jobs", 1)
    try:
        script.saw("start 0")  # job 1 (key job-0) holds the process until its gate opens
        taken = control.add(path, [{"n": 0}], keys=["job-0"], timeout=STUCK)
        added = control.add(path, [{"n": 7}, {"n": 7}], keys=["job-7"] * 2, timeout=STUCK)
        (gates / "all").touch()
        lines = script.finish()
    finally:
        script.stop()

    assert taken == {"ids": [], "skipped": 1}  # nothing to record: no change at all
    assert added == {"ids": ["2"], "skipped": 1}
    assert lines[-1] == "finished [('done', 2)]"
    run = jorb.Run.load(path)
    assert [change["what"] for change in run.changes] == [
        "added 1 job(s) in 'new' (1 skipped: their key exists)"
    ]


def test_a_kicked_key_replays_from_the_journal_as_it_was_written() -> None:
    # A journal record carries the kicked children as JSON; replayed, they keep their keys,
    # and the run's key index knows them.
    from jorb import outcome
    from jorb.model import Job, apply_record

    states = {name: jorb.State(name, terminal=True) for name in ("done", "work")}
    run = jorb.Run()
    parent = run.add_job({}, "new")
    result = ({}, "done", [jorb.Kick("work", {"i": 1}, key="k")])
    record, _ = outcome.success(states, parent, result, run.next_id, 0.0, 1.0, run.keyed)
    record["seq"] = 1
    written = orjson.loads(orjson.dumps(record))

    replayed = jorb.Run()
    replayed.jobs[parent.id] = Job(parent.id, "new", {})
    replayed.keyed()  # the index is built before the record arrives
    apply_record(replayed, written)

    kid = replayed.jobs["2"]
    assert (kid.key, kid.parent, kid.state) == ("k", parent.id, "work")
    assert replayed.keyed() == {"k": "2"}
    assert replayed.add_job({}, key="k") is kid


def test_run_add_jobs_with_a_key_adds_each_key_once(make_run: MakeRun) -> None:
    run = make_run()
    first = run.add_job({"repo": "b"}, key="b")
    ctxs = [{"repo": "a"}, {"repo": "b"}, {"repo": "c"}, {"repo": "a", "again": True}]

    jobs = run.add_jobs(ctxs, key=lambda ctx: ctx["repo"], priority=2)
    again = run.add_jobs(ctxs, key=lambda ctx: ctx["repo"])

    assert [job.key for job in run.jobs.values()] == ["b", "a", "c"]
    assert jobs == again  # one job per ctx: the new one, or the one that has the key
    assert [job.id for job in jobs] == ["2", "1", "3", "2"]
    assert jobs[1] is first and jobs[0].ctx == {"repo": "a"} and jobs[0].priority == 2
    with pytest.raises(jorb.JorbError, match="key must be a non-empty string"):
        run.add_jobs([{}], key=lambda ctx: "")
