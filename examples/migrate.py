"""A repository-migration campaign: clone, edit, commit, push, open a PR, wait for CI.

Nothing here touches the network or git: a fake code host answers after a few milliseconds and
fails now and then, from a seeded RNG, so a fresh run with the same seed always ends the same
way. The script is shaped like a real campaign:

- one job per repository, added once; rerunning the script resumes ``runs/migrate.json``;
- ``def`` execs (git work: blocking) run in threads, ``async def`` execs (API calls) on the loop;
- ``edit`` fans out: it kicks one ``lint`` job per file it changed;
- one ``jorb.Rate`` is shared by every state that calls the code host's API: one budget;
- retries with backoff, then ``on_error`` routes a job to ``clone_failed`` / ``push_failed``;
- ``wait_ci`` polls: ``jorb.Next("wait_ci", delay=...)`` brings the job back later, holding no
  slot in between (a poll is counted in ``job.polls``, not added to its history).

Usage::

    ./dev.sh example                            # = .venv/bin/python examples/migrate.py
    .venv/bin/python examples/migrate.py --repos 500 --fresh
    .venv/bin/python examples/migrate.py --dry-run  # stop before push; rerun without it to go on

Kill it (Ctrl-C, ``kill -9``) at any point and run it again: it carries on where it stopped. To
redrive the failed pushes, replace ``"state": "push_failed"`` with ``"state": "push"`` in the run
file and rerun (each run of the script is a new "pass", with fresh luck at the fake code host).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jorb

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN = ROOT / "runs" / "migrate.json"

Ctx = dict[str, Any]


# -- the outside world (fake) ----------------------------------------------------------------------


class PushRejected(Exception):
    """The remote refused the push."""


class CodeHost:
    """A fake code host (git remote, pull requests, CI) with latency and seeded bad luck.

    What happens to a repository is fixed by ``(seed, repo)``: how many files the migration
    changes, whether its remote is flaky, whether CI fails. Each attempt's luck is fixed by
    ``(seed, pass, repo, step, attempt)``, so a fresh run replays exactly, whatever the
    interleaving, and a rerun of the script (a new pass) gets fresh luck for redriven jobs.
    """

    def __init__(self, seed: int, pass_number: int) -> None:
        self.seed = seed
        self.pass_number = pass_number
        self.api_calls = 0
        self._attempts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()  # some callers are `def` execs, in threads

    def fate(self, repo: str) -> random.Random:
        """What is true of ``repo`` for the whole campaign."""
        return random.Random(f"{self.seed}:{repo}")

    def luck(self, repo: str, step: str) -> float:
        """A number in [0, 1) for this attempt of ``step`` on ``repo``."""
        with self._lock:
            self._attempts[repo, step] += 1
            attempt = self._attempts[repo, step]
        return random.Random(f"{self.seed}:{self.pass_number}:{repo}:{step}:{attempt}").random()

    def archived(self, repo: str) -> bool:
        return random.Random(f"{self.seed}:{repo}:archived").random() < 0.03

    def files_to_change(self, repo: str) -> list[str]:
        fate = self.fate(repo)
        if fate.random() < 0.1:
            return []  # already migrated
        names = ["setup.cfg", "pyproject.toml", "tox.ini", ".github/workflows/ci.yml", "Makefile"]
        return sorted(fate.sample(names, fate.randint(1, 4)))

    async def call(self) -> None:
        """One API round trip: a few milliseconds."""
        self.api_calls += 1
        await asyncio.sleep(random.uniform(0.002, 0.006))

    async def push(self, repo: str, branch: str) -> str:
        await self.call()
        flaky = self.fate(repo).random() < 0.15  # a remote that rejects most pushes
        if self.luck(repo, "push") < (0.85 if flaky else 0.1):
            raise PushRejected(f"{repo}: remote rejected {branch} (pre-receive hook declined)")
        return f"{self.fate(repo).getrandbits(40):010x}"

    async def find_or_open_pr(self, repo: str, branch: str, title: str) -> int:
        # Idempotent, as execs should be: asked twice for one branch, a code host returns the
        # pull request it already has. A job that reruns after a crash opens no duplicate.
        await self.call()
        return 100 + self.fate(repo).randrange(900)

    async def ci_status(self, repo: str, polls: int) -> str:
        await self.call()
        fate = self.fate(repo)
        fate.random()  # (the flaky-remote draw)
        needed, fails = fate.randint(1, 4), fate.random() < 0.1
        if polls < needed:
            return "pending"
        return "failure" if fails else "success"


def blocking_git(seconds: float) -> None:
    """Stand-in for a git subprocess: blocks its thread."""
    time.sleep(seconds)


# -- the execs: (app, overall, ctx) -> (ctx, next_state[, kicks]) --------------------------------


def clone(host: CodeHost, overall: Ctx, ctx: Ctx) -> tuple[Ctx, str]:
    repo = ctx["repo"]
    blocking_git(random.uniform(0.003, 0.01))
    if host.archived(repo):
        raise LookupError(f"git clone {repo}: repository not found")
    if host.luck(repo, "clone") < 0.08:
        raise ConnectionResetError(f"git clone {repo}: connection reset by peer")
    ctx["path"] = f"{overall['workdir']}/{repo}"
    return ctx, "edit"


def edit(host: CodeHost, overall: Ctx, ctx: Ctx) -> tuple[Ctx, str, list[jorb.Kick]]:
    blocking_git(0.002)
    files = host.files_to_change(ctx["repo"])
    ctx["changed"] = files
    if not files:
        return ctx, "unchanged", []
    kicks = [jorb.Kick("lint", {"repo": ctx["repo"], "file": f}) for f in files]
    return ctx, "commit", kicks


async def lint(host: CodeHost, overall: Ctx, ctx: Ctx) -> tuple[Ctx, str]:
    await asyncio.sleep(0.002)
    fate = random.Random(f"{host.seed}:{ctx['repo']}:{ctx['file']}")
    if fate.random() < 0.1:
        ctx["finding"] = "line 12: mixed tabs and spaces"
        return ctx, "lint_failed"  # a finding is an outcome, not an error: route it
    return ctx, "lint_ok"


def commit(host: CodeHost, overall: Ctx, ctx: Ctx) -> tuple[Ctx, str]:
    blocking_git(0.002)
    ctx["commit"] = f"{random.Random(ctx['repo']).getrandbits(40):010x}"
    return ctx, "push"


async def push(host: CodeHost, overall: Ctx, ctx: Ctx) -> tuple[Ctx, str]:
    ctx["pushed"] = await host.push(ctx["repo"], overall["branch"])
    return ctx, "open_pr"


async def open_pr(host: CodeHost, overall: Ctx, ctx: Ctx) -> tuple[Ctx, str]:
    ctx["pr"] = await host.find_or_open_pr(ctx["repo"], overall["branch"], overall["title"])
    ctx["polls"] = 0
    return ctx, "wait_ci"


async def wait_ci(host: CodeHost, overall: Ctx, ctx: Ctx) -> tuple[Ctx, str | jorb.Next]:
    status = await host.ci_status(ctx["repo"], ctx["polls"])
    ctx["polls"] += 1
    ctx["ci"] = status
    if status == "pending":
        # Come back in 10 ms (a real campaign: a minute). Meanwhile the job holds no slot;
        # the poll is counted in job.polls, not added to its history.
        return ctx, jorb.Next("wait_ci", delay=0.01)
    return ctx, "done" if status == "success" else "ci_failed"


def declare_states(dry_run: bool) -> list[jorb.State]:
    # The code host allows ~200 calls a second: one Rate, shared, is one budget for all of them.
    api = jorb.Rate(200, per=1.0)
    if dry_run:  # the Go original's trick: make the first public step terminal for a while
        pushing = jorb.State("push", terminal=True)
    else:
        pushing = jorb.State(
            "push",
            exec=push,
            concurrency=8,
            rate=api,
            retries=3,
            backoff=0.02,
            on_error="push_failed",
        )
    return [
        jorb.State(
            "new", exec=clone, concurrency=8, retries=2, backoff=0.01, on_error="clone_failed"
        ),
        jorb.State("edit", exec=edit, concurrency=2),
        jorb.State("lint", exec=lint, concurrency=16),
        jorb.State("commit", exec=commit, concurrency=4),
        pushing,
        jorb.State("open_pr", exec=open_pr, concurrency=8, rate=api, retries=2, backoff=0.02),
        jorb.State("wait_ci", exec=wait_ci, concurrency=32, rate=api),
        jorb.State("done", terminal=True),
        jorb.State("unchanged", terminal=True),
        jorb.State("lint_ok", terminal=True),
        jorb.State("lint_failed", terminal=True),
        jorb.State("clone_failed", terminal=True),
        jorb.State("push_failed", terminal=True),
        jorb.State("ci_failed", terminal=True),
        jorb.State("failed", terminal=True),  # the processor's error state (no on_error)
    ]


# -- the script ------------------------------------------------------------------------------------


def open_run(path: Path, repos: int, seed: int, fresh: bool) -> jorb.Run:
    if fresh:
        try:
            jorb.Run.open(path).close()  # refuses (RunLockedError) while another process runs it
        except jorb.RunLockedError:
            raise
        except jorb.RunFileError:
            pass  # unreadable: being thrown away anyway
        for stale in (path, path.with_name(path.name + ".journal")):
            stale.unlink(missing_ok=True)
    overall = {
        "org": "acme",
        "branch": "migrate/python-3.11",
        "title": "Move to Python 3.11",
        "workdir": "/tmp/jorb-migrate",
        "seed": seed,
        "passes": 0,
    }
    run = jorb.Run.open(path, overall=overall)  # reopens the file (and its overall) if it exists
    if not run.jobs:
        for i in range(repos):
            run.add_job({"repo": f"acme/service-{i:03d}"})  # state defaults to "new"
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repos", type=int, default=100, help="repositories in a new run")
    parser.add_argument("--seed", type=int, default=7, help="seed of a new run's fake world")
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN, help="the run file")
    parser.add_argument("--fresh", action="store_true", help="discard the run file; start over")
    parser.add_argument("--dry-run", action="store_true", help="stop every job before push")
    args = parser.parse_args(argv)

    run = open_run(args.run, args.repos, args.seed, args.fresh)
    if "--fresh" in sys.argv:  # Ctrl-C prints the command line as the way to resume: without it
        sys.argv.remove("--fresh")
    resumed = any(job.history for job in run.jobs.values())
    run.overall["passes"] += 1  # stored with the run at exec's first checkpoint
    host = CodeHost(run.overall["seed"], run.overall["passes"])
    states = declare_states(args.dry_run)
    started = time.monotonic()
    jorb.Processor(host, states).exec(run)  # blocks until every job is terminal
    elapsed = time.monotonic() - started

    counts = run.counts()
    repos = sum(1 for job in run.jobs.values() if job.parent is None)
    verb = "resumed" if resumed else "ran"
    print(
        f"{verb} {_shown(run.path)}: {repos} repos, {len(run.jobs)} jobs, "
        f"{host.api_calls} code host calls in {elapsed:.2f}s (pass {run.overall['passes']})"
    )
    for state in states:
        if counts.get(state.name):
            print(f"  {state.name:<13} {counts[state.name]:>5}")
    shown, jorb_cli = _shown(run.path), _jorb_command()
    print(f"inspect it:  {jorb_cli} status {shown}   (and: {jorb_cli} show {shown} JOB_ID)")
    if counts.get("push_failed"):
        print(f'redrive:     replace "state": "push_failed" with "state": "push" in {shown}, rerun')
        print(f"or:          {jorb_cli} redrive {shown} --from push_failed --to push, rerun")
    if args.dry_run:
        print("dry run:     jobs wait in push; rerun without --dry-run to push them")


def _jorb_command() -> str:
    """How to call the ``jorb`` command line from here: on the PATH, or beside this Python."""
    if shutil.which("jorb"):
        return "jorb"
    return _shown(Path(sys.executable).parent / "jorb")


def _shown(path: Path | None) -> str:
    """The run path relative to the current directory when it is below it."""
    assert path is not None
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()
