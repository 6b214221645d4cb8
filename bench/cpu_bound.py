"""CPU-bound execs through threads, jorb.ProcessPool and jorb.dask.DaskPool, interleaved.

    .venv/bin/python bench/cpu_bound.py                      # 2,000 execs of ~1 ms, 3 rounds
    .venv/bin/python bench/cpu_bound.py --n 500 --runs 1 --no-dask

The workload: N jobs, each one ``def`` exec of pure-Python work calibrated here to ``--ms``
milliseconds of CPU (it holds the GIL), ``new -> done``, progress off, durable. Three ways to
run it, one after the other in each round so that all three see the same neighbours' load:

- *threads*: ``State(..., concurrency=C)``, the execs in the processor's threads;
- *process*: the same with ``pool=jorb.ProcessPool(W)``;
- *dask*: ``pool=jorb.dask.DaskPool(address)`` on a local cluster of W single-threaded workers
  (``python -m jorb.dask W``), started once, before the rounds; its start is not timed; at
  ``--dask-concurrency`` (C unless given: README's advice for millisecond execs is 128 times
  the threads, so each worker has its next full task at hand);
- *bare*: no jorb at all, the same work through ``concurrent.futures.ProcessPoolExecutor(W)``
  (``map``, chunks of 16): what W processes can do on this machine at this moment, the ceiling
  the others are read against when the neighbours leave less than W cores.

For each: throughput (execs/s of wall time), *cores used* (CPU seconds of every process
involved, the processor's and the pool's, over the wall time), *overhead per exec* (that CPU
less N times the calibrated exec's own CPU, over N: what running an exec costs beyond the exec)
and the run file's fsyncs per exec (group commits).
Then the *round trip*: N no-op calls straight through ``ProcessPool.call`` with C in flight,
without a processor: CPU µs per call (both sides) and wall µs per call.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import median, report, table

import jorb
from jorb.pool import ProcessPool

DURABLE = True


def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
    ctx["sum"] = sum(i * i for i in range(overall["loops"]))
    return ctx, "done"


def bare(loops: int) -> int:
    return sum(i * i for i in range(loops))


def bare_run(n: int, loops: int, workers: int) -> tuple[float, float]:
    """The work without jorb, in a ProcessPoolExecutor: (wall seconds, CPU seconds)."""
    with concurrent.futures.ProcessPoolExecutor(workers) as executor:
        list(executor.map(bare, [loops] * workers))  # (started before the clock)
        cpu = own_cpu()
        start = time.perf_counter()
        list(executor.map(bare, [loops] * n, chunksize=16))
        wall = time.perf_counter() - start
    return wall, own_cpu() - cpu  # (its processes are reaped: their CPU time is ours)


def noop(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
    return ctx, "done"


def calibrate(ms: float) -> tuple[int, float]:
    """Loops of ``work`` that take about ``ms`` of CPU here, and the CPU seconds they take."""
    loops = 1000
    while True:
        spent = _cpu_of(loops)
        if spent >= 0.02:
            break
        loops *= 2
    loops = max(1, int(loops * ms / 1000 / spent))
    return loops, _cpu_of(loops)


def _cpu_of(loops: int) -> float:
    samples = []
    for _ in range(7):
        start = time.process_time()
        work(None, {"loops": loops}, {})
        samples.append(time.process_time() - start)
    return statistics.median(samples)


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and every live descendant (from /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    family, grew = {pid}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in family} - family
        family |= more
        grew = bool(more)
    return sum(times.get(p, 0.0) for p in family)


def own_cpu() -> float:
    """CPU seconds of this process and of its reaped children (a ProcessPool's, once closed)."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def one(
    mode: str, n: int, loops: int, concurrency: int, pool: Any, cluster: int | None
) -> tuple[float, float, int]:
    """Run N execs one way; return (wall seconds, CPU seconds of every process involved,
    fsyncs of the run file)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = jorb.Run.open(Path(tmp) / "run.json", overall={"loops": loops})
        for i in range(n):
            run.add_job({"i": i})
        states = [
            jorb.State("new", exec=work, concurrency=concurrency, pool=pool),
            jorb.State("done", terminal=True),
        ]
        store = run._holder  # the checkpoint Store: its counters say how many fsyncs it made
        cpu = own_cpu() + (tree_cpu(cluster) if cluster else 0.0)
        start = time.perf_counter()
        jorb.Processor(None, states, progress=False, durable=DURABLE).exec(run)
        wall = time.perf_counter() - start
        cpu = own_cpu() + (tree_cpu(cluster) if cluster else 0.0) - cpu
        if run.counts() != {"done": n}:
            raise SystemExit(f"cpu_bound: {mode}: expected {n} done, got {run.counts()}")
        run.close()
    return wall, cpu, getattr(store, "stats", {}).get("fsyncs", 0)


async def round_trip(n: int, workers: int, in_flight: int) -> tuple[float, float]:
    """N no-op calls through ProcessPool.call; (CPU µs, wall µs) per call."""
    pool = ProcessPool(workers)
    state = jorb.State("new", exec=noop)
    pool.start([state])
    slots = asyncio.Semaphore(in_flight)

    async def call(i: int) -> None:
        async with slots:
            await pool.call(state, (None, {}, {"i": i}))

    cpu = own_cpu()
    start = time.perf_counter()
    await asyncio.gather(*(call(i) for i in range(n)))
    wall = time.perf_counter() - start
    pool.close()  # (reaps the workers: their CPU time is ours from here)
    return (own_cpu() - cpu) / n * 1e6, wall / n * 1e6


def start_cluster(workers: int) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jorb.dask", str(workers)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="execs per measurement")
    parser.add_argument("--runs", type=int, default=3, help="rounds (medians are reported)")
    parser.add_argument("--ms", type=float, default=1.0, help="CPU milliseconds per exec")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--dask-concurrency", type=int, default=None, help="(default: C)")
    parser.add_argument("--no-dask", action="store_true", help="threads and ProcessPool only")
    parser.add_argument("--no-fsync", action="store_true", help="durable=False")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    global DURABLE
    DURABLE = not args.no_fsync
    if not args.no_dask:
        from jorb.dask import DaskPool

    loops, exec_cpu = calibrate(args.ms)
    modes = ["threads", "process"] + ([] if args.no_dask else ["dask"]) + ["bare"]
    cluster, address = (None, "") if args.no_dask else start_cluster(args.workers)
    samples: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    trips: list[tuple[float, float]] = []
    fsyncs: dict[str, list[int]] = {m: [] for m in modes}
    try:
        for _ in range(args.runs):
            for mode in modes:
                if mode == "bare":
                    samples[mode].append(bare_run(args.n, loops, args.workers))
                    continue
                pool: Any = None
                if mode == "process":
                    pool = jorb.ProcessPool(args.workers)
                elif mode == "dask":
                    pool = DaskPool(address)
                tree = cluster.pid if mode == "dask" and cluster else None
                concurrency = args.concurrency
                if mode == "dask" and args.dask_concurrency:
                    concurrency = args.dask_concurrency
                wall, cpu, synced = one(mode, args.n, loops, concurrency, pool, tree)
                samples[mode].append((wall, cpu))
                fsyncs[mode].append(synced)
            trips.append(asyncio.run(round_trip(args.n, args.workers, args.concurrency)))
    finally:
        if cluster is not None:
            assert cluster.stdin is not None
            cluster.stdin.close()
            cluster.wait()

    results: dict[str, Any] = {
        "n": args.n,
        "exec_cpu_ms": exec_cpu * 1e3,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "dask_concurrency": args.dask_concurrency or args.concurrency,
    }
    base = median([args.n / wall for wall, _ in samples["threads"]])
    rows = []
    for mode in modes:
        rate = median([args.n / wall for wall, _ in samples[mode]])
        cores = median([cpu / wall for wall, cpu in samples[mode]])
        overhead = median([(cpu / args.n - exec_cpu) * 1e6 for _, cpu in samples[mode]])
        ratios = _ratios(samples[mode], samples["threads"])
        of_bare = _ratios(samples[mode], samples["bare"])
        results[mode] = {
            "execs_per_s": rate,
            "cores": cores,
            "overhead_us": overhead,
            "vs_threads": median(ratios),
            "vs_bare": median(of_bare),
            "fsyncs_per_exec": median([f / args.n for f in fsyncs[mode]] or [0.0]),
        }
        rows.append(
            [
                mode,
                f"{rate:,.0f}",
                f"{median(ratios):.2f}×",
                f"{median(of_bare):.2f}×",
                f"{cores:.2f}",
                f"{overhead:.0f}",
                f"{results[mode]['fsyncs_per_exec']:.2f}",
            ]
        )
    trip_cpu, trip_wall = median([t[0] for t in trips]), median([t[1] for t in trips])
    results["round_trip"] = {"cpu_us": trip_cpu, "wall_us": trip_wall}
    markdown = table(
        [
            "executor",
            "execs/s",
            "vs threads",
            "vs bare",
            "cores used",
            "overhead µs/exec",
            "fsyncs/exec",
        ],
        rows,
    ) + (
        f"\n\nexec: {exec_cpu * 1e3:.2f} ms of CPU; {args.workers} workers, concurrency "
        f"{args.concurrency} (dask {args.dask_concurrency or args.concurrency}); thread "
        f"baseline {base:,.0f} execs/s (median of {args.runs}).\n"
        f"ProcessPool round trip (no processor): {trip_cpu:.0f} CPU µs, {trip_wall:.0f} wall µs "
        f"per call."
    )
    report("cpu_bound", results, markdown, args.json)


def _ratios(these: list[tuple[float, float]], base: list[tuple[float, float]]) -> list[float]:
    """Throughput over the base's, round by round (measured minutes apart at most)."""
    return [bwall / wall for (wall, _), (bwall, _) in zip(these, base, strict=True)]


if __name__ == "__main__":
    main()
