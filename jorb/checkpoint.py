"""Checkpointing: the run file, the journal beside it, atomic writes and the run's lock.

On disk a run is three files side by side:

- ``x.json``: the snapshot, pretty-printed JSON a user may read and edit. Only ever replaced
  whole and atomically (temp file, fsync, rename, fsync the directory), so it always loads.
- ``x.json.journal``: while a process runs, one JSON line per settled exec (the job's new state,
  ctx, history entry, error, and the children it kicked, all in one record) appended with group
  commit: every record settled while the previous write+fsync was in flight goes out in the next
  one. Its first line names the snapshot it continues (seq, length and CRC of the bytes), so a
  snapshot edited after a crash is detected instead of silently losing either side. When the
  journal outgrows the snapshot it is compacted into a new snapshot; on a clean exit it is folded
  in and removed. A torn last line (a crash mid-write) is ignored on load.
- ``x.json.lock``: held with ``flock`` by the process that has the run open; the OS releases it
  when that process dies, so a crash never leaves a stale lock.

The cost of a checkpoint is one short append per transition, whatever the run's size; the
snapshot rewrite is amortized over at least as many bytes of journal as the snapshot holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from .errors import (
    CheckpointError,
    CorruptRunError,
    JournalConflictError,
    RunFileError,
    RunLockedError,
)
from .model import Run, apply_record

__all__ = ["Store", "encode_run", "open_run", "read_run", "save_run"]

JOURNAL_SUFFIX = ".journal"
LOCK_SUFFIX = ".lock"
#: Compact when the journal holds more than this many bytes *and* more than the snapshot.
MIN_COMPACT_BYTES = 4 << 20


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + JOURNAL_SUFFIX)


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + LOCK_SUFFIX)


# -- encoding ----------------------------------------------------------------------------------


def encode_run(run: Run) -> bytes:
    """The run file's bytes: 2-space-indented JSON, one key per line."""
    return orjson.dumps(run.to_document(), option=orjson.OPT_INDENT_2) + b"\n"


