"""bench/checkpoint_cost.py still runs (tiny sizes): a smoke test, never a timed assertion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent / "bench" / "checkpoint_cost.py"


def _bench(tmp_path: Path, *args: str) -> tuple[str, list[dict[str, Any]]]:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--runs", "1", "--dir", str(tmp_path), "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(proc.stdout.splitlines()[-1])


def test_bytes_per_transition_do_not_grow_with_the_run(tmp_path: Path) -> None:
    out, points = _bench(tmp_path, "--sizes", "200,2000", "--transitions", "1000")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "jobs" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["200", "200", "2k", "2k"]
    small, large = points[0], points[2]
    assert small["transitions"] == large["transitions"] == 1000
    # One short record per transition whatever the size (ids grow by a digit or two).
    assert 100 < small["journal_b"] < 400
    assert abs(large["journal_b"] - small["journal_b"]) < 5
    assert large["snapshot_mb"] > 5 * small["snapshot_mb"]
    assert all(p["fsyncs"] < 1 for p in points if p["durable"]), "group commit batches"
    assert not list(tmp_path.iterdir()), "the bench cleans up its files"


def test_compactions_in_the_window_are_counted_in_the_amortized_bytes(tmp_path: Path) -> None:
    # 20k records of ~225 bytes outgrow the 4 MiB threshold once.
    _, (point,) = _bench(tmp_path, "--sizes", "300", "--transitions", "20k", "--durable", "off")
    assert point["compactions"] >= 1
    assert point["amortized_b"] > point["journal_b"]
    assert abs(point["amortized_b"] - point["wchar_b"]) < 0.05 * point["wchar_b"]
