"""Snapshots copy the chunks of jobs that did not change since the last one (``Reuse``).

Every test here checks the file a snapshot wrote against a full encoding of the run at that
moment, byte for byte: copying must never change what the file says.
"""

from __future__ import annotations

import errno
import os
import random
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import MakeRun, process

import jorb
from jorb import checkpoint
from jorb.checkpoint import Reuse, Store, encode_run

Ctx = dict[str, Any]


class Snapshots:
    """Counts the snapshots written and the chunks copied into them, and checks each file."""

    def __init__(self) -> None:
        self.written = 0
        self.copied = 0
        self.encoded = 0
        self.chunks: set[int] = set()  # the chunks copied, by index
        self.differ: list[int] = []  # the snapshots whose file was not the run encoded
        self.unmatched: list[int] = []  # the snapshots whose journal named another length/CRC


@pytest.fixture
def snapshots(monkeypatch: pytest.MonkeyPatch) -> Iterator[Snapshots]:
    """Small chunks, frequent compactions, and a check after every snapshot write."""
    monkeypatch.setattr(checkpoint, "ENCODE_CHUNK", 4)
    monkeypatch.setattr(checkpoint, "MIN_COMPACT_BYTES", 0)
    monkeypatch.setattr(checkpoint, "COMPACT_RATIO", 0.5)
    monkeypatch.setattr(checkpoint, "STEP_BYTES", 0)  # against the snapshot alone
    seen = Snapshots()
    write, copy = Store._write_snapshot, Reuse.copy

    def checked_write(store: Store, run: jorb.Run, finish: bool) -> None:
        write(store, run, finish)
        seen.written += 1
        data = store.path.read_bytes()
        if data != encode_run(run):
            seen.differ.append(seen.written)
        if not finish:  # the journal's header names the file it continues, by length and CRC
            with checkpoint.journal_path(store.path).open("rb") as journal:
                header = orjson.loads(journal.readline()[9:])
            if (header["length"], header["crc"]) != (len(data), zlib.crc32(data)):
                seen.unmatched.append(seen.written)

    def counted_copy(reuse: Reuse, index: int, jobs: list[jorb.Job]) -> tuple[bytes, int] | None:
        data = copy(reuse, index, jobs)
        if data is None:
            seen.encoded += 1
        else:
            seen.copied += 1
            seen.chunks.add(index)
        return data

    monkeypatch.setattr(Store, "_write_snapshot", checked_write)
    monkeypatch.setattr(Reuse, "copy", counted_copy)
    yield seen


async def _mixed(app: Any, overall: Ctx, ctx: Ctx) -> Any:
    """A bit of everything a record can do to a job: errors, retries, kicks, plain moves."""
    n = ctx["n"]
    rng = random.Random(n * 7919 + ctx.get("tries", 0))
    ctx["tries"] = ctx.get("tries", 0) + 1
    roll = rng.random()
    if roll < 0.15 and ctx["tries"] == 1:
        raise RuntimeError(f"flaky {n}")
    if roll < 0.25 and "kid" not in ctx:
        return ctx, "b", [jorb.Kick("b", {"n": 10_000 + n, "kid": True})]
    if roll < 0.30:
        raise ValueError(f"broken {n}")  # (no retries left after the first): to failed
    return ctx, "b"


async def _finish(app: Any, overall: Ctx, ctx: Ctx) -> Any:
    ctx["finished"] = True
    return ctx, "done"


STATES = [
    jorb.State("a", exec=_mixed, concurrency=3, retries=1, backoff=0.0),
    jorb.State("b", exec=_finish, concurrency=2),
    jorb.State("done", terminal=True),
    jorb.State("failed", terminal=True),
]


def test_every_snapshot_equals_a_full_encoding(make_run: MakeRun, snapshots: Snapshots) -> None:
    run = make_run([{"n": i} for i in range(120)], "a")
    process(STATES, run)
    assert run.counts().get("a", 0) == 0 and run.counts().get("b", 0) == 0
    assert snapshots.written >= 4, "compactions happened mid-run"
    assert snapshots.copied > 0, "unchanged chunks were copied, not encoded again"
    assert snapshots.encoded > 0
    assert snapshots.differ == []
    assert snapshots.unmatched == []
    assert jorb.Run.load(run.path or Path()).to_document() == run.to_document()


def test_a_job_changed_between_two_execs_is_written_again(
    make_run: MakeRun, snapshots: Snapshots
) -> None:
    """The store outlives an exec; what a script changes in memory before the next one (no
    record says so) is in the next exec's first snapshot."""
    run = make_run([{"n": i} for i in range(40)], "a")
    process(STATES, run)
    first = next(iter(run.jobs.values()))
    first.ctx["edited"] = "by the script"
    for job in run.jobs.values():
        if job.state == "failed":
            job.state = "a"  # (as a script may redrive, between execs)
    process(STATES, run)
    assert jorb.Run.load(run.path or Path()).jobs[first.id].ctx["edited"] == "by the script"
    assert snapshots.differ == []
    assert snapshots.unmatched == []


