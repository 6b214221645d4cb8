"""The chaos harness (bench/chaos.py), short: real processes killed by real signals at random
points of a workflow with kicks, fan-in and retries, every invariant checked after each kill.
The long run's figures are in RELIABILITY.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import jorb

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import chaos  # noqa: E402


@pytest.mark.parametrize("pool", [[], ["--pool"]], ids=["on the loop", "in a ProcessPool"])
def test_a_short_chaos_run_finds_nothing_lost_duplicated_or_locked(
    tmp_path: Path, pool: list[str]
) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "chaos.py"),
            "--kills",
            "8",
            "--roots",
            "30",
            "--json",
            "--seed",
            "3",
            "--dir",
            str(tmp_path),
            *pool,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    stats = json.loads(proc.stdout)
    assert "violation" not in stats, stats
    assert proc.returncode == 0
    assert stats["kills"] == 8 and stats["by_signal"]["SIGKILL"] >= 1
    assert stats["runs_completed"] >= 1 and stats["lost"] == 0 and stats["duplicated"] == 0
    assert stats["pool"] == bool(pool)


def test_the_checks_see_a_lost_transition_and_a_duplicated_child(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    with jorb.Run.open(path) as run:
        root = run.add_job({"id": "r0", "k": 2}, "sum")
        for i in range(2):
            run.new_job("child", {"id": f"r0/{i}", "i": i}, root.id, None, 0)
        run.save()
    seen: chaos.Seen = {}
    chaos.observe(path, seen, "first look")
    seen["1"] = (5, 0, "sum")  # as if a step had been seen that the file no longer holds
    with pytest.raises(chaos.Violation, match="lost committed work"):
        chaos.observe(path, seen, "second look")
    with jorb.Run.open(path) as run:
        run.new_job("child", {"id": "r0/1", "i": 1}, root.id, None, 0)
        run.save()
    with pytest.raises(chaos.Violation, match=r"has children \[0, 1, 1\], want \[0, 1\]"):
        chaos.observe(path, {}, "third look")
