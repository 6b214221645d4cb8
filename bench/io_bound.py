"""I/O-bound execs: N jobs through 3 states, each exec ``await asyncio.sleep(0.05)``, durable.

    .venv/bin/python bench/io_bound.py                  # N = 20k, concurrency 1,000; 3 runs
    .venv/bin/python bench/io_bound.py --n 2k --runs 5  # quicker
    .venv/bin/python bench/io_bound.py --fsync-thread   # the journal's fsync off the loop

Each state has ``concurrency=1000``; jorb is measured durable (fsync per group commit), progress
off. The pipelined ideal is what the sleeps alone allow: the first state runs N / concurrency
waves of ``sleep`` seconds, and each later state finishes one sleep after the one before it
(1.10 s for 20k jobs). The floor, in the same process and interleaved with jorb, is bare asyncio:
3 stages of ``concurrency`` workers over an ``asyncio.Queue``, the same sleep per step, no
durability. Reported: wall seconds and their ratio to the ideal, CPU seconds, and the mean
number of execs in flight (the time integral of execs sleeping, over the wall time; at most
3 × concurrency). Medians over the runs.
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

from common import human, median, parse_counts, report, table

import jorb
import jorb.checkpoint

STATES = ("new", "a", "b")
NEXT = {"new": "a", "a": "b", "b": "done"}


class InFlight:
    """Counts execs sleeping at once and integrates that count over time."""

    def __init__(self) -> None:
        self.now = 0
        self.area = 0.0
        self.last = time.perf_counter()

    def change(self, by: int) -> None:
        t = time.perf_counter()
        self.area += self.now * (t - self.last)
        self.last = t
        self.now += by


def ideal_seconds(n: int, concurrency: int, sleep: float) -> float:
    waves = -(-n // concurrency)
    return (waves + len(STATES) - 1) * sleep


# -- the floor: asyncio and nothing else --------------------------------------------------------


async def _floor(n: int, concurrency: int, sleep: float, flight: InFlight) -> None:
    queues: list[asyncio.Queue[dict[str, Any]]] = [asyncio.Queue() for _ in STATES]
    finished = asyncio.get_running_loop().create_future()
    left = n

    async def worker(stage: int) -> None:
        nonlocal left
        inbox = queues[stage]
        outbox = queues[stage + 1] if stage + 1 < len(STATES) else None
        while True:
            ctx = await inbox.get()
            flight.change(1)
            await asyncio.sleep(sleep)
            flight.change(-1)
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
        for _ in range(concurrency)
    ]
    await finished
    for task in workers:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)


def floor_run(n: int, concurrency: int, sleep: float) -> dict[str, float]:
    flight = InFlight()
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    asyncio.run(_floor(n, concurrency, sleep, flight))
    wall = time.perf_counter() - start
    return {"wall": wall, "cpu": time.process_time() - cpu, "in_flight": flight.area / wall}


# -- jorb ---------------------------------------------------------------------------------------


def _exec_to(next_state: str, sleep: float, flight: InFlight) -> Any:
    async def step(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        flight.change(1)
        await asyncio.sleep(sleep)
        flight.change(-1)
        return ctx, next_state

    step.__name__ = f"to_{next_state}"
    return step


def jorb_run(n: int, concurrency: int, sleep: float, workdir: Path) -> dict[str, float]:
    path = workdir / f"io-{n}.json"
    for p in workdir.glob(path.name + "*"):
        p.unlink()
    flight = InFlight()
    states = [
        *(
            jorb.State(s, exec=_exec_to(NEXT[s], sleep, flight), concurrency=concurrency)
            for s in STATES
        ),
        jorb.State("done", terminal=True),
    ]
    run = jorb.Run.open(path)
    for i in range(n):
        run.add_job({"i": i})
    processor = jorb.Processor(None, states, progress=False, durable=True)
    store = run._holder
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    processor.exec(run)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    counts = run.counts()
    run.close()
    if counts != {"done": n}:
        raise SystemExit(f"bench/io_bound.py: expected {n} jobs done, got {counts}")
    fsyncs = float(getattr(store, "stats", {}).get("fsyncs", 0))
    return {"wall": wall, "cpu": cpu, "in_flight": flight.area / wall, "fsyncs": fsyncs}


# -- driver -------------------------------------------------------------------------------------


def measure(n: int, runs: int, concurrency: int, sleep: float, workdir: Path) -> dict[str, Any]:
    samples: dict[str, list[dict[str, float]]] = {"floor": [], "jorb": []}
    for _ in range(runs):  # interleaved, so drift hits both alike
        samples["floor"].append(floor_run(n, concurrency, sleep))
        samples["jorb"].append(jorb_run(n, concurrency, sleep, workdir))
    ideal = ideal_seconds(n, concurrency, sleep)
    result: dict[str, Any] = {
        "n": n,
        "runs": runs,
        "concurrency": concurrency,
        "sleep": sleep,
        "transitions": n * len(STATES),
        "ideal_s": ideal,
    }
    for key, rows in samples.items():
        for field in rows[0]:
            result[f"{key}_{field}"] = median([row[field] for row in rows])
        result[f"{key}_all"] = [round(row["wall"], 3) for row in rows]
    return result


def render(results: list[dict[str, Any]]) -> str:
    rows = [
        [
            human(r["n"]),
            r["runs"],
            r["concurrency"],
            f"{r['ideal_s']:.2f}",
            f"{r['floor_wall']:.2f}",
            f"{r['floor_wall'] / r['ideal_s']:.2f}×",
            f"{r['floor_in_flight']:.0f}",
            f"{r['floor_cpu']:.2f}",
            f"{r['jorb_wall']:.2f}",
            f"{r['jorb_wall'] / r['ideal_s']:.2f}×",
            f"{r['jorb_in_flight']:.0f}",
            f"{r['jorb_cpu']:.2f}",
            f"{r['jorb_fsyncs']:.0f}",
        ]
        for r in results
    ]
    headers = [
        "jobs",
        "runs",
        "concurrency",
        "ideal s",
        "floor s",
        "floor/ideal",
        "floor in flight",
        "floor CPU s",
        "jorb s",
        "jorb/ideal",
        "jorb in flight",
        "jorb CPU s",
        "fsyncs",
    ]
    return table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", default="20k", help="job counts, e.g. 2k,20k")
    parser.add_argument("--runs", type=int, default=3, help="runs per point (median reported)")
    parser.add_argument("--concurrency", type=int, default=1000, help="per state")
    parser.add_argument("--sleep", type=float, default=0.05, help="seconds each exec sleeps")
    parser.add_argument("--dir", type=Path, help="where run files go (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument(
        "--fsync-thread", action="store_true", help="fsync the journal on the store's thread"
    )
    args = parser.parse_args(argv)
    if args.fsync_thread:
        jorb.checkpoint.FSYNC_ON_LOOP = False
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="jorb-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = [
            measure(n, args.runs, args.concurrency, args.sleep, workdir)
            for n in parse_counts(args.n)
        ]
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report("I/O-bound execs", results, render(results), args.json)


if __name__ == "__main__":
    main()
