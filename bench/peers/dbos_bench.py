"""DBOS (SQLite system database): N workflows of 3 no-op steps, every step checkpointed.

Run by ``run.py`` inside ``bench/peers/.venv``; prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from dbos import DBOS, DBOSConfig


@DBOS.step()
def step(i: int, k: int) -> int:
    return i + k


@DBOS.workflow()
def three_steps(i: int) -> int:
    step(i, 1)
    step(i, 2)
    return step(i, 3)


def main() -> None:
    n = int(sys.argv[1])
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    workdir = Path(tempfile.mkdtemp(prefix="jorb-peer-dbos-"))
    config: DBOSConfig = {
        "name": "jorb-peer-bench",
        "system_database_url": f"sqlite:///{workdir / 'dbos.sqlite'}",
        "max_executor_threads": concurrency,
        "log_level": "WARNING",
        "console_log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()
    try:
        start = time.perf_counter()
        handles = [DBOS.start_workflow(three_steps, i) for i in range(n)]
        results = [h.get_result() for h in handles]
        seconds = time.perf_counter() - start
    finally:
        DBOS.destroy()
    assert results == [i + 3 for i in range(n)], "a workflow returned the wrong result"
    print(
        json.dumps(
            {
                "peer": "DBOS",
                "version": version("dbos"),
                "setup": f"SQLite system DB, {concurrency} executor threads",
                "jobs": n,
                "steps": 3 * n,
                "seconds": seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