def decode_run(data: bytes, path: Path) -> Run:
    """Parse run-file bytes; every failure is a CorruptRunError naming the file and place."""
    if not data.strip():
        raise CorruptRunError(f"{path}: the run file is empty")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise CorruptRunError(
            f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    return Run.from_document(doc, path)


# -- atomic writes -----------------------------------------------------------------------------


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is out (a regular file may take a short write)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the directory.

    On any error the temp file is removed and ``path`` is untouched.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


# -- reading -----------------------------------------------------------------------------------


def _journal_header(snapshot: bytes, seq: int) -> bytes:
    header = {"journal": 1, "seq": seq, "length": len(snapshot), "crc": zlib.crc32(snapshot)}
    return orjson.dumps(header) + b"\n"


def read_journal(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]], int]:
    """Header, whole records and the byte length they span; a torn last line is dropped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, [], 0
    lines = data.split(b"\n")
    # A complete record ends with "\n", so the last element is b"" unless the tail is torn.
    good = len(data) - len(lines[-1])
    lines.pop()
    records: list[dict[str, Any]] = []
    header: dict[str, Any] | None = None
    for number, line in enumerate(lines, 1):
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            if number == len(lines):  # the last record was cut mid-write: ignore it
                good -= len(line) + 1
                break
            raise CorruptRunError(f"{path}: line {number} is not a valid journal record") from None
        if header is None:
            if not isinstance(value, dict) or value.get("journal") != 1:
                raise CorruptRunError(f"{path}: line 1 is not a jorb journal header")
            header = value
        else:
            records.append(value)
    return header, records, good


def _replay(run: Run, path: Path, snapshot: bytes) -> None:
    jpath = journal_path(path)
    header, records, _ = read_journal(jpath)
    pending = [r for r in records if r.get("seq", 0) > run.seq]
    if header is None or not pending:
        return  # no journal, or one whose every record is already folded into the snapshot
    if (
        header.get("seq") != run.seq
        or header.get("length") != len(snapshot)
        or header.get("crc") != zlib.crc32(snapshot)
    ):
        raise JournalConflictError(
            f"{path} was changed after its last process stopped uncleanly, but {jpath} still "
            f"holds {len(pending)} transition(s) not saved in it; jorb will not guess which side "
            f"to keep. To keep the journal's work: restore {path} as it was, run once (that "
            f"folds the journal in), then make your edit again. To keep your edit and let the "
            f"journal's jobs run again: delete {jpath}."
        )
    for record in pending:
        try:
            apply_record(run, record)
        except (KeyError, TypeError, AttributeError) as e:
            raise CorruptRunError(
                f"{jpath}: record seq {record.get('seq')} does not fit the run file ({e!r})"
            ) from None


def read_run(path: Path) -> Run:
    """Load ``path`` and replay its journal; raises a RunFileError saying what is wrong."""
    for attempt in range(3):
        try:
            snapshot = path.read_bytes()
        except FileNotFoundError:
            raise RunFileError(f"{path}: no such run file") from None
        except IsADirectoryError:
            raise RunFileError(f"{path}: is a directory, not a run file") from None
        run = decode_run(snapshot, path)
        try:
            _replay(run, path, snapshot)
        except JournalConflictError:
            # A live process may have compacted between our two reads: look again.
            if attempt < 2 and is_locked(path):
                continue
            raise
        return run
    raise AssertionError("unreachable")


def is_locked(path: Path) -> bool:
    """Whether some process holds the run's lock right now."""
    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def open_run(path: Path, overall: dict[str, Any] | None) -> Run:
    """``Run.open``: take the lock, then reopen the file or start a new run."""
    store = Store(path)
    try:
        if path.exists():
            run = read_run(path)
        elif journal_path(path).exists():
            raise RunFileError(
                f"{path} is missing but its journal {journal_path(path)} exists; restore the "
                f"run file, or delete the journal to start afresh"
            )
        else:
            run = Run(path, overall)
    except BaseException:
        store.close()
        raise
    run._holder = store
    return run


def save_run(run: Run) -> None:
    """``Run.save``: write the whole run atomically and drop any journal it folds in."""
    if run.path is None:
        raise RunFileError("this run has no path; create it with Run.open(path)")
    store = run._holder
    if store is None:
        with Store(run.path) as temporary:
            temporary.compact(run, finish=True)
        return
    if store.executing:
        raise RunFileError("run.save() while a processor executes the run; it checkpoints itself")
    store.compact(run, finish=True)


# -- the writer --------------------------------------------------------------------------------


