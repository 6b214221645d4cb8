"""Power loss, simulated (issue 18, finding 8), in the spirit of ALICE (OSDI '14) and
CrashMonkey: record every file-system call the checkpoint makes while a real run executes,
and at each point build every on-disk state a power cut could leave; each must load to
exactly a state the process had, holding at least every transition it acknowledged.

The recording: ``jorb.checkpoint`` reaches the OS through its module's ``os``; the test puts a
recorder there (``Recorder``) that makes each call for real and also replays it on a model of
the run's directory (``Disk``). The model keeps, per file, what its last ``fsync`` made
durable and the writes since; per directory, the names as of its last ``fsync`` and the
creations, renames and unlinks since.

What a power cut may leave (the crash states of one point), the model's rules:

- a file's content: what its last fsync made durable, then any prefix of the writes since,
  the last of them possibly torn (cut after its first byte, its half, all but its last byte),
  and a torn write either short or with the rest of its length read back as zeros (the size
  made durable before the data);
- the directory: its names as of its last fsync, then any subset of the creations, renames
  and unlinks since, applied in the order made (stricter than ext4 and xfs, which journal
  them in order: a later rename may land without an earlier one; a rename reaches the disk
  only with the directory's fsync);
- every combination of those, for the files the directory then names.

A state loads to "exactly a state the process had": the run it loads, encoded, is one the
process held at that ``seq`` (recorded after each record applied and each snapshot written),
so never a mix; and its ``seq`` is at or past the last one acknowledged (a batch's append
resolved, or a snapshot written) before the cut.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import process
from test_checkpoint import STATES, _a, _b, assert_consistent, roots

import jorb
from jorb import checkpoint, commit, model, steering
from jorb.checkpoint import Store, encode_run, read_run

#: A crash state: file name -> content.
State = dict[str, bytes]
Op = tuple[Any, ...]


#: The workflow of test_checkpoint, an exec at a time: a batch per transition or two.
ONE_AT_A_TIME = [jorb.State("a", exec=_a), jorb.State("b", exec=_b), STATES[-1]]

_failed_once: set[str] = set()


async def _flaky(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
    """Every third job fails its first attempt, so a worker's batch mixes plain successes
    (applied as they settle) with failures (each a record of its own)."""
    if int(ctx["key"][1:]) % 3 == 0 and ctx["key"] not in _failed_once:
        _failed_once.add(ctx["key"])
        raise ValueError("the first attempt fails")
    ctx["a"] = True
    return ctx, "b"


_steering: list[jorb.Processor] = []  # the processor running STEERED (its execs steer it)


async def _adding(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
    """Every fifth root adds a job: the change is applied in a later turn, often after other
    workers settled plain successes in it (applied, their record not yet written). Odd roots
    wait a turn, so workers settle in every turn."""
    n = int(ctx["key"][1:])
    if n % 2:
        await asyncio.sleep(0)  # resumed in a later turn, where it settles
    if n % 5 == 0 and n < 100:
        _steering[0].add_jobs([{"key": f"r{n + 100}"}], "a")
    ctx["a"] = True
    return ctx, "b"


#: Execs that never wait, in batches, adding jobs to the run as it goes.
STEERED = [
    jorb.State("a", exec=_adding, concurrency=8),
    jorb.State("b", exec=_b, concurrency=4),
    STATES[-1],
]

#: Batches of four execs that never wait, successes and failures settled in one turn.
MIXED = [
    jorb.State("a", exec=_flaky, concurrency=4, retries=1, backoff=0),
    jorb.State("b", exec=_b, concurrency=4),
    STATES[-1],
]


class File:
    """One file (an inode): its content now, and as of its last fsync plus the writes since."""

    def __init__(self, durable: bytes = b"") -> None:
        self.now = bytearray(durable)
        self.durable = durable
        self.since: list[Op] = []  # ("write", offset, bytes) | ("truncate", size)

    def apply(self, content: bytearray, op: Op) -> None:
        if op[0] == "truncate":
            del content[op[1] :]
            content.extend(bytes(max(0, op[1] - len(content))))
            return
        _, offset, data = op
        content.extend(bytes(max(0, offset - len(content))))
        content[offset : offset + len(data)] = data

    def change(self, op: Op) -> None:
        self.apply(self.now, op)
        self.since.append(op)

    def contents(self) -> set[bytes]:
        """Every content a power cut may leave."""
        found = set()
        content = bytearray(self.durable)
        for op in self.since:
            found.add(bytes(content))
            if op[0] == "write":
                _, offset, data = op
                for cut in {1, len(data) // 2, len(data) - 1} - {0, len(data)}:
                    for tail in (b"", bytes(len(data) - cut)):
                        torn = bytearray(content)
                        self.apply(torn, ("write", offset, data[:cut] + tail))
                        found.add(bytes(torn))
            self.apply(content, op)
        found.add(bytes(content))
        return found


class Disk:
    """The model of one directory: its files, their names now and as of its last fsync."""

    def __init__(self, directory: Path) -> None:
        self.directory = os.path.abspath(directory)
        self.names: dict[str, File] = {}
        for entry in os.scandir(directory):
            if _tracked(entry.name):
                self.names[entry.name] = File(Path(entry.path).read_bytes())
        self.durable_names = dict(self.names)
        self.since: list[Op] = []  # ("create", name, file) | ("rename", a, b) | ("unlink", a)
        self.fds: dict[int, File | None] = {}  # fd -> its file (None: the directory)

    def name(self, path: Any) -> str | None:
        full = os.path.abspath(os.fspath(path))
        if os.path.dirname(full) == self.directory and _tracked(os.path.basename(full)):
            return os.path.basename(full)
        return None

    def crash_states(self) -> Iterator[State]:
        pending = range(len(self.since))
        if len(self.since) <= 8:  # any subset, in any case the order made: a rename may land
            kept = itertools.chain.from_iterable(  # without the creation before it, ...
                itertools.combinations(pending, size) for size in range(len(self.since) + 1)
            )
        else:
            kept = (tuple(pending[:count]) for count in range(len(self.since) + 1))
        for chosen in kept:
            names = dict(self.durable_names)
            for op in (self.since[index] for index in chosen):
                if op[0] == "create":
                    names[op[1]] = op[2]
                elif op[0] == "rename":
                    if op[1] in names:  # (a rename of a name whose creation did not land)
                        names[op[2]] = names.pop(op[1])
                else:
                    names.pop(op[1], None)
            files = list(dict.fromkeys(names.values()))
            options = [sorted(file.contents()) for file in files]
            for chosen in itertools.product(*options):
                content = dict(zip(map(id, files), chosen, strict=True))
                yield {name: content[id(file)] for name, file in names.items()}


def _tracked(name: str) -> bool:
    return not name.endswith(".lock")  # (the lock holds a pid: no part of what loads)


class Recorder:
    """Stands in for ``os`` in ``jorb.checkpoint``: each call made for real, and replayed on
    the model; after each, the crash states it allows are collected."""

    def __init__(self, disk: Disk, fail_fsync: int | None = None) -> None:
        self.disk = disk
        self.states: dict[frozenset[tuple[str, bytes]], int] = {}  # state -> acked seq
        self.acked = 0
        self.calls = 0
        self.fsyncs = 0
        self.fail_fsync = fail_fsync  # the n-th file fsync raises EIO
        self.lock = threading.RLock()  # (an fsync may come from another thread)
        self.collect()

    def ack(self, seq: int) -> None:
        with self.lock:
            self.acked = max(self.acked, seq)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def collect(self) -> None:
        with self.lock:
            self.calls += 1
            for state in self.disk.crash_states():
                key = frozenset(state.items())
                self.states[key] = max(self.states.get(key, 0), self.acked)

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        with self.lock:
            return self._open(path, flags, mode)

    def _open(self, path: Any, flags: int, mode: int) -> int:
        fd = os.open(path, flags, mode)
        disk = self.disk
        if os.path.abspath(os.fspath(path)) == disk.directory:
            disk.fds[fd] = None
            return fd
        name = disk.name(path)
        if name is None:
            return fd
        file = disk.names.get(name)
        if file is None:
            file = disk.names[name] = File()
            disk.since.append(("create", name, file))
        elif flags & os.O_TRUNC:
            file.change(("truncate", 0))
        disk.fds[fd] = file
        self.collect()
        return fd

    def write(self, fd: int, data: Any) -> int:
        with self.lock:
            return self._write(fd, data)

    def _write(self, fd: int, data: Any) -> int:
        written = os.write(fd, data)
        if fd in self.disk.fds:
            file = self.disk.fds[fd]
            assert file is not None  # (jorb writes a file from its start, or appends: at its end)
            file.change(("write", len(file.now), bytes(data[:written])))
            self.collect()
        return written

    def ftruncate(self, fd: int, size: int) -> None:
        with self.lock:
            self._ftruncate(fd, size)

    def _ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)
        if fd in self.disk.fds:
            file = self.disk.fds[fd]
            assert file is not None
            file.change(("truncate", size))
            self.collect()

    def fsync(self, fd: int) -> None:
        with self.lock:  # what the fsync covers: what was written before it was called
            tracked, file = fd in self.disk.fds, self.disk.fds.get(fd)
            names, since = dict(self.disk.names), len(self.disk.since)
            content = bytes(file.now) if file is not None else b""
            writes = len(file.since) if file is not None else 0
            if file is not None:
                self.fsyncs += 1
                if self.fsyncs == self.fail_fsync:
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fsync(fd)
        if not tracked:
            return
        with self.lock:
            if file is None:
                self.disk.durable_names = names
                del self.disk.since[:since]
            else:
                file.durable = content
                del file.since[:writes]
            self.collect()

    def replace(self, source: Any, target: Any) -> None:
        with self.lock:
            self._replace(source, target)

    def _replace(self, source: Any, target: Any) -> None:
        os.replace(source, target)
        a, b = self.disk.name(source), self.disk.name(target)
        if a is not None and b is not None:
            self.disk.names[b] = self.disk.names.pop(a)
            self.disk.since.append(("rename", a, b))
            self.collect()

    def unlink(self, path: Any) -> None:
        with self.lock:
            self._unlink(path)

    def _unlink(self, path: Any) -> None:
        os.unlink(path)
        name = self.disk.name(path)
        if name is not None and self.disk.names.pop(name, None) is not None:
            self.disk.since.append(("unlink", name))
            self.collect()

    def close(self, fd: int) -> None:
        with self.lock:
            os.close(fd)
            self.disk.fds.pop(fd, None)


class Seen:
    """Every state the process held, by seq (encoded), and the acknowledgements."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, recorder: Recorder) -> None:
        self.runs: dict[int, set[bytes]] = {}
        real_apply, real_prepare, real_append, real_snapshot = (
            model.apply_record,
            commit.Commits.prepare,
            Store.append,
            Store._write_snapshot,
        )

        def apply_record(run: jorb.Run, record: dict[str, Any]) -> None:
            real_apply(run, record)
            self.hold(run)

        def prepare(commits: commit.Commits) -> None:
            # Plain successes are applied as they settle; their record's seq, here.
            seq = commits.proc._run.seq if commits.proc._run is not None else None
            real_prepare(commits)
            run = commits.proc._run
            if run is not None and run.seq != seq:
                self.hold(run)

        def append(store: Store, record: bytes, steps: int = 0) -> asyncio.Future[None]:
            # Acknowledged when the append's future resolves: what the processor waits for.
            batch = real_append(store, record, steps)
            upto = store._run.seq if store._run is not None else 0

            def acknowledged(batch: asyncio.Future[None]) -> None:
                if not batch.cancelled() and batch.exception() is None:
                    recorder.ack(upto)

            batch.add_done_callback(acknowledged)
            return batch

        def write_snapshot(store: Store, run: jorb.Run, finish: bool) -> None:
            self.hold(run)
            real_snapshot(store, run, finish)
            recorder.ack(run.seq)

        for module in (commit, steering):  # where the live path applies records
            monkeypatch.setattr(module, "apply_record", apply_record)
        monkeypatch.setattr(commit.Commits, "prepare", prepare)
        monkeypatch.setattr(Store, "append", append)
        monkeypatch.setattr(Store, "_write_snapshot", write_snapshot)

    def hold(self, run: jorb.Run) -> None:
        self.runs.setdefault(run.seq, set()).add(encode_run(run))


