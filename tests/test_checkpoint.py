"""The checkpoint: run files and journals on disk, what loads, what is refused, and the writer
under faults (os calls in jorb.checkpoint made to fail by monkeypatching, never by luck).

The workflow used throughout: roots in "a" each kick one child into "b" and finish; every exec
records its effect in ctx. ``assert_consistent`` checks a loaded run is one the process really
had (never a torn mix): histories chain, effects match them, parents never moved without
their children, and ``seq`` counts every transition.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import os
import random
import shutil
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import DONE, MakeRun, process

import jorb
from jorb import checkpoint
from jorb.checkpoint import (
    Store,
    encode_run,
    is_locked,
    journal_path,
    lock_path,
    parse_journal,
    read_journal,
    read_run,
)
from jorb.model import apply_record

Ctx = dict[str, Any]
STUCK = 10.0


async def _a(app: Any, overall: Ctx, ctx: Ctx) -> Any:
    ctx["a"] = True
    return ctx, "done", [jorb.Kick("b", {"key": f"{ctx['key']}/0"})]


async def _b(app: Any, overall: Ctx, ctx: Ctx) -> Any:
    ctx["b"] = True
    return ctx, "done"


STATES = [jorb.State("a", exec=_a, concurrency=3), jorb.State("b", exec=_b, concurrency=3), DONE]


def roots(n: int = 12) -> list[Ctx]:
    return [{"key": f"r{i}"} for i in range(n)]


def assert_consistent(run: jorb.Run) -> None:
    """The run is one a process really had: no transition half-applied, none lost between
    a parent and its children, ``seq`` counting the records that made the transitions."""
    for job in run.jobs.values():
        first = "b" if job.parent else "a"
        chain = [first] + [h["to"] for h in job.steps()]
        assert [h["from"] for h in job.steps()] == chain[:-1], job.history
        assert chain[-1] == job.state
        for step in chain[:-1]:
            assert job.ctx.get(step) is True, (job, job.ctx)
        assert job.ctx.get(job.state) is None, "an effect without its transition"
        kids = run.children(job.id)
        if job.parent is None:
            assert len(kids) == (0 if job.state == "a" else 1), (job, kids)
            assert all(kid.ctx["key"] == f"{job.ctx['key']}/0" for kid in kids)
        else:
            assert run.jobs[job.parent].state != "a"
        assert int(job.id) < run.next_id
    transitions = sum(len(job.history) for job in run.jobs.values())
    # A record per exec with kicks, one per batch of plain successes: never more than those.
    assert (run.seq > 0) == (transitions > 0) and run.seq <= transitions


def assert_complete(run: jorb.Run, n: int) -> None:
    assert_consistent(run)
    assert run.counts() == {"done": 2 * n}
    keys = sorted(job.ctx["key"] for job in run.jobs.values())
    assert keys == sorted([f"r{i}" for i in range(n)] + [f"r{i}/0" for i in range(n)])


def stop_before_finish(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make exec end as a ``kill -9`` just before its last compaction would: journal left."""

    def finish(store: Store) -> None:
        store.executing = False
        store._close_journal()

    monkeypatch.setattr(Store, "finish", finish)


# -- corrupt run files --------------------------------------------------------------------------


def _good(tmp_path: Path) -> bytes:
    run = jorb.Run.open(tmp_path / "good.json", overall={"w": 1})
    for ctx in roots(3):
        run.add_job(ctx, "a")
    run.save()
    run.close()
    return (tmp_path / "good.json").read_bytes()


def _doc(edit: Callable[[dict[str, Any]], object]) -> Callable[[bytes], bytes]:
    def make(good: bytes) -> bytes:
        doc = orjson.loads(good)
        edit(doc)
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2)

    return make


def _job(key: str, value: Any = None, *, drop: bool = False) -> Callable[[bytes], bytes]:
    def edit(doc: dict[str, Any]) -> None:
        if drop:
            del doc["jobs"][1][key]
        else:
            doc["jobs"][1][key] = value

    return _doc(edit)


CORRUPT: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    # name: (make the bad bytes from good ones, what the message must say)
    "empty": (lambda good: b"", "the run file is empty"),
    "only whitespace": (lambda good: b"  \n\n", "the run file is empty"),
    "truncated": (lambda good: good[: len(good) // 2], "(the file ends early: truncated?)"),
    "cut after one byte": (lambda good: good[:1], "line 1, column 2"),
    "garbled bytes": (
        lambda good: good[:40] + b"\xff\xfe\x00\x81" + good[44:],
        "not UTF-8 text at line 3, column",
    ),
    "a brace lost": (lambda good: good.replace(b"}", b"", 1), "not valid JSON at line"),
    "a top-level array": (lambda good: b"[" + good + b"]", "expected a JSON object at the top"),
    "a top-level number": (lambda good: b"42\n", "got int"),
    "not a jorb file": (_doc(lambda d: d.pop("format")), "not a jorb run file"),
    "unknown version": (_doc(lambda d: d.update(version=99)), "version 99"),
    "missing jobs": (_doc(lambda d: d.pop("jobs")), '"jobs"'),
    "jobs not a list": (_doc(lambda d: d.update(jobs={})), '"jobs" has the wrong type (dict)'),
    "a job not an object": (_doc(lambda d: d["jobs"].append(7)), "jobs[3]: expected a job"),
    "a job without id": (_job("id", drop=True), 'jobs[1]: job has no string "id"'),
    "a job without state": (_job("state", drop=True), 'jobs[1] (job 2): job has no "state"'),
    "a job without ctx": (_job("ctx", drop=True), 'jobs[1] (job 2): job has no "ctx"'),
    "a state not a string": (_job("state", 5), '(job 2): "state" has the wrong type (int)'),
    "an empty state": (_job("state", ""), '(job 2): "state" is empty'),
    "a ctx not an object": (_job("ctx", [1]), '(job 2): "ctx" has the wrong type (list)'),
    "history not a list": (_job("history", "x"), '"history" has the wrong type (str)'),
    "an unknown job key": (_job("colour", "red"), "unknown job keys ['colour']"),
    "overall not an object": (_doc(lambda d: d.update(overall=3)), '"overall" has the wrong'),
    # Wrong types one level down: these loaded, then every `jorb` command died on them with a
    # Python traceback (model.py's checks stop at the job's own keys).
    "a history entry not an object": (_job("history", [1]), '(job 2): "history"'),
    "errors not lists": (_job("errors", {"a": 5}), '(job 2): "errors"'),
    "errors null": (_job("errors", None), '(job 2): "errors" has the wrong type (null)'),
    "polls a float zero": (_job("polls", 0.0), '(job 2): "polls" has the wrong type (float)'),
    "polls null": (_job("polls", None), '(job 2): "polls" has the wrong type (null)'),
    "a paused state not a name": (_doc(lambda d: d.update(paused=[3])), '"paused"'),
    "duplicate ids": (
        _doc(lambda d: d["jobs"].append(dict(d["jobs"][0]))),
        "job id '1' appears twice",
    ),
}


@pytest.mark.parametrize("shape", list(CORRUPT))
def test_a_corrupt_run_file_is_refused_with_where_and_left_as_it_was(
    tmp_path: Path, shape: str
) -> None:
    make, says = CORRUPT[shape]
    path = tmp_path / "run.json"
    bad = make(_good(tmp_path))
    path.write_bytes(bad)
    for load in (jorb.Run.load, jorb.Run.open):
        with pytest.raises(jorb.CorruptRunError) as refused:
            load(path)
        message = str(refused.value)
        assert message.startswith(f"{path}: ")
        assert says in message
        assert path.read_bytes() == bad
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "good.json",
        "good.json.lock",
        "run.json",
        "run.json.lock",
    ]
    assert not is_locked(path), "a refused open releases the lock"


