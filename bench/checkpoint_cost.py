"""Checkpoint cost per transition: bytes written and time, at run sizes 10k and 1M jobs.

    .venv/bin/python bench/checkpoint_cost.py                       # 10k and 1M, 3 runs each
    .venv/bin/python bench/checkpoint_cost.py --sizes 10k --transitions 200k   # see compactions

What is measured is the checkpoint alone, driven the way the processor drives it: 64 workers on
one event loop each build a transition record (the job's new state, ctx and history entry),
apply it to the run and await ``Store.append`` (group commit: a batch per write + fsync). The run
is flat (every job a root) and already on disk; the first snapshot is timed apart ("snapshot"
columns: what one compaction costs at that size). Bytes come from ``Store.stats`` (journal and
snapshot bytes jorb wrote) and from ``/proc/self/io`` (``wchar``: bytes handed to write(2);
``write_bytes``: bytes the kernel sent to the disk, page-cache flushes of earlier runs
included, so noisy). Time is wall clock over the whole window, divided by the transitions.

A compaction rewrites the snapshot once the journal outgrows it (and 4 MiB), so its cost per
transition is at most the journal's: "amortized" adds ``snapshot bytes / transitions between two
compactions`` (measured when the window holds compactions, else computed from the threshold).
Rewriting the whole run per transition instead would cost the "snapshot" bytes every time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from common import human, machine_line, median, parse_counts, table

import jorb
from jorb import checkpoint
from jorb.checkpoint import Store
from jorb.model import apply_record

WORKERS = 64
CYCLE = {"a": "b", "b": "c", "c": "a"}


def io_counters() -> dict[str, int]:
    """This process's /proc/self/io counters (zeros where /proc is missing)."""
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
    except OSError:
        return {"wchar": 0, "write_bytes": 0}
    return {key: int(value) for key, value in (line.split(": ") for line in lines)}


def build(path: Path, n: int) -> jorb.Run:
    """A flat run of ``n`` jobs in state "a", each with a small ctx."""
    run = jorb.Run(path, {"workdir": "/tmp/w"})
    for i in range(1, n + 1):
        ctx = {"repo": f"org/repo-{i:07d}", "path": f"/tmp/w/repo-{i:07d}"}
        run.jobs[str(i)] = jorb.Job(str(i), "a", ctx)
    run.next_id = n + 1
    return run


async def transitions(run: jorb.Run, store: Store, count: int) -> None:
    """``count`` transitions by ``WORKERS`` workers, each awaiting its record's commit."""
    jobs = list(run.jobs.values())
    taken = 0

    async def worker() -> None:
        nonlocal taken
        while taken < count:
            job = jobs[taken % len(jobs)]
            taken += 1
            to = CYCLE[job.state]
            now = time.time()
            record = {
                "job": job.id,
                "to": to,
                "ctx": {**job.ctx, "step": len(job.history) + 1},
                "attempts": 0,
                "throttled": 0,
                "not_before": None,
                "history": {"from": job.state, "to": to, "time": now, "duration": 0.001},
                "seq": run.seq + 1,
            }
            data = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
            apply_record(run, record)
            await store.append(data)

    await asyncio.gather(*(worker() for _ in range(WORKERS)))


def measure(n: int, count: int, durable: bool, folder: Path) -> dict[str, Any]:
    """One run: a fresh n-job run, its first snapshot, then ``count`` transitions."""
    path = folder / f"bench-{n}.json"
    run = build(path, n)
    store = Store(path, durable=durable)
    try:
        gc.collect()
        start = time.perf_counter()
        store.begin(run)
        snapshot_s = time.perf_counter() - start
        snapshot_bytes = store.stats["snapshot_bytes"]
        before, io_before = dict(store.stats), io_counters()
        gc.collect()
        start = time.perf_counter()
        asyncio.run(transitions(run, store, count))
        seconds = time.perf_counter() - start
        io_after = io_counters()
        delta = {key: store.stats[key] - before[key] for key in store.stats}
    finally:
        store.close()
        for file in folder.iterdir():
            file.unlink()
    journal = delta["journal_bytes"] / count
    if delta["snapshots"]:
        amortized = journal + delta["snapshot_bytes"] / count
    else:  # no compaction in the window: one every `threshold` bytes of journal
        threshold = max(checkpoint.MIN_COMPACT_BYTES, checkpoint.COMPACT_RATIO * snapshot_bytes)
        amortized = journal + snapshot_bytes / (threshold / journal)
    return {
        "jobs": n,
        "transitions": count,
        "durable": durable,
        "us": seconds / count * 1e6,
        "journal_b": journal,
        "amortized_b": amortized,
        "wchar_b": (io_after["wchar"] - io_before["wchar"]) / count,
        "disk_b": (io_after["write_bytes"] - io_before["write_bytes"]) / count,
        "fsyncs": delta["fsyncs"] / count,
        "compactions": delta["snapshots"],
        "snapshot_mb": snapshot_bytes / 1e6,
        "snapshot_s": snapshot_s,
    }


def medians(results: list[dict[str, Any]]) -> dict[str, Any]:
    first = results[0]
    return {
        key: (median([r[key] for r in results]) if isinstance(value, float) else value)
        for key, value in first.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10k,1M", help="run sizes in jobs, e.g. 10k,1M")
    parser.add_argument("--transitions", default="50k", help="transitions measured per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per point (medians shown)")
    parser.add_argument("--durable", choices=["both", "on", "off"], default="both")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: /tmp)")
    parser.add_argument("--json", action="store_true", help="also print the medians as JSON")
    args = parser.parse_args()
    (count,) = parse_counts(args.transitions)
    modes = {"both": [True, False], "on": [True], "off": [False]}[args.durable]
    folder = Path(tempfile.mkdtemp(prefix="jorb-ckpt-", dir=args.dir))
    rows, points = [], []
    try:
        for n in parse_counts(args.sizes):
            for durable in modes:
                point = medians([measure(n, count, durable, folder) for _ in range(args.runs)])
                points.append(point)
                rows.append(
                    [
                        human(n),
                        "fsync" if durable else "no fsync",
                        f"{point['us']:.1f}",
                        f"{point['journal_b']:.0f}",
                        f"{point['amortized_b']:.0f}",
                        f"{point['wchar_b']:.0f}",
                        f"{point['disk_b']:.0f}",
                        f"{point['fsyncs']:.3f}",
                        str(point["compactions"]),
                        f"{point['snapshot_mb']:.1f}",
                        f"{point['snapshot_s']:.2f}",
                    ]
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(machine_line())
    print(f"{human(count)} transitions per run, {WORKERS} workers, median of {args.runs} runs\n")
    headers = [
        "jobs",
        "mode",
        "µs/transition",
        "journal B/tr",
        "amortized B/tr",
        "write() B/tr",
        "disk B/tr",
        "fsyncs/tr",
        "compactions",
        "snapshot MB",
        "snapshot s",
    ]
    print(table(headers, rows))
    if args.json:
        print(json.dumps(points))


if __name__ == "__main__":
    main()
