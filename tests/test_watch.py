"""jorb watch: the live table of a run another process executes, read-only, until it stops."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import jorb
from jorb import report_html
from jorb.watch import Watcher

JORB = str(Path(sys.executable).with_name("jorb"))
STUCK = 30.0

SCRIPT = """
import sys
import jorb

def a(app, overall, ctx):
    return ctx, "b"

def b(app, overall, ctx):
    sys.stdout.write(f"in b {ctx['n']}\\n")  # one write: print() from two threads interleaves
    sys.stdout.flush()
    with open(overall["gate"], "rb", buffering=0) as gate:
        gate.read(1)                    # one byte from the test lets one job through
    if ctx["n"] == 2:
        raise ValueError("two is bad")
    return ctx, "done"

states = [
    jorb.State("a", exec=a),
    jorb.State("b", exec=b, concurrency=2),
    jorb.State("done", terminal=True),
    jorb.State("failed", terminal=True),
]
run = jorb.Run.open(sys.argv[1], overall={"gate": sys.argv[2]})
for n in (1, 2):
    run.add_job({"n": n}, state="a")
jorb.Processor(None, states, progress=False, poll_interval=0.05).exec(run)
"""


def _launch(tmp_path: Path, script: str, fifo: Path) -> subprocess.Popen[str]:
    """Run ``script`` as live.py in ``tmp_path`` on run.json, its gate the ``fifo``."""
    (tmp_path / "live.py").write_text(script)
    return subprocess.Popen(
        [sys.executable, "live.py", "run.json", str(fifo)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def running(tmp_path: Path, gate: tuple[Path, int]) -> Iterator[tuple[Path, int]]:
    """A process executing a run whose two jobs wait in b's execs for a byte each."""
    fifo, fd = gate
    path = tmp_path / "run.json"
    script = _launch(tmp_path, SCRIPT, fifo)
    try:
        assert script.stdout is not None
        # Both jobs are in b's execs: their a -> b transitions are on disk (in the journal).
        assert sorted(script.stdout.readline() for _ in range(2)) == ["in b 1\n", "in b 2\n"]
        yield path, fd
        _, err = script.communicate(timeout=STUCK)
        assert script.returncode == 0, err
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()


def settle(check: Callable[[], bool]) -> None:
    """Poll until ``check()`` holds (the other process writes when it gets to it)."""
    deadline = time.monotonic() + STUCK
    while not check():
        assert time.monotonic() < deadline, "never settled"
        time.sleep(0.01)


def test_a_watcher_follows_the_journal_without_ever_taking_the_lock(
    running: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, fd = running

    def no_lock(*args: object) -> None:
        raise AssertionError("the watcher tried the run's lock")

    monkeypatch.setattr(fcntl, "flock", no_lock)
    watcher = Watcher(path)
    rows = {row.name: row for row in watcher.poll().states}
    assert watcher.running() and not watcher.ended
    assert [(n, r.jobs) for n, r in rows.items()] == [
        ("a", 0),
        ("b", 2),
        ("done", 0),
        ("failed", 0),
        ("cancelled", 0),  # (jorb cancel's state, always declared)
    ]
    page = report_html.render(jorb.Run.load(path))  # the report of a run in progress, too
    assert "not complete: 0 of 2 jobs in terminal states" in page

    os.write(fd, b"x")  # one of the two finishes (done or, for 2, failed after no retry)
    settle(lambda: watcher.poll().finished == 1)
    assert watcher.reloads == 0  # read from the journal as it grew, not by loading again
    assert not watcher.ended

    os.write(fd, b"x")
    settle(lambda: watcher.poll() is not None and watcher.ended)
    final = {row.name: row.jobs for row in watcher.status().states}
    run = jorb.Run.load(path)
    assert (
        final
        == {"a": 0, "b": 0, "done": 1, "failed": 1, "cancelled": 0}
        == {name: run.counts().get(name, 0) for name in final}
    )
    watcher.close()


def test_jorb_watch_prints_status_lines_until_the_run_ends(running: tuple[Path, int]) -> None:
    path, fd = running
    watch = subprocess.Popen(
        [JORB, "watch", str(path), "--interval", "0.02"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stderr is not None
        first = watch.stderr.readline()  # the line at start: not a terminal, so plain lines
        assert " 0/2 finished" in first and "| b 2 waiting 0 done |" in first, first
        os.write(fd, b"xx")
        out, rest = watch.communicate(timeout=STUCK)  # it stops by itself when the run ends
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, rest
    assert out == ""
    last = rest.splitlines()[-1]
    assert " 2/2 finished" in last and "| done 1 | failed 1" in last, rest


def test_a_watcher_loads_the_run_again_when_the_journal_is_compacted(
    tmp_path: Path, gate: tuple[Path, int]
) -> None:
    fifo, fd = gate
    # The same run, compacted at every commit (the journal replaced each time).
    script = SCRIPT.replace(
        "import jorb\n",
        "import jorb, jorb.checkpoint\n"
        "jorb.checkpoint.MIN_COMPACT_BYTES = jorb.checkpoint.COMPACT_RATIO = 0\n",
    ).replace("for n in (1, 2):", "for n in (1, 3, 4, 5):")
    path = tmp_path / "run.json"
    process = _launch(tmp_path, script, fifo)
    try:
        assert process.stdout is not None
        assert len([process.stdout.readline() for _ in range(2)]) == 2  # b's two slots taken
        watcher = Watcher(path)
        for finished in (1, 2, 3):
            os.write(fd, b"x")
            settle(lambda n=finished: watcher.poll().finished == n)  # type: ignore[misc]
            rows = {row.name: row.jobs for row in watcher.status().states}
            assert rows["done"] == finished and rows["a"] + rows["b"] == 4 - finished
        assert watcher.reloads >= 3  # each compaction replaced the journal it was reading
        os.write(fd, b"x")
        settle(lambda: watcher.poll() is not None and watcher.ended)
        final = {row.name: row.jobs for row in watcher.status().states}
        assert final == {"a": 0, "b": 0, "done": 4, "failed": 0, "cancelled": 0}
        watcher.close()
        _, err = process.communicate(timeout=STUCK)
        assert process.returncode == 0, err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_watcher_reads_a_journal_in_chunks_and_applies_records_split_across_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal a watcher attaches to may be as big as the run: it is read a chunk at a
    time, and a record cut by a chunk's end is applied whole once the rest is read."""
    from test_checkpoint import STATES, roots, stop_before_finish

    from jorb import watch
    from jorb.checkpoint import journal_path

    path = tmp_path / "run.json"
    run = jorb.Run.open(path)
    for ctx in roots(30):
        run.add_job(ctx, "a")
    with monkeypatch.context() as patch:
        stop_before_finish(patch)  # the journal stays, holding every transition
        jorb.Processor(None, STATES, progress=False).exec(run)
    run.close()
    journal = journal_path(path)
    whole = journal.read_bytes()
    first = whole.index(b"\n") + 1  # the header: the watcher starts from the bare snapshot
    journal.write_bytes(whole[:first])

    monkeypatch.setattr(watch, "READ_CHUNK", 7)
    monkeypatch.setattr(Watcher, "running", lambda self: True)
    watcher = Watcher(path)
    assert watcher.poll().finished == 0
    with journal.open("ab") as grow:  # the process appends the rest
        grow.write(whole[first:])
    counts = {row.name: row.jobs for row in watcher.poll().states}
    assert watcher.reloads == 0, "followed, not loaded again"
    loaded = jorb.Run.load(path).counts()
    assert loaded == {"done": 60}
    assert {name: n for name, n in counts.items() if n} == loaded