def test_a_run_naming_undeclared_states_stops_before_any_work(make_run: MakeRun) -> None:
    run = make_run(roots(3), "a")
    run.save()
    text = run.path.read_bytes()  # type: ignore[union-attr]
    run.jobs["2"].state = "nowhere"
    ran: list[Ctx] = []

    async def spy(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        ran.append(ctx)
        return ctx, "done"

    with pytest.raises(jorb.StateError, match="'nowhere' \\(jobs 2\\)") as raised:
        process([jorb.State("a", exec=spy), DONE], run)
    assert "jorb redrive" in str(raised.value) and "add_job" not in str(raised.value)
    assert ran == []
    assert run.path.read_bytes() == text  # type: ignore[union-attr]


def test_jobs_added_in_an_undeclared_state_are_refused_with_the_fix_that_applies(
    tmp_path: Path,
) -> None:
    # Never saved, so nothing on disk to redrive; and add_job's default state is "new".
    run = jorb.Run.open(tmp_path / "run.json")
    run.add_job({"url": "u"})
    with pytest.raises(jorb.StateError, match="'new' \\(jobs 1\\)") as raised:
        process([jorb.State("x", exec=lambda *a: None), DONE], run)
    message = str(raised.value)
    assert "jorb redrive" not in message
    assert "run.add_job(ctx, state=...)" in message and "puts a job in 'new'" in message
    assert not (tmp_path / "run.json").exists()
    run.close()


# -- the journal: torn ends tolerated, damage refused -----------------------------------------


@pytest.fixture
def crashed(make_run: MakeRun, monkeypatch: pytest.MonkeyPatch) -> Iterator[jorb.Run]:
    """A run executed to the end, whose process "died" before folding its journal in."""
    run = make_run(roots(), "a")
    with monkeypatch.context() as patch:
        stop_before_finish(patch)
        process(STATES, run)
    run.close()
    assert journal_path(run.path).exists()  # type: ignore[arg-type]
    yield run


def _replayed(path: Path, records: int) -> bytes:
    """What loading gives with only the first ``records`` journal records."""
    _, all_records = read_journal(journal_path(path))
    run = checkpoint.decode_run(path.read_bytes(), path)
    for _, record in list(all_records)[:records]:
        apply_record(run, record)
    return encode_run(run)


def test_loading_replays_the_journal_to_exactly_what_the_process_had(crashed: jorb.Run) -> None:
    assert crashed.path is not None
    loaded = jorb.Run.load(crashed.path)
    assert encode_run(loaded) == encode_run(crashed)
    assert_complete(loaded, 12)


def test_a_journal_torn_anywhere_in_its_last_record_loads_the_records_before_it(
    crashed: jorb.Run,
) -> None:
    path = crashed.path
    assert path is not None
    journal = journal_path(path)
    whole = journal.read_bytes()
    ends = [i + 1 for i, byte in enumerate(whole) if byte == ord("\n")]
    for end, start in zip(ends[1:], ends, strict=False):  # each record: whole[start:end]
        records = ends.index(end) - 1  # records wholly before this one
        for cut in sorted({start + 1, (start + end) // 2, end - 2, end - 1}):
            journal.write_bytes(whole[:cut])
            loaded = jorb.Run.load(path)
            assert encode_run(loaded) == _replayed(path, records), f"cut at byte {cut}"
            assert_consistent(loaded)
            assert journal.read_bytes() == whole[:cut], "loading never repairs in place"


def test_a_garbage_last_line_is_a_torn_write_and_is_dropped(crashed: jorb.Run) -> None:
    path = crashed.path
    assert path is not None
    journal = journal_path(path)
    whole = journal.read_bytes()
    count = whole.count(b"\n") - 1
    journal.write_bytes(whole + b'{"seq": 9\x00\x00\x00\n')
    assert encode_run(jorb.Run.load(path)) == _replayed(path, count)


def framed(line: bytes) -> bytes:
    """A journal line (without its newline) with a correct checksum in front: damage that only
    a record's fields show. A line already framed is framed anew."""
    body = line[9:] if line[8:9] == b" " and not line.startswith(b"{") else line
    return b"%08x %b" % (zlib.crc32(body + b"\n"), body)


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda lines: [*lines[:3], b"garbage", *lines[3:]], "line 4 fails its checksum"),
        (
            lambda lines: [*lines[:3], lines[3][:20] + b"X" + lines[3][21:], *lines[4:]],
            "line 4 fails its checksum (damaged)",
        ),
        (lambda lines: [*lines[:3], framed(b"garbage"), *lines[3:]], "line 4 is not valid JSON"),
        (lambda lines: [*lines[:3], framed(b"[1, 2]"), *lines[3:]], "line 4 is not a journal"),
        (lambda lines: [*lines[:3], framed(b'{"seq": "x"}'), *lines[3:]], "line 4 is not a jo"),
        (
            lambda lines: lines[:2] + lines[3:4] + lines[2:3] + lines[4:],
            "line 3 has seq 3, after seq 1: records are missing",
        ),
        (lambda lines: lines[:2] + lines[3:], "records are missing"),
        (lambda lines: [b'{"journal": 1}', *lines[1:]], 'header has no integer "seq"'),
        (lambda lines: [b'{"journal": 7, "seq": 0}', *lines[1:]], "journal version 7"),
        (lambda lines: [b"{}", *lines[1:]], "line 1 is not a jorb journal header"),
        (lambda lines: [b'{"jour', *lines[1:]], "line 1 is not valid JSON"),
        (
            lambda lines: [
                framed(lines[0][9:].replace(b'"journal":2', b'"journal":1')),
                *lines[1:],
            ],
            "a version 1 header, but with a checksum",
        ),
        (
            lambda lines: [
                lines[0],
                framed(lines[1].replace(b'"job":"', b'"job":"99')),
                *lines[2:],
            ],
            "does not fit the run file",
        ),
    ],
    ids=[
        "garbage mid-journal",
        "a byte changed mid-journal",
        "framed garbage mid-journal",
        "a record not an object",
        "a seq not a number",
        "records out of order",
        "a record missing",
        "a header without seq",
        "a newer journal version",
        "no header",
        "a torn header with records after it",
        "a header of the wrong version for its lines",
        "a record for a job not in the file",
    ],
)
def test_a_damaged_journal_is_refused_naming_the_line_and_both_files_are_kept(
    crashed: jorb.Run, damage: Callable[[list[bytes]], list[bytes]], says: str
) -> None:
    path = crashed.path
    assert path is not None
    journal = journal_path(path)
    bad = b"\n".join(damage(journal.read_bytes().split(b"\n")[:-1])) + b"\n"
    journal.write_bytes(bad)
    snapshot = path.read_bytes()
    for load in (jorb.Run.load, jorb.Run.open):
        with pytest.raises(jorb.CorruptRunError) as refused:
            load(path)
        assert str(refused.value).startswith(f"{journal}: ")
        assert says in str(refused.value)
        assert journal.read_bytes() == bad and path.read_bytes() == snapshot
    if "version" not in says:
        assert "move the journal aside" in str(refused.value)


