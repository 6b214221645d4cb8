"""Steering a run: add, pause, resume and redrive, live (through the inbox) and offline (the file).

The live tests run tests/scripts_steer/steer.py in a subprocess: its execs log to an effects
file and to stdout (read through a pipe), and wait on gate files the test creates. The test
process calls ``jorb.control`` like ``jorb add`` / ``jorb pause`` do from another terminal.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import DONE, MakeRun, Notes, errors_of
from scripts_steer.harness import ROOT, STUCK, Script

import jorb
from jorb import JorbError, control
from jorb.checkpoint import atomic_write, is_locked, journal_path

Ctx = dict[str, Any]


def _drive(processor: jorb.Processor, run: jorb.Run) -> None:
    """``aexec`` on the virtual clock; a run still stuck after a virtual hour fails the test."""
    jorb.testing.run(asyncio.wait_for(processor.aexec(run), 3600))


class Live:
    """One steer.py run over ``tmp/run.json``: its effects, its gates, and the script."""

    def __init__(self, tmp: Path, started: list[Script]) -> None:
        self.tmp = tmp
        self.path = tmp / "run.json"
        self.effects = tmp / "effects.log"
        self.gates = tmp / "gates"
        self.gates.mkdir(exist_ok=True)
        self._started = started

    def start(self, *options: Any) -> Script:
        script = Script(self.tmp, "steer.py", self.path, self.effects, self.gates, *options)
        self._started.append(script)
        return script

    def open_gate(self, name: str | int) -> None:
        (self.gates / str(name)).touch()

    def mark(self, text: str) -> None:
        """A line of the test's own in the effects log, ordered with the script's lines."""
        fd = os.open(self.effects, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"TEST {text}\n".encode())
        finally:
            os.close(fd)

    def log(self) -> list[str]:
        return self.effects.read_text().splitlines()

    def started(self, log: list[str] | None = None) -> list[int]:
        """The ``n`` of every exec start of ``new``, in order."""
        lines = self.log() if log is None else log
        return [int(line.split()[1]) for line in lines if line.startswith("start ")]


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    started: list[Script] = []
    yield Live(tmp_path, started)
    for script in started:
        script.stop()


def _request(path: Path, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """Like ``control.<op>``, but failing the test instead of waiting forever."""
    return control.request(path, op, args, timeout=STUCK)


def _started_by(n: int) -> Any:
    return lambda lines: f"start {n}" in lines


def _me() -> str:
    return f"pid {os.getpid()}"


# -- live: add, pause/resume, redrive ------------------------------------------------------------


def test_add_to_a_running_process(live: Live) -> None:
    script = live.start("--jobs", 1)  # job n=0 keeps the process busy until its gate opens
    script.until(_started_by(0))

    before = time.time()
    result = _request(live.path, "add", {"ctxs": [{"n": 10}, {"n": 11}], "state": "new"})
    after = time.time()

    assert result == {"ids": ["2", "3"]}
    script.until(_started_by(10))  # the added job runs (one slot of two was free)
    live.open_gate("all")
    lines = script.finish()
    assert "start 11" in lines
    run = jorb.Run.load(live.path)
    assert {job.id: (job.ctx["n"], job.state) for job in run.jobs.values()} == {
        "1": (0, "done"),
        "2": (10, "done"),
        "3": (11, "done"),
    }
    (change,) = run.changes
    assert change["what"] == "added 2 job(s) in 'new'"
    assert before <= change["time"] <= after
    assert _me() in change["who"]
    assert change["result"] == {"ids": ["2", "3"]}
    assert f"note applied: added 2 job(s) in 'new' (by {change['who']})" in lines
    assert live.started().count(10) == live.started().count(11) == 1  # applied once
    assert not list(control.inbox_path(live.path).glob("*.json"))  # nothing left queued


def test_pause_stops_new_starts_and_resume_restarts_them(live: Live) -> None:
    script = live.start("--jobs", 6, "--concurrency", 2)
    script.until(lambda lines: "start 0" in lines and "start 1" in lines)

    assert _request(live.path, "pause", {"name": "new"}) == {"paused": ["new"]}
    live.mark("paused")
    # Free both slots. Unpaused, the lane would start jobs 2 and 3 at once.
    live.open_gate(0)
    live.open_gate(1)
    script.until(lambda lines: "end 0" in lines and "end 1" in lines)
    # A round trip through the process (an added job in another state runs) before looking.
    _request(live.path, "add", {"ctxs": [{"n": 100}], "state": "probe"})
    script.saw("probe 100")
    paused_run = jorb.Run.load(live.path)

    live.mark("resuming")
    assert _request(live.path, "resume", {"name": "new"}) == {"paused": []}
    script.until(lambda lines: "start 2" in lines and "start 3" in lines)
    live.open_gate("all")
    script.finish()

    log = live.log()
    paused_at, resumed_at = log.index("TEST paused"), log.index("TEST resuming")
    assert live.started(log[:resumed_at]) == [0, 1]  # nothing started while paused
    assert sorted(live.started(log[resumed_at:])) == [2, 3, 4, 5]  # the rest after the resume
    assert "end 0" in log[paused_at:resumed_at]  # (the slots were free while paused)
    assert paused_run.paused == {"new"}
    assert [job.state for job in paused_run.jobs.values()].count("new") == 4
    run = jorb.Run.load(live.path)
    assert run.paused == set()
    assert [c["what"] for c in run.changes] == [
        "paused 'new'",
        "added 1 job(s) in 'probe'",
        "resumed 'new'",
    ]
    assert all(_me() in c["who"] for c in run.changes)
    assert run.counts() == {"done": 7}


def test_redrive_moves_waiting_jobs_and_skips_running_ones(live: Live) -> None:
    script = live.start("--jobs", 4, "--concurrency", 2)
    # Jobs 1 and 2 (n=0, n=1) run, held by their gates; jobs 3 and 4 wait for a slot.
    script.until(lambda lines: "start 0" in lines and "start 1" in lines)

    before = time.time()
    result = control.redrive(live.path, "new", "parked")
    assert result == {"moved": 2, "skipped": ["1", "2"]}
    live.open_gate(0)
    script.saw("end 0")  # a slot is free: a job left in "new" would start now
    assert control.redrive(live.path, "parked", "new", ["3"]) == {"moved": 1, "skipped": []}
    script.until(_started_by(2))
    live.open_gate("all")
    script.finish()

    run = jorb.Run.load(live.path)
    assert {job.id: job.state for job in run.jobs.values()} == {
        "1": "done",
        "2": "done",
        "3": "done",
        "4": "parked",
    }
    assert live.started() == [0, 1, 2]  # job 4 never ran; job 3 ran once, after its redrive
    away, back = run.changes
    assert away["what"] == "redrove 2 job(s) 'new' -> 'parked'"
    assert back["what"] == "redrove 1 job(s) 'parked' -> 'new'"
    assert before <= away["time"] <= back["time"]
    assert _me() in away["who"] and _me() in back["who"]
    # History keeps every step, the redrives included, stamped with the change's time.
    steps = [(h["from"], h["to"]) for h in run.jobs["3"].steps()]
    assert steps == [("new", "parked"), ("parked", "new"), ("new", "done")]
    assert run.jobs["3"].steps()[0]["time"] == away["applied"]  # applied, not asked
    assert run.jobs["3"].steps()[1]["time"] == back["applied"]
    assert [(h["from"], h["to"]) for h in run.jobs["4"].steps()] == [("new", "parked")]
    for running in ("1", "2"):  # skipped: running jobs are not moved under their exec
        assert [(h["from"], h["to"]) for h in run.jobs[running].steps()] == [("new", "done")]


def test_a_refused_change_says_why_and_changes_nothing(live: Live) -> None:
    script = live.start("--jobs", 1)
    script.until(_started_by(0))

    with pytest.raises(jorb.JorbError, match="no state 'nope' declared"):
        control.pause(live.path, "nope")
    with pytest.raises(jorb.JorbError, match="terminal"):
        control.pause(live.path, "done")
    live.open_gate("all")
    script.finish()

    run = jorb.Run.load(live.path)
    assert run.changes == []
    assert run.paused == set()


# -- nothing lost, nothing applied twice ----------------------------------------------------------


def _replay_request(path: Path, change: dict[str, Any], op: str, args: dict[str, Any]) -> Path:
    """Put back, in the inbox, a request that was applied but never answered (a crash between
    applying and replying): same id, same contents."""
    request = {"id": change["id"], "op": op, "args": args, "time": change["time"]}
    request["who"] = change["who"]
    inbox = control.inbox_path(path)
    inbox.mkdir(exist_ok=True)
    file = inbox / f"{time.time_ns() - 10**9:020d}-{change['id']}.json"
    atomic_write(file, orjson.dumps(request), durable=False)  # as a command writes it
    return file


def test_a_change_applied_before_a_kill_9_is_not_applied_again(live: Live) -> None:
    script = live.start("--jobs", 1)
    script.until(_started_by(0))
    args = {"ctxs": [{"n": 5}], "state": "parked"}
    assert _request(live.path, "add", args) == {"ids": ["2"]}
    script.kill()  # as if it died after applying, before the command read its reply
    (change,) = jorb.Run.load(live.path).changes

    # Found when the next process starts...
    at_start = _replay_request(live.path, change, "add", args)
    again = live.start()
    again.until(_started_by(0))  # job 1 was mid-exec at the kill: it runs again
    # ... and found by the running process.
    while_running = _replay_request(live.path, change, "add", args)
    # A fresh request, queued after the stale ones: once it is answered, so are they.
    assert _request(live.path, "add", {"ctxs": [{"n": 6}], "state": "parked"}) == {"ids": ["3"]}
    answers = [
        orjson.loads(f.with_suffix(control.REPLY).read_bytes()) for f in (at_start, while_running)
    ]
    live.open_gate("all")
    again.finish()

    assert answers == [{"result": {"ids": ["2"]}}] * 2  # the first answer, not a second add
    run = jorb.Run.load(live.path)
    assert {job.id: job.ctx["n"] for job in run.jobs.values()} == {"1": 0, "2": 5, "3": 6}
    assert [c["id"] for c in run.changes].count(change["id"]) == 1
    assert len(run.changes) == 2
    assert not list(control.inbox_path(live.path).glob("*.json"))


def test_a_change_between_open_and_exec_is_not_lost(live: Live) -> None:
    live.start().finish()  # the run file exists, and is empty
    # An exec that missed the change would find nothing to do, finish at once, never run it.
    script = live.start("--wait-inbox")
    script.saw("opened")  # the script holds the run (Run.open) and has not called exec yet

    result = _request(live.path, "add", {"ctxs": [{"n": 1}], "state": "probe"})

    assert result == {"ids": ["1"]}
    lines = script.finish()
    assert "probe 1" in lines
    assert lines[-1] == "finished [('done', 1)]"
    run = jorb.Run.load(live.path)
    assert [c["what"] for c in run.changes] == ["added 1 job(s) in 'probe'"]


# -- offline: no process, the file is edited under the lock ---------------------------------------


def test_with_no_process_commands_edit_the_file_and_a_pause_persists(live: Live) -> None:
    live.start().finish()  # an empty run, executed once: its states are declared in the file
    assert not is_locked(live.path)

    ids = control.add(live.path, [{"n": 0}, {"n": 1}, {"n": 2}])["ids"]
    assert control.pause(live.path, "new") == {"paused": ["new"]}
    assert control.redrive(live.path, "new", "parked", [ids[2]]) == {"moved": 1, "skipped": []}
    # A stale, already applied request (its answer was lost) is not applied twice offline either.
    first = jorb.Run.load(live.path).changes[0]
    _replay_request(live.path, first, "add", {"ctxs": [{"n": 0}, {"n": 1}, {"n": 2}]})
    # Pausing a paused state (or resuming a running one) is refused, and records nothing.
    with pytest.raises(JorbError, match=r"state 'new' is already paused \(paused: new\)"):
        control.pause(live.path, "new")
    with pytest.raises(JorbError, match=r"state 'probe' is not paused \(paused: new\)"):
        control.resume(live.path, "probe")

    run = jorb.Run.load(live.path)
    assert ids == ["1", "2", "3"]
    assert {job.id: job.state for job in run.jobs.values()} == {
        "1": "new",
        "2": "new",
        "3": "parked",
    }
    assert run.paused == {"new"}
    assert [c["what"] for c in run.changes] == [
        "added 3 job(s) in 'new'",
        "paused 'new'",
        "redrove 1 job(s) 'new' -> 'parked'",
    ]
    assert all(_me() in c["who"] for c in run.changes)
    assert not journal_path(live.path).exists()  # folded into the file, which stands alone
    assert not list(control.inbox_path(live.path).glob("*.json"))
    assert not is_locked(live.path)

    # A process started later keeps the pause, and says so.
    script = live.start()
    script.until(lambda lines: any("state 'new' is paused" in line for line in lines))
    _request(live.path, "add", {"ctxs": [{"n": 100}], "state": "probe"})
    script.saw("probe 100")
    assert live.started() == []
    control.resume(live.path, "new")
    live.open_gate("all")
    lines = script.finish()
    assert sorted(live.started()) == [0, 1]
    assert lines[-1] == "finished [('done', 3), ('parked', 1)]"


def test_a_change_refused_because_the_run_does_not_load_is_never_applied(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The command says it failed, so the change must not be applied later by whoever opens
    # the run once it is mended (a retried `jorb add` would add its jobs twice).
    live.start().finish()
    good = live.path.read_bytes()
    live.path.write_bytes(b"{")
    with pytest.raises(JorbError, match="not valid JSON"):
        control.pause(live.path, "new")
    with pytest.raises(JorbError, match="not valid JSON"):
        control.add(live.path, [{"n": 0}])
    assert not list(control.inbox_path(live.path).iterdir())
    live.path.write_bytes(good)

    # Nor one that loaded but could not be saved.
    def full(*args: Any, **kwargs: Any) -> None:
        raise jorb.CheckpointError("no space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(control.Store, "compact", full)
        with pytest.raises(jorb.CheckpointError, match="no space"):
            control.pause(live.path, "new")
    assert not list(control.inbox_path(live.path).iterdir())
    assert control.add(live.path, [{"n": 7}]) == {"ids": ["1"]}  # only this one applies
    run = jorb.Run.load(live.path)
    assert run.paused == set() and {i: j.ctx for i, j in run.jobs.items()} == {"1": {"n": 7}}
    assert [c["what"] for c in run.changes] == ["added 1 job(s) in 'new'"]
    assert not list(control.inbox_path(live.path).iterdir())


def test_a_pause_applied_live_survives_kill_9(live: Live) -> None:
    script = live.start("--jobs", 3, "--concurrency", 1)
    script.until(_started_by(0))
    control.pause(live.path, "new")
    script.kill()
    assert journal_path(live.path).exists()  # the pause is in the journal the kill left behind

    # No process now: a command folds that journal into the file, under the lock.
    assert control.add(live.path, [{"n": 50}], "parked") == {"ids": ["4"]}
    folded = jorb.Run.load(live.path)
    assert not journal_path(live.path).exists()
    assert folded.paused == {"new"}
    assert [c["what"] for c in folded.changes] == ["paused 'new'", "added 1 job(s) in 'parked'"]

    again = live.start()
    again.until(lambda lines: any("state 'new' is paused" in line for line in lines))
    _request(live.path, "add", {"ctxs": [{"n": 100}], "state": "probe"})
    again.saw("probe 100")
    assert live.started() == [0]  # job 1 (n=0) ran before the kill; nothing since
    live.open_gate("all")
    control.resume(live.path, "new")
    again.finish()
    assert live.started() == [0, 0, 1, 2]  # job 1 was mid-exec at the kill: it ran again
    assert jorb.Run.load(live.path).counts() == {"done": 4, "parked": 1}


def test_a_change_made_after_exec_returned_is_never_overwritten(live: Live) -> None:
    # exec returned and released the lock, but the script still holds the Run in memory and
    # calls exec on it again. A command in between edits the file directly: the stale Run must
    # not be written over it (that would silently undo the change): jorb refuses, saying why.
    script = live.start("--again")
    script.saw("exec returned")

    assert control.add(live.path, [{"n": 7}], "probe") == {"ids": ["1"]}
    live.open_gate("again")
    lines = script.finish()

    refusals = [line for line in lines if line.startswith("refused: ")]
    assert len(refusals) == 1 and "changed since this process last read or wrote it" in refusals[0]
    run = jorb.Run.load(live.path)
    assert [c["what"] for c in run.changes] == ["added 1 job(s) in 'probe'"]
    assert [job.ctx for job in run.jobs.values()] == [{"n": 7}]
    # Reopened, the change is there and runs.
    assert "probe 7" not in lines


# -- the same operations from Python ---------------------------------------------------------------


def test_processor_steering_from_python(make_run: MakeRun) -> None:
    started: list[int] = []

    class App:
        processor: jorb.Processor

    async def work(app: App, overall: Ctx, ctx: Ctx) -> Any:
        started.append(ctx["n"])
        return ctx, "done"

    async def conductor(app: App, overall: Ctx, ctx: Ctx) -> Any:
        await asyncio.sleep(60)  # virtual: every ready job of an unpaused state had its turn
        ctx["started_while_paused"] = list(started)
        app.processor.add_jobs([{"n": 9}])
        app.processor.redrive("parked", "new")
        app.processor.resume("new")
        return ctx, "done"

    states = [
        jorb.State("new", exec=work, concurrency=2),
        jorb.State("conduct", exec=conductor),
        jorb.State("parked", terminal=True),
        DONE,
    ]
    run = make_run([{"n": 0}, {"n": 1}])
    run.add_job({"n": 5}, state="parked")
    run.add_job({}, state="conduct")
    app = App()
    app.processor = jorb.Processor(app, states, progress=False)
    app.processor.pause("new")  # before exec: applied when exec starts

    _drive(app.processor, run)

    conduct = run.jobs["4"]
    assert conduct.ctx["started_while_paused"] == []
    assert sorted(started) == [0, 1, 5, 9]
    assert run.paused == set()
    assert [c["what"] for c in run.changes] == [
        "paused 'new'",
        "added 1 job(s) in 'new'",
        "redrove 1 job(s) 'parked' -> 'new'",
        "resumed 'new'",
    ]


def test_a_redrive_or_cancel_from_python_that_leaves_jobs_says_which(make_run: MakeRun) -> None:
    # processor.redrive() and .cancel() return nothing (they are applied in the loop, from any
    # thread): a job they leave, busy or finished, is told as `jorb redrive`/`cancel` tell it.
    class App:
        processor: jorb.Processor
        go: asyncio.Event

    async def work(app: App, overall: Ctx, ctx: Ctx) -> Any:
        await app.go.wait()  # (job 1 runs until the conductor has asked)
        return ctx, "done"

    async def conductor(app: App, overall: Ctx, ctx: Ctx) -> Any:
        await asyncio.sleep(1)  # virtual: job 1 is in its exec
        app.processor.redrive("work", "parked")  # job 1 is running: left
        app.processor.cancel(["2"])  # job 2 is done already: left
        await asyncio.sleep(1)  # both are applied
        app.go.set()
        return ctx, "done"

    states = [
        jorb.State("work", exec=work),
        jorb.State("conduct", exec=conductor),
        jorb.State("parked", terminal=True),
        DONE,
    ]
    run = make_run([{"n": 0}], state="work")
    run.add_job({"n": 1}, state="done")
    run.add_job({}, state="conduct")
    app = App()
    app.go = asyncio.Event()
    notes = Notes()
    app.processor = jorb.Processor(app, states, progress=False, listeners=[notes])

    _drive(app.processor, run)

    assert notes.notes == [
        "processor.redrive('work', 'parked'): moved 0; 1 running right now were left (1)",
        "processor.cancel(): cancelled 0 job(s) (now in 'cancelled'); 1 left: already finished (2)",
    ]
    assert run.counts() == {"done": 3}, errors_of(run)


def test_steering_a_state_the_processor_does_not_declare_is_an_error(make_run: MakeRun) -> None:
    # The processor knows its states from the start: a typo must not be dropped in silence.
    states = [jorb.State("new", exec=lambda app, overall, ctx: (ctx, "done")), DONE]
    processor = jorb.Processor(None, states, progress=False)

    with pytest.raises(jorb.StateError, match="nope"):
        processor.pause("nope")


# -- the command line ------------------------------------------------------------------------------


def test_jorb_pause_against_a_live_run(live: Live) -> None:
    script = live.start("--jobs", 4, "--concurrency", 1)
    script.until(_started_by(0))

    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "jorb"), "pause", str(live.path), "new"],
        capture_output=True,
        text=True,
        timeout=STUCK,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("paused 'new'")
    live.open_gate(0)
    script.saw("end 0")  # the slot is free: unpaused, job 2 would start now
    _request(live.path, "add", {"ctxs": [{"n": 100}], "state": "probe"})
    script.saw("probe 100")
    assert live.started() == [0]
    paused = jorb.Run.load(live.path)
    assert paused.paused == {"new"}
    (change, _probe) = paused.changes
    assert change["what"] == "paused 'new'"
    assert "pid " in change["who"] and _me() not in change["who"]  # the jorb command's pid
    control.resume(live.path, "new")
    live.open_gate("all")
    script.finish()
    assert live.started() == [0, 1, 2, 3]


# -- changes while records wait for their group commit ---------------------------------------


class App:
    processor: jorb.Processor


def test_a_child_redriven_before_its_kick_is_on_disk_runs_once(make_run: MakeRun) -> None:
    # The parent asks for "move everything in 'work' to 'work2'" and kicks a child into 'work'
    # in the same turn, so the redrive is applied while the kick's record waits for its
    # commit. The child must not be both moved and placed by the commit (it ran twice).
    execs: Counter[tuple[str, str]] = Counter()

    async def split(app: App, overall: Ctx, ctx: Ctx) -> Any:
        app.processor.redrive("work", "work2")
        return ctx, "done", [jorb.Kick("work", {"k": 1})]

    async def work(app: App, overall: Ctx, ctx: Ctx) -> Any:
        execs["work", str(ctx)] += 1
        return ctx, "done"

    async def work2(app: App, overall: Ctx, ctx: Ctx) -> Any:
        execs["work2", str(ctx)] += 1
        await asyncio.sleep(1)
        return ctx, "done"

    states = [
        jorb.State("split", exec=split),
        jorb.State("work", exec=work, concurrency=4),
        jorb.State("work2", exec=work2, concurrency=4),
        DONE,
    ]
    run = make_run([{"p": 1}], state="split")
    app = App()
    app.processor = jorb.Processor(app, states, progress=False)

    _drive(app.processor, run)

    assert run.counts() == {"done": 2}, errors_of(run)
    kid = next(job for job in run.jobs.values() if job.parent is not None)
    # Until its kick is on disk the child is busy, like a job in an attempt: the redrive
    # skips it, and it runs once, where it was kicked. A redrive that moved nothing is not
    # recorded.
    assert [(h["from"], h["to"]) for h in kid.steps()] == [("work", "done")], kid.history
    assert execs == {("work", "{'k': 1}"): 1}
    assert run.changes == []


def test_a_job_added_by_the_last_exec_runs_before_exec_returns(make_run: MakeRun) -> None:
    # A job is added (from Python, from another thread) a moment after the last open job's
    # exec returned: after its record is queued, before exec began to stop. exec must not
    # return with that job open in the run file, never run: a change on its way to an exec
    # keeps it from ending, so the job runs now.
    ran: list[Ctx] = []

    async def last(app: App, overall: Ctx, ctx: Ctx) -> Any:
        # As if another thread called add_jobs just after this exec returned.
        asyncio.get_running_loop().call_soon(app.processor.add_jobs, [{"late": True}], "work")
        return ctx, "done"

    async def work(app: App, overall: Ctx, ctx: Ctx) -> Any:
        ran.append(ctx)
        return ctx, "done"

    states = [jorb.State("last", exec=last), jorb.State("work", exec=work), DONE]
    run = make_run([{"first": True}], state="last")
    app = App()
    app.processor = jorb.Processor(app, states, progress=False)

    _drive(app.processor, run)

    assert run.counts() == {"done": 2}, run.counts()
    assert ran == [{"late": True}]


def test_a_pause_right_after_a_resume_keeps_the_state_paused(make_run: MakeRun) -> None:
    # "new" is paused. A resume and a pause are applied in the same turn (the user changed
    # their mind at once): the run file says "new" is paused, and nothing may start in it
    # until the next resume, a minute later; the resume reaching disk must not unpause it
    # (found by tests/test_stress.py, seed 1929).
    started: list[float] = []

    async def work(app: App, overall: Ctx, ctx: Ctx) -> Any:
        started.append(asyncio.get_running_loop().time())
        return ctx, "done"

    async def conductor(app: App, overall: Ctx, ctx: Ctx) -> Any:
        await asyncio.sleep(60)  # virtual time
        app.processor.resume("new")
        app.processor.pause("new")
        await asyncio.sleep(60)
        ctx["paused_on_disk"] = sorted(jorb.Run.load(run.path).paused)
        app.processor.resume("new")
        return ctx, "done"

    states = [jorb.State("new", exec=work), jorb.State("conduct", exec=conductor), DONE]
    run = make_run([{"n": 0}, {"n": 1}])
    run.add_job({}, state="conduct")
    app = App()
    app.processor = jorb.Processor(app, states, progress=False)
    app.processor.pause("new")  # before exec: applied when exec starts

    _drive(app.processor, run)

    assert run.jobs["3"].ctx["paused_on_disk"] == ["new"]
    assert len(started) == 2 and min(started) >= 120, started  # not [60.0, 60.0]
    assert run.paused == set()


def test_a_redrive_of_a_job_whose_last_attempt_is_being_written_says_so(
    make_run: MakeRun,
) -> None:
    # Job 2 gives up (to 'failed') in the turn before a change asks to move 'failed' back to
    # 'new': the job is busy until its record is on disk, so the change leaves it. The answer
    # (what `jorb redrive` prints) must say it is settling and to redrive again, not that it
    # is running; and again, a moment later, it is moved.
    answers: list[dict[str, Any]] = []
    go = asyncio.Event()
    tries: Counter[int] = Counter()

    def redrive_failed(app: App) -> Any:
        request = control.new_request("redrive", {"from": "failed", "to": "new", "jobs": None})
        return app.processor._steering.change(request)  # (what the inbox's watcher does)

    async def work(app: App, overall: Ctx, ctx: Ctx) -> Any:
        tries[ctx["n"]] += 1
        if ctx["n"] == 0:  # the one that asks, woken first
            await go.wait()
            await asyncio.sleep(0)  # a turn: job 2, woken second, gives up meanwhile
            answers.append(await redrive_failed(app))
            await asyncio.sleep(1)  # (virtual) its record is on disk by now
            answers.append(await redrive_failed(app))
        elif ctx["n"] == 1 and tries[1] == 1:
            await go.wait()
            raise jorb.NoRetry("not yet")
        elif ctx["n"] == 2:
            go.set()  # both others wait for it by now
        return ctx, "done"

    states = [jorb.State("new", exec=work, concurrency=3), jorb.State("failed", terminal=True)]
    run = make_run([{"n": n} for n in range(3)])
    app = App()
    app.processor = jorb.Processor(app, [*states, DONE], progress=False)

    _drive(app.processor, run)

    assert answers == [
        {"result": {"moved": 0, "skipped": ["2"], "settling": ["2"]}},
        {"result": {"moved": 1, "skipped": []}},
    ]
    assert run.counts() == {"done": 3}, errors_of(run)
    steps = [(h["from"], h["to"]) for h in run.jobs["2"].steps()]
    assert steps == [("new", "failed"), ("failed", "new"), ("new", "done")]
