"""Memory while a run executes: the peak of an exec, per job, beside the run's own size.

    .venv/bin/python bench/exec_memory.py                 # 100k and 1M jobs, 1 run each
    .venv/bin/python bench/exec_memory.py --n 100k --runs 3

``bench/reopen.py`` measures a run loaded from its file; this measures one being executed,
whose peak comes from what the exec does on top of the run: the snapshots (the first, each
compaction, the final fold), the journal's batches, the lanes. Each run is a fresh process:
it builds N jobs (the engine benchmark's workload: ``new -> a -> b -> done``, no-op execs,
``concurrency=64``, durable, progress off), then executes them. Reported per job, less what
the ctx dicts alone take (measured the same way): the run before the exec, the peak during it
(``VmHWM``), and the run after it (every job with its 3 history entries). Use
``PYTHONPATH=/path/to/other/checkout`` to measure another version of jorb.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
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
from engine import build_run, make_states

import jorb

HERE = Path(__file__).resolve()


def _exec_child(n: str, directory: str) -> None:
    gc.collect()
    base = rss_bytes()
    run = build_run(Path(directory) / "run.json", int(n))
    gc.collect()
    built = rss_bytes()
    jorb.Processor(None, make_states(), progress=False).exec(run)
    peak = peak_rss_bytes()
    gc.collect()
    after = rss_bytes()
    if run.counts() != {"done": int(n)}:
        raise SystemExit(f"exec_memory: expected {n} jobs done, got {run.counts()}")
    print(json.dumps({"built": built - base, "peak": peak - base, "after": after - base}))


def _ctx_child(n: str) -> None:
    """What n ctx dicts alone take (the workload's ctx is ``{"i": i}``)."""
    gc.collect()
    before = rss_bytes()
    ctxs = [{"i": i} for i in range(int(n))]
    gc.collect()
    print(json.dumps({"bytes": rss_bytes() - before, "n": len(ctxs)}))


def measure(n: int, runs: int) -> dict[str, Any]:
    ctx = run_child([str(HERE), "--child", "ctx", str(n)])["bytes"]
    samples = []
    for _ in range(runs):
        directory = tempfile.mkdtemp(prefix="jorb-exec-memory-")
        try:
            child = [str(HERE), "--child", "exec", str(n), directory]
            samples.append(run_child(child, timeout=3600))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    result: dict[str, Any] = {"n": n, "runs": runs, "ctx": ctx}
    for key in ("built", "peak", "after"):
        result[key] = median([s[key] for s in samples])
    return result


def render(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        n, ctx = r["n"], r["ctx"]
        rows.append(
            [
                human(n),
                r["runs"],
                f"{(r['built'] - ctx) / n:.0f}",
                f"{(r['peak'] - ctx) / n:.0f}",
                f"{(r['after'] - ctx) / n:.0f}",
                f"{r['peak'] / 2**20:.0f}",
                f"{ctx / n:.0f}",
            ]
        )
    headers = [
        "jobs",
        "runs",
        "before exec B/job",
        "peak B/job",
        "after exec B/job",
        "peak MiB",
        "ctx B/job",
    ]
    return table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", default="100k,1M", help="job counts, e.g. 100k,1M")
    parser.add_argument("--runs", type=int, default=1, help="runs per point (median reported)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        {"exec": _exec_child, "ctx": _ctx_child}[kind](*rest)
        return
    results = [measure(n, args.runs) for n in parse_counts(args.n)]
    report("exec memory", results, render(results), args.json)


if __name__ == "__main__":
    sys.exit(main())
