"""The Prometheus exporter, scraped over HTTP on 127.0.0.1 while a run executes."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

from conftest import DONE, STUCK, process
from prometheus_client.parser import text_string_to_metric_families

import jorb
from jorb.prometheus import Exporter


def scrape(port: int) -> dict[str, dict[str, float]]:
    """``{metric: {state (or ""): value}}`` from one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=STUCK) as answer:
        text = answer.read().decode()
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("jorb_"):
                found.setdefault(sample.name, {})[sample.labels.get("state", "")] = sample.value
    return found


def test_a_scrape_during_the_run_agrees_with_the_run_file(tmp_path: Path) -> None:
    release = threading.Event()

    def fetch(app: object, overall: object, ctx: dict) -> tuple:
        if ctx["n"] == 0:
            raise LookupError("no such page")
        return ctx, "store"

    def store(app: object, overall: object, ctx: dict) -> tuple:
        release.wait(STUCK)  # every job holds here until the test has looked
        return ctx, "done"

    states = [
        jorb.State("fetch", exec=fetch, on_error="failed"),
        jorb.State("store", exec=store, concurrency=2),
        DONE,
        jorb.State("failed", terminal=True),
    ]
    run = jorb.Run.open(tmp_path / "run.json")
    for n in range(6):
        run.add_job({"n": n}, "fetch")
    exporter = Exporter(port=0)
    worker = threading.Thread(
        target=process,
        args=(states, run),
        kwargs={"listeners": [exporter], "status_interval": 0.01},
    )
    worker.start()
    try:
        deadline = time.monotonic() + STUCK

        def held() -> bool:  # fetch worked off, both store slots taken: nothing can move now
            if exporter.port == 0:
                return False
            now = scrape(exporter.port)
            return (
                now.get("jorb_jobs", {}).get("fetch") == 0
                and now.get("jorb_execs_running", {}).get("store") == 2
            )

        while not held():
            assert time.monotonic() < deadline, "the run never got to store"
            time.sleep(0.01)
        metrics = scrape(exporter.port)
        on_disk = jorb.Run.load(tmp_path / "run.json")  # (replays the journal: safe meanwhile)
        in_file = Counter(job.state for job in on_disk.jobs.values())
        assert metrics["jorb_jobs"] == {name: in_file[name] for name in metrics["jorb_jobs"]}
        assert metrics["jorb_jobs"] == {
            "fetch": 0,
            "store": 5,
            "done": 0,
            "failed": 1,
            "cancelled": 0,
        }
        assert metrics["jorb_execs_running"] == {"fetch": 0, "store": 2}
        assert metrics["jorb_jobs_waiting"]["store"] == 3
        left_fetch = sum(
            1 for job in on_disk.jobs.values() for step in job.steps() if step["from"] == "fetch"
        )
        assert metrics["jorb_execs_done_total"]["fetch"] == left_fetch - 1 == 5
        assert metrics["jorb_exec_errors_total"]["fetch"] == 1
        assert metrics["jorb_jobs_gave_up_total"]["fetch"] == 1
        assert metrics["jorb_run_jobs"][""] == 6 and metrics["jorb_run_complete"][""] == 0
    finally:
        release.set()
        worker.join(STUCK)
    final = scrape(exporter.port)  # the last word stays served after the exec
    exporter.close()
    assert final["jorb_jobs"] == {"fetch": 0, "store": 0, "done": 5, "failed": 1, "cancelled": 0}
    assert final["jorb_execs_done_total"]["store"] == 5
    assert final["jorb_run_complete"][""] == 1
    assert final["jorb_transitions_total"][""] == 11  # 5 + 1 failure in fetch, 5 in store