def test_a_journal_holding_only_a_torn_header_is_ignored(make_run: MakeRun) -> None:
    run = make_run(roots(2), "a")
    run.save()
    assert run.path is not None
    run.close()
    journal_path(run.path).write_bytes(b'{"journal": 1, "se')
    assert encode_run(jorb.Run.load(run.path)) == run.path.read_bytes()
    journal_path(run.path).write_bytes(b"")
    assert encode_run(jorb.Run.load(run.path)) == run.path.read_bytes()


# -- the run file and its journal disagree -------------------------------------------------------


def test_a_run_file_edited_while_its_journal_holds_work_is_refused(crashed: jorb.Run) -> None:
    path = crashed.path
    assert path is not None
    journal = journal_path(path)
    edited = path.read_bytes().replace(b'"state": "a"', b'"state": "done"', 1)
    path.write_bytes(edited)
    kept = journal.read_bytes()
    with pytest.raises(jorb.JournalConflictError) as refused:
        jorb.Run.open(path)
    message = str(refused.value)
    assert f"{path} was changed" in message and f"delete {journal}" in message
    assert f"`jorb fold {path}`" in message and "neither file was changed" in message
    assert path.read_bytes() == edited and journal.read_bytes() == kept
    assert not is_locked(path)


def test_an_edit_after_a_crash_whose_journal_was_already_folded_in_is_honoured(
    crashed: jorb.Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal whose records the run file already holds (the process compacted, then died
    before removing it) is no reason to refuse an edit."""
    path = crashed.path
    assert path is not None
    journal = journal_path(path)
    stale = journal.read_bytes()
    jorb.Run.load(path).save()  # folds the journal in and removes it
    journal.write_bytes(stale)  # ...as if the process died before the removal
    path.write_bytes(path.read_bytes().replace(b'"key": "r3"', b'"key": "r3", "x": 1', 1))
    edited = jorb.Run.load(path)
    assert [job.ctx.get("x") for job in edited.jobs.values() if job.ctx["key"] == "r3"] == [1]


def test_a_crash_between_the_snapshot_rename_and_the_journal_reset_is_not_a_conflict(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies right after a compaction renamed the new snapshot in, before it
    replaced the journal: the old journal's records are all in the new snapshot."""
    monkeypatch.setattr(checkpoint, "MIN_COMPACT_BYTES", 1500)
    monkeypatch.setattr(checkpoint, "COMPACT_RATIO", 0.0)
    real = checkpoint.atomic_write
    resets = []

    def atomic_write(path: Path, data: Any, **options: Any) -> tuple[int, int]:
        if path.name.endswith(".journal"):
            resets.append(data)
            if len(resets) == 2:  # the first reset is at exec start; die at the second
                raise OSError(errno.EIO, "killed")
        return real(path, data, **options)

    monkeypatch.setattr(checkpoint, "atomic_write", atomic_write)
    run = make_run(roots(), "a")
    assert run.path is not None
    with pytest.raises(jorb.CheckpointError):
        process(STATES, run)
    header, parsed = read_journal(journal_path(run.path))
    records = [record for _, record in parsed]
    snapshot = jorb.checkpoint.decode_run(run.path.read_bytes(), run.path)
    assert header is not None and header["seq"] < snapshot.seq, "an old journal, a new file"
    assert records and all(r["seq"] <= snapshot.seq for r in records)
    loaded = jorb.Run.load(run.path)
    assert encode_run(loaded) == run.path.read_bytes()
    assert_consistent(loaded)
    run.close()
    monkeypatch.setattr(checkpoint, "atomic_write", real)
    again = jorb.Run.open(run.path)
    process(STATES, again)
    assert_complete(again, 12)
    again.close()


# -- editing the file with no process running ---------------------------------------------------


async def _hold_unless_ok(app: Any, overall: Ctx, ctx: Ctx) -> Any:
    ctx["seen"] = ctx.get("seen", 0) + 1
    return ctx, ("done" if ctx.get("ok") else "held")


EDIT_STATES = [
    jorb.State("a", exec=_hold_unless_ok),
    jorb.State("retry", exec=_hold_unless_ok),
    jorb.State("held", terminal=True),
    DONE,
]


def _edit_text(path: Path, old: str, new: str, count: int = -1) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, count))


