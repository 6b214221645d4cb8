"""Reopen time and memory: a big run file loaded back, with and without a journal to replay.

    .venv/bin/python bench/reopen.py                           # 1M jobs, a 100k-record journal
    .venv/bin/python bench/reopen.py --n 100k --journal 10k    # quicker
    .venv/bin/python bench/reopen.py --n 1M --journal 2.99M    # killed near the end of an exec

Builds two run files of N jobs, each job with 3 transitions of history (new -> a -> b -> done)
and a small ctx: ``clean.json``, folded and saved, and ``crashed.json``, whose last K
transitions live only in its journal because the process executing it was SIGKILLed (a real
``kill -9`` of a real ``Processor.exec``, so the journal is exactly what jorb writes). Then, each
in a fresh subprocess, ``jorb.Run.load`` (read + validate + journal replay) is timed, with the
peak RSS (``VmHWM``) it reached. Memory per job is that peak minus the process's RSS before
the load, less what the ctx dicts alone take (measured the same way), over N. "CPU s" is user
plus kernel time; the kernel's part is mostly page faults, the first touch of each fresh page
of the memory the run takes (how much each costs depends on the machine: a VM pays more).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    human,
    median,
    parse_counts,
    peak_rss_bytes,
    report,
    rss_bytes,
    run_child,
    table,
)

import jorb

HERE = Path(__file__).resolve()
HISTORY = (("new", "a"), ("a", "b"), ("b", "done"))


def _ctx(i: int) -> dict[str, Any]:
    return {"i": i, "name": f"item-{i:07d}"}


# -- building the files -------------------------------------------------------------------------


def build_clean(path: Path, n: int, active: int = 0) -> None:
    """n jobs; all but the last ``active`` are done with 3 history entries, those are "new"."""
    run = jorb.Run.open(path)
    t = time.time() - 3600.0
    for i in range(n):
        job = run.add_job(_ctx(i))
        if i < n - active:
            for step, (src, dst) in enumerate(HISTORY):
                job.history.append((src, dst, t + step, 0.001))
            job.state = "done"
    run.save()
    run.close()


def _crash_child(path: str, records: str) -> None:
    """Executes the run and SIGKILLs itself once ``records`` transitions have settled."""
    # The in-flight ones and those waiting for the disk (max_pending) may not reach the journal.
    settled, stop_at = 0, int(records) + 2 * 3 * 64

    def step(next_state: str) -> Any:
        async def exec_(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
            nonlocal settled
            settled += 1
            if settled >= stop_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return ctx, next_state

        return exec_

    states = [
        jorb.State("new", exec=step("a"), concurrency=64),
        jorb.State("a", exec=step("b"), concurrency=64),
        jorb.State("b", exec=step("done"), concurrency=64),
        jorb.State("done", terminal=True),
    ]
    options: dict[str, Any] = {}
    if "max_pending" in inspect.signature(jorb.Processor).parameters:  # (older jorbs: no such)
        options["max_pending"] = 3 * 64
    jorb.Processor(None, states, progress=False, **options).exec(jorb.Run.open(path))
    raise SystemExit("the crash child finished without crashing: raise --journal")


def build_crashed(path: Path, n: int, records: int) -> int:
    """A run file plus a journal of about ``records`` transitions; returns the record count."""
    active = records // 3 + 2 * 3 * 64  # enough jobs that the kill comes before they all finish
    build_clean(path, n, active=active)
    args = [str(HERE), "--child", "crash", str(path), str(records)]
    proc = os.spawnv(os.P_WAIT, sys.executable, [sys.executable, *args])
    if proc != -signal.SIGKILL:
        raise SystemExit(f"the crash child exited with {proc}, expected SIGKILL")
    return journal_transitions(path.with_name(path.name + ".journal"))


def journal_transitions(journal: Path) -> int:
    """Transitions in a journal: a record each, or an ``ok`` record's every entry."""
    from jorb.checkpoint import read_journal  # (its lines carry checksums: jorb reads them)

    count = 0
    _, records = read_journal(journal)
    for _, record in records:
        count += len(record["ok"]) if "ok" in record else 1
    return count


# -- measuring (each in a fresh process) --------------------------------------------------------


