"""huey (SqliteHuey, fsync on): N jobs, each 3 chained no-op tasks (each enqueues the next).

Run by ``run.py`` inside ``bench/peers/.venv``; prints one JSON line. The consumer runs
in-process with thread workers; every enqueue and dequeue is a SQLite transaction.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

from huey import SqliteHuey
from huey.consumer import Consumer

WORKDIR = Path(tempfile.mkdtemp(prefix="jorb-peer-huey-"))
huey = SqliteHuey("jorb-peer", filename=str(WORKDIR / "huey.sqlite"), fsync=True, results=False)
done = threading.Event()
lock = threading.Lock()
left = 0


@huey.task()
def step(i: int, k: int) -> None:
    global left
    if k < 3:
        step(i, k + 1)  # enqueue the job's next step
        return
    with lock:
        left -= 1
        if left == 0:
            done.set()


def main() -> None:
    global left
    n = int(sys.argv[1])
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    logging.getLogger("huey").setLevel(logging.ERROR)
    left = n
    consumer = Consumer(
        huey,
        workers=workers,
        worker_type="thread",
        periodic=False,
        initial_delay=0.001,
        max_delay=0.01,
        check_worker_health=False,
    )
    start = time.perf_counter()
    for i in range(n):
        step(i, 1)
    consumer.start()
    if not done.wait(timeout=600):
        raise SystemExit(f"huey: {left} jobs unfinished after 600 s")
    seconds = time.perf_counter() - start
    consumer.stop(graceful=True)
    print(
        json.dumps(
            {
                "peer": "huey",
                "version": version("huey"),
                "setup": f"SqliteHuey (WAL, synchronous=FULL), {workers} thread workers",
                "jobs": n,
                "steps": 3 * n,
                "seconds": seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