def test_an_edited_state_is_honoured_by_the_next_exec(make_run: MakeRun) -> None:
    run = make_run([{"key": f"j{i}", "ok": True} for i in range(4)], "a")
    run.jobs["1"].ctx["ok"] = False
    process(EDIT_STATES, run)
    assert run.counts() == {"held": 1, "done": 3}
    run.close()
    assert run.path is not None
    # The user's find-and-replace: every held job back to "retry", and job 2 (done) to "a".
    _edit_text(run.path, '"state": "held"', '"state": "retry"')
    text = run.path.read_text()
    second = text.index('"id": "2"')
    tail = text[second:].replace('"state": "done"', '"state": "a"', 1)
    run.path.write_text(text[:second] + tail)
    again = jorb.Run.open(run.path)
    assert again.jobs["1"].state == "retry" and again.jobs["2"].state == "a"
    process(EDIT_STATES, again)
    assert again.jobs["1"].state == "held" and again.jobs["1"].ctx["seen"] == 2
    assert again.jobs["1"].steps()[-1]["from"] == "retry"
    assert again.jobs["2"].state == "done" and again.jobs["2"].ctx["seen"] == 2
    assert [job.ctx["seen"] for job in again.jobs.values()] == [2, 2, 1, 1]
    again.close()


def test_an_edited_ctx_is_what_the_next_exec_gets(make_run: MakeRun) -> None:
    run = make_run([{"key": "j0", "ok": False}, {"key": "j1", "ok": False}], "a")
    process(EDIT_STATES, run)
    run.close()
    assert run.path is not None
    _edit_text(run.path, '"state": "held"', '"state": "retry"')
    _edit_text(run.path, '"ok": false', '"ok": true', 1)  # job 1 only
    again = jorb.Run.open(run.path)
    process(EDIT_STATES, again)
    assert [(job.state, job.ctx["ok"]) for job in again.jobs.values()] == [
        ("done", True),
        ("held", False),
    ]
    again.close()


def test_a_deleted_job_stays_deleted_and_its_id_is_never_reused(make_run: MakeRun) -> None:
    run = make_run([{"key": f"r{i}", "ok": False} for i in range(3)], "a")
    process(EDIT_STATES, run)
    run.close()
    assert run.path is not None
    doc = orjson.loads(run.path.read_bytes())
    doc["jobs"] = [job for job in doc["jobs"] if job["id"] != "3"]
    run.path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    _edit_text(run.path, '"state": "held"', '"state": "a"')
    again = jorb.Run.open(run.path)
    process(STATES, again)  # STATES' "a" kicks a child per job
    assert sorted(job.ctx["key"] for job in again.jobs.values()) == ["r0", "r0/0", "r1", "r1/0"]
    assert set(again.jobs) == {"1", "2", "4", "5"}, "id 3 was the deleted job's: not reused"
    again.close()


# -- writer faults never damage the last good checkpoint ---------------------------------------


