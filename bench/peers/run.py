"""Peers side by side: the same 3-step durable workload on jorb, DBOS (SQLite) and huey (SQLite).

    .venv/bin/python bench/peers/run.py                # installs the peers on first use
    .venv/bin/python bench/peers/run.py --dbos 300 --huey 3000 --runs 3

The peers are installed into their own virtualenv, ``bench/peers/.venv`` (pinned versions,
never project dependencies), by this script; delete it to reinstall. Each peer runs N jobs of 3
no-op steps, each step made durable the peer's way (DBOS: a checkpoint row per step in its
SQLite system database; huey: each step a task enqueued and dequeued through SQLite with
``synchronous=FULL``), and jorb runs the same N through new -> a -> b -> done, durable, progress
off, concurrency 64. N is kept small enough that each peer takes about a minute here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import venv
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import machine_line, median, rate, run_child, table  # noqa: E402

VENV = HERE / ".venv"
PINS = ["dbos==3.4.0", "huey==3.5.4"]


def ensure_venv() -> Path:
    """The peers' virtualenv, created and filled on first use (PyPI only)."""
    python = VENV / "bin" / "python"
    marker = VENV / ".installed"
    if marker.exists() and marker.read_text() == " ".join(PINS):
        return python
    if not python.exists():
        venv.create(VENV, with_pip=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PINS],
        check=True,
    )
    marker.write_text(" ".join(PINS))
    return python


def run_peer(python: Path, script: str, n: int, extra: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [str(python), str(HERE / script), str(n), *extra],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    import json

    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run_jorb(n: int) -> dict[str, Any]:
    """jorb's side, in a fresh process of the project's interpreter (bench/engine.py)."""
    workdir = tempfile.mkdtemp(prefix="jorb-peer-jorb-")
    rows = run_child(
        [str(HERE.parent / "engine.py"), "--n", str(n), "--runs", "1", "--dir", workdir, "--json"]
    )
    (row,) = rows if isinstance(rows, list) else [rows]
    return {
        "peer": "jorb",
        "version": _jorb_version(),
        "setup": "journal + group commit (fsync), concurrency 64 per state",
        "jobs": n,
        "steps": 3 * n,
        "seconds": row["durable_s"],
    }


def _jorb_version() -> str:
    from importlib.metadata import version

    return version("jorb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dbos", type=int, default=600, help="jobs for DBOS")
    parser.add_argument("--huey", type=int, default=6000, help="jobs for huey")
    parser.add_argument("--jorb", type=int, default=100_000, help="jobs for jorb")
    parser.add_argument("--runs", type=int, default=1, help="runs per peer (median reported)")
    args = parser.parse_args()
    python = ensure_venv()
    plan = [
        ("jorb", args.jorb, lambda: run_jorb(args.jorb)),
        ("huey", args.huey, lambda: run_peer(python, "huey_bench.py", args.huey, ["8"])),
        ("DBOS", args.dbos, lambda: run_peer(python, "dbos_bench.py", args.dbos, ["64"])),
    ]
    results = []
    for _name, _n, measure in plan:
        samples = [measure() for _ in range(args.runs)]
        best = dict(samples[0])
        best["seconds"] = median([s["seconds"] for s in samples])
        results.append(best)
    jorb_rate = results[0]["steps"] / results[0]["seconds"]
    rows = []
    for r in results:
        steps_per_s = r["steps"] / r["seconds"]
        rows.append(
            [
                r["peer"],
                r["version"],
                r["setup"],
                r["jobs"],
                f"{r['seconds']:.2f}",
                rate(steps_per_s),
                f"{jorb_rate / steps_per_s:.0f}×" if r["peer"] != "jorb" else "1×",
            ]
        )
    print(f"peers: {machine_line()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])} (runs={args.runs})")
    print()
    print(table(["peer", "version", "setup", "jobs", "s", "steps/s", "jorb is"], rows))


if __name__ == "__main__":
    main()
