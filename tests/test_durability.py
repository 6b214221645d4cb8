"""Durability end to end: real processes killed for real, interrupted, locked out, edited.

The workflow is tests/scripts/fanout.py: roots kick children through four states, every exec
appends ``"key state"`` to an effects log and records ``ctx[state] = True``. The tests read its
stdout through a pipe as the progress signal; the only timers are the random delays before a
kill, which are the fault injection itself.
"""

from __future__ import annotations

import random
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest
from scripts.fanout import CONCURRENCY, PENDING
from scripts.harness import Proc

import jorb
from jorb.checkpoint import is_locked, journal_path, read_journal

#: What a kill may make run again in one state: its execs in flight, plus those settled and not
#: yet on disk, at most the state's share of max_pending less one (see README, Durability).
AGAIN = {state: n + PENDING // len(CONCURRENCY) - 1 for state, n in CONCURRENCY.items()}


class Fanout:
    """One fan-out run in ``tmp``: start the script on it, and check the end state."""

    def __init__(self, tmp: Path, roots: int, kids: int, *options: object) -> None:
        self.tmp = tmp
        self.path = tmp / "run.json"
        self.effects = tmp / "effects.log"
        self.roots, self.kids = roots, kids
        self.options = options
        self.procs: list[Proc] = []

    def start(self, *extra: object) -> Proc:
        proc = Proc(
            self.tmp,
            "fanout.py",
            self.path,
            self.effects,
            "--roots",
            self.roots,
            "--kids",
            self.kids,
            *self.options,
            *extra,
        )
        self.procs.append(proc)
        return proc

    def expected_effects(self) -> set[tuple[str, str]]:
        expected = set()
        for r in range(self.roots):
            expected |= {(f"r{r}", "new"), (f"r{r}", "split")}
            for k in range(self.kids):
                expected |= {(f"r{r}/{k}", "child"), (f"r{r}/{k}", "check")}
        return expected

    def effects_seen(self) -> Counter[tuple[str, str]]:
        lines = self.effects.read_text().splitlines() if self.effects.exists() else []
        return Counter(tuple(line.split(" ")) for line in lines)  # type: ignore[misc]

    def effects_since(self, offset: int) -> list[tuple[str, str]]:
        with self.effects.open("rb") as log:
            log.seek(offset)
            return [tuple(line.split(" ")) for line in log.read().decode().splitlines()]  # type: ignore[misc]

    def effects_size(self) -> int:
        return self.effects.stat().st_size if self.effects.exists() else 0

    def check_after_kill(self, segment_start: int) -> None:
        """After a kill: the files load and lose nothing that finished.

        An exec starts only once the transition that led to it is on disk, so each effect in the
        log vouches for one: ``split`` for its root's new->split, ``child`` for its parent's
        split (which created it), ``check`` for its own child->check. And of the execs that ran
        since the last start, only those in flight at the kill or settled and not yet on disk
        (at most ``AGAIN`` per state) may be missing from the file.
        """
        run = jorb.Run.load(self.path)
        by_key = {job.ctx["key"]: job for job in run.jobs.values()}

        def done(key: str, state: str) -> bool:
            job = by_key.get(key)
            return job is not None and state in [h["from"] for h in job.steps()]

        for key, state in self.effects_seen():
            vouched = {"new": None, "split": (key, "new"), "check": (key, "child")}.get(
                state, (key.split("/")[0], "split")
            )
            assert vouched is None or done(*vouched), f"{key} {state} ran, {vouched} is lost"
            assert state != "child" or key in by_key, f"{key} ran, but is not in the run"
        lost = Counter(
            state for key, state in self.effects_since(segment_start) if not done(key, state)
        )
        for state, n in lost.items():
            assert n <= AGAIN[state], f"{n} {state} execs lost at one kill: {lost}"

    def check_complete(self, kills: int, dropped: int = 0) -> None:
        """Every root and child exactly once, all done, every effect in ctx, and no more
        re-executions than could be in flight at the kills (plus ``dropped`` transitions)."""
        assert not journal_path(self.path).exists(), "a clean exit folds the journal in"
        run = jorb.Run.load(self.path)
        keys = Counter(job.ctx["key"] for job in run.jobs.values())
        twice = [key for key, n in keys.items() if n > 1]
        assert not twice, f"jobs present more than once: {twice}"
        roots = {f"r{r}" for r in range(self.roots)}
        kids = {f"r{r}/{k}" for r in range(self.roots) for k in range(self.kids)}
        assert set(keys) == roots | kids
        for job in run.jobs.values():
            key = job.ctx["key"]
            assert job.state == "done", job
            steps = ["new", "split"] if key in roots else ["child", "check"]
            assert all(job.ctx.get(step) is True for step in steps), job.ctx
            assert [h["from"] for h in job.steps()] == steps, job.history
            if key in roots:
                assert job.parent is None
            else:
                assert job.parent is not None
                assert run.jobs[job.parent].ctx["key"] == key.rsplit("/", 1)[0]
        assert 0 < run.seq <= sum(len(job.history) for job in run.jobs.values())
        seen = self.effects_seen()
        expected = self.expected_effects()
        assert set(seen) == expected, "every exec ran at least once, and nothing else did"
        again = sum(seen.values()) - len(expected)
        bound = sum(AGAIN.values())
        assert again <= bound * kills + dropped, (
            f"{again} re-executions after {kills} kills; at most {bound} execs can be in "
            f"flight or waiting for the disk at a kill"
        )


@pytest.fixture
def reaper() -> list[Proc]:
    procs: list[Proc] = []
    yield procs
    for proc in procs:
        proc.stop()


# -- kill -9 at random moments -------------------------------------------------------------

KILL_SCENARIOS = {
    # name: (seed, kills, script options)
    "fsync": (31, 8, ("--durable", "1")),
    "no-fsync, compact every batch": (32, 8, ("--durable", "0", "--compact-always")),
    "fsync, compact every batch": (33, 8, ("--durable", "1", "--compact-always")),
    "snapshots written 7 jobs a piece": (
        34,
        8,
        ("--durable", "1", "--compact-always", "--encode-chunk", "7"),
    ),
    # Execs that return at once settle many per turn: max_pending is what bounds the re-runs.
    "instant execs, fsync": (35, 8, ("--durable", "1", "--instant")),
    "instant execs, no-fsync": (36, 8, ("--durable", "0", "--instant")),
    "fsync on the store's thread": (37, 8, ("--durable", "1", "--fsync-thread")),
    "instant execs, fsync on the store's thread, compact every batch": (
        38,
        8,
        ("--durable", "1", "--instant", "--fsync-thread", "--compact-always"),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(KILL_SCENARIOS))
def test_sigkill_at_random_moments_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, scenario: str, reaper: list[Proc]
) -> None:
    """Kill -9 the fan-out again and again (mid-exec, mid-fsync, mid-compaction, at startup),
    resume each time; the finished run is whole and re-ran no more than was in flight."""
    seed, target, options = KILL_SCENARIOS[scenario]
    rng = random.Random(seed)
    fanout = Fanout(tmp_path, 60, 8, *options)
    kills = 0
    while kills < target:
        segment_start = fanout.effects_size()
        proc = fanout.start()
        reaper.append(proc)
        if rng.random() < 0.2:
            # Before any progress: during start-up, replay, or the first compaction (and at
            # the latest at the first exec, so a quick start cannot finish the run).
            proc.wait_before_output(rng.uniform(0.05, 0.5))
        else:
            progressed = proc.wait_lines(len(proc.lines) + rng.randint(1, 30))
            assert progressed, f"the run finished after {kills} kills; make it bigger"
            threading.Event().wait(rng.uniform(0, 0.02))
        code = proc.kill()
        assert code == -signal.SIGKILL, f"exit status {code}\n{proc.stderr()}"
        kills += 1
        # Whatever moment the kill hit, the files load, and hold every transition that any
        # exec already depended on.
        if fanout.path.exists():
            fanout.check_after_kill(segment_start)
        assert not is_locked(fanout.path), "the OS released the dead process's lock"
    proc = fanout.start()
    reaper.append(proc)
    proc.finish()
    fanout.check_complete(kills)


def test_a_reader_never_sees_a_torn_or_conflicting_run_while_a_process_compacts(
    tmp_path: Path, reaper: list[Proc]
) -> None:
    """``Run.load`` from another process (what ``jorb status`` does) while the run compacts
    after every batch: every load succeeds and progress never goes backwards."""
    fanout = Fanout(tmp_path, 30, 6, "--durable", "0", "--compact-always")
    proc = fanout.start()
    reaper.append(proc)
    proc.wait_lines(1)
    loads, last = 0, -1
    while proc.popen.poll() is None or loads == 0:
        run = jorb.Run.load(fanout.path)
        loads += 1
        assert run.seq >= last, "a later load went back in time"
        assert run.seq <= sum(len(job.history) for job in run.jobs.values())
        last = run.seq
    proc.finish()
    fanout.check_complete(kills=0)
    assert loads > 1


# -- Ctrl-C and SIGTERM ----------------------------------------------------------------------


def _resume_line(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "Resume" in line or "resume" in line]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_first_interrupt_finishes_running_execs_checkpoints_and_exits_130(
    tmp_path: Path, signum: int, reaper: list[Proc]
) -> None:
    fanout = Fanout(tmp_path, 30, 6)
    # Every "child" exec waits for the test's word after logging: the run cannot finish before
    # the signal arrives, and the execs it finds running finish after it.
    proc = fanout.start("--hold", "child")
    reaper.append(proc)
    proc.wait_for(" child")  # mid-run: children exist and execs are in flight
    proc.signal(signum)
    proc.wait_for("stopping", stderr=True)  # the signal is handled: the running execs go on
    proc.release()
    assert proc.wait() == 130
    stderr = proc.stderr()
    assert "Traceback" not in stderr
    resume = _resume_line(stderr)
    assert len(resume) == 1, stderr
    assert str(fanout.path) in resume[0]
    assert not journal_path(fanout.path).exists(), "the journal was folded into the run file"
    run = jorb.Run.load(fanout.path)
    assert 0 < run.counts().get("done", 0) < len(fanout.expected_effects())
    proc = fanout.start()
    reaper.append(proc)
    proc.finish()
    # Running execs were allowed to finish and were checkpointed: nothing runs twice.
    fanout.check_complete(kills=0)
    assert max(fanout.effects_seen().values()) == 1


def test_a_second_interrupt_stops_at_once_and_the_run_still_resumes(
    tmp_path: Path, reaper: list[Proc]
) -> None:
    fanout = Fanout(tmp_path, 20, 4)
    # Every "child" exec hangs after logging: the first Ctrl-C would wait out the grace.
    proc = fanout.start("--stall", "child")
    reaper.append(proc)
    proc.wait_lines(CONCURRENCY["child"] + 1)
    proc.wait_for(" child")
    proc.signal(signal.SIGINT)
    proc.wait_for("stopping", stderr=True)  # the first Ctrl-C is waiting for running execs
    proc.signal(signal.SIGINT)
    assert proc.wait(timeout=5) == 130, "a second Ctrl-C does not wait for the grace period"
    assert "Traceback" not in proc.stderr()
    jorb.Run.load(fanout.path)  # loads, journal and all
    proc = fanout.start()
    reaper.append(proc)
    proc.finish()
    fanout.check_complete(kills=1)


def test_execs_still_running_after_the_grace_period_are_cancelled_and_run_again(
    tmp_path: Path, reaper: list[Proc]
) -> None:
    fanout = Fanout(tmp_path, 20, 4)
    proc = fanout.start("--stall", "child", "--grace", "0.3")
    reaper.append(proc)
    proc.wait_for(" child")
    proc.signal(signal.SIGINT)
    assert proc.wait() == 130
    assert "Traceback" not in proc.stderr()
    assert len(_resume_line(proc.stderr())) == 1
    assert not journal_path(fanout.path).exists()
    stalled = {key for key, state in fanout.effects_seen() if state == "child"}
    run = jorb.Run.load(fanout.path)
    assert {job.ctx["key"] for job in run.jobs.values() if job.state == "child"} >= stalled
    proc = fanout.start()
    reaper.append(proc)
    proc.finish()
    fanout.check_complete(kills=1)


# -- the lock ----------------------------------------------------------------------------------


def test_a_second_process_is_refused_until_the_holder_dies(
    tmp_path: Path, reaper: list[Proc]
) -> None:
    path = tmp_path / "run.json"
    holder = Proc(tmp_path, "hold.py", path)
    reaper.append(holder)
    holder.wait_for("holding")
    with pytest.raises(jorb.RunLockedError) as refused:
        jorb.Run.open(path)
    message = str(refused.value)
    assert str(path) in message and f"process {holder.pid}" in message
    assert "released" in message  # says what to do: wait, or stop the holder
    other = Proc(tmp_path, "open_run.py", path)
    reaper.append(other)
    assert other.wait() == 1
    assert other.lines == [f"RunLockedError: {message}"]
    assert is_locked(path)
    assert holder.kill() == -signal.SIGKILL
    assert not is_locked(path)
    jorb.Run.open(path).close()
    other = Proc(tmp_path, "open_run.py", path)
    reaper.append(other)
    other.finish()
    assert other.lines == ["opened"]


def test_a_script_that_hangs_fails_its_test_showing_where_it_hung(
    tmp_path: Path, reaper: list[Proc]
) -> None:
    # The harness's guard against a hang says more than "no output": the script's stacks.
    holder = Proc(tmp_path, "hold.py", tmp_path / "run.json")
    reaper.append(holder)
    holder.wait_for("holding")  # then it reads stdin, which the test never writes to
    with pytest.raises(AssertionError) as stuck:
        holder.wait_for("a line hold.py never prints", timeout=0.5)
    failure = str(stuck.value)
    assert failure.startswith("no output for 0.5s"), failure
    assert 'hold.py", line' in failure and "in <module>" in failure, failure
    assert holder.eof, "the script ended after printing its stacks"


def test_a_second_open_in_the_same_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    run = jorb.Run.open(path)
    try:
        with pytest.raises(jorb.RunLockedError, match="already open in this process"):
            jorb.Run.open(path)
    finally:
        run.close()
    jorb.Run.open(path).close()


# -- the journal and the file disagree ---------------------------------------------------------


def test_a_run_file_edited_after_a_crash_is_refused_and_both_files_are_kept(
    tmp_path: Path, reaper: list[Proc]
) -> None:
    fanout = Fanout(tmp_path, 20, 4, "--durable", "0")
    proc = fanout.start()
    reaper.append(proc)
    proc.wait_for(" child")  # a child ran, so its parent's record is in the journal
    assert proc.kill() == -signal.SIGKILL
    journal = journal_path(fanout.path)
    header, parsed = read_journal(journal)
    records = [record for _, record in parsed]
    assert header is not None and [r for r in records if r["seq"] > header["seq"]]
    original = fanout.path.read_bytes()
    edited = original.replace(b'"key": "r19"', b'"key": "r19", "note": "mine"', 1)
    assert edited != original
    fanout.path.write_bytes(edited)
    journal_bytes = journal.read_bytes()
    for attempt in (jorb.Run.load, jorb.Run.open, jorb.Run.open):
        with pytest.raises(jorb.JournalConflictError) as refused:
            attempt(fanout.path)
        assert fanout.path.read_bytes() == edited and journal.read_bytes() == journal_bytes
    message = str(refused.value)
    assert str(fanout.path) in message and f"delete {journal}" in message
    assert f"jorb fold {fanout.path}" in message
    # The first way out: put the file back as it was; the journal's work is kept.
    fanout.path.write_bytes(original)
    replayed = jorb.Run.load(fanout.path)
    assert replayed.seq == records[-1]["seq"]
    # The other: keep the edit, drop the journal; the edit is honoured.
    fanout.path.write_bytes(edited)
    journal.unlink()
    kept = jorb.Run.load(fanout.path)
    assert [j.ctx.get("note") for j in kept.jobs.values() if j.ctx["key"] == "r19"] == ["mine"]
    proc = fanout.start()
    reaper.append(proc)
    proc.finish()
    fanout.check_complete(kills=1, dropped=len(records))  # the dropped journal's work reran