def test_a_file_changed_in_place_mid_run_is_not_copied_from(
    make_run: MakeRun, snapshots: Snapshots, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone overwrites bytes of the run file in place while the process runs it: the edit
    is set aside as usual, and no later snapshot copies the changed bytes."""
    run = make_run([{"n": i} for i in range(80)], "a")
    path = run.path
    assert path is not None
    edited: list[bytes] = []

    async def scribble(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        if not edited and snapshots.chunks:  # chunks of settled jobs are being copied along
            data = path.read_bytes().replace(b'"n": ', b'"m": ')  # in every job's ctx
            with path.open("r+b") as file:  # same inode, same size: only the bytes differ
                file.write(data)
            edited.append(data)
        return await _finish(app, overall, ctx)

    states = [STATES[0], jorb.State("b", exec=scribble, concurrency=2), *STATES[2:]]
    process(states, run)
    assert edited, "the file was edited mid-run"
    assert all("m" not in job.ctx for job in jorb.Run.load(path).jobs.values())
    assert list(path.parent.glob("run.json.edited-*")), "the edit was set aside"
    assert snapshots.differ == []
    assert snapshots.unmatched == []


def test_an_edit_in_place_that_puts_the_times_back_is_not_copied_either(
    make_run: MakeRun, snapshots: Snapshots
) -> None:
    """The same edit, then its modification time set back as it was (``touch -r``, ``rsync -t
    --inplace`` do that): the bytes read back are checked, not only the file's times."""
    run = make_run([{"n": i} for i in range(60)], "a")
    path = run.path
    assert path is not None
    edited: list[bool] = []

    async def scribble(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        if not edited and snapshots.written >= 2:
            st = path.stat()
            data = path.read_bytes().replace(b'"n": ', b'"m": ')
            with path.open("r+b") as file:
                file.write(data)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            edited.append(True)
        return await _finish(app, overall, ctx)

    process([STATES[0], jorb.State("b", exec=scribble), *STATES[2:]], run)
    assert edited
    assert all("m" not in job.ctx for job in jorb.Run.load(path).jobs.values())
    assert snapshots.differ == []
    assert snapshots.unmatched == []


def test_a_file_renamed_over_ours_as_we_write_it_is_not_taken_for_ours(
    make_run: MakeRun, snapshots: Snapshots, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An editor saves the file (a temp renamed over it) just after a snapshot was renamed in:
    the store keeps copying from its own file, and sets the editor's aside."""
    run = make_run([{"n": i} for i in range(60)], "a")
    path = run.path
    assert path is not None
    fsync_dir = checkpoint.fsync_dir
    replaced: list[int] = []

    def then_an_editor_saves(directory: Path) -> None:
        fsync_dir(directory)
        if snapshots.written >= 2 and not replaced:
            saved = path.with_name("editor.tmp")
            saved.write_bytes(path.read_bytes().replace(b'"n": ', b'"m": '))
            os.replace(saved, path)
            replaced.append(snapshots.written + 1)  # (the snapshot being written)

    monkeypatch.setattr(checkpoint, "fsync_dir", then_an_editor_saves)
    process(STATES, run)
    assert replaced
    assert all("m" not in job.ctx for job in jorb.Run.load(path).jobs.values())
    assert list(path.parent.glob("run.json.edited-*")), "the editor's file was set aside"
    assert snapshots.differ == replaced  # (that one check read the editor's file: only it)


def test_a_read_error_on_the_last_snapshot_only_means_encoding(
    make_run: MakeRun, snapshots: Snapshots, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO (or ESTALE on NFS) reading the last snapshot back: the chunks are encoded instead,
    and the exec goes on."""
    run = make_run([{"n": i} for i in range(60)], "a")
    pread = os.pread

    def failing(fd: int, n: int, offset: int) -> bytes:
        if snapshots.written >= 2:
            raise OSError(errno.EIO, "Input/output error")
        return pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", failing)
    process(STATES, run)
    assert run.counts().get("a", 0) == run.counts().get("b", 0) == 0
    assert snapshots.differ == []
    assert snapshots.unmatched == []


def test_jobs_added_from_python_are_the_runs_own(make_run: MakeRun, snapshots: Snapshots) -> None:
    """``processor.add_jobs(ctxs)`` copies each ctx: a caller that goes on using its dict
    changes nothing in the run (in memory or on disk)."""
    run = make_run([{"n": i} for i in range(30)], "a")
    mine: Ctx = {"n": -1}
    added: list[bool] = []

    async def add_then_reuse(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        if ctx["n"] == 3:
            processor.add_jobs([mine], "done")
            added.append(True)
        if ctx["n"] == 20 and added:
            mine["n"] = 12345
        return await _finish(app, overall, ctx)

    processor = jorb.Processor(
        None, [STATES[0], jorb.State("b", exec=add_then_reuse), *STATES[2:]], progress=False
    )
    processor.exec(run)
    assert added
    ours = [job for job in run.jobs.values() if job.ctx["n"] < 0]
    assert [job.ctx for job in ours] == [{"n": -1}]
    assert jorb.Run.load(run.path or Path()).jobs[ours[0].id].ctx == {"n": -1}
    assert snapshots.differ == []
    assert snapshots.unmatched == []