class Disk:
    """Makes one kind of os call fail, on the files whose name ``match`` picks, from the
    ``after``+1-th such call on; ``short`` first writes half the bytes (a short write)."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        call: str,
        match: Callable[[str], bool],
        *,
        after: int = 0,
        error: int = errno.ENOSPC,
        short: bool = False,
    ) -> None:
        self.calls = 0
        self.failed = 0
        self.healed = False
        real = getattr(os, call)

        def name_of(arg: Any) -> str:
            if isinstance(arg, int):
                return os.path.basename(os.readlink(f"/proc/self/fd/{arg}"))
            return os.path.basename(str(arg))

        def broken(*args: Any) -> Any:
            name = name_of(args[-1] if call == "replace" else args[0])
            if self.healed or not match(name):
                return real(*args)
            self.calls += 1
            if self.calls <= after:
                return real(*args)
            self.failed += 1
            if short and self.failed == 1 and len(args[1]) > 1:
                return real(args[0], args[1][: len(args[1]) // 2])
            raise OSError(error, os.strerror(error))

        monkeypatch.setattr(checkpoint.os, call, broken)


def _is_journal(name: str) -> bool:
    return name == "run.json.journal"


def _is_snapshot_temp(name: str) -> bool:
    return name.startswith(".run.json.") and name.endswith(".tmp") and "journal" not in name


FAULTS: dict[str, dict[str, Any]] = {
    "disk full appending to the journal (after a short write)": dict(
        call="write", match=_is_journal, after=2, short=True
    ),
    "fsync of the journal fails": dict(call="fsync", match=_is_journal, after=2, error=errno.EIO),
    "fsync of the journal fails on the store's thread": dict(
        call="fsync", match=_is_journal, after=2, error=errno.EIO, thread=True
    ),
    "disk full writing a compaction's snapshot": dict(
        call="write", match=_is_snapshot_temp, after=2, compact=True
    ),
    "fsync of a compaction's snapshot fails": dict(
        call="fsync", match=_is_snapshot_temp, after=2, error=errno.EIO, compact=True
    ),
    "the snapshot's rename fails": dict(
        call="replace", match=lambda n: n == "run.json", after=2, error=errno.EIO, compact=True
    ),
    "the journal's reset fails after the rename": dict(
        call="replace", match=_is_journal, after=2, error=errno.EIO, compact=True
    ),
    "fsync of the directory fails": dict(
        call="fsync", match=lambda n: not n.startswith(("run", ".run")), after=3, error=errno.EIO
    ),
    "disk full writing the final snapshot": dict(call="write", match=_is_snapshot_temp, after=1),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_write_fault_fails_the_exec_and_leaves_the_last_good_checkpoint(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    options = dict(FAULTS[fault])
    monkeypatch.setattr(checkpoint, "FSYNC_ON_LOOP", not options.pop("thread", False))
    if options.pop("compact", False):  # compact after every couple of batches
        monkeypatch.setattr(checkpoint, "MIN_COMPACT_BYTES", 700)
        monkeypatch.setattr(checkpoint, "COMPACT_RATIO", 0.0)
    run = make_run(roots(), "a")
    path = run.path
    assert path is not None
    store = run._holder
    acked: list[int] = []  # the seq of every record the store said was on disk
    append = store.append

    def tracked(record: bytes, steps: int = 0) -> asyncio.Future[None]:
        future = append(record, steps)
        seq = orjson.loads(record)["seq"]
        future.add_done_callback(
            lambda f: acked.append(seq) if not f.cancelled() and f.exception() is None else None
        )
        return future

    store.append = tracked
    disk = Disk(monkeypatch, **options)
    with pytest.raises(jorb.CheckpointError) as failed:
        process(STATES, run)
    assert disk.failed, "the fault was injected"
    message = str(failed.value)
    assert message.startswith(f"{path}: could not write a checkpoint (")
    assert (
        "the disk is full"
        if options.get("error", errno.ENOSPC) == errno.ENOSPC
        else os.strerror(errno.EIO)
    ) in message
    assert "the last good checkpoint is intact" in message
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    loaded = jorb.Run.load(path)
    assert_consistent(loaded)
    assert loaded.seq >= max(acked, default=0), "a transition said to be on disk was lost"
    for job in loaded.jobs.values():  # a state the process really had, never a mix
        mine = run.jobs[job.id]
        assert job.history == mine.history[: len(job.history)]
    # The disk recovers: a rerun resumes from the checkpoint and finishes.
    disk.healed = True
    run.close()
    again = jorb.Run.open(path)
    process(STATES, again)
    assert_complete(again, 12)
    again.close()


def test_a_fault_at_the_first_checkpoint_stops_before_any_work_and_keeps_the_file(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(roots(3), "a")
    run.save()
    assert run.path is not None
    before = run.path.read_bytes()
    run.jobs["1"].ctx["changed"] = True
    store = run._holder
    Disk(monkeypatch, "write", _is_snapshot_temp)
    ran = []

    async def spy(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        ran.append(ctx)
        return ctx, "done"

    with pytest.raises(jorb.CheckpointError, match="the disk is full"):
        process([jorb.State("a", exec=spy), DONE], run)
    assert ran == []
    assert run.path.read_bytes() == before
    assert not store.executing, "a failed start leaves run.save() usable"


def test_finish_after_a_failure_keeps_the_journal_and_a_new_begin_recovers(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(roots(4), "a")
    assert run.path is not None
    store = run._holder
    disk = Disk(monkeypatch, "write", _is_journal, after=1)
    with pytest.raises(jorb.CheckpointError):
        process(STATES, run)
    assert store.failure is not None and not store.executing
    journal = journal_path(run.path)
    files = (run.path.read_bytes(), journal.read_bytes())
    store.finish()  # again: writes nothing, raises nothing
    assert (run.path.read_bytes(), journal.read_bytes()) == files
    assert_consistent(jorb.Run.load(run.path))
    disk.healed = True
    process(STATES, run)  # the same run object, in memory ahead of the disk
    assert_complete(run, 4)
    assert not journal.exists()
    assert encode_run(jorb.Run.load(run.path)) == encode_run(run)


def test_a_run_that_is_not_json_serializable_is_refused_with_a_checkpoint_error(
    make_run: MakeRun,
) -> None:
    run = make_run(roots(2), "a", overall={"when": {1, 2}})
    with pytest.raises(jorb.CheckpointError, match=r"\(overall: .*every job's ctx must hold only"):
        process(STATES, run)
    assert run.path is not None and not run.path.exists()


def test_a_history_entry_that_cannot_be_written_is_refused_naming_the_history(
    make_run: MakeRun,
) -> None:
    # A script appended a malformed entry: the refusal must point at the history, not claim
    # that overall or a ctx holds something that is not JSON.
    run = make_run(roots(2), "a")
    run.jobs["2"].history.append(("a", "b"))
    with pytest.raises(jorb.CheckpointError) as refused:
        run.save()
    assert "history" in str(refused.value)
    assert "ctx must hold only JSON" not in str(refused.value)


# -- dependent work waits for durability -------------------------------------------------------


@pytest.mark.parametrize("durable", [True, False], ids=["fsync", "no-fsync"])
def test_a_jobs_next_exec_and_its_childrens_first_start_only_once_on_disk(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    """Each exec looks at the journal as the disk has it (bytes fsynced, or written when
    fsync is off) and checks the record that led to it is there. The disk is made slow so an
    engine that did not wait would be caught."""
    on_disk = [0]  # journal bytes known durable
    real_write, real_fsync = os.write, os.fsync

    def journal_size(fd: int) -> int | None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        return os.fstat(fd).st_size if name.endswith("run.json.journal") else None

    def write(fd: int, data: Any) -> int:
        written = real_write(fd, data)
        size = journal_size(fd)
        if size is not None and not durable:
            on_disk[0] = size
        return written

    def fsync(fd: int) -> None:
        size = journal_size(fd)
        if size is not None:
            threading.Event().wait(0.002)  # a slow disk
        real_fsync(fd)
        if size is not None:
            on_disk[0] = size

    monkeypatch.setattr(checkpoint.os, "write", write)
    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    run = make_run(roots(10), "a")
    assert run.path is not None
    journal = journal_path(run.path)
    late: list[str] = []

    def durable_record(found: Callable[[dict[str, Any]], bool]) -> bool:
        _, records = parse_journal(journal.read_bytes()[: on_disk[0]], journal)
        return any(found(record) for _, record in records)

    async def a(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        ctx["a"] = True
        kicks = [jorb.Kick("b", {"key": f"{ctx['key']}/{i}"}) for i in range(3)]
        return ctx, "c", kicks

    async def b(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        key = ctx["key"]
        if not durable_record(lambda r: key in [k["ctx"]["key"] for k in r.get("kids", ())]):
            late.append(f"child {key} started before its parent's record was on disk")
        return ctx, "done"

    async def c(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        key = ctx["key"]
        if not durable_record(lambda r: ("c", key) in _moves(r)):
            late.append(f"{key} started in c before its move to c was on disk")
        return ctx, "done"

    states = [
        jorb.State("a", exec=a, concurrency=4),
        jorb.State("b", exec=b, concurrency=8),
        jorb.State("c", exec=c, concurrency=2),
        DONE,
    ]
    process(states, run, durable=durable)
    assert late == []
    assert run.counts() == {"done": 40}


def _moves(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(new state, ctx key) of each transition in a journal record: one exec's record, or a
    batch of plain successes ``{"ok": [[id, to, ctx, time, duration], ...]}``."""
    if "ok" in record:
        return [(to, ctx["key"]) for _, to, ctx, _, _ in record["ok"]]
    if "to" in record:
        return [(record["to"], record["ctx"]["key"])] if "ctx" in record else []
    return []


