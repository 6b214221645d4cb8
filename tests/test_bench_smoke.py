"""The benchmark scripts still run (tiny N): a smoke test, never a timed assertion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_engine_bench_moves_every_job_and_prints_a_row_per_size(tmp_path: Path) -> None:
    out = _run("engine.py", "--n", "200,300", "--runs", "1", "--dir", str(tmp_path))
    rows = [line for line in out.splitlines() if line.startswith("| ") and "jobs" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["200", "300"]
    assert "durable/floor" in out and "no-fsync/floor" in out


def test_engine_bench_json_counts_three_transitions_per_job(tmp_path: Path) -> None:
    out = _run("engine.py", "--n", "100", "--runs", "1", "--dir", str(tmp_path), "--json")
    (result,) = json.loads(out.splitlines()[-1])
    assert result["transitions"] == 300
    assert result["durable_s"] > 0 and result["floor_s"] > 0


def test_reopen_bench_replays_a_real_crash_journal(tmp_path: Path) -> None:
    out = _run(
        "reopen.py",
        "--n",
        "1000",
        "--journal",
        "200",
        "--runs",
        "1",
        "--dir",
        str(tmp_path),
        "--json",
    )
    result = json.loads(out.splitlines()[-1])
    assert result["clean"]["jobs"] == result["crashed"]["jobs"] == 1000
    assert result["journal_records"] >= 200  # the SIGKILLed process left them unfolded
    assert result["crashed"]["seconds"] > 0


def test_exec_memory_bench_reports_the_peak_of_an_exec() -> None:
    out = _run("exec_memory.py", "--n", "300", "--json")
    (result,) = json.loads(out.splitlines()[-1])
    assert result["n"] == 300 and result["runs"] == 1  # (the child exits 1 unless all are "done")
    assert result["peak"] > 0


def test_breakdown_bench_splits_the_cpu_of_an_exec() -> None:
    out = _run("breakdown.py", "--n", "300", "--runs", "1", "--json")
    results = json.loads(out.splitlines()[-1])
    assert [r["durable"] for r in results] == [True, False]
    for r in results:  # (each child exits 1 unless every job ended "done")
        assert r["cpu"] > 0 and 0 < r["snapshots"] < r["cpu"]


def test_io_bound_bench_runs_the_floor_and_jorb_and_counts_execs_in_flight(
    tmp_path: Path,
) -> None:
    out = _run(
        "io_bound.py",
        "--n",
        "300",
        "--concurrency",
        "50",
        "--sleep",
        "0.01",
        "--runs",
        "1",
        "--dir",
        str(tmp_path),
        "--json",
    )
    (result,) = json.loads(out.splitlines()[-1])  # (it exits 1 unless every job is "done")
    assert result["transitions"] == 900
    assert abs(result["ideal_s"] - 0.08) < 1e-9  # 6 waves of 10 ms in the first state, then 2 more
    for key in ("floor", "jorb"):
        assert result[f"{key}_wall"] > 0
        assert 0 < result[f"{key}_in_flight"] <= 3 * 50


def test_add_jobs_bench_adds_in_bulk_and_one_at_a_time(tmp_path: Path) -> None:
    out = _run("add_jobs.py", "--n", "500", "--runs", "1", "--dir", str(tmp_path), "--json")
    (result,) = json.loads(out.splitlines()[-1])  # (it exits 1 unless all jobs were added)
    assert result["n"] == 500
    assert result["bulk_add_s"] > 0 and result["loop_add_s"] > 0


def test_cpu_bound_bench_runs_threads_and_both_pools() -> None:
    out = _run("cpu_bound.py", "--n", "100", "--runs", "1", "--ms", "0.2", "--json")
    result = json.loads(out.splitlines()[-1])
    for mode in ("threads", "process", "dask"):  # (each run exits 1 unless every job is done)
        assert result[mode]["execs_per_s"] > 0 and result[mode]["cores"] >= 0
    assert result["round_trip"]["cpu_us"] > 0


def test_queue_basics_bench_polls_and_compares_executors() -> None:
    out = _run("queue_basics.py", "--runs", "1", "--execs", "50", "--json")
    result = json.loads(out.splitlines()[-1])
    by_next = [row for row in result["polls"] if row["next"]]
    assert all(row["history"] == row["jobs"] for row in by_next)  # one entry each: the exit
    assert result["threads"][0]["case"].startswith("no-op def execs")


def test_checksum_bench_measures_with_and_without_the_crc() -> None:
    out = _run("checksum_cost.py", "--n", "300", "--rounds", "1")
    assert "| durable |" in out and "| nofsync |" in out and "frame():" in out


def test_warm_memory_touches_what_it_is_asked_to() -> None:
    out = _run("warm_memory.py", "--gb", "0.01")
    assert out.startswith("touched 0.0 GB") and "µs a page" in out
