"""Setting a run up: N jobs added to a new run, in bulk and one at a time.

    .venv/bin/python bench/add_jobs.py                 # N = 1M; 3 runs
    .venv/bin/python bench/add_jobs.py --n 100k --runs 5

Timed on the wall clock: ``jorb.Run.open`` of a new file plus ``run.add_jobs(ctxs)`` (the bulk
path), against ``Run.open`` plus ``run.add_job(ctx)`` in a loop; then ``run.save()`` of the
result (the first snapshot, which ``exec`` otherwise writes when it starts). The ctxs
(``{"i": i}``) exist before the clock starts. Runs interleaved, medians reported.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import human, median, parse_counts, report, table

import jorb


def one(n: int, bulk: bool, workdir: Path) -> dict[str, float]:
    path = workdir / f"add-{n}-{int(bulk)}.json"
    for p in workdir.glob(path.name + "*"):
        p.unlink()
    ctxs = [{"i": i} for i in range(n)]
    gc.collect()
    start = time.perf_counter()
    run = jorb.Run.open(path)
    if bulk:
        run.add_jobs(ctxs)
    else:
        for ctx in ctxs:
            run.add_job(ctx)
    added = time.perf_counter() - start
    start = time.perf_counter()
    run.save()
    saved = time.perf_counter() - start
    run.close()
    if len(run.jobs) != n:
        raise SystemExit(f"bench/add_jobs.py: expected {n} jobs, got {len(run.jobs)}")
    del run, ctxs
    gc.collect()
    return {"add": added, "save": saved}


def measure(n: int, runs: int, workdir: Path) -> dict[str, Any]:
    rows: dict[str, list[dict[str, float]]] = {"bulk": [], "loop": []}
    for _ in range(runs):
        rows["bulk"].append(one(n, True, workdir))
        rows["loop"].append(one(n, False, workdir))
    result: dict[str, Any] = {"n": n, "runs": runs}
    for key, samples in rows.items():
        result[f"{key}_add_s"] = median([s["add"] for s in samples])
        result[f"{key}_save_s"] = median([s["save"] for s in samples])
    return result


def render(results: list[dict[str, Any]]) -> str:
    rows = [
        [
            human(r["n"]),
            r["runs"],
            f"{r['bulk_add_s']:.2f}",
            f"{r['bulk_add_s'] / r['n'] * 1e6:.2f}",
            f"{r['loop_add_s']:.2f}",
            f"{r['loop_add_s'] / r['n'] * 1e6:.2f}",
            f"{r['bulk_save_s']:.2f}",
        ]
        for r in results
    ]
    headers = [
        "jobs",
        "runs",
        "open + add_jobs s",
        "µs/job",
        "open + add_job loop s",
        "µs/job",
        "save s",
    ]
    return table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", default="1M", help="job counts, e.g. 100k,1M")
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
    report("adding jobs", results, render(results), args.json)


if __name__ == "__main__":
    main()
