"""Failed attempts, give-ups and rate-limit pauses reach stdlib logging ("jorb.exec")."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DONE, process

import jorb


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    handler = Records()
    logger = logging.getLogger("jorb")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield handler.records
    logger.setLevel(old)
    logger.removeHandler(handler)


def test_each_failed_attempt_and_give_up_is_a_record_with_fields(
    make_run: object, records: list[logging.LogRecord]
) -> None:
    def flaky(app: object, overall: object, ctx: dict) -> tuple:
        raise LookupError(f"repo {ctx['n']} not found\nmore detail")

    states = [
        jorb.State("new", exec=flaky, retries=1, on_error="failed"),
        DONE,
        jorb.State("failed", terminal=True),
    ]
    run = make_run([{"n": 1}, {"n": 2}])  # type: ignore[operator]
    process(states, run)
    mine = [r for r in records if r.name == "jorb.exec"]
    assert sorted((r.job, r.attempt, r.levelname) for r in mine) == [  # type: ignore[attr-defined]
        ("1", 1, "INFO"),
        ("1", 2, "WARNING"),
        ("2", 1, "INFO"),
        ("2", 2, "WARNING"),
    ]
    gave_up = next(r for r in mine if r.levelname == "WARNING")
    fields = {k: getattr(gave_up, k) for k in ("state", "error_type", "error", "gave_up", "to")}
    assert fields == {
        "state": "new",
        "error_type": "LookupError",
        "error": f"repo {gave_up.job} not found",  # type: ignore[attr-defined]
        "gave_up": True,
        "to": "failed",
    }
    assert gave_up.getMessage() == (
        f"job {gave_up.job} gave up in new after attempt 2 "  # type: ignore[attr-defined]
        f"(LookupError: repo {gave_up.job} not found); moved to failed"  # type: ignore[attr-defined]
    )


def test_a_retry_after_pause_is_logged(make_run: object, records: list[logging.LogRecord]) -> None:
    calls = []

    def limited(app: object, overall: object, ctx: dict) -> tuple:
        calls.append(1)
        if len(calls) == 1:
            raise jorb.RateLimited(retry_after=0.01)
        return ctx, "done"

    run = make_run([{}])  # type: ignore[operator]
    process([jorb.State("new", exec=limited, rate=jorb.Rate(100)), DONE], run)
    pauses = [r for r in records if getattr(r, "retry_after", None) is not None]
    assert [(r.state, r.retry_after, r.levelname) for r in pauses] == [  # type: ignore[attr-defined]
        ("new", 0.01, "INFO")
    ]
    attempt = next(r for r in records if getattr(r, "rate_limited", False))
    assert attempt.getMessage().endswith("; rate limited")


def test_quiet_unless_the_application_configures_logging(tmp_path: Path) -> None:
    script = (
        "import logging, sys, jorb\n"
        "def bad(app, overall, ctx): raise ValueError('nope')\n"
        "states = [jorb.State('new', exec=bad, retries=0), jorb.State('done', terminal=True),"
        " jorb.State('failed', terminal=True)]\n"
        "if sys.argv[1] == 'configured': logging.basicConfig(format='%(levelname)s %(message)s')\n"
        "run = jorb.Run.open(sys.argv[2]); run.add_job({})\n"
        "jorb.Processor(None, states, progress=False).exec(run)\n"
    )

    def run(how: str) -> subprocess.CompletedProcess[str]:
        path = str(tmp_path / f"{how}.json")
        command = [sys.executable, "-c", script, how, path]
        return subprocess.run(command, capture_output=True, text=True)

    quiet = run("plain")
    assert quiet.returncode == 0 and quiet.stderr == ""
    loud = run("configured")
    assert loud.stderr == (
        "WARNING job 1 gave up in new after attempt 1 (ValueError: nope); moved to failed\n"
    )
