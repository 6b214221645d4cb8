"""Every script in examples/ runs, for real, in a subprocess, and leaves a run a user can trust.

Each example takes ``--run PATH`` (so tests write into a temp dir, never into the repo's runs/)
and small sizes. The checks read the run file back the way a user would: every job terminal,
the expected states reached, children recorded with their parents, errors kept.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import jorb

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{name} {args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def terminal_states(run: jorb.Run) -> set[str]:
    return {s["name"] for s in run.declared if s["terminal"]}


def assert_complete(run: jorb.Run) -> None:
    terminal = terminal_states(run)
    stuck = {job.id: job.state for job in run.jobs.values() if job.state not in terminal}
    assert not stuck, f"jobs left in non-terminal states: {stuck}"
    for job in run.jobs.values():
        if job.parent is not None:
            assert job.parent in run.jobs, f"job {job.id}'s parent {job.parent} is missing"


def test_every_example_is_run_by_a_test() -> None:
    # This file runs migrate.py and api_batch.py; other examples belong to the feature they
    # show (mapreduce.py: tests/test_fanin.py). A new example nobody runs fails here.
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    unrun = [p.name for p in EXAMPLES.glob("*.py") if f'"{p.name}"' not in tests]
    assert not unrun, f"examples no test runs: {unrun}"


# -- migrate.py ------------------------------------------------------------------------------


def test_migrate_drives_every_repo_to_an_end(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "migrate.json"
    out = run_example("migrate.py", "--repos", "20", "--run", str(path), cwd=tmp_path).stdout
    run = jorb.Run.load(path)
    assert_complete(run)
    counts = run.counts()
    # Seeded: this campaign reaches every outcome, good and bad.
    for state in ("done", "unchanged", "lint_ok", "lint_failed"):
        assert counts.get(state), f"no job reached {state}: {counts}"
    for state in ("clone_failed", "push_failed", "ci_failed"):
        assert counts.get(state), f"no job reached {state}: {counts}"
    assert "failed" not in counts  # every error was routed by an on_error

    repos = [job for job in run.jobs.values() if job.parent is None]
    assert sorted(job.ctx["repo"] for job in repos) == [f"acme/service-{i:03d}" for i in range(20)]
    # Fan-out: edit kicked one lint job per changed file, each pointing back at its repo.
    for repo in repos:
        kids = run.children(repo.id)
        assert sorted(kid.ctx["file"] for kid in kids) == sorted(repo.ctx.get("changed", []))
        assert all(kid.ctx["repo"] == repo.ctx["repo"] for kid in kids)
        assert all(kid.state in ("lint_ok", "lint_failed") for kid in kids)
    assert len(run.jobs) == len(repos) + sum(len(r.ctx.get("changed", [])) for r in repos)

    # Retries, then on_error: a failed push was tried 1 + retries (3) times, every try recorded.
    for job in run.jobs.values():
        if job.state == "push_failed":
            errors = job.errors["push"]
            assert len(errors) == 4
            assert [e["attempt"] for e in errors] == [1, 2, 3, 4]
            assert all(e["type"].endswith("PushRejected") and e["traceback"] for e in errors)
            assert job.steps()[-1]["from"] == "push" and job.steps()[-1]["to"] == "push_failed"
    # CI was polled: wait_ci re-entered itself before an answer.
    assert any(
        step["from"] == step["to"] == "wait_ci" for job in run.jobs.values() for step in job.steps()
    )
    for job in run.jobs.values():
        if job.state == "done":
            assert job.ctx["ci"] == "success" and job.ctx["pr"] and job.ctx["pushed"]

    # The summary agrees with the file and says how to look closer.
    listed = dict(line.split() for line in out.splitlines() if line.startswith("  "))
    assert {state: int(n) for state, n in listed.items()} == counts
    assert f"jorb status {path}" in out or "jorb status runs/migrate.json" in out


def test_migrate_rerun_resumes_and_a_find_replace_redrives(tmp_path: Path) -> None:
    path = tmp_path / "migrate.json"
    run_example("migrate.py", "--repos", "20", "--run", str(path), cwd=tmp_path)
    before = jorb.Run.load(path)

    # Rerunning a finished run does nothing but report.
    out = run_example("migrate.py", "--repos", "99", "--run", str(path), cwd=tmp_path).stdout
    again = jorb.Run.load(path)
    assert "resumed" in out
    assert len(again.jobs) == len(before.jobs)
    assert {j.id: len(j.history) for j in again.jobs.values()} == {
        j.id: len(j.history) for j in before.jobs.values()
    }

    # The README's redrive: find/replace the state in the file, rerun.
    failed = [job.id for job in again.jobs.values() if job.state == "push_failed"]
    assert failed
    text = path.read_text()
    path.write_text(text.replace('"state": "push_failed"', '"state": "push"'))
    run_example("migrate.py", "--run", str(path), cwd=tmp_path)
    after = jorb.Run.load(path)
    assert_complete(after)
    for ident in failed:
        job, old = after.jobs[ident], again.jobs[ident]
        assert len(job.history) > len(old.history)
        assert job.steps()[len(old.history)]["from"] == "push"  # it was pushed again
        assert job.errors.get("push", [])[: len(old.errors["push"])] == old.errors["push"]
    assert len(after.jobs) == len(before.jobs)


def test_migrate_dry_run_stops_before_push_then_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "migrate.json"
    run_example("migrate.py", "--repos", "12", "--dry-run", "--run", str(path), cwd=tmp_path)
    dry = jorb.Run.load(path)
    assert_complete(dry)
    waiting = [job.id for job in dry.jobs.values() if job.state == "push"]
    assert waiting
    assert not any(job.state in ("open_pr", "wait_ci", "done") for job in dry.jobs.values())

    run_example("migrate.py", "--run", str(path), cwd=tmp_path)
    wet = jorb.Run.load(path)
    assert_complete(wet)
    assert all(wet.jobs[ident].state != "push" for ident in waiting)
    assert wet.counts().get("done")


def test_migrate_fresh_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "migrate.json"
    run_example("migrate.py", "--repos", "5", "--run", str(path), cwd=tmp_path)
    run_example("migrate.py", "--repos", "3", "--fresh", "--run", str(path), cwd=tmp_path)
    run = jorb.Run.load(path)
    assert sum(1 for job in run.jobs.values() if job.parent is None) == 3
    assert run.overall["passes"] == 1
    assert_complete(run)


def test_migrate_writes_under_the_repos_runs_dir_by_default() -> None:
    source = (EXAMPLES / "migrate.py").read_text()
    assert 'ROOT / "runs" / "migrate.json"' in source
    assert "Path(__file__).resolve().parent.parent" in source


# -- api_batch.py -----------------------------------------------------------------------------


def test_api_batch_finishes_through_429s(tmp_path: Path) -> None:
    path = tmp_path / "api.json"
    args = ("--prompts", "40", "--quota", "50", "--run", str(path))
    out = run_example("api_batch.py", *args, cwd=tmp_path).stdout
    run = jorb.Run.load(path)
    assert_complete(run)
    assert run.counts() == {"done": 40}
    for job in run.jobs.values():
        assert job.ctx["completion"] and job.ctx["tokens"] > 0
    limited = [
        error
        for job in run.jobs.values()
        for error in job.errors.get("new", [])
        if error["rate_limited"]
    ]
    # The fake API's burst is 5: the first wave of starts must have met 429s, recorded as such.
    assert limited
    assert all(e["type"] == "jorb.errors.RateLimited" for e in limited)
    assert "429s:" in out and "observed" in out


# Runs api_batch on jorb.testing's virtual clock, so the figures do not depend on the machine.
_FAKE_CLOCK_RUN = """
import importlib.util, json, sys
import jorb, jorb.testing
spec = importlib.util.spec_from_file_location("api_batch", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["api_batch"] = module
spec.loader.exec_module(module)
batch = module.prepare(["--run", sys.argv[2], "--prompts", "300", "--quota", "100"])
jorb.testing.run(jorb.Processor(batch.api, batch.states, progress=False).aexec(batch.run))
print(json.dumps({"counts": batch.run.counts(), "arrivals": batch.api.arrivals,
                  "statuses": batch.api.statuses}))
"""


def test_api_batch_converges_below_the_hidden_quota(tmp_path: Path) -> None:
    try:
        result = subprocess.run(
            [sys.executable, "-c", _FAKE_CLOCK_RUN, EXAMPLES / "api_batch.py", tmp_path / "a.json"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("api_batch on the fake clock did not finish (the virtual clock stalled)")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["counts"] == {"done": 300}
    arrivals, statuses = seen["arrivals"], seen["statuses"]
    share = statuses.count(429) / len(statuses)
    assert share < 0.10, f"{share:.1%} of {len(statuses)} requests got a 429"
    middle = arrivals[0] + (arrivals[-1] - arrivals[0]) / 2
    late = [t for t in arrivals if t >= middle]
    late_rate = len(late) / (arrivals[-1] - middle)
    assert late_rate <= 100 * 1.05, f"{late_rate:.1f} req/s in the second half, quota 100"
    ok_rate = statuses.count(200) / (arrivals[-1] - arrivals[0])
    assert ok_rate >= 60, f"only {ok_rate:.1f} successful req/s against a quota of 100"


# -- README.md ----------------------------------------------------------------------------------


def test_the_readmes_complete_script_runs_and_resumes(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python\n# hello.py\n") + len("```python\n")
    script = tmp_path / "hello.py"
    script.write_text(readme[start : readme.index("```", start)])
    for _ in range(2):  # the second run reopens runs/hello.json and finds it finished
        result = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "{'done': 7, 'lost': 1}"
    run = jorb.Run.load(tmp_path / "runs" / "hello.json")
    assert_complete(run)
    (lost,) = [job for job in run.jobs.values() if job.state == "lost"]
    assert [e["message"] for e in lost.errors["store"]] == ["disk quota exceeded"] * 3
    assert run.jobs[lost.parent or ""].ctx["url"] == "https://b.example"


def test_a_failed_attempt_leaves_the_jobs_ctx_as_it_was(tmp_path: Path) -> None:
    # jorb bug (processor: the exec gets `dict(job.ctx)`, a shallow copy): a nested value changed
    # in place by an attempt that then fails leaks into the next attempt, in this process only;
    # after a restart the attempt sees the ctx on disk. Memory and disk disagree.
    seen: list[list[str]] = []

    def step(app: object, overall: dict[str, object], ctx: dict[str, list[str]]) -> object:
        seen.append(list(ctx["tags"]))
        ctx["tags"].append("x")
        if len(seen) < 3:
            raise RuntimeError("flaky")
        return ctx, "done"

    run = jorb.Run.open(tmp_path / "s.json")
    run.add_job({"tags": []})
    states = [jorb.State("new", exec=step, retries=3, backoff=0), jorb.State("done", terminal=True)]
    jorb.Processor(None, states, progress=False).exec(run)
    assert seen == [[], [], []]
    assert jorb.Run.load(tmp_path / "s.json").jobs["1"].ctx == {"tags": ["x"]}


# -- cpu_pool.py ------------------------------------------------------------------------------


def test_cpu_pool_renders_every_tile_in_worker_processes_and_resumes_to_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cpu.json"
    out = run_example("cpu_pool.py", "--jobs", "100", "--run", str(path), cwd=tmp_path).stdout
    run = jorb.Run.load(path)
    assert run.counts() == {"done": 100}
    workers = {job.ctx["pid"] for job in run.jobs.values()}
    assert len(workers) == min(2, os.cpu_count() or 1)  # one worker per core, all of them used
    assert "100 tiles in" in out
    again = run_example("cpu_pool.py", "--jobs", "100", "--run", str(path), cwd=tmp_path).stdout
    assert "100 tiles in" in again
    assert [len(job.history) for job in jorb.Run.load(path).jobs.values()] == [1] * 100  # no rerun