class Store:
    """A run's files, held open by one process: the lock, the journal and compaction.

    ``begin(run)`` folds the run into a fresh snapshot and opens the journal; ``append(record)``
    returns a future that resolves once the record is on disk (group commit); ``finish()``
    folds the journal in and removes it. Any write failure leaves the last good checkpoint
    intact and fails the pending futures with :class:`CheckpointError`.
    """

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self.path = path
        self.journal = journal_path(path)
        #: Whether writes are fsync'd (power-loss safe); a plain write already survives kill -9.
        self.durable = durable
        #: Whether a processor is executing the run (it is then the only writer).
        self.executing = False
        #: The first write failure, after which every append fails.
        self.failure: CheckpointError | None = None
        #: Totals, for benchmarks and status: bytes written, fsyncs, snapshots.
        self.stats = {"journal_bytes": 0, "fsyncs": 0, "snapshots": 0, "records": 0}
        self._run: Run | None = None
        self._fd = -1
        self._size = 0  # bytes in the journal file
        self._snapshot_len = 0
        self._pending: list[bytes] = []
        self._batch: asyncio.Future[None] | None = None
        self._flushing = False
        self._io: ThreadPoolExecutor | None = None
        self._flusher: asyncio.Task[None] | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RunLockedError(
                f"{path} is held by another process (lock {lock_path(path)}); wait for it to "
                f"finish or stop it — the lock is released the moment it exits"
            ) from None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the journal and release the lock."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = -1

    # -- snapshots -------------------------------------------------------------------------

    def compact(self, run: Run, *, finish: bool = False) -> None:
        """Fold everything in memory into a new snapshot; start a fresh journal (or none)."""
        self._write_snapshot(encode_run(run), run.seq, finish)

    def _write_snapshot(self, snapshot: bytes, seq: int, finish: bool) -> None:
        atomic_write(self.path, snapshot, durable=self.durable)
        self.stats["snapshots"] += 1
        self._snapshot_len = len(snapshot)
        # The old journal's records are all <= seq now, so a crash from here on is harmless.
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if finish:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.journal)
                if self.durable:
                    fsync_dir(self.path.parent)
            return
        header = _journal_header(snapshot, seq)
        atomic_write(self.journal, header, durable=self.durable)
        self._fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND)
        self._size = len(header)

    def begin(self, run: Run) -> None:
        """Start executing ``run``: a fresh snapshot (with any added jobs) and journal."""
        self._run = run
        self.executing = True
        self.failure = None
        self._io = self._io or ThreadPoolExecutor(1, thread_name_prefix="jorb-journal")
        self.compact(run)

    def finish(self) -> None:
        """Stop executing: fold the journal into the snapshot and remove it."""
        self.executing = False
        if self._run is not None and self.failure is None:
            self.compact(self._run, finish=True)

    # -- group commit ----------------------------------------------------------------------

    def append(self, record: bytes) -> asyncio.Future[None]:
        """Queue one record; the future resolves when it (and its batch) is on disk."""
        loop = asyncio.get_running_loop()
        if self.failure is not None:
            failed: asyncio.Future[None] = loop.create_future()
            failed.set_exception(self.failure)
            return failed
        self._pending.append(record)
        batch = self._batch
        if batch is None:
            batch = self._batch = loop.create_future()
        if not self._flushing:
            self._flushing = True
            self._flusher = loop.create_task(self._flush())
        return batch

    async def drain(self) -> None:
        """Wait until every appended record is on disk (or the writer failed)."""
        while self._flushing and self._batch is not None:
            with contextlib.suppress(CheckpointError):
                await asyncio.shield(self._batch)
        while self._flushing:
            await asyncio.sleep(0)

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                records, batch = self._pending, self._batch
                self._pending, self._batch = [], None
                assert batch is not None and self._run is not None
                try:
                    if self._size > max(MIN_COMPACT_BYTES, self._snapshot_len):
                        # Every record in this batch is already applied to the run in memory,
                        # so the snapshot holds them: no need to write them to the journal.
                        snapshot = encode_run(self._run)
                        await loop.run_in_executor(
                            self._io, self._write_snapshot, snapshot, self._run.seq, False
                        )
                    else:
                        await loop.run_in_executor(self._io, self._write, b"".join(records))
                        self.stats["records"] += len(records)
                except OSError as e:
                    self._fail(e, batch)
                    return
                if not batch.done():
                    batch.set_result(None)
        finally:
            self._flushing = False

    def _write(self, data: bytes) -> None:
        start = self._size
        try:
            write_all(self._fd, data)
            if self.durable:
                os.fsync(self._fd)
                self.stats["fsyncs"] += 1
        except OSError:
            # Cut the journal back to its last whole record so later loads see no garbage.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            raise
        self._size += len(data)
        self.stats["journal_bytes"] += len(data)

    def _fail(self, error: OSError, batch: asyncio.Future[None]) -> None:
        reason = os.strerror(error.errno) if error.errno else str(error)
        if error.errno == errno.ENOSPC:
            reason = "the disk is full"
        self.failure = CheckpointError(
            f"{self.path}: could not write a checkpoint ({reason}); the last good checkpoint is "
            f"intact and a rerun resumes from it"
        )
        self.failure.__cause__ = error
        for future in (batch, self._batch):
            if future is not None and not future.done():
                future.set_exception(self.failure)
        self._pending, self._batch = [], None
