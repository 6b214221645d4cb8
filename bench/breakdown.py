"""Where an exec's time goes: CPU per transition, split into snapshots, cyclic GC and the rest.

    .venv/bin/python bench/breakdown.py                      # 100k jobs, 3 runs
    .venv/bin/python bench/breakdown.py --n 1M --runs 1
    .venv/bin/python bench/breakdown.py --dir /dev/shm/jorb  # fsync ~free (tmpfs)

The engine benchmark's workload (N jobs ``new -> a -> b -> done``, no-op ``async def`` execs,
``concurrency=64``, progress off), durable and not, each run in a fresh process. Only
``processor.exec(run)`` is measured (building the jobs is not), in the run of median CPU: its
process CPU time per transition, and within it the CPU spent writing snapshots (the first
checkpoint, the compactions, the final fold: ``Store._write_snapshot``) and the wall time of
the cyclic garbage collector's collections by generation (``gc.callbacks``). The rest is the
loop: workers, execs, records, the journal. Use ``PYTHONPATH=/path/to/other/checkout`` to measure
another version of jorb with the same script.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import human, parse_counts, report, run_child, table
from engine import build_run, make_states

import jorb
import jorb.checkpoint

HERE = Path(__file__).resolve()


def _child(n: str, durable: str, directory: str) -> None:
    jobs, spent = int(n), {"snapshots": 0.0, "gen0": 0.0, "gen1": 0.0, "gen2": 0.0}
    run = build_run(Path(directory) / "run.json", jobs)
    store = jorb.checkpoint.Store
    write_snapshot = store._write_snapshot

    def timed_snapshot(self: Any, run: jorb.Run, finish: bool) -> None:
        start = time.process_time()
        try:
            write_snapshot(self, run, finish)
        finally:
            spent["snapshots"] += time.process_time() - start

    started = [0.0]

    def collection(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            spent[f"gen{info['generation']}"] += time.perf_counter() - started[0]

    store._write_snapshot = timed_snapshot  # type: ignore[method-assign]
    gc.collect()
    gc.callbacks.append(collection)
    start = time.process_time()
    jorb.Processor(None, make_states(), progress=False, durable=durable == "1").exec(run)
    cpu = time.process_time() - start
    gc.callbacks.remove(collection)
    if run.counts() != {"done": jobs}:
        raise SystemExit(f"breakdown: expected {jobs} jobs done, got {run.counts()}")
    print(json.dumps({"cpu": cpu, **spent}))


def measure(n: int, runs: int, durable: bool, workdir: Path) -> dict[str, Any]:
    samples = []
    for _ in range(runs):
        directory = Path(tempfile.mkdtemp(prefix="jorb-breakdown-", dir=workdir))
        try:
            child = [str(HERE), "--child", str(n), str(int(durable)), str(directory)]
            samples.append(run_child(child, timeout=3600))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    # The run of median CPU, whole (medians taken part by part would not add up).
    middle = sorted(samples, key=lambda s: s["cpu"])[len(samples) // 2]
    transitions = 3 * n
    result: dict[str, Any] = {"n": n, "runs": runs, "durable": durable}
    for key, seconds in middle.items():
        result[key] = seconds / transitions * 1e6  # µs per transition
    return result


def render(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        gc_total = r["gen0"] + r["gen1"] + r["gen2"]
        rest = r["cpu"] - r["snapshots"] - gc_total
        rows.append(
            [
                human(r["n"]),
                "fsync" if r["durable"] else "no fsync",
                r["runs"],
                f"{r['cpu']:.2f}",
                f"{r['snapshots']:.2f}",
                f"{gc_total:.2f}",
                f"{r['gen2']:.2f}",
                f"{rest:.2f}",
            ]
        )
    headers = ["jobs", "mode", "runs", "CPU µs/tr", "snapshots", "GC", "of it full", "the rest"]
    return table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", default="100k", help="job counts, e.g. 100k,1M")
    parser.add_argument("--runs", type=int, default=3, help="runs per point (median reported)")
    parser.add_argument("--dir", type=Path, help="where run files go (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return
    workdir = args.dir or Path(tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    results = [
        measure(n, args.runs, durable, workdir)
        for n in parse_counts(args.n)
        for durable in (True, False)
    ]
    report("where the time goes", results, render(results), args.json)


if __name__ == "__main__":
    sys.exit(main())