def explore(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fail_fsync: int | None,
    states: list[jorb.State] = ONE_AT_A_TIME,
) -> Any:
    """Run the workflow under the recorder; then load every crash state it collected."""
    monkeypatch.setattr(checkpoint, "MIN_COMPACT_BYTES", 0)  # compact often
    monkeypatch.setattr(checkpoint, "COMPACT_RATIO", 0.4)
    monkeypatch.setattr(checkpoint, "STEP_BYTES", 0)
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / "run.json"
    run = jorb.Run.open(path)
    for ctx in roots(100):
        run.add_job(ctx, "a")
    run.save()
    recorder = Recorder(Disk(folder), fail_fsync)
    seen = Seen(monkeypatch, recorder)
    seen.hold(jorb.Run.load(path))  # the file as saved: seq 0 before begin() declares states
    monkeypatch.setattr(checkpoint, "os", recorder)
    error: BaseException | None = None
    try:
        process(states, run)
    except jorb.CheckpointError as e:
        error = e
    finally:
        run.close()
        monkeypatch.setattr(checkpoint, "os", os)
    scratch = tmp_path / "crash"
    violations, loaded_seqs = [], set()
    for state, acked in recorder.states.items():
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        for name, content in state:
            (scratch / name).write_bytes(content)
        where = f"crash state {sorted((n, len(c)) for n, c in state)}"
        try:
            loaded = read_run(scratch / "run.json")
        except jorb.JorbError as e:
            violations.append(f"{where}: does not load: {e}")
            continue
        if encode_run(loaded) not in seen.runs.get(loaded.seq, set()):
            violations.append(f"{where}: loads to seq {loaded.seq}, a state the process never had")
        elif loaded.seq < acked:
            violations.append(f"{where}: seq {loaded.seq}, but seq {acked} was acknowledged")
        loaded_seqs.add(loaded.seq)
    return recorder, violations, loaded_seqs, error, path


