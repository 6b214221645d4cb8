"""Checkpointing: the run file, the journal beside it, atomic writes and the run's lock.

On disk a run is three files side by side:

- ``x.json``: the snapshot, pretty-printed JSON a user may read and edit. Only ever replaced
  whole and atomically (temp file, fsync, rename, fsync the directory), so it always loads.
- ``x.json.journal``: while a process runs, one line per settled exec (the job's new state,
  ctx, history entry, error, and the children it kicked, all in one JSON record, after the
  CRC-32 of the record's bytes: ``1a2b3c4d {...}``) appended with group commit: every record
  settled during one turn of the event loop goes out in one write+fsync at the end of that
  turn. Its first line names the snapshot it continues (seq, length and CRC of
  the bytes), so a snapshot edited after a crash is detected instead of silently losing either
  side. When the journal outgrows the run it is compacted into a new snapshot; on a clean
  exit it is folded in and removed. A torn last line (a crash mid-write) is ignored on load; any
  other line whose checksum fails is damage, refused with the journal's name and the line.
  Replay checks each record's fields (``model.replay_record``) before applying it, so what a
  journal folds into is a run file that loads. Journals of version 1 (no checksums) still read.
- ``x.json.lock``: held with ``flock`` by the process that has the run open (its pid is written
  inside, for the error another process shows); the OS releases it when that process dies, so a
  crash never leaves a stale lock. A child the process forks does not keep it (see
  ``_forget_in_child``).

A run is known by its real file, not by a name: ``resolve`` follows symlinks once, so the
journal, lock and temp files sit beside the real file whatever name a user opened it by, and
a symlink stays a symlink (the snapshot is renamed over the file it points to). A run file
with hard links is refused: the names would lock apart, and a rewrite would leave the other
name on the old content. Only regular files are read (a FIFO or a device is refused, never
waited on); files jorb creates are opened ``O_NOFOLLOW`` (temp files also ``O_EXCL``), so a
link planted at their name redirects nothing; a rewritten run file keeps its mode (and, as
root, its owner), and the journal gets the same.

Why a journal and not a rewrite per transition: rewriting the run costs O(jobs) per transition,
O(jobs²) over a run. Here a transition costs one short append whatever the run's size, and a
snapshot is rewritten only after at least as many journal bytes as it holds, so its cost per
transition is bounded by the journal's (about twice the bytes of the records, amortized).

Order of writes, which is what makes every crash point safe: a compaction writes the new
snapshot (rename) before it resets the journal, and records in a journal only ever have a seq
at or below that of any snapshot written after them. So the journal is opened *before* the run
file: the file opened second is the snapshot that journal continues, or a newer one holding all
its records (``seq`` tells which records to skip). The journal's records are read after the
snapshot, from the file opened first: a journal is only appended to until a compaction replaces
it, so whatever it holds by then still continues its own snapshot. A crash between the rename
and the reset leaves a new snapshot and an old journal whose records it already holds: not a
conflict.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import gc
import io
import itertools
import operator
import os
import re
import stat
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from .crc import crc32_combine
from .errors import (
    CheckpointError,
    CorruptRunError,
    JournalConflictError,
    RunFileError,
    RunLockedError,
)
from .model import (
    Job,
    Run,
    UnwritableEntry,
    job_documents,
    json_default,
    plug_files,
    replay_record,
    stamp_all,
    transitions_in,
)
from .runfile import read_pieces

__all__ = [
    "Store",
    "atomic_write",
    "decode_run",
    "encode_run",
    "is_locked",
    "journal_path",
    "lock_path",
    "open_run",
    "parse_journal",
    "read_journal",
    "read_run",
    "resolve",
    "save_run",
]

JOURNAL_SUFFIX = ".journal"
LOCK_SUFFIX = ".lock"
JOURNAL_VERSION = 2
#: Journal versions this jorb reads: 1 wrote bare JSON lines, 2 puts each line's CRC-32 first.
JOURNAL_READS = (1, 2)
#: Compact when the journal holds more than this many bytes *and* more than
#: ``COMPACT_RATIO`` times the run's size: its snapshot's, plus ``STEP_BYTES`` for each
#: plain success the journal holds (what folding the run now would write, or a little less,
#: unless ctxs shrank since the snapshot). So a crash leaves at most that much journal to
#: replay, however long ago the snapshot was written: about a folded run's worth, a few times
#: more where ctxs shrank (each record repeats its ctx). And a run whose journal grows no
#: faster than its history (most: a plain success's record is ~65 bytes) is written whole
#: only when its exec starts and ends, however large the journal grows against the snapshot
#: written at the start.
MIN_COMPACT_BYTES = 4 << 20
COMPACT_RATIO = 1.0
#: The fewest bytes a history entry takes in a snapshot (``{"from", "to", "time",
#: "duration"}`` one key a line: ~110 with one-letter states and short numbers, ~150 usually).
STEP_BYTES = 100
#: A journal record as parsed: a JSON object with an int "seq".
Record = dict[str, Any]
#: A journal's records with their line numbers, read and parsed as they are taken.
Records = Generator[tuple[int, Record], None, None]

#: How long to keep retrying the lock while only a momentary ``is_locked`` probe blocks it.
LOCK_PATIENCE = 0.05


def real_path(path: Path) -> Path:
    """``path`` with every symlink resolved; ``path`` itself when it names no symlink (so
    messages keep the name the user gave)."""
    real = os.path.realpath(path)
    return path if real == os.path.abspath(path) else Path(real)


def resolve(path: Path) -> Path:
    """The run file's own path (see the module docstring): symlinks resolved once, and a
    RunFileError for a file jorb cannot use as a run file (a symlink loop, a directory, a
    FIFO or device, a file with hard links). A path that does not exist yet is fine."""
    real = real_path(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return real
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunFileError(f"{path}: a loop of symlinks, not a run file") from None
        raise RunFileError(f"{path}: cannot use it as a run file ({e.strerror})") from None
    _check_regular(st, path, real, "run file")
    if st.st_nlink > 1:
        raise RunFileError(
            f"{path}: the run file has {st.st_nlink} hard links; jorb refuses it, because a "
            f"run's lock and journal sit beside one name (two names would run it twice at "
            f"once) and every checkpoint replaces the file (the other names would keep the old "
            f"content). Remove the other links, or use a symlink instead"
        )
    return real


def _check_regular(st: os.stat_result, path: Path, real: Path, what: str) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise RunFileError(f"{path}: is a directory, not a {what}")
    kind = {
        stat.S_IFIFO: "a FIFO",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
        stat.S_IFSOCK: "a socket",
    }.get(stat.S_IFMT(st.st_mode), "not a regular file")
    shown = f" ({real})" if real != path else ""
    raise RunFileError(f"{path}{shown}: is {kind}, not a {what}; jorb reads only regular files")


def _open_regular(path: Path, what: str) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file (never waits on a FIFO; follows
    no symlink: a run file's path is resolved first). FileNotFoundError if it is missing."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunFileError(
                f"{path}: is a symlink; jorb does not follow one to a {what}"
            ) from None
        if e.errno == errno.EISDIR:
            raise RunFileError(f"{path}: is a directory, not a {what}") from None
        raise RunFileError(f"{path}: cannot read the {what} ({e.strerror})") from None
    try:
        _check_regular(os.fstat(fd), path, path, what)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + JOURNAL_SUFFIX)


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + LOCK_SUFFIX)


# -- encoding ----------------------------------------------------------------------------------


#: Jobs encoded at a time when a run is written: a snapshot of a million jobs never exists
#: whole in memory, as bytes or as documents (that peak was twice the run's own size).
ENCODE_CHUNK = 1000
#: fsync durable journal appends on the event loop (True, the default) or on the store's thread
#: (False: the loop runs execs meanwhile, batches written during an fsync share the next one).
#: Measured no faster on this project's VM (BENCHMARKS.md, issue 13); kept for disks where an
#: fsync takes long.
FSYNC_ON_LOOP = True


_CHUNK_OPEN = b'{\n  "jobs": [\n    '  # a chunk of jobs encoded as {"jobs": [...]}: its start
_CHUNK_CLOSE = b"\n  ]\n}"  # and its end


def encode_run(run: Run) -> bytes:
    """The run file's bytes: 2-space-indented JSON, one key per line (``runfile`` reads this
    layout a piece at a time)."""
    return b"".join(encode_pieces(run))


def encode_pieces(run: Run, reuse: Reuse | None = None) -> Iterator[bytes | memoryview]:
    """The run file's bytes, ``ENCODE_CHUNK`` jobs at a time; joined, exactly
    ``orjson.dumps(run.to_document())`` with 2 spaces of indent and a final newline.

    Each chunk of job documents is encoded on its own, as ``{"jobs": [...]}``, and taken out
    of that object: its jobs are then at the depth they have in the file. With ``reuse``, a
    chunk none of whose jobs changed since the file ``reuse`` read was written is copied
    from that file instead of encoded again, and every piece is told to it (where each chunk
    lands, and the whole file's CRC-32).
    """
    option = orjson.OPT_INDENT_2
    try:
        head = orjson.dumps(run.to_document(jobs=False), default=json_default, option=option)
    except TypeError as e:
        raise TypeError(f"overall: {e}") from None
    jobs = list(run.jobs.values())
    if not jobs:
        head += b"\n"
        if reuse is not None:
            reuse.note(head)
        yield head
        return
    before = head[: -len(b"[]\n}")] + b"[\n    "  # the head ends with '"jobs": []', then '}'
    entries: list[dict[str, Any]] = []  # history objects, filled in again for each chunk
    for index, start in enumerate(range(0, len(jobs), ENCODE_CHUNK)):
        chunk_jobs = jobs[start : start + ENCODE_CHUNK]
        copied = reuse.copy(index, chunk_jobs) if reuse is not None else None
        piece, crc = (_encode_chunk(chunk_jobs, entries), None) if copied is None else copied
        if reuse is not None:
            reuse.note(before)
            reuse.note(piece, chunk_jobs, crc)
        yield before
        yield piece
        before = b",\n    "
    tail = b"\n  ]\n}\n"
    if reuse is not None:
        reuse.note(tail)
    yield tail


def _encode_chunk(jobs: list[Job], entries: list[dict[str, Any]]) -> memoryview:
    """Jobs' documents as they appear in the run file, between the ``[`` and ``]`` of "jobs"
    (``entries``: the pool of history objects, see ``job_documents``)."""
    with _no_cycle_collection():  # a job's document is a dict: a thousand would set it off
        docs = job_documents(jobs, entries)
        try:
            chunk = orjson.dumps({"jobs": docs}, default=json_default, option=orjson.OPT_INDENT_2)
        except TypeError as e:
            raise TypeError(f"{_first_unwritable(docs)}: {e}") from None
        del docs  # freed before the collector is back on: nothing left for it to walk
    # Under a "jobs" key, as in the file, the jobs come out at the file's depth (and are
    # handed on as a view: a chunk is never copied).
    return memoryview(chunk)[len(_CHUNK_OPEN) : -len(_CHUNK_CLOSE)]


_EPOCH = operator.attrgetter("_epoch")

#: Where a chunk of jobs lies in a snapshot: its first and last ``Job``, how many jobs, the
#: offset and length of its bytes, and their CRC-32.
Chunk = tuple[Job, Job, int, int, int, int]


class Reuse:
    """What a store needs to write its next snapshot without encoding again the jobs that did
    not change since its last one: that file (open for reading), where each of its chunks of
    jobs lies in it, and the run's ``_epoch`` once it was written.

    A chunk is copied only if it holds the same ``Job`` objects (its first and last, and how
    many: while a processor executes, jobs are only ever added, at the end), no record changed
    any of them since that file was written (each ``Job._epoch`` is older), and the bytes read
    back have the CRC-32 they were written with (whatever changed the file since, even in
    place keeping its size and times, is never copied). Everything else is encoded, so the
    bytes are exactly what encoding the whole run would give (``tests/test_snapshot_reuse.py``
    checks every snapshot of a mixed run).

    With ``keeping`` (the new file will be copied from in turn), it is told every piece of the
    new file as it is made: it notes where each chunk lands with its CRC-32, and combines those
    into the whole file's (for the journal's header), so no byte is summed twice. Without it
    (the fold at the end of an exec) nothing is summed but the copies' check.
    """

    __slots__ = ("chunks", "crc", "epoch", "fd", "keeping", "laid", "length")

    def __init__(self, fd: int, chunks: list[Chunk], epoch: int, *, keeping: bool) -> None:
        self.fd = fd  # the previous snapshot, or -1: nothing to copy (the first snapshot)
        self.chunks = chunks  # where that file's chunks are
        self.epoch = epoch  # jobs changed since that file was written have this epoch or later
        self.keeping = keeping
        self.laid: list[Chunk] = []  # where the new file's are
        self.length = self.crc = 0  # the new file's so far

    def copy(self, index: int, jobs: list[Job]) -> tuple[bytes, int] | None:
        """The previous file's bytes for this chunk and their CRC-32, if none of its jobs
        changed since and the bytes are still the ones written there."""
        if self.fd < 0 or index >= len(self.chunks):
            return None
        first, last, count, offset, length, crc = self.chunks[index]
        if count != len(jobs) or first is not jobs[0] or last is not jobs[-1]:
            return None
        try:
            if max(map(_EPOCH, jobs)) >= self.epoch:
                return None
        except AttributeError:  # (a job stamped by neither begin() nor a record: encode it)
            return None
        try:
            data = os.pread(self.fd, length, offset)
        except OSError:  # (EIO; ESTALE on NFS): only the shortcut failed, so encode
            self.fd = -1
            return None
        if len(data) != length or zlib.crc32(data) != crc:
            return None
        return data, crc

    def note(
        self, piece: bytes | memoryview, jobs: list[Job] | None = None, crc: int | None = None
    ) -> None:
        """``piece`` is the new file's next (``jobs``' chunk, if given, whose CRC-32 may be
        known already)."""
        if not self.keeping:
            return
        if jobs is None:
            self.crc = zlib.crc32(piece, self.crc)
        else:
            crc = zlib.crc32(piece) if crc is None else crc
            self.laid.append((jobs[0], jobs[-1], len(jobs), self.length, len(piece), crc))
            self.crc = crc32_combine(self.crc, crc, len(piece))
        self.length += len(piece)


def _first_unwritable(docs: list[dict[str, Any]]) -> str:
    """Which of these job documents orjson refuses (to name it in the error)."""
    for doc in docs:
        try:
            orjson.dumps(doc, default=json_default)
        except TypeError:
            return f"job {doc['id']}"
    return "a job"


def decode_run(data: bytes, path: Path) -> Run:
    """Parse run-file bytes; every failure is a CorruptRunError naming the file and place."""
    if not data or data.isspace():  # (not data.strip(): that copies the whole file)
        raise CorruptRunError(f"{path}: the run file is empty")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise CorruptRunError(f"{path}: {_json_problem(data, e)}") from None
    return Run.from_document(doc, path)


def _json_problem(data: bytes, error: orjson.JSONDecodeError) -> str:
    """Where and what, for bytes orjson refused (it places UTF-8 errors at 1:1, so look)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, column = _position(data, e.start)
        return f"not UTF-8 text at line {line}, column {column} (byte offset {e.start})"
    text = data.lstrip()
    if error.pos == len(data) - len(text) and text[:1] not in (b"{", b"["):
        # Refused at its very first character: not JSON at all (notes, a log, a CSV...).
        start = text[:40].decode("utf-8", "replace").splitlines()[0]
        return (
            f"not a jorb run file: a run file is a JSON object, starting with '{{', and this "
            f"is other text (it begins {start!r})"
        )
    where = f"not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
    if error.pos >= len(data.rstrip()):
        return f"{where} (the file ends early: truncated?)"
    return where