def test_records_settled_during_a_write_share_the_next_write_and_fsync(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(roots(11), "a")
    store = run._holder
    started, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".journal") and not started.is_set():
            started.set()
            release.wait(STUCK)
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)

    async def main() -> None:
        store.begin(run)
        jobs = list(run.jobs.values())
        first = store.append(_move(run, jobs[0]))
        await asyncio.to_thread(started.wait, STUCK)
        rest = [store.append(_move(run, job)) for job in jobs[1:]]
        release.set()
        await asyncio.gather(first, *rest)
        store.finish()

    asyncio.run(main())
    assert store.stats["records"] == 11
    assert store.stats["batches"] == 2 and store.stats["fsyncs"] == 2


# -- races and edges of the writer ---------------------------------------------------------------


def test_a_long_journal_is_replayed_without_holding_its_records(tmp_path: Path) -> None:
    # A journal may grow as big as its snapshot before a compaction; a resume after a crash
    # then held every record as objects at once (and the journal's bytes): twice the run's
    # memory, and more. Replay now reads and applies one record at a time.
    path = tmp_path / "run.json"
    run = jorb.Run.open(path)
    for i in range(2000):
        run.add_job({"key": f"r{i}", "pad": "x" * 50}, "a")
    store = run._holder
    assert store is not None

    async def three_passes() -> None:
        store.begin(run)
        for _ in range(3):
            for job in list(run.jobs.values()):
                await store.append(_move(run, job, "a"))

    asyncio.run(three_passes())
    store.close()  # as a crash leaves it: the journal not folded in
    journal = journal_path(path).stat().st_size
    gc.collect()
    tracemalloc.start()
    try:
        loaded = jorb.Run.load(path)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert loaded.seq == 6000 and encode_run(loaded) == encode_run(run)
    beyond = peak - after
    assert beyond < journal / 2, f"{beyond:,} B beyond the run for a {journal:,} B journal"


