"""Job-queue basics, measured: polling with jorb.Next, and def execs in threads.

    .venv/bin/python bench/queue_basics.py [--runs 5] [--json]

Polling: jobs poll "CI" every 30 s for an hour on jorb.testing's virtual clock (so only jorb's
own work costs real time), with ``jorb.Next("wait_ci", delay=30)`` against the way it was
done before Next, an exec that sleeps 30 s and returns its own state (holding its slot, one
history entry per poll). Real seconds, run-file bytes and history entries.

Threads: the same ``def`` execs run through this jorb's executor and through the one of commit
982d88e (read from git), in the same run: throughput of no-op execs, the time one job takes in
a state of ``concurrency=3000`` (threads started up front before), and the longest the event
loop stalled while three execs timed out in such a state.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, machine_line, median, table

import jorb
import jorb.testing

Ctx = dict[str, Any]


def _old_executor() -> Any:
    """LocalExecutor as it was at 982d88e (before this work), loaded from git."""
    source = (
        subprocess.run(
            ["git", "show", "982d88e:jorb/executor.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.replace("from .errors", "from jorb.errors")
        .replace("from .states", "from jorb.states")
    )
    path = Path(tempfile.mkdtemp()) / "old_executor.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_executor", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LocalExecutor


# -- polling ---------------------------------------------------------------------------------------


def poll(jobs: int, *, with_next: bool, durable: bool, workdir: Path) -> dict[str, Any]:
    async def wait_ci(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        loop = asyncio.get_running_loop()
        if not with_next:
            await asyncio.sleep(30)  # the wait, inside the exec: it holds the slot
        if loop.time() >= 3600:
            return ctx, "done"
        return ctx, jorb.Next("wait_ci", delay=30) if with_next else "wait_ci"

    path = workdir / f"poll-{jobs}-{with_next}-{durable}.json"
    path.unlink(missing_ok=True)
    run = jorb.Run.open(path)
    for n in range(jobs):
        run.add_job({"n": n, "repo": f"acme/service-{n:03d}"}, "wait_ci")
    states = [
        jorb.State("wait_ci", exec=wait_ci, concurrency=jobs),
        jorb.State("done", terminal=True),
    ]
    processor = jorb.Processor(None, states, progress=False, durable=durable, poll_interval=60)
    start = time.perf_counter()
    jorb.testing.run(processor.aexec(run))
    seconds = time.perf_counter() - start
    polls = sum(job.polls for job in run.jobs.values())
    history = sum(len(job.history) for job in run.jobs.values())
    return {
        "jobs": jobs,
        "next": with_next,
        "durable": durable,
        "seconds": seconds,
        "polls": polls if with_next else history - jobs,
        "history": history,
        "bytes": path.stat().st_size,
    }


# -- threads --------------------------------------------------------------------------------------


def _noop(app: Any, overall: Ctx, ctx: Ctx) -> Any:
    return ctx, "done"


def _slow(app: Any, overall: Ctx, ctx: Ctx) -> Any:
    time.sleep(0.2)  # past its timeout
    return ctx, "done"


def through(
    executor_class: Any, fn: Any, jobs: int, concurrency: int, workdir: Path, **state: Any
) -> dict[str, float]:
    """Seconds to run ``jobs`` def execs, and the longest loop stall seen meanwhile."""
    path = workdir / "threads.json"
    path.unlink(missing_ok=True)
    run = jorb.Run.open(path)
    for n in range(jobs):
        run.add_job({"n": n})
    states = [
        jorb.State("new", exec=fn, concurrency=concurrency, **state),
        jorb.State("done", terminal=True),
    ]
    stall = [0.0]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        due = [loop.time() + 0.005]

        def tick() -> None:
            stall[0] = max(stall[0], loop.time() - due[0])
            due[0] = loop.time() + 0.005
            loop.call_later(0.005, tick)

        loop.call_later(0.005, tick)
        processor = jorb.Processor(
            None, states, progress=False, durable=False, executor=executor_class(states)
        )
        await processor.aexec(run)

    start, cpu = time.perf_counter(), time.process_time()
    asyncio.run(main())
    return {
        "seconds": time.perf_counter() - start,
        "cpu": time.process_time() - cpu,
        "stall": stall[0],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per point (median reported)")
    parser.add_argument("--execs", type=int, default=20_000, help="no-op def execs to run")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="jorb-queue-bench-"))
    from jorb.executor import LocalExecutor

    old = _old_executor()
    results: dict[str, Any] = {"polls": [], "threads": []}
    for jobs, with_next, durable in [
        (1, True, True),
        (20, True, True),
        (20, True, False),
        (20, False, True),
    ]:
        runs = [
            poll(jobs, with_next=with_next, durable=durable, workdir=workdir)
            for _ in range(args.runs)
        ]
        best = dict(runs[0])
        best["seconds"] = median([r["seconds"] for r in runs])
        results["polls"].append(best)
    cases = [
        ("no-op def execs, concurrency 8", _noop, args.execs, 8, {}),
        ("1 def exec, concurrency 3000", _noop, 1, 3000, {}),
        ("3 def execs timing out, concurrency 3000", _slow, 3, 3000, {"timeout": 0.05}),
    ]
    for name, fn, jobs, concurrency, state in cases:
        row: dict[str, Any] = {"case": name}
        runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
        for _ in range(args.runs):  # alternating, so a change in the machine's load hits both
            for label, cls in (("old", old), ("new", LocalExecutor)):
                runs[label].append(through(cls, fn, jobs, concurrency, workdir, **state))
        for label, measured in runs.items():
            row[f"{label}_s"] = median([r["seconds"] for r in measured])
            row[f"{label}_cpu_s"] = median([r["cpu"] for r in measured])
            row[f"{label}_stall_s"] = median([r["stall"] for r in measured])
        results["threads"].append(row)
    if args.json:
        print(json.dumps(results))
        return
    print(machine_line())
    print()
    print(
        table(
            ["jobs", "how", "fsync", "real s", "polls", "history entries", "run file bytes"],
            [
                [
                    r["jobs"],
                    "jorb.Next(delay=30)" if r["next"] else "sleep 30 in exec, own state",
                    "yes" if r["durable"] else "no",
                    f"{r['seconds']:.3f}",
                    f"{r['polls']:,}",
                    f"{r['history']:,}",
                    f"{r['bytes']:,}",
                ]
                for r in results["polls"]
            ],
        )
    )
    print()
    print(
        table(
            [
                "case",
                "982d88e s",
                "now s",
                "now/982d88e",
                "CPU now/982d88e",
                "982d88e worst stall ms",
                "now worst stall ms",
            ],
            [
                [
                    r["case"],
                    f"{r['old_s']:.3f}",
                    f"{r['new_s']:.3f}",
                    f"{r['new_s'] / r['old_s']:.2f}",
                    f"{r['new_cpu_s'] / r['old_cpu_s']:.2f}",
                    f"{r['old_stall_s'] * 1000:.0f}",
                    f"{r['new_stall_s'] * 1000:.0f}",
                ]
                for r in results["threads"]
            ],
        )
    )


if __name__ == "__main__":
    sys.exit(main())
