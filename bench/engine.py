"""Engine overhead: N no-op jobs through 3 states, against a bare-asyncio floor.

    .venv/bin/python bench/engine.py                  # N = 10k, 100k; 3 runs each
    .venv/bin/python bench/engine.py --n 1M --runs 1  # the 1M point (a few minutes, ~3 GB)
    .venv/bin/python bench/engine.py --n 100k --dir /dev/shm/jorb-bench  # fsync ~free (tmpfs)

The workload: every job goes new -> a -> b -> done, each exec an ``async def`` that returns at
once, each state ``concurrency=64``, progress off. jorb is measured durable (fsync per group
commit) and with ``durable=False``; the time is ``processor.exec(run)`` on the wall clock, so it
includes the first snapshot and the final compaction a user also waits for. The floor, measured
in the same process, is what asyncio alone costs: 3 stages, each 64 workers over an
``asyncio.Queue``, the same no-op coroutine per step, no durability. Runs are interleaved
(floor, durable, no-fsync, floor, ...) and medians reported, with the ratio to the floor; the
"CPU µs/tr" columns give process CPU time per transition, steadier than the wall clock on a
machine shared with other work. Use ``PYTHONPATH=/path/to/other/checkout`` to measure another
version of jorb with the same script.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import human, median, parse_counts, rate, report, table

import jorb

STATES = ("new", "a", "b")
NEXT = {"new": "a", "a": "b", "b": "done"}
CONCURRENCY = 64


# -- the floor: asyncio and nothing else --------------------------------------------------------


async def _noop(ctx: dict[str, Any], next_state: str) -> tuple[dict[str, Any], str]:
    return ctx, next_state


async def _floor(n: int) -> None:
    queues: list[asyncio.Queue[dict[str, Any]]] = [asyncio.Queue() for _ in STATES]
    finished = asyncio.get_running_loop().create_future()
    left = n

    async def worker(stage: int) -> None:
        nonlocal left
        inbox = queues[stage]
        outbox = queues[stage + 1] if stage + 1 < len(STATES) else None
        next_state = NEXT[STATES[stage]]
        while True:
            ctx = await inbox.get()
            ctx, _ = await _noop(ctx, next_state)
            if outbox is not None:
                outbox.put_nowait(ctx)
            else:
                left -= 1
                if left == 0:
                    finished.set_result(None)

    for i in range(n):
        queues[0].put_nowait({"i": i})
    workers = [
        asyncio.create_task(worker(stage))
        for stage in range(len(STATES))
        for _ in range(CONCURRENCY)
    ]
    await finished
    for task in workers:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)


def floor_seconds(n: int) -> tuple[float, float]:
    """Wall and CPU seconds of one floor run."""
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    asyncio.run(_floor(n))
    return time.perf_counter() - start, time.process_time() - cpu


# -- jorb ---------------------------------------------------------------------------------------


def _exec_to(next_state: str) -> Any:
    async def step(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        return ctx, next_state

    step.__name__ = f"to_{next_state}"
    return step


def make_states() -> list[jorb.State]:
    return [
        *(jorb.State(s, exec=_exec_to(NEXT[s]), concurrency=CONCURRENCY) for s in STATES),
        jorb.State("done", terminal=True),
    ]


def build_run(path: Path, n: int) -> jorb.Run:
    run = jorb.Run.open(path)
    for i in range(n):
        run.add_job({"i": i})
    return run


def jorb_seconds(n: int, *, durable: bool, workdir: Path) -> tuple[float, dict[str, Any]]:
    """One timed exec of a fresh n-job run: wall seconds, and the store's counters + CPU."""
    path = workdir / f"engine-{n}-{int(durable)}.json"
    for p in workdir.glob(path.name + "*"):
        p.unlink()
    run = build_run(path, n)
    processor = jorb.Processor(None, make_states(), progress=False, durable=durable)
    store = run._holder  # the checkpoint Store: its counters say how many fsyncs it made
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    processor.exec(run)
    seconds = time.perf_counter() - start
    stats = dict(getattr(store, "stats", {}), cpu_s=time.process_time() - cpu)
    counts = run.counts()
    run.close()
    if counts != {"done": n}:
        raise SystemExit(f"bench/engine.py: expected {n} jobs done, got {counts}")
    del run, processor
    gc.collect()
    return seconds, stats


# -- driver -------------------------------------------------------------------------------------


def measure(n: int, runs: int, workdir: Path) -> dict[str, Any]:
    walls: dict[str, list[float]] = {"floor": [], "durable": [], "nondurable": []}
    cpus: dict[str, list[float]] = {"floor": [], "durable": [], "nondurable": []}
    stats: dict[str, Any] = {}
    for _ in range(runs):  # interleaved, so drift hits every column alike
        wall, cpu = floor_seconds(n)
        walls["floor"].append(wall)
        cpus["floor"].append(cpu)
        for key, durable in (("durable", True), ("nondurable", False)):
            wall, counters = jorb_seconds(n, durable=durable, workdir=workdir)
            walls[key].append(wall)
            cpus[key].append(counters["cpu_s"])
            if durable:
                stats = counters
    result: dict[str, Any] = {"n": n, "runs": runs, "transitions": n * len(STATES)}
    for key in walls:
        result[f"{key}_s"] = median(walls[key])
        result[f"{key}_cpu_s"] = median(cpus[key])
        result[f"{key}_all"] = [round(w, 3) for w in walls[key]]
    result["fsyncs"] = stats.get("fsyncs", 0)
    result["snapshots"] = stats.get("snapshots", 0)
    return result


def render(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        t = r["transitions"]
        rows.append(
            [
                human(r["n"]),
                r["runs"],
                f"{r['floor_s']:.2f}",
                rate(t / r["floor_s"]),
                f"{r['durable_s']:.2f}",
                rate(t / r["durable_s"]),
                f"{r['durable_s'] / r['floor_s']:.1f}×",
                f"{r['nondurable_s']:.2f}",
                rate(t / r["nondurable_s"]),
                f"{r['nondurable_s'] / r['floor_s']:.1f}×",
                f"{t / max(1, r['fsyncs']):.0f}",
                f"{r['floor_cpu_s'] / t * 1e6:.1f}",
                f"{r['durable_cpu_s'] / t * 1e6:.1f}",
                f"{r['nondurable_cpu_s'] / t * 1e6:.1f}",
            ]
        )
    headers = [
        "jobs",
        "runs",
        "floor s",
        "floor tr/s",
        "durable s",
        "durable tr/s",
        "durable/floor",
        "no-fsync s",
        "no-fsync tr/s",
        "no-fsync/floor",
        "tr/fsync",
        "floor CPU µs/tr",
        "durable CPU µs/tr",
        "no-fsync CPU µs/tr",
    ]
    return table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", default="10k,100k", help="job counts, e.g. 10k,100k,1M")
    parser.add_argument("--runs", type=int, default=3, help="runs per point (median reported)")
    parser.add_argument("--dir", type=Path, help="where run files go (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = parser.parse_args(argv)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="jorb-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = [measure(n, args.runs, workdir) for n in parse_counts(args.n)]
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report("engine overhead", results, render(results), args.json)


if __name__ == "__main__":
    main()
