"""Reading a run file in pieces: a million jobs without the whole file or its parse in memory.

``orjson.loads`` of a whole 1M-job file holds the file's bytes, the parser's own document of
them and every Python object at once: about 4 KB a job at the peak, most of a load's time spent
faulting in fresh memory. jorb writes run files in one layout (``checkpoint.encode_run``: two
spaces of indent, the ``"jobs"`` list last, one job object at four spaces), so a file in that
layout is read 64 KB at a time, cut between two jobs, and each piece parsed as a list
and turned into Jobs before the next is read.

Why this reads exactly what a whole parse would: a piece is cut only at a line break (never
inside a JSON string, where a raw line break is not allowed), and every piece must parse, on
its own, as a list of complete values; pieces that each parse that way, joined by the commas
they were cut at, are the whole list. Anything else (a file edited into another layout, a
damaged one) returns None, and the caller parses the whole file the ordinary way, which also
gives its errors their line and column.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import BinaryIO

import orjson

from .errors import CorruptRunError
from .model import Job, Run, usual_jobs

__all__ = ["PIECE", "read_pieces"]

#: Bytes read at a time (a piece is cut at the last job boundary in it).
PIECE = 1 << 16

_JOBS = b'\n  "jobs": [\n'  # the "jobs" key, its list opened, the first job on the next line
_CLOSE = b"\n    }"  # the end of a job object
_BETWEEN = _CLOSE + b",\n"  # the end of one job object and the comma before the next
_OPEN, _SHUT = ord("["), ord("]")
_END = re.compile(rb"[ \t\r\n]*\][ \t\r\n]*\}[ \t\r\n]*")  # the jobs list and the file closed


def read_pieces(
    file: BinaryIO, path: Path, *, checksum: bool = True
) -> tuple[Run, int, int | None] | None:
    """The run in ``file`` (read from where it is), its length in bytes and its CRC-32 (None
    without ``checksum``: only a journal's header needs it, and a 1M-job file takes 0.14 s);
    None if the file is not in jorb's own layout, or a piece does not parse or holds a job of
    the wrong shape: read it whole instead (which also reports the file's first problem, not
    a piece's).

    Bytes are searched once each (a file with no cut in it is read to its end in linear time).
    """
    head = bytearray()
    length = crc = 0
    while True:  # the head: every key but "jobs"
        block = file.read(PIECE)
        if not block:
            return None
        searched = max(0, len(head) - len(_JOBS) + 1)
        head += block
        length += len(block)
        crc = zlib.crc32(block, crc) if checksum else 0
        if (start := head.find(_JOBS, searched)) >= 0:
            break
    data = bytes(head)
    del head
    if not data.endswith(b",", 0, start):
        return None
    doc = _parse(data[: start - 1] + b"\n}")  # the head's object, without the comma
    if not isinstance(doc, dict) or "jobs" in doc:
        return None
    try:
        run = Run.from_head(doc, path)
    except CorruptRunError:
        return None
    # From the "[" that opens the jobs list: each piece is parsed where it lies in ``buf``, as a
    # list opened by the byte before its first job (that "[", then the comma before it, made a
    # "[") and closed by the comma after its last (made a "]").
    buf = bytearray(data[start + len(_JOBS) - 2 :])
    # The jobs checked, and their ids (taken while the jobs are in the CPU's cache), added to
    # the run at the end: a million inserts into one dict cost half as much together as spread
    # between the pieces' parsing, which evicts the dict's table from the cache each time.
    read: list[Job] = []
    ids: list[str] = []
    index = 0
    while True:
        block = file.read(PIECE)
        if block:
            length += len(block)
            crc = zlib.crc32(block, crc) if checksum else 0
            searched = max(0, len(buf) - len(_BETWEEN) + 1)
            buf += block
            cut = buf.rfind(_BETWEEN, searched)  # the last job boundary in the new bytes
            if cut < 0:
                continue  # not one whole job yet
            end = cut + len(_CLOSE)  # (the comma after the piece's last job)
        else:  # the last jobs, then the end of the list and of the file
            cut = buf.rfind(_CLOSE)
            end = cut + len(_CLOSE)
            if cut < 0 or not _END.fullmatch(buf, end):
                return None
        buf[0], buf[end] = _OPEN, _SHUT
        with memoryview(buf) as whole, whole[: end + 1] as piece:
            jobs = _parse(piece)
        if not isinstance(jobs, list):
            return None
        built = usual_jobs(jobs)
        try:
            if built is not None:
                read += built
                ids += [job.id for job in built]
            else:  # (added in the file's order: those read before it first)
                run.add_read(ids, read)
                ids, read = [], []
                run.read_jobs(jobs, index)
            if not block:
                run.add_read(ids, read)
        except CorruptRunError:
            return None  # the whole parse decides: a syntax error further on is reported first
        if not block:
            return run, length, crc if checksum else None
        index += len(jobs)
        del buf[:end]


def _parse(data: bytes | memoryview) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