def _load_child(path: str) -> None:
    gc.collect()
    before = rss_bytes()
    start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    run = jorb.Run.load(path)
    seconds, end = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    peak = peak_rss_bytes()
    gc.collect()
    after = rss_bytes()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu": end.ru_utime - usage.ru_utime + end.ru_stime - usage.ru_stime,
                "system": end.ru_stime - usage.ru_stime,
                "faults": end.ru_minflt - usage.ru_minflt,
                "jobs": len(run.jobs),
                "before": before,
                "peak": peak,
                "after": after,
            }
        )
    )


def _ctx_child(n: str) -> None:
    """What n ctx dicts alone take: the part of a job's memory that is the user's."""
    gc.collect()
    before = rss_bytes()
    ctxs = [_ctx(i) for i in range(int(n))]
    gc.collect()
    print(json.dumps({"bytes": rss_bytes() - before, "n": len(ctxs)}))


def measure(path: Path, runs: int) -> dict[str, Any]:
    samples = [run_child([str(HERE), "--child", "load", str(path)]) for _ in range(runs)]
    return {
        "seconds": median([s["seconds"] for s in samples]),
        "cpu": median([s["cpu"] for s in samples]),
        "system": median([s["system"] for s in samples]),
        "faults": median([s["faults"] for s in samples]),
        "all": [round(s["seconds"], 3) for s in samples],
        "peak": median([s["peak"] - s["before"] for s in samples]),
        "steady": median([s["after"] - s["before"] for s in samples]),
        "jobs": samples[0]["jobs"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", default="1M", help="jobs in the run file")
    parser.add_argument("--journal", default="100k", help="records in the crashed run's journal")
    parser.add_argument("--runs", type=int, default=3, help="loads per file (median reported)")
    parser.add_argument("--dir", type=Path, help="where run files go (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument(
        "--reuse", action="store_true", help="keep the files already built in --dir (same N)"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        {"load": _load_child, "ctx": _ctx_child, "crash": _crash_child}[kind](*rest)
        return

    (n,) = parse_counts(args.n)
    (records,) = parse_counts(args.journal)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="jorb-reopen-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        clean, crashed = workdir / "clean.json", workdir / "crashed.json"
        journal = crashed.with_name(crashed.name + ".journal")
        start = time.perf_counter()
        if args.reuse and clean.exists() and journal.exists():
            replayed = journal_transitions(journal)
        else:
            for p in workdir.glob("*.json*"):
                p.unlink()
            build_clean(clean, n)
            replayed = build_crashed(crashed, n, records)
        built = time.perf_counter() - start
        ctx_bytes = run_child([str(HERE), "--child", "ctx", str(n)])["bytes"]
        results = {
            "n": n,
            "file_bytes": clean.stat().st_size,
            "crashed_file_bytes": crashed.stat().st_size,
            "journal_records": replayed,
            "journal_bytes": journal.stat().st_size,
            "ctx_bytes": ctx_bytes,
            "build_s": built,
            "clean": measure(clean, args.runs),
            "crashed": measure(crashed, args.runs),
            "runs": args.runs,
        }
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report("reopen", results, render(results), args.json)


def render(r: dict[str, Any]) -> str:
    n = r["n"]
    rows = []
    for label, key, size, extra in (
        ("no journal", "clean", r["file_bytes"], "—"),
        (
            "journal",
            "crashed",
            r.get("crashed_file_bytes", r["file_bytes"]),
            f"{r['journal_records']:,} transitions, {r['journal_bytes'] / 1e6:.0f} MB",
        ),
    ):
        m = r[key]
        rows.append(
            [
                label,
                human(n),
                f"{size / 1e6:.0f} MB",
                extra,
                r["runs"],
                f"{m['seconds']:.2f}",
                f"{m['cpu']:.2f}",
                f"{m['system']:.2f}",
                f"{m['faults'] / 1000:,.0f}k",
                f"{(m['peak'] - r['ctx_bytes']) / n:.0f}",
                f"{(m['steady'] - r['ctx_bytes']) / n:.0f}",
                f"{r['ctx_bytes'] / n:.0f}",
            ]
        )
    headers = [
        "reopen",
        "jobs",
        "run file",
        "journal",
        "runs",
        "Run.load s",
        "CPU s",
        "of it kernel s",
        "page faults",
        "peak B/job",
        "after B/job",
        "ctx B/job",
    ]
    return table(headers, rows)


if __name__ == "__main__":
    main()