def test_every_power_cut_state_loads_to_a_state_the_process_had(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recorder, violations, seqs, error, path = explore(tmp_path, monkeypatch, None)
    assert error is None
    final = jorb.Run.load(path)
    assert_consistent(final)
    with capsys.disabled():
        print(
            f"\npower-loss simulator: {recorder.calls} file-system calls, "
            f"{len(recorder.states)} crash states explored, {len(violations)} violations; "
            f"they load to {len(seqs)} different seqs of {final.seq}"
        )
    assert violations == []
    assert len(recorder.states) > 600 and len(seqs) > 150  # the simulator saw a real run


def test_successes_and_failures_settled_in_one_turn_reach_the_journal_in_the_order_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's plain successes are applied as they settle, but written as one record at the
    end of the turn; a failure settled after them in that turn must not take a seq before
    theirs, or a power cut between the two records loads a run the process never had."""
    _failed_once.clear()
    _, violations, seqs, error, path = explore(tmp_path, monkeypatch, None, MIXED)
    assert error is None
    final = jorb.Run.load(path)
    assert {job.state for job in final.jobs.values()} == {"done"}
    assert all(job.ctx.get("a") and job.ctx.get("b") for job in final.jobs.values())
    assert sum(bool(job.errors) for job in final.jobs.values()) == 34  # the failures happened
    assert violations == []
    assert len(seqs) > 10


@pytest.mark.parametrize("unsafe", ["no directory fsync", "no fsync before the rename"])
def test_the_simulator_catches_a_write_order_that_is_not_safe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unsafe: str
) -> None:
    """The same exploration over a checkpoint with one step of its write order left out
    finds crash states that lose acknowledged work or do not load (so the test above can
    fail)."""
    if unsafe == "no directory fsync":
        monkeypatch.setattr(checkpoint, "fsync_dir", lambda directory: None)
    else:
        real = checkpoint.atomic_write
        monkeypatch.setattr(
            checkpoint,
            "atomic_write",
            lambda path, data, **kw: real(path, data, **{**kw, "durable": False}),
        )
    _, violations, _, _, _ = explore(tmp_path, monkeypatch, None)
    assert violations


def test_an_fsync_that_fails_acknowledges_nothing_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync returns EIO (the disk is failing): no transition of that batch is acknowledged,
    exec stops with a CheckpointError, and every crash state (also after the failure, where
    the data may or may not have reached the disk) holds what was acknowledged."""
    recorder, violations, _, error, path = explore(tmp_path, monkeypatch, 6)
    assert isinstance(error, jorb.CheckpointError)
    assert "could not write a checkpoint (Input/output error)" in str(error)
    assert violations == []
    after = jorb.Run.load(path)
    assert after.seq >= recorder.acked
    assert_consistent(after)
    with jorb.Run.open(path) as run:  # and the run resumes to the end
        process(STATES, run)
    assert_consistent(jorb.Run.load(path))


def test_a_change_applied_after_successes_settled_in_its_turn_is_journaled_after_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A steering change (here ``add_jobs``) applied in a turn in which plain successes were
    settled, and so applied already, must take a seq after theirs: a power cut between the two
    records must load a run the process had."""
    real_aexec = jorb.Processor.aexec
    _steering.clear()

    async def aexec(processor: jorb.Processor, run: jorb.Run) -> jorb.Run:
        _steering.append(processor)
        return await real_aexec(processor, run)

    monkeypatch.setattr(jorb.Processor, "aexec", aexec)
    _, violations, seqs, error, path = explore(tmp_path, monkeypatch, None, STEERED)
    assert error is None
    final = jorb.Run.load(path)
    assert len(final.jobs) == 120  # every change was applied
    assert {job.state for job in final.jobs.values()} == {"done"}
    assert violations == []
    assert len(seqs) > 4  # (the records are few: each holds a turn's successes)