def _move(run: jorb.Run, job: jorb.Job, to: str = "done") -> bytes:
    """What the processor does for one transition: build a record, apply it, return its bytes."""
    record = {
        "seq": run.seq + 1,
        "job": job.id,
        "to": to,
        "ctx": {**job.ctx, job.state: True},
        "attempts": 0,
        "throttled": 0,
        "not_before": None,
        "history": {"from": job.state, "to": to, "time": 0.0, "duration": 0.0},
    }
    apply_record(run, record)
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def test_a_compaction_between_a_readers_two_reads_is_neither_a_conflict_nor_torn(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``jorb status`` reads the run while the process compacts: the worst moment is between
    its two reads. It sees a run the process had, never a conflict."""
    run = make_run(roots(6), "a")
    assert run.path is not None
    store = run._holder
    reached, proceed = threading.Event(), threading.Event()
    real = checkpoint._read_snapshot

    def between(path: Path, **options: bool) -> tuple[jorb.Run, tuple[int, int | None]]:
        reached.set()
        proceed.wait(STUCK)
        return real(path, **options)

    at_three: list[bytes] = []

    async def main() -> jorb.Run:
        store.begin(run)
        jobs = list(run.jobs.values())
        for job in jobs[:3]:
            await store.append(_move(run, job))
        at_three.append(encode_run(run))
        monkeypatch.setattr(checkpoint, "_read_snapshot", between)
        reader = asyncio.ensure_future(asyncio.to_thread(read_run, run.path))
        await asyncio.to_thread(reached.wait, STUCK)
        store.compact(run)  # the journal outgrew the snapshot...
        for job in jobs[3:]:  # ...and more transitions follow in the fresh journal
            await store.append(_move(run, job))
        proceed.set()
        return await reader

    seen = asyncio.run(main())
    assert seen.seq == 3 and encode_run(seen) == at_three[0]
    assert encode_run(jorb.Run.load(run.path)) == encode_run(run)


def test_finishing_with_a_batch_not_yet_written_folds_it_in(make_run: MakeRun) -> None:
    """finish() runs while records are appended but their group commit has not run yet (it
    is due at the end of the loop's turn): the final snapshot holds them, their appends
    resolve, and no journal is left behind."""
    run = make_run(roots(4), "a")
    assert run.path is not None
    store = run._holder
    assert store is not None

    async def main() -> None:
        store.begin(run)
        pending = [store.append(_move(run, job)) for job in list(run.jobs.values())]
        assert not any(future.done() for future in pending)
        store.finish()
        await asyncio.gather(*pending)

    asyncio.run(main())
    assert store.failure is None and store.stats["records"] == 4
    assert not journal_path(run.path).exists()
    assert encode_run(jorb.Run.load(run.path)) == encode_run(run)
    assert run.counts() == {"done": 4}


def test_an_append_after_finish_fails_instead_of_vanishing(make_run: MakeRun) -> None:
    run = make_run(roots(2), "a")
    store = run._holder

    async def main() -> None:
        store.begin(run)
        store.finish()
        with pytest.raises(jorb.CheckpointError, match="after finish"):
            await store.append(_move(run, run.jobs["1"]))

    asyncio.run(main())


def test_durable_writes_fsync_the_file_then_its_directory(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        synced.append(os.path.basename(name) if not os.path.isdir(name) else "<dir>")
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    run = make_run(roots(1), "a")
    run.save()
    temp = f".run.json.{os.getpid()}.tmp"
    assert synced == [temp, "<dir>"], "the data, then the rename"
    synced.clear()
    process(STATES, run)
    journal_temp = f".run.json.journal.{os.getpid()}.tmp"
    assert synced[:4] == [temp, "<dir>", journal_temp, "<dir>"], "exec start: snapshot, journal"
    assert synced[4:-3] == ["run.json.journal"] * (len(synced) - 7), "each batch: one fsync"
    assert synced[-3:] == [temp, "<dir>", "<dir>"], "the end: snapshot, then the journal unlink"
    synced.clear()
    process(STATES, run, durable=False)
    assert synced == []


def test_stale_temp_files_from_a_crash_are_removed_and_no_others(make_run: MakeRun) -> None:
    run = make_run(roots(1), "a")
    assert run.path is not None
    folder = run.path.parent
    stale = [".run.json.99999.tmp", ".run.json.journal.4242.tmp"]
    others = [".run.json.x.json.1.tmp", ".other.json.1.tmp", "run.json.bak"]
    for name in stale + others:
        (folder / name).write_bytes(b"partial")
    process(STATES, run)
    left = {p.name for p in folder.iterdir()}
    assert not left & set(stale) and set(others) <= left


def test_an_open_is_not_refused_because_a_command_is_checking_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``is_locked`` (used by commands) holds the lock shared for an instant; an open landing
    in that instant waits it out instead of reporting a holder that does not exist."""
    path = tmp_path / "run.json"
    probe = os.open(lock_path(path), os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(probe, fcntl.LOCK_SH)
    pauses = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 1:
            os.close(probe)  # the probe ends

    monkeypatch.setattr(checkpoint.time, "sleep", sleep)
    run = jorb.Run.open(path)
    assert len(pauses) == 1
    # A real holder is reported at once, without waiting.
    with pytest.raises(jorb.RunLockedError):
        jorb.Run.open(path)
    assert len(pauses) == 1
    run.close()


def test_a_new_runs_folder_is_made_durable_with_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    run = jorb.Run.open(tmp_path / "runs" / "run.json")
    assert synced == [str(tmp_path)], "the folder's entry in its parent"
    run.close()


# -- the journal's record forms --------------------------------------------------------------

# A journal as jorb wrote it before batch records (982d88e): a record per transition, with the
# full history entry; one with a kicked child. Byte for byte what that version appended.
OLD_RECORDS = [
    b'{"job":"1","to":"b","ctx":{"key":"r0","a":true},"history":{"from":"a","to":"b",'
    b'"time":1700000000.5,"duration":0.25},"seq":1}\n',
    b'{"job":"2","to":"done","ctx":{"key":"r1","a":true},"history":{"from":"a","to":"done",'
    b'"time":1700000001.0,"duration":0.5},"kids":[{"id":"4","state":"b","ctx":{"key":"r1/0"},'
    b'"parent":"2"}],"next_id":5,"seq":2}\n',
    b'{"job":"3","in":"a","error":{"message":"blip","type":"ConnectionError","traceback":"",'
    b'"time":1700000001.5,"attempt":1,"rate_limited":false},"to":"a","attempts":1,'
    b'"throttled":0,"not_before":null,"seq":3}\n',
]


def _journal_after_snapshot(run: jorb.Run, lines: list[bytes]) -> None:
    """Write the run's snapshot and journal header (as an exec's start does), then ``lines``
    as its records, and let go of the run as a crash would."""
    store = run._holder
    assert store is not None and run.path is not None
    store.begin(run)
    with journal_path(run.path).open("ab") as journal:
        journal.write(checkpoint.frame(lines))  # (each line after its CRC-32, as jorb writes)
    run.close()


def test_a_journal_in_the_old_record_form_is_replayed_and_the_run_resumes(
    make_run: MakeRun,
) -> None:
    run = make_run(roots(3), "a")
    assert run.path is not None
    _journal_after_snapshot(run, OLD_RECORDS)

    loaded = jorb.Run.load(run.path)
    jobs = loaded.jobs
    assert [jobs[i].state for i in "1234"] == ["b", "done", "a", "b"]
    assert jobs["1"].history == [("a", "b", 1700000000.5, 0.25)]
    assert jobs["4"].parent == "2" and jobs["4"].ctx == {"key": "r1/0"}
    assert jobs["3"].attempts == 1 and jobs["3"].errors["a"][0]["message"] == "blip"
    assert loaded.seq == 3 and loaded.next_id == 5

    async def to_b(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        return {**ctx, "a": True}, "b"

    async def to_done(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        return {**ctx, "b": True}, "done"

    resumed = jorb.Run.open(run.path)
    states = [jorb.State("a", exec=to_b), jorb.State("b", exec=to_done, concurrency=3), DONE]
    process(states, resumed)
    assert resumed.counts() == {"done": 4}
    assert [h["to"] for h in resumed.jobs["3"].steps()] == ["b", "done"]


def test_plain_successes_settled_together_are_one_record_that_replays_to_the_same_run(
    make_run: MakeRun,
) -> None:
    """Execs that return without waiting settle as one ``ok`` record per group commit; a load
    replaying it gets every transition the process had, with its history."""
    run = make_run(roots(5), "a")
    assert run.path is not None
    path = run.path
    seen: list[tuple[jorb.Run, list[dict[str, Any]]]] = []

    async def to_b(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        return {**ctx, "a": True}, "b"

    async def look(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        if not seen:  # every move to b is on disk: read it as a crash would leave it
            _, records = read_journal(journal_path(path))
            seen.append((jorb.Run.load(path), [record for _, record in records]))
        return ctx, "done"

    states = [jorb.State("a", exec=to_b, concurrency=5), jorb.State("b", exec=look), DONE]
    process(states, run)
    assert run.counts() == {"done": 5}
    ((loaded, records),) = seen
    ok = [record for record in records if "ok" in record]
    assert len(ok) == 1 and len(ok[0]["ok"]) == 5
    assert {job.id: job.state for job in loaded.jobs.values()} == dict.fromkeys("12345", "b")
    for job in loaded.jobs.values():
        ((source, to, _, duration),) = job.history
        assert (source, to) == ("a", "b") and duration >= 0
        assert job.ctx["a"] is True


def test_after_every_group_commit_the_files_replay_to_the_run_in_memory(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Plain successes are applied as their batch settles and written at the end of the turn;
    errors, kicks and steering changes are records of their own, applied at once. Right after
    each group commit the snapshot plus journal must replay to exactly the run in memory: a
    compaction that took in successes whose record then went to the new journal would apply
    them twice, one written out of order would be missed."""
    monkeypatch.setattr(checkpoint, "MIN_COMPACT_BYTES", 0)
    monkeypatch.setattr(checkpoint, "COMPACT_RATIO", 0.05)  # compactions between batches
    monkeypatch.setattr(checkpoint, "STEP_BYTES", 0)
    rng = random.Random(7)
    mismatches: list[str] = []
    checked = [0]
    real_flush = Store._flush

    def flush(store: Store) -> None:
        real_flush(store)
        run = store._run
        if run is None or store.failure is not None:
            return
        copy = tmp_path / f"copy{checked[0]}"
        copy.mkdir()
        shutil.copy(store.path, copy / store.path.name)
        if store.journal.exists():
            shutil.copy(store.journal, copy / store.journal.name)
        replayed = read_run(copy / store.path.name)
        if encode_run(replayed) != encode_run(run):
            mismatches.append(f"after commit {checked[0]}: seq {replayed.seq} vs {run.seq}")
        checked[0] += 1

    monkeypatch.setattr(Store, "_flush", flush)
    processor: list[jorb.Processor] = []
    steered = [0]

    async def first(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        r = rng.random()
        if r < 0.1 and steered[0] < 40:  # changes land between a worker's settled successes
            steered[0] += 1
            steer = processor[0]
            if r < 0.04:
                steer.add_jobs([{"n": 1000 + steered[0]}], "a")
            elif r < 0.07:
                steer.redrive("b", "a")
            else:
                steer.pause("b")
                steer.resume("b")
        if r < 0.2 and rng.random() < 0.5:
            await asyncio.sleep(0)  # this one waits: the rest of its batch goes back
        if 0.2 <= r < 0.3:
            raise ValueError("a failed attempt: a record of its own")
        if 0.3 <= r < 0.35:
            return ctx, "b", [jorb.Kick("b", {"n": -ctx["n"]})]
        ctx["a"] = ctx.get("a", 0) + 1
        return ctx, "b"

    async def second(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        if rng.random() < 0.1:
            raise ValueError("b failed")
        return ctx, "done"

    run = make_run([{"n": i} for i in range(400)], "a")
    states = [
        jorb.State("a", exec=first, concurrency=16, retries=2, backoff=0),
        jorb.State("b", exec=second, concurrency=8, retries=2, backoff=0),
        DONE,
        jorb.State("failed", terminal=True),
    ]
    processor.append(jorb.Processor(None, states, progress=False, durable=False))
    processor[0].exec(run)
    assert mismatches == []
    assert checked[0] > 10 and steered[0] > 10  # the run went through many commits and changes
    assert run.counts().get("done", 0) > 300
    assert encode_run(jorb.Run.load(run.path)) == encode_run(run)


async def _step(app: Any, overall: Ctx, ctx: Ctx) -> Any:
    ctx["n"] += 1
    return ctx, f"s{ctx['n']}" if ctx["n"] < 4 else "done"


STEPS = [*(jorb.State(f"s{i}", exec=_step, concurrency=8) for i in range(4)), DONE]


def test_the_journal_a_crash_leaves_is_bounded_by_the_run_it_replays_to(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a crash can leave to replay, where ctxs do not shrink: at most
    ``MIN_COMPACT_BYTES`` of journal, or as many bytes as the run would fold into, plus the
    commit that crossed the line. A run whose
    journal stays under both is written whole only when its exec starts and ends, even when
    the journal outgrows the snapshot written at the start (which held no history yet).
    Measured on the files, after every group commit."""
    limit = 24 << 10
    monkeypatch.setattr(checkpoint, "MIN_COMPACT_BYTES", limit)
    seen: list[tuple[int, int, int, int]] = []  # journal before, after; snapshot; run folded
    real_flush = Store._flush

    def flush(store: Store) -> None:
        before = store.journal.stat().st_size if store.journal.exists() else 0
        real_flush(store)
        if store.journal.exists() and store._run is not None:
            after = store.journal.stat().st_size
            snapshot = store.path.stat().st_size
            seen.append((before, after, snapshot, len(encode_run(store._run))))

    monkeypatch.setattr(Store, "_flush", flush)

    def execute(ctxs: list[Ctx], name: str) -> tuple[int, jorb.Run]:
        run = make_run(ctxs, "s0", name=name)
        store = run._holder
        assert isinstance(store, Store) and run.path is not None
        seen.clear()
        process(STEPS, run)
        assert run.counts() == {"done": len(ctxs)}
        for before, after, _, folded in seen:
            if after > before:  # a commit appended: the journal was not over the line yet
                assert before <= max(limit, folded), (before, folded)
        return store.stats["snapshots"], jorb.Run.load(run.path)

    snapshots, _ = execute([{"n": 0} for _ in range(10)], "small.json")
    assert snapshots == 2  # the exec's first snapshot and the fold
    assert seen and max(after for _, after, _, _ in seen) < limit

    snapshots, _ = execute([{"n": 0} for _ in range(800)], "history.json")
    assert max(after for _, after, _, _ in seen) > max(limit, seen[0][2])  # the first snapshot
    assert snapshots == 2  # ...but the journal grew slower than the history it added

    snapshots, loaded = execute([{"n": 0, "pad": "x" * 500} for _ in range(300)], "ctx.json")
    assert snapshots > 2  # each record repeats the ctx: the journal outgrew the run
    assert {job.ctx["n"] for job in loaded.jobs.values()} == {4}


async def _trim(app: Any, overall: Ctx, ctx: Ctx) -> Any:
    ctx["n"] += 1
    ctx["pad"] = "y" * 1000  # the job's big input, replaced by what the rest of it needs
    return ctx, "s1"


async def _on(app: Any, overall: Ctx, ctx: Ctx) -> Any:
    ctx["n"] += 1
    return ctx, f"s{ctx['n']}" if ctx["n"] < 30 else "done"


TRIMMED = [
    jorb.State("s0", exec=_trim, concurrency=8),
    *(jorb.State(f"s{i}", exec=_on, concurrency=8) for i in range(1, 30)),
    DONE,
]


def test_a_journal_is_bounded_by_its_snapshot_and_the_successes_since_as_ctxs_shrink(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where every job's ctx shrinks after its first state, the run folds into less than the
    snapshot written before; what bounds the journal a crash leaves is then the snapshot plus
    ``STEP_BYTES`` for each success the journal holds (each repeats its ctx: the journal can
    be a few times the run it replays to). Measured on the files, after every group commit."""
    limit = 24 << 10
    monkeypatch.setattr(checkpoint, "MIN_COMPACT_BYTES", limit)
    appended: list[tuple[int, int, int]] = []  # journal before; snapshot; successes in journal
    real_flush = Store._flush

    def flush(store: Store) -> None:
        before = store.journal.stat().st_size if store.journal.exists() else 0
        real_flush(store)
        if store.journal.exists() and store.journal.stat().st_size > before:
            _, records = read_journal(store.journal)
            with contextlib.closing(records):
                successes = sum(len(record.get("ok", ())) for _, record in records)
            appended.append((before, store.path.stat().st_size, successes))

    monkeypatch.setattr(Store, "_flush", flush)
    run = make_run([{"n": 0, "pad": "x" * 20000} for _ in range(100)], "s0")
    store = run._holder
    assert isinstance(store, Store) and run.path is not None
    process(TRIMMED, run)
    assert store.stats["snapshots"] > 2  # compacted mid-run
    for before, snapshot, successes in appended:
        assert before <= max(limit, snapshot + checkpoint.STEP_BYTES * successes)
    loaded = jorb.Run.load(run.path)
    assert {(job.state, job.ctx["n"], len(job.history)) for job in loaded.jobs.values()} == {
        ("done", 30, 30)
    }
