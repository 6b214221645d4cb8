"""Hardening (issue 18): a run is known by its real file, every journal line is checked, files
jorb creates cannot be redirected, special files are refused, and forked children or a
deleted directory do not mislead.

Each test here failed before its fix (the issue's findings 1, 2, 4, 6 and 7).
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import DONE, MakeRun, process
from test_checkpoint import STATES, assert_consistent, roots, stop_before_finish

import jorb
from jorb import checkpoint
from jorb.checkpoint import Store, encode_run, is_locked, journal_path, lock_path

Ctx = dict[str, Any]
STUCK = 10.0


def crash(path: Path, monkeypatch: pytest.MonkeyPatch, name: Path | None = None) -> jorb.Run:
    """Execute a run at ``path`` (opened by ``name``) to the end, and "die" before the journal
    is folded in: the journal holds every transition."""
    run = jorb.Run.open(name or path)
    for ctx in roots(6):
        run.add_job(ctx, "a")
    with monkeypatch.context() as patch:
        stop_before_finish(patch)
        process(STATES, run)
    run.close()
    assert journal_path(path).exists()
    return run


# -- 1. identity -------------------------------------------------------------------------------


def test_a_run_reopened_through_a_symlink_replays_its_journal_and_stays_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "run.json"
    link = tmp_path / "current.json"
    link.symlink_to("real/run.json")
    crashed = crash(real, monkeypatch)
    loaded = jorb.Run.load(link)
    assert encode_run(loaded) == encode_run(crashed), "the journal's transitions were ignored"
    ran: list[str] = []

    async def count(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        ran.append(ctx["key"])
        return ctx, "done"

    with jorb.Run.open(link) as run:
        process([jorb.State("a", exec=count), jorb.State("b", exec=count), DONE], run)
    assert ran == [], "committed transitions ran again"
    assert link.is_symlink() and os.readlink(link) == "real/run.json"
    assert not journal_path(real).exists() and not journal_path(link).exists()
    assert_consistent(jorb.Run.load(real))


def test_a_run_opened_by_its_real_name_is_locked_under_a_symlink_too(tmp_path: Path) -> None:
    real = tmp_path / "run.json"
    link = tmp_path / "link.json"
    link.symlink_to(real.name)
    with jorb.Run.open(real):
        with pytest.raises(jorb.RunLockedError):
            jorb.Run.open(link)
        assert is_locked(link)
    with jorb.Run.open(link) as run:  # a new run made through a dangling link
        run.add_job({"x": 1})
        with pytest.raises(jorb.RunLockedError):
            jorb.Run.open(real)
        run.save()
    assert link.is_symlink() and len(jorb.Run.load(real).jobs) == 1


def test_a_run_file_with_a_hard_link_is_refused_with_the_reason(tmp_path: Path) -> None:
    real = tmp_path / "run.json"
    with jorb.Run.open(real) as run:
        run.save()
    os.link(real, tmp_path / "other.json")
    for use in (jorb.Run.open, jorb.Run.load):
        with pytest.raises(jorb.RunFileError, match=r"2 hard links.*symlink instead"):
            use(tmp_path / "other.json")
    assert not lock_path(tmp_path / "other.json").exists()


# -- 2. checksums --------------------------------------------------------------------------------


def test_a_version_1_journal_without_checksums_still_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.json"
    crashed = crash(path, monkeypatch)
    journal = journal_path(path)
    lines = journal.read_bytes().splitlines(keepends=True)
    assert all(zlib.crc32(line[9:]) == int(line[:8], 16) for line in lines)
    old = [line[9:] for line in lines]
    old[0] = old[0].replace(b'"journal":2', b'"journal":1')
    journal.write_bytes(b"".join(old))
    assert encode_run(jorb.Run.load(path)) == encode_run(crashed)


def _mutants(lines: list[bytes], rng: random.Random) -> list[tuple[str, bytes]]:
    """Damaged copies of a journal: byte flips anywhere, and records whose fields were changed
    and framed again with a correct checksum (what only the fields' checks can catch)."""
    values: list[Any] = [
        None, "", "x", "[/bold]", -1, 0, 1.5, 1e308, True, [], {}, [1], {"a": 1}, "99", "1",
    ]  # fmt: skip
    mutants = []
    whole = b"".join(lines)
    for _ in range(150):
        at = rng.randrange(len(whole))
        flipped = bytearray(whole)
        flipped[at] ^= 1 << rng.randrange(8)
        mutants.append((f"bit flip at byte {at}", bytes(flipped)))
    for _ in range(400):
        index = rng.randrange(1, len(lines))
        record = orjson.loads(lines[index][9:])
        target, key = _pick_field(record, rng)
        target[key] = rng.choice(values)
        body = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        line = b"%08x %b" % (zlib.crc32(body), body)
        mutants.append((f"line {index + 1} {key!r} = {target[key]!r}", b"".join(
            [*lines[:index], line, *lines[index + 1 :]]
        )))  # fmt: skip
    return mutants


def _pick_field(record: dict[str, Any], rng: random.Random) -> tuple[dict[str, Any], str]:
    """A field anywhere in the record (a nested object's, a kid's), to change."""
    target = record
    while True:
        key = rng.choice(list(target))
        inner = target[key]
        if isinstance(inner, list) and inner and isinstance(inner[0], dict) and rng.random() < 0.7:
            inner = rng.choice(inner)
        if isinstance(inner, dict) and inner and rng.random() < 0.7:
            target = inner
            continue
        return target, key


def test_fuzzed_journals_are_refused_naming_the_line_or_fold_into_a_file_that_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Byte flips and field changes over a real journal: each one is refused with a
    JorbError naming the journal (and both files are left as they were), or it loads, and
    what it loads is a run whose file loads again (never a fold into an unloadable file)."""
    from jorb import cli

    path = tmp_path / "run.json"
    crash(path, monkeypatch)
    journal = journal_path(path)
    lines = journal.read_bytes().splitlines(keepends=True)
    snapshot = path.read_bytes()
    refused = loaded = 0
    for what, data in _mutants(lines, random.Random(18)):
        journal.write_bytes(data)
        try:
            run = jorb.Run.load(path)
        except jorb.JorbError as e:
            assert str(e).startswith(f"{journal}: line "), (what, e)
            refused += 1
            continue
        except Exception as e:  # pragma: no cover - what the test is for
            pytest.fail(f"{what}: {type(e).__name__}: {e}")
        loaded += 1
        again = checkpoint.decode_run(encode_run(run), path)  # what a fold would write
        assert encode_run(again) == encode_run(run), what
        for job in list(run.jobs.values())[:3]:
            cli.report.job_detail(run, job.id)
        assert path.read_bytes() == snapshot
    with capsys.disabled():
        print(f"\njournal fuzz: {refused + loaded} mutants, {refused} refused, {loaded} loaded")
    assert refused > 100 and loaded > 50, (refused, loaded)


BAD_SUCCESSES: dict[str, tuple[Any, str]] = {  # the damage, and what the refusal says
    "an unknown job": (lambda e: e.__setitem__(0, "999"), "'999' is no job of the run"),
    "an id that is no string": (lambda e: e.__setitem__(0, 1), "1 is no job of the run"),
    "no state": (lambda e: e.__setitem__(1, ""), "a success needs a state name"),
    "a ctx that is no object": (lambda e: e.__setitem__(2, []), "a ctx object"),
    "a time past the year 9999": (lambda e: e.__setitem__(3, 1e308), "and a time"),
    "a time that is a boolean": (lambda e: e.__setitem__(3, True), "and a time"),
    "a duration that is a string": (lambda e: e.__setitem__(4, "0.1"), "must be a number"),
    "four fields": (lambda e: e.pop(), "[id, to, ctx, time, duration]"),
}


@pytest.mark.parametrize("damage", list(BAD_SUCCESSES))
def test_a_damaged_success_in_a_journal_is_refused_naming_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    """An entry of a batch of plain successes, changed and framed again with a correct
    checksum (so only the entry's checks can catch it), is refused, not applied."""
    path = tmp_path / "run.json"
    crash(path, monkeypatch)
    journal = journal_path(path)
    lines = journal.read_bytes().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if b'"ok":' in line)
    record = orjson.loads(lines[index][9:])
    change, says = BAD_SUCCESSES[damage]
    change(record["ok"][-1])
    body = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    lines[index] = b"%08x %b" % (zlib.crc32(body), body)
    journal.write_bytes(b"".join(lines))
    with pytest.raises(jorb.JorbError, match=f"^{journal}: line {index + 1}") as refused:
        jorb.Run.load(path)
    assert says in str(refused.value)


def test_a_flipped_byte_mid_journal_is_refused_by_exec_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.json"
    crash(path, monkeypatch)
    journal = journal_path(path)
    data = bytearray(journal.read_bytes())
    second = data.index(b"\n") + 1
    data[second + 30] ^= 0x04  # inside the first record's JSON, whatever it says
    journal.write_bytes(bytes(data))
    before = path.read_bytes()
    with (
        pytest.raises(jorb.CorruptRunError, match=r"line 2 fails its checksum"),
        jorb.Run.open(path) as run,
    ):
        process(STATES, run)
    assert journal.read_bytes() == data and path.read_bytes() == before


# -- 4. files jorb creates -----------------------------------------------------------------------


def test_planted_symlinks_at_the_lock_and_temp_names_redirect_nothing(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    path = tmp_path / "run.json"
    lock_path(path).symlink_to(victim)
    with pytest.raises(jorb.RunFileError, match=r"lock file .* is a symlink"):
        jorb.Run.open(path)
    assert victim.read_text() == "precious\n"
    lock_path(path).unlink()
    temp = checkpoint._temp_path(path)
    temp.symlink_to(victim)
    journal_temp = checkpoint._temp_path(journal_path(path))
    journal_temp.symlink_to(victim)
    with jorb.Run.open(path) as run:
        run.add_job({"key": "r0"}, "a")
        run.save()
        process(STATES, run)
    assert victim.read_text() == "precious\n"
    assert not temp.is_symlink() and not journal_temp.is_symlink()
    assert len(jorb.Run.load(path).jobs) == 2


def test_a_run_file_keeps_its_mode_and_owner_and_the_journal_is_no_more_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.json"
    with jorb.Run.open(path) as run:
        run.add_job({"key": "r0"}, "a")
        run.save()
    os.chmod(path, 0o600)
    owner = (4321, 4321) if os.geteuid() == 0 else None
    if owner:
        os.chown(path, *owner)
    with monkeypatch.context() as patch, jorb.Run.open(path) as run:
        stop_before_finish(patch)  # the journal stays, as a crash leaves it
        process(STATES, run)
    journal = os.stat(journal_path(path))
    assert stat.S_IMODE(journal.st_mode) == 0o600
    if owner:
        assert (journal.st_uid, journal.st_gid) == owner
    with jorb.Run.open(path) as run:
        process(STATES, run)
    jorb.control.add(path, [{"key": "r8"}], "a")  # what `jorb add` does
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with jorb.Run.open(path) as run:
        run.save()
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    if owner:
        assert (st.st_uid, st.st_gid) == owner


# -- 6. special files and absurd values -----------------------------------------------------------


def _returns(fn: Any) -> BaseException | None:
    """Call ``fn`` in a thread; what it raised (None if nothing). A call still blocked after
    STUCK seconds fails the test (the guard against a hang, not a wait for something)."""
    raised: list[BaseException | None] = []

    def call() -> None:
        try:
            fn()
            raised.append(None)
        except BaseException as e:
            raised.append(e)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(STUCK)
    assert raised, "blocked"
    return raised[0]


@pytest.mark.parametrize("which", ["run file", "journal"])
def test_a_fifo_is_refused_not_waited_on(tmp_path: Path, which: str) -> None:
    path = tmp_path / "run.json"
    with jorb.Run.open(path) as run:
        run.save()
    fifo = path if which == "run file" else journal_path(path)
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # a writer that never writes: a read would block
    try:
        for use in (jorb.Run.load, jorb.Run.open):
            error = _returns(lambda use=use: use(path))
            assert isinstance(error, jorb.RunFileError), error
            assert "is a FIFO" in str(error)
    finally:
        os.close(writer)


def test_a_symlink_to_a_device_or_a_loop_is_refused_clearly(tmp_path: Path) -> None:
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    error = _returns(lambda: jorb.Run.load(zero))
    assert isinstance(error, jorb.RunFileError) and "a character device" in str(error)
    (tmp_path / "a.json").symlink_to("b.json")
    (tmp_path / "b.json").symlink_to("a.json")
    for use in (jorb.Run.load, jorb.Run.open):
        with pytest.raises(jorb.RunFileError, match="a loop of symlinks"):
            use(tmp_path / "a.json")
    (tmp_path / "d.json").mkdir()
    with pytest.raises(jorb.RunFileError, match="is a directory"):
        jorb.Run.open(tmp_path / "d.json")


def test_a_not_before_past_any_real_time_is_refused_naming_the_job(make_run: MakeRun) -> None:
    run = make_run([{"k": 1}, {"k": 2}])
    run.save()
    path = run.path
    assert path is not None
    run.close()
    doc = orjson.loads(path.read_bytes())
    doc["jobs"][1]["not_before"] = 1e308
    path.write_bytes(orjson.dumps(doc))
    with pytest.raises(jorb.CorruptRunError, match=r"job 2.*not_before.*year 9999"):
        jorb.Run.load(path)
    with pytest.raises(jorb.JorbError, match="not_before"):
        jorb.Run(None).add_job({}, not_before=1e308)


def test_a_parent_cycle_through_a_join_state_is_refused_not_waited_on(make_run: MakeRun) -> None:
    run = make_run([{"k": 1}, {"k": 2}, {"k": 3}], "wait")
    run.jobs["1"].parent = "2"
    run.jobs["2"].parent = "1"

    def join(app: Any, overall: Ctx, ctx: Ctx, children: Any) -> Any:
        return ctx, "done"

    states = [jorb.State("wait", exec=join, join=True), DONE]
    with pytest.raises(jorb.RunFileError, match=r"jobs 1 -> 2 -> 1 are each other's parent"):
        process(states, run)


# -- 7. forks and a deleted directory --------------------------------------------------------------


def test_a_forked_child_does_not_keep_the_run_locked(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    store = Store(path)
    release_r, release_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child lives on (blocked on the pipe) after the parent lets go
        try:
            os.write(ready_w, b"x")  # (fork has returned here: its handlers ran)
            os.read(release_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        store.close()  # as the parent's death would
        assert not is_locked(path), "the forked child still holds the lock"
        jorb.Run.open(path).close()
    finally:
        os.write(release_w, b"x")
        os.waitpid(pid, 0)
        for fd in (release_r, release_w, ready_r, ready_w):
            os.close(fd)


def test_a_lock_held_after_its_taker_died_says_so(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, gone.stdout.encode())
        with pytest.raises(jorb.RunLockedError) as locked:
            jorb.Run.open(path)
        message = str(locked.value)
        assert f"process {gone.stdout.strip()} took its lock" in message
        assert "has exited" in message and "inherited" in message
    finally:
        os.close(fd)


def test_a_deleted_directory_is_not_promised_to_resume(tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()

    async def delete(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        shutil.rmtree(folder)
        return ctx, "done"

    with jorb.Run.open(folder / "run.json") as run:
        run.add_job({}, "a")
        with pytest.raises(jorb.CheckpointError) as failed:
            process([jorb.State("a", exec=delete), DONE], run)
    message = str(failed.value)
    assert "resumes from it" not in message
    assert f"its directory {folder} is gone" in message, message


def test_a_write_error_elsewhere_still_promises_the_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    calls = [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        if calls[0] > 4:
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    with jorb.Run.open(tmp_path / "run.json") as run:
        run.add_job({"key": "r0"}, "a")
        with pytest.raises(jorb.CheckpointError, match="is intact and a rerun resumes from it"):
            process(STATES, run)


def test_a_change_through_a_symlink_goes_through_the_real_files_inbox(
    tmp_path: Path,
) -> None:
    real = tmp_path / "run.json"
    link = tmp_path / "link.json"
    link.symlink_to(real.name)
    with jorb.Run.open(real) as run:
        run.add_job({"key": "r0"}, "a")
        run.save()
        process(STATES, run)
    jorb.control.add(link, [{"key": "r1"}], "a")
    assert sorted(job.ctx["key"] for job in jorb.Run.load(real).jobs.values()) == [
        "r0", "r0/0", "r1",
    ]  # fmt: skip
    assert not (tmp_path / "link.json.inbox").exists()
    assert link.is_symlink()


FORKING_EXEC = """
import asyncio, os, signal, sys
import jorb

async def spawn(app, overall, ctx):
    if os.fork() == 0:  # a daemon the exec leaves behind: it outlives the process running the run
        print(os.getpid(), flush=True)  # (fork has returned here: its handlers ran)
        signal.pause()
        os._exit(0)
    await asyncio.Event().wait()  # the exec never returns: its process is killed

run = jorb.Run.open(sys.argv[1])
run.add_job({}, "a")
jorb.Processor(None, [jorb.State("a", exec=spawn), jorb.State("done", terminal=True)],
               progress=False).exec(run)
"""


def test_a_child_forked_by_an_exec_does_not_hold_the_run_after_its_parent_is_killed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.json"
    parent = subprocess.Popen(
        [sys.executable, "-c", FORKING_EXEC, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())  # the exec has forked, and the child runs
    try:
        parent.kill()
        parent.wait()
        assert not is_locked(path), "the forked child keeps the lock of its dead parent"
        with jorb.Run.open(path) as run:
            assert list(run.jobs) == ["1"]
    finally:
        os.kill(child, 9)


def test_a_run_made_by_a_symlinks_name_is_executed_as_the_real_file(tmp_path: Path) -> None:
    real = tmp_path / "run.json"
    link = tmp_path / "link.json"
    link.symlink_to(real.name)
    run = jorb.Run(link)
    run.add_job({"key": "r0"}, "a")
    process(STATES, run)
    run.close()
    assert run.path == real and link.is_symlink()
    assert_consistent(jorb.Run.load(link))