def _position(data: bytes, offset: int) -> tuple[int, int]:
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1


# -- atomic writes -----------------------------------------------------------------------------


#: Pieces smaller than this are gathered into one write (a small run is written in one).
_SMALL = 1 << 16


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until every byte is out (a regular file may take a short write)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` survive a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _create_temp(tmp: Path, like: Path, *, readable: bool = False) -> int:
    """Create ``tmp`` for writing, never through a link planted at its name (``O_EXCL |
    O_NOFOLLOW``; anything already there is a leftover of a crash, or planted: it is removed
    and the name taken afresh). Its mode (and, as root, its owner) is that of ``like`` if it
    exists, the usual 0o644 under the umask if not: never more open than the file it
    replaces, not even for a moment."""
    try:
        st: os.stat_result | None = os.stat(like)
    except OSError:
        st = None
    flags = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_RDWR if readable else os.O_WRONLY
    mode = 0o600 if st is not None else 0o644
    try:
        fd = os.open(tmp, flags, mode)
    except FileExistsError:
        os.unlink(tmp)
        fd = os.open(tmp, flags, mode)
    if st is not None:
        try:
            if os.geteuid() == 0:
                os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return fd


def atomic_write(
    path: Path,
    data: bytes | Iterable[bytes | memoryview],
    *,
    durable: bool = True,
    like: Path | None = None,
    keep: list[int] | None = None,
    checksum: bool = True,
) -> tuple[int, int]:
    """Replace ``path`` with ``data`` (bytes, or pieces of them written as they come): temp
    file, fsync, rename, fsync the directory. Returns the bytes' length and CRC-32 (0 without
    ``checksum``: the caller sums them itself, or needs no sum).

    Pieces under ``_SMALL`` bytes are gathered into one write. On any error before the rename
    (also one raised while the pieces are made) the temp file is removed and ``path`` is
    untouched. The new file keeps the mode and owner of the one it replaces (of ``like``, if
    given: the journal's are the run file's); see :func:`_create_temp`.
    """
    pieces = (data,) if isinstance(data, bytes) else data
    length = crc = 0
    small = bytearray()
    tmp = _temp_path(path)
    fd = _create_temp(tmp, like or path, readable=keep is not None)
    try:
        try:
            for piece in pieces:
                length += len(piece)
                if checksum:
                    crc = zlib.crc32(piece, crc)
                if len(piece) < _SMALL:
                    small += piece
                    if len(small) >= _SMALL:
                        write_all(fd, small)
                        small.clear()
                    continue
                if small:
                    write_all(fd, small)
                    small.clear()
                write_all(fd, piece)
            if small:
                write_all(fd, small)
            if durable:
                os.fsync(fd)
            os.replace(tmp, path)
        finally:
            if keep is None:
                os.close(fd)
    except BaseException:
        if keep is not None:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        try:
            fsync_dir(path.parent)
        except BaseException:
            if keep is not None:
                os.close(fd)
            raise
    if keep is not None:
        keep.append(fd)  # the file just written, open: whatever is at ``path`` by now
    return length, crc


# -- reading -----------------------------------------------------------------------------------


def _journal_header(length: int, crc: int, seq: int) -> bytes:
    """The journal's first line: the snapshot it continues (its seq, length and CRC-32)."""
    header = {"journal": JOURNAL_VERSION, "seq": seq, "length": length, "crc": crc}
    line = orjson.dumps(header, option=orjson.OPT_APPEND_NEWLINE)
    return b"%08x %b" % (zlib.crc32(line), line)


def frame(records: list[bytes]) -> bytes:
    """Journal lines for ``records`` (each a JSON object and its newline): each after the
    CRC-32 of its bytes, in 8 hex digits and a space: about 0.27 µs a record, 2 to 5% of a
    transition's CPU (``bench/checksum_cost.py``, BENCHMARKS.md)."""
    crc32 = zlib.crc32
    return b"".join([piece for record in records for piece in (b"%08x " % crc32(record), record)])


def read_journal(path: Path) -> tuple[dict[str, Any] | None, Records]:
    """The journal's header, and its whole records with their line numbers, each read and
    parsed only as it is taken (no journal: ``None`` and none). Close the records (or take
    them all) when done: they hold the journal open.

    The journal is opened and its header read now: :func:`read_run` relies on that (the
    records read later are from the journal opened first, whatever replaced it since; see
    the module docstring). A journal may be as big as the run, so its records are never
    all in memory at once, as bytes or as objects (that was twice a run's memory on a resume
    after a crash with a long journal).

    Only the end of a journal can be torn (a crash mid-append): an unterminated last line, or
    a last line that fails its checksum or does not parse, is dropped. Anything wrong before
    that is damage, raised (naming the line) when the records get that far.
    """
    try:
        file = _open_regular(path, "journal")
    except FileNotFoundError:
        return None, _none()
    return _header_and_records(file, path)


def parse_journal(data: bytes, path: Path) -> tuple[dict[str, Any] | None, Records]:
    """:func:`read_journal` on bytes already read."""
    return _header_and_records(io.BytesIO(data), path)


def _header_and_records(file: BinaryIO, path: Path) -> tuple[dict[str, Any] | None, Records]:
    """The header, read and checked now, and the records after it, as they are taken."""
    framed: list[bool] = []  # (whether the lines carry checksums: _lines says, from line 1)
    lines = _lines(file, path, framed)
    first = next(lines, None)
    if first is None:
        return None, _none()
    try:
        header = _check_header(first[1], path, framed[0])
    except BaseException:
        lines.close()
        raise
    return header, _records(lines, path)


def _none() -> Records:
    yield from ()


def _lines(
    file: BinaryIO, path: Path, framed: list[bool]
) -> Generator[tuple[int, Any], None, None]:
    """(line number, parsed value) of each whole line of ``file``, the torn end dropped; the
    file is closed at the end (or when the generator is closed). Whether the lines carry a
    checksum is decided by the first (a version 1 header starts with ``{``) and put in
    ``framed``; a line that fails it is damage, or, last, a torn write."""
    loads, crc32 = orjson.loads, zlib.crc32
    with file:
        try:
            line, number = file.readline(), 0
            framed.append(not line.startswith(b"{"))
            checked = framed[0]
            while line:
                following = file.readline()
                number += 1
                if not line.endswith(b"\n"):
                    return  # an unterminated last line: a cut write
                problem = None
                if checked:
                    body = line[9:]
                    if line[8:9] != b" " or line[:8] != b"%08x" % crc32(body):
                        problem = "fails its checksum (damaged)"
                else:
                    body = line
                if problem is None:
                    try:
                        value = loads(body)
                    except orjson.JSONDecodeError:
                        problem = "is not valid JSON"
                if problem is not None:
                    if not following:  # the last write was cut: not written
                        return
                    raise CorruptRunError(
                        f"{path}: line {number} {problem}, and more follows it, so this is "
                        f"not a torn last write. {_MOVE_ASIDE}"
                    )
                yield number, value
                line = following
        except OSError as e:
            raise RunFileError(f"{path}: cannot read the journal ({e.strerror})") from None


def _records(lines: Generator[tuple[int, Any], None, None], path: Path) -> Records:
    """The records after the header, each checked to have a seq after the one before."""
    last: int | None = None
    with contextlib.closing(lines):  # (closing these closes the journal)
        for number, value in lines:
            seq = value.get("seq") if isinstance(value, dict) else None
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise CorruptRunError(
                    f'{path}: line {number} is not a journal record (no "seq"). {_MOVE_ASIDE}'
                )
            if last is not None and seq <= last:
                raise CorruptRunError(
                    f"{path}: line {number} has seq {seq}, not after {last}. {_MOVE_ASIDE}"
                )
            last = seq
            yield number, value


_MOVE_ASIDE = (
    "To load the run file as of its last compaction, move the journal aside (the transitions "
    "only it holds will run again)."
)


def _check_header(value: Any, path: Path, framed: bool) -> dict[str, Any]:
    if not isinstance(value, dict) or "journal" not in value:
        raise CorruptRunError(f"{path}: line 1 is not a jorb journal header. {_MOVE_ASIDE}")
    version = value["journal"]
    if version not in JOURNAL_READS or isinstance(version, bool):
        raise CorruptRunError(
            f"{path}: journal version {version!r}; this jorb reads versions "
            f"{', '.join(map(str, JOURNAL_READS))} (was the run executed by a newer jorb?)"
        )
    if framed != (version >= 2):
        raise CorruptRunError(
            f"{path}: line 1 is a version {version} header, but "
            f"{'with' if framed else 'without'} a checksum. {_MOVE_ASIDE}"
        )
    for key in ("seq", "length", "crc"):
        if not isinstance(value.get(key), int):
            raise CorruptRunError(
                f'{path}: the journal header has no integer "{key}". {_MOVE_ASIDE}'
            )
    return value


def _replay(
    run: Run,
    path: Path,
    snapshot: tuple[int, int | None],
    header: dict[str, Any] | None,
    records: Records,
) -> None:
    """Apply the journal's records that the snapshot (its length and CRC-32) does not hold
    yet, one at a time as they are parsed (every record is parsed, so damage anywhere in the
    journal is reported even where the snapshot holds everything)."""
    jpath = journal_path(path)
    base = run.seq
    pending = ((line, record) for line, record in records if record["seq"] > base)
    first = next(pending, None)
    if header is None or first is None:
        return  # no journal, or one whose every record is already folded into the snapshot
    if header["seq"] != base or header["length"] != snapshot[0] or header["crc"] != snapshot[1]:
        unsaved = transitions_in(first[1]) + sum(transitions_in(r) for _, r in pending)
        raise JournalConflictError(
            f"{path} was changed after its last process stopped uncleanly, while {jpath} "
            f"still holds {unsaved} transition(s) not saved in it: the two disagree, and "
            f"neither file was changed. To merge them, run `jorb fold {path}`: your edit is "
            f"kept for the jobs whose state you changed, the journal's transitions for the "
            f"others, and a copy of each file as it is now is set aside. To keep only your "
            f"edit (the journal's jobs then run again): delete {jpath}."
        )
    for expected, (line, record) in enumerate(itertools.chain([first], pending), base + 1):
        if record["seq"] != expected:
            raise CorruptRunError(
                f"{jpath}: line {line} has seq {record['seq']}, after seq {expected - 1}: "
                f"records are missing. {_MOVE_ASIDE}"
            )
        try:
            problem = replay_record(run, record)
        except (KeyError, TypeError, AttributeError, ValueError, RunFileError) as e:
            problem = str(e)
        if problem is not None:
            raise CorruptRunError(
                f"{jpath}: line {line}, record seq {record['seq']}, does not fit the run file "
                f"({problem}). {_MOVE_ASIDE}"
            )


def _read_snapshot(path: Path, *, checksum: bool = True) -> tuple[Run, tuple[int, int | None]]:
    """The run in the run file, and the file's length and CRC-32 (for the journal's header;
    None without ``checksum``).

    A file in jorb's own layout is read a piece at a time; any other is read and parsed whole,
    which also gives a damaged file's error its line and column.
    """
    try:
        with _open_regular(path, "run file") as file:
            pieces = read_pieces(file, path, checksum=checksum)
            if pieces is not None:
                run, length, crc = pieces
                return run, (length, crc)
            file.seek(0)
            data = file.read()  # the same file: a rename since the open does not mix two
    except FileNotFoundError:
        raise RunFileError(f"{path}: no such run file") from None
    except IsADirectoryError:
        raise RunFileError(f"{path}: is a directory, not a run file") from None
    except OSError as e:
        raise RunFileError(f"{path}: cannot read the run file ({e.strerror})") from None
    return decode_run(data, path), (len(data), zlib.crc32(data) if checksum else None)


def read_run(path: Path) -> Run:
    """Load ``path`` and replay its journal; raises a RunFileError saying what is wrong.

    Safe while another process executes the run: the journal is opened first (see the module
    docstring), so a compaction racing with this read is never mistaken for a conflict.
    """
    path = resolve(path)
    settle = gc.isenabled() and gc.get_freeze_count() == 0
    if settle:
        gc.collect(1)  # the process's young garbage, freed before _settle_collector
    with _no_cycle_collection():
        header, records = read_journal(journal_path(path))
        with contextlib.closing(records):
            run, snapshot = _read_snapshot(path, checksum=header is not None)
            _replay(run, path, snapshot, header, records)
        if settle:
            _settle_collector()
    return run


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Pause the cyclic garbage collector while a run's millions of objects are built.

    Loading (or encoding, which builds each job's document) makes no garbage cycles, but every
    container it creates counts toward the next collection, and each full collection walks
    every object of the run: a third of the CPU of a big load, for nothing.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _settle_collector() -> None:
    """After a load: hand what it built to the collector's oldest generation, unwalked.

    Built with the collector paused, a million jobs' five million objects all sit in its
    youngest generation, so the first collection after the load (due at once) walked every
    one of them: 0.5 s of a 1M-job reopen, only to move them on to where long-lived objects
    go. ``gc.freeze()`` then ``gc.unfreeze()`` moves every tracked object of the process
    there directly, without a walk.

    ``read_run`` calls it only when the collector is on (else nothing would walk them
    anyway), not if the process froze objects of its own (``unfreeze`` would thaw them),
    and after collecting the young generations before the load: whatever else the process
    had made meanwhile is moved too, and the cyclic garbage among it would otherwise wait
    for a full collection, which objects moved this way do not bring nearer.
    """
    gc.freeze()
    gc.unfreeze()


def open_run(path: Path, overall: dict[str, Any] | None) -> Run:
    """``Run.open``: take the lock, then reopen the file or start a new run."""
    path = resolve(path)
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


def file_stamp(path: Path | None) -> tuple[int, int, int] | None:
    """Identity of a file's current content: inode, size, mtime (None if it does not exist)."""
    if path is None:
        return None
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


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


# -- the lock ----------------------------------------------------------------------------------


def is_locked(path: Path) -> bool:
    """Whether some process holds the run's lock right now."""
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(lock_path(real_path(path)), flags)
    except OSError:  # none (or a planted link or a FIFO: taking the lock reports it)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _take_lock(path: Path) -> int:
    """Open the lock file and hold it exclusively; the descriptor is the lock."""
    lpath = lock_path(path)
    try:
        if not path.parent.is_dir():  # a new runs/ folder: make its entry durable too
            path.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(path.parent.parent)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode) & 0o666
        except OSError:
            mode = 0o644
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(lpath, flags, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunFileError(
                f"{path}: its lock file {lpath} is a symlink; jorb does not follow it (it would "
                f"overwrite what it points to). Remove the link"
            ) from None
        raise RunFileError(f"{path}: cannot create its lock file {lpath} ({e.strerror})") from None
    try:
        _check_regular(os.fstat(fd), lpath, lpath, "lock file")
    except RunFileError:
        os.close(fd)
        raise
    deadline = time.monotonic() + LOCK_PATIENCE
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            # An ``is_locked`` probe (a command checking for a live process) holds the lock
            # shared for a moment: it is free if we can share it too. Only a real holder,
            # with its exclusive lock, makes us give up at once.
            if _shareable(fd) and time.monotonic() < deadline:
                time.sleep(0.001)
                continue
            holder = _holder(fd)
            os.close(fd)
            raise RunLockedError(_locked_message(path, lpath, holder)) from None
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _shareable(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # (someone else's process)
    return True


#: Every Store open in this process, so that a forked child can let go of their files.
_STORES: weakref.WeakSet[Store] = weakref.WeakSet()


def _forget_in_child() -> None:
    """In a child made by ``os.fork`` (an exec's own, a multiprocessing worker): close the
    descriptors of the parent's lock and journal.

    A flock belongs to the open file, which the child shares: had the child kept its copy, the
    lock would outlive the parent while the child runs, blaming the dead parent (``O_CLOEXEC``
    only covers a child that execs). Closing the child's copy releases nothing the parent
    holds. The child's Stores are then closed: any write from it fails.
    """
    for store in list(_STORES):
        store.forget()


os.register_at_fork(after_in_child=_forget_in_child)


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _locked_message(path: Path, lpath: Path, holder: int | None) -> str:
    if holder == os.getpid():
        return (
            f"{path} is already open in this process (another Run.open of it has not been "
            f"closed); use that Run, or call its close() first"
        )
    if holder and not _alive(holder):
        return (
            f"{path} is in use: process {holder} took its lock {lpath} and has exited, but "
            f"another process still holds the lock it inherited (a child it started without "
            f"exec, still running). Stop that process (`fuser {lpath}` names it)"
        )
    who = f"process {holder}" if holder else "another process"
    return (
        f"{path} is in use by {who} (it holds {lpath}); wait for it to finish or stop it. "
        f"The lock is released the moment that process exits, even if it is killed."
    )


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """A file's identity and version: inode, size, modification time (None if it is gone)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


# -- the writer --------------------------------------------------------------------------------


class Store:
    """A run's files, held open by one process: the lock, the journal and compaction.

    ``store = Store(path)`` takes the lock (``RunLockedError`` if another holder has it);
    ``begin(run)`` folds the run into a fresh snapshot and opens the journal;
    ``await store.append(record)`` returns once the record is on disk (group commit);
    ``finish()`` folds the journal in and removes it; ``close()`` releases the lock.

    The caller applies a record to the run *before* appending it (so a snapshot taken later
    holds it). Any write failure leaves the last good checkpoint intact, fails the pending
    appends and every later one with :class:`CheckpointError`, and writes nothing more until
    the next ``begin``.
    """

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        path = resolve(path)
        self.path = path
        self.journal = journal_path(path)
        #: Whether writes are fsync'd (power-loss safe); a plain write already survives kill -9.
        self.durable = durable
        #: Whether a processor is executing the run (it is then the only writer).
        self.executing = False
        #: The first write failure, after which every append fails.
        self.failure: CheckpointError | None = None
        #: Totals, for benchmarks and status: bytes written, fsyncs, snapshots, records.
        self.stats = {
            "journal_bytes": 0,
            "snapshot_bytes": 0,
            "fsyncs": 0,
            "snapshots": 0,
            "records": 0,
            "batches": 0,
        }
        self._run: Run | None = None
        self._fd = -1  # the journal, open for appending
        self._size = 0  # bytes in the journal file
        self._snapshot_len = 0
        self._steps = 0  # history entries the journal added since the snapshot
        self._snapshot_seq = -1  # seq of the newest snapshot on disk
        self._upto = 0  # the run's seq at the last append
        self._pending: list[bytes] = []
        self._batch: asyncio.Future[None] | None = None
        # Durable journal appends: written on the loop, fsync'd on a thread (see _flush).
        self._syncing: threading.Event | None = None  # set when the fsync in flight returns
        self._unsynced: list[asyncio.Future[None]] = []  # batches written, for the next one
        self._synced_size = 0  # the journal's bytes known to be on disk
        self._sync_thread: futures.ThreadPoolExecutor | None = None
        #: Called first thing in every flush: the processor's chance to append the records it
        #: settled in bulk this turn (see ``commit``).
        self.prepare: Callable[[], None] | None = None
        # Writes happen on the event loop while executing, or on whatever thread calls
        # begin/finish/compact/close; this keeps them from ever interleaving.
        self._files = threading.Lock()
        #: Called with the path of a copy of the run file when an edit made to it while this
        #: process writes it is set aside (the processor tells the user).
        self.on_edit: Callable[[Path], None] | None = None
        self._written: tuple[int, int, int] | None = None  # the file as this store last wrote it
        # The last snapshot, open for reading, and where its chunks of jobs lie: the next
        # snapshot copies the chunks whose jobs did not change (see ``Reuse``).
        self._source_fd = -1
        self._chunks: list[Chunk] = []
        self._written_source: tuple[int, int, int, int] | None = None  # (+ its ctime)
        self._lock_fd = _take_lock(path)
        _STORES.add(self)

    def __repr__(self) -> str:
        return (
            f"<Store {self.path} journal={self._size}B snapshot={self._snapshot_len}B "
            f"pending={len(self._pending)} executing={self.executing} failure={self.failure}>"
        )

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def forget(self) -> None:
        """In a forked child: drop this process's copies of the files, write nothing more."""
        for fd in (self._lock_fd, self._fd, self._source_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._lock_fd = self._fd = self._source_fd = -1
        self._files = threading.Lock()  # (the parent's may have been held at the fork)
        self.executing = False
        self.failure = CheckpointError(
            f"{self.path}: this process was forked from the one running the run; only that "
            f"one writes it"
        )

    def close(self) -> None:
        """Close the journal and release the lock (after any write in progress)."""
        with self._files:
            self._close_journal()
            self._drop_source()
        if self._sync_thread is not None:
            self._sync_thread.shutdown(wait=False)
            self._sync_thread = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = -1

    # -- snapshots -------------------------------------------------------------------------

    def begin(self, run: Run) -> None:
        """Start executing ``run``: a fresh snapshot (with any added jobs) and journal."""
        self._run = run
        self.failure = None
        self._pending, self._batch = [], None
        self._remove_stale_temps()
        with self._files:  # (the run may have been changed in memory since: encode it all)
            self._drop_source()
        stamp_all(run.jobs.values())
        self.compact(run)
        self.executing = True

    def finish(self) -> None:
        """Stop executing: fold the journal into the snapshot and remove it.

        After a write failure nothing more is written: the snapshot and journal on disk are the
        last good checkpoint, which the next open replays.
        """
        self.executing = False
        run, self._run = self._run, None
        if run is not None and self.failure is None:
            self.compact(run, finish=True)
        else:
            with self._files:
                self._close_journal()
                self._drop_source()

    def compact(self, run: Run, *, finish: bool = False) -> None:
        """Fold ``run`` into a new snapshot; start a fresh journal (or, with ``finish``, none)."""
        try:
            self._write_snapshot(run, finish)
        except (OSError, CheckpointError) as e:
            raise self._fail(e)  # noqa: B904 (the cause is set on the CheckpointError)

    def _write_snapshot(self, run: Run, finish: bool) -> None:
        """Write ``run`` as the new snapshot, encoded as it is written (never whole in memory),
        then start its journal."""
        with self._files:
            seq = run.seq
            if self._written is not None:
                self._keep_edit()
            reuse = self._reuse(run, keeping=not finish)
            kept: list[int] = []
            length, _ = atomic_write(
                self.path,
                self._pieces(run, reuse),
                durable=self.durable,
                keep=kept,
                checksum=False,  # (the reuse sums the pieces it is told, if the sum is needed)
            )
            fd = kept[0]  # our file, even if another was renamed over it since
            try:
                st = os.fstat(fd)
            except OSError:
                os.close(fd)
                raise
            self._written = (st.st_ino, st.st_size, st.st_mtime_ns)
            self._drop_source()
            run._epoch += 1  # (records from now on change jobs after this file)
            if finish:
                os.close(fd)
            else:  # kept open, to copy its unchanged chunks into the next snapshot
                self._source_fd, self._chunks = fd, reuse.laid
                self._written_source = (*self._written, st.st_ctime_ns)
            self._snapshot_seq, self._snapshot_len, self._steps = seq, length, 0
            self.stats["snapshots"] += 1
            self.stats["snapshot_bytes"] += length
            # Every record in the old journal is <= seq now: a crash from here on is harmless.
            self._close_journal()
            if finish:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.journal)
                    if self.durable:
                        fsync_dir(self.path.parent)
                return
            header = _journal_header(length, reuse.crc, seq)
            atomic_write(self.journal, header, durable=self.durable, like=self.path)
            flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
            self._fd = os.open(self.journal, flags)
            self._size = self._synced_size = len(header)
            self.stats["journal_bytes"] += len(header)

    def _keep_edit(self) -> None:
        """The file is about to be replaced: if someone edited it since this store wrote it
        (while a process runs it, that edit cannot be applied), keep a copy beside it."""
        if _stamp(self.path) == self._written:
            return
        aside = self.path.with_name(f"{self.path.name}.edited-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            with self.path.open("rb") as edited:  # (copied a MB at a time: it may be big)
                atomic_write(aside, iter(lambda: edited.read(1 << 20), b""), durable=self.durable)
        except OSError:
            return  # (deleted, or unreadable: nothing to keep)
        if self.on_edit is not None:
            self.on_edit(aside)

    def _reuse(self, run: Run, *, keeping: bool) -> Reuse:
        """What the next snapshot may copy from the last one: nothing at the start of an exec
        (``begin`` drops it), or if the file was changed in place since it was written."""
        fd = self._source_fd
        if fd >= 0:
            try:
                st = os.fstat(fd)
            except OSError:
                return Reuse(-1, [], 0, keeping=keeping)
            if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == self._written_source:
                # (run._epoch has not moved since that file: only writing a snapshot moves it)
                return Reuse(fd, self._chunks, run._epoch, keeping=keeping)
        return Reuse(-1, [], 0, keeping=keeping)

    def _drop_source(self) -> None:
        if self._source_fd >= 0:
            os.close(self._source_fd)
        self._source_fd, self._chunks = -1, []

    def _pieces(self, run: Run, reuse: Reuse | None = None) -> Iterator[bytes | memoryview]:
        try:
            yield from encode_pieces(run, reuse)
        except UnwritableEntry as e:
            raise CheckpointError(f"{self.path}: the run cannot be written: {e}") from None
        except TypeError as e:  # orjson: something in overall or a ctx is not JSON
            raise CheckpointError(
                f"{self.path}: the run cannot be written as JSON ({e}); overall and every "
                f"job's ctx must hold only JSON values"
            ) from None

    def _close_journal(self) -> None:
        syncing = self._syncing
        if syncing is not None:  # let the fsync in flight end before its descriptor does
            syncing.wait()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _remove_stale_temps(self) -> None:
        """Temp files a crash left mid-write (we hold the lock, so none is live)."""
        pattern = re.compile(
            rf"\.{re.escape(self.path.name)}(?:{re.escape(JOURNAL_SUFFIX)})?\.\d+\.tmp"
        )
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.path.parent):
                if pattern.fullmatch(entry.name):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    # -- group commit ----------------------------------------------------------------------

    def append(self, record: bytes, steps: int = 0) -> asyncio.Future[None]:
        """Queue one record; the future resolves when it (and its batch) is on disk.

        ``steps``: history entries the record adds (the next snapshot grows by at least
        ``STEP_BYTES`` each); left at 0 the record counts as growing nothing, which only makes
        a compaction come sooner.
        """
        run = self._run
        if self.failure is not None or run is None:
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            failed.set_exception(
                self.failure
                or CheckpointError(f"{self.path}: append before begin() or after finish()")
            )
            return failed
        self._pending.append(record)
        self._steps += steps
        self._upto = run.seq  # the caller applied the record first: a later snapshot holds it
        return self._batch or self.pending()

    def pending(self) -> asyncio.Future[None]:
        """The group commit the next records join: resolved once they are on disk.

        Opening one schedules its flush at the end of this turn of the event loop.
        """
        batch = self._batch
        if batch is None:  # the first record of this turn (asking for the loop costs, once)
            loop = asyncio.get_running_loop()
            batch = self._batch = loop.create_future()
            loop.call_soon(self._flush)
        return batch

    async def drain(self) -> None:
        """Write everything appended so far (or fail it) before returning."""
        if self._pending or self._batch is not None:
            self._flush()

    def _flush(self) -> None:
        """Write and fsync every record appended during this turn of the event loop.

        It runs on the loop, at the end of the turn in which the first record of the batch
        was appended, so every worker that settled in that turn shares one write and one
        fsync. A writer thread was measured slower, in every variant tried (d1a1ddd, see
        BENCHMARKS.md): while the loop runs Python the thread cannot get the GIL to start the
        write, so it merges the batches back to one fsync per turn and only adds hand-offs
        (-9% durable tr/s); splitting the batches when a worker parks, with the loop handing
        the GIL over, does overlap the fsync but doubles the fsyncs and context switches
        (-15%, +2.4 CPU µs per transition).
        """
        if self.prepare is not None:
            try:
                self.prepare()
            except Exception as e:  # a bug: fail the batch rather than leave it hanging
                self._fail(e, self._batch)
                return
        records, batch, upto = self._pending, self._batch, self._upto
        self._pending, self._batch = [], None
        if batch is None:
            return
        if not records:
            if not batch.done():
                batch.set_result(None)
            return
        run = self._run  # None once finish() folded everything in
        try:
            grown = self._snapshot_len + STEP_BYTES * self._steps
            big = self._size > max(MIN_COMPACT_BYTES, COMPACT_RATIO * grown)
            if run is not None and big:
                # Every record in this batch is applied to the run in memory already, so a
                # snapshot of it holds them: no need to write them to the journal.
                self._write_snapshot(run, False)
            else:
                self._write(records, upto)
        except Exception as e:  # a write error, a bad encode
            self._fail(e, batch)
            return
        self.stats["records"] += len(records)
        self.stats["batches"] += 1
        if self.durable and self._size > self._synced_size and not FSYNC_ON_LOOP:
            # Written, not yet durable: the fsync runs on a thread while the loop goes on
            # (one at a time; batches written meanwhile share the next).
            self._unsynced.append(batch)
            if self._syncing is None:
                self._sync()
        elif not batch.done():
            batch.set_result(None)

    def _sync(self) -> None:
        """fsync the journal on the store's thread; its batches resolve when that returns."""
        batches, self._unsynced = self._unsynced, []
        loop = asyncio.get_running_loop()
        if self._sync_thread is None:
            self._sync_thread = futures.ThreadPoolExecutor(1, thread_name_prefix="jorb-fsync")
        size, fd = self._size, self._fd
        syncing = self._syncing = threading.Event()

        def fsync() -> None:
            try:
                os.fsync(fd)
            finally:
                syncing.set()

        # Through the loop's run_in_executor, so a test's virtual clock waits for it.
        done = loop.run_in_executor(self._sync_thread, fsync)
        done.add_done_callback(functools.partial(self._synced, syncing, batches, size))

    def _synced(
        self,
        syncing: threading.Event,
        batches: list[asyncio.Future[None]],
        size: int,
        done: asyncio.Future[None],
    ) -> None:
        """On the loop: an fsync returned. Resolve its batches; start the next if any wait."""
        if self._syncing is syncing:
            self._syncing = None
        error = done.exception() if not done.cancelled() else CheckpointError("fsync cancelled")
        if error is not None:
            if self._fd >= 0:  # cut what may not be on disk, so later loads see no garbage
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._synced_size)
            self._fail(error, *batches)
            return
        self.stats["fsyncs"] += 1
        self._synced_size = max(self._synced_size, size)
        for batch in batches:
            if not batch.done():
                batch.set_result(None)
        if self._unsynced and self._syncing is None and self.failure is None and self._fd >= 0:
            self._sync()

    def _write(self, records: list[bytes], upto: int) -> None:
        """Append one batch (fsync'd on the loop only if ``_flush`` will not hand it off)."""
        with self._files:
            if self._snapshot_seq >= upto:
                return  # a snapshot taken since holds every record of this batch
            if self._fd < 0:
                raise OSError(errno.EBADF, "the journal is not open")
            data = frame(records)
            start = self._size
            try:
                write_all(self._fd, data)
                if self.durable and FSYNC_ON_LOOP:
                    os.fsync(self._fd)
                    self.stats["fsyncs"] += 1
                    self._synced_size = self._size + len(data)
            except OSError:
                # Cut the journal back to its last whole record so later loads see no garbage.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
                raise
            self._size += len(data)
            self.stats["journal_bytes"] += len(data)

    def _fail(self, error: BaseException, *batches: asyncio.Future[None] | None) -> CheckpointError:
        """Turn ``error`` into a CheckpointError, keep the first as ``failure``, and fail every
        waiting append with it."""
        if isinstance(error, CheckpointError):
            failure = error
        else:
            reason = str(error)
            if isinstance(error, OSError):
                reason = os.strerror(error.errno) if error.errno else str(error)
                if error.errno == errno.ENOSPC:
                    reason = "the disk is full"
            if self.path.parent.is_dir():
                after = "the last good checkpoint is intact and a rerun resumes from it"
            else:
                after = (
                    f"its directory {self.path.parent} is gone (deleted while the run ran), "
                    f"and with it every checkpoint: a rerun starts afresh"
                )
            failure = CheckpointError(
                f"{self.path}: could not write a checkpoint ({reason}); {after}"
            )
            failure.__cause__ = error
        self.failure = self.failure or failure
        for future in (*batches, self._batch, *self._unsynced):
            if future is not None and not future.done():
                future.set_exception(failure)
        self._pending, self._batch, self._unsynced = [], None, []
        return failure


class _Files:
    """What ``model.Run`` needs of this module (the model itself does no I/O)."""

    open_run = staticmethod(open_run)
    read_run = staticmethod(read_run)
    save_run = staticmethod(save_run)
    file_stamp = staticmethod(file_stamp)


plug_files(_Files())
