"""Following a run from another process: ``jorb watch RUNFILE`` draws the live table from the
run file and its journal, read-only, until the process running it stops.

::

    watcher = jorb.watch.Watcher(Path("runs/migrate.json"))
    status = watcher.poll()          # a jorb.Status, as the processor's listeners get them
    if watcher.ended: ...

It never takes the run's lock and never writes: it loads the run once (as ``jorb status``
does) and then reads the records the process appends to the journal, applying them as a
load would. When the journal is replaced (a compaction, or the process folding it in as it
stops) it loads the run again. Whether a process is still running the run is read from the
process id its lock file holds, not by trying the lock.

What the file cannot tell is left out: which jobs are running right now (the journal has a
record per finished exec, none per start), the states' concurrency, and which jobs await
their children. ``done``, ``errors`` and the jobs given up on count what the watcher has
seen since it started, and so does ``elapsed``.
"""

from __future__ import annotations

import os
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from .checkpoint import journal_path, lock_path
from .errors import JorbError
from .model import Run, apply_record
from .status import StateStatus, Status

__all__ = ["Watcher"]

#: A journal line framed with its checksum: eight hex digits of CRC-32, a space, the record.
_FRAMED = re.compile(rb"[0-9a-f]{8} ")
#: How much of the journal is read at once.
READ_CHUNK = 4 << 20


class Watcher:
    """Reads a run and its journal as another process writes them; :meth:`poll` for a Status.

    ``clock`` (seconds, default ``time.monotonic``) is what ``Status.elapsed`` counts in; the
    time of day that decides which jobs are still delayed is ``time.time``.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock = clock
        self.started = clock()
        self.ended = False
        self.reloads = 0
        self.run: Run = Run.load(path)
        self._journal: BinaryIO | None = None
        self._journal_id: tuple[int, int] | None = None
        self._rest = b""  # a partial last line, until the process finishes writing it
        self._counts: Counter[str] = Counter()
        self._done: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._failed: Counter[str] = Counter()
        self._transitions = 0
        self._reset()

    def __repr__(self) -> str:
        return f"<Watcher {self.path} seq={self.run.seq} ended={self.ended}>"

    def close(self) -> None:
        """Close the journal the watcher holds open."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def poll(self) -> Status:
        """Read what was appended since the last poll, and the run as of now."""
        if not self.ended:
            running = self.running()
            if not self._follow() or not running:
                self._reload()
            self.ended = not running
        return self.status()

    def running(self) -> bool:
        """Whether the process whose id the lock file holds is alive (a crashed process leaves
        its journal but is gone; a clean exit removes the journal)."""
        try:
            pid = int(lock_path(self.path).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # someone else's process, alive
        return journal_path(self.path).exists()

    def status(self) -> Status:
        """The run as a Status snapshot (declared states in order, then any others)."""
        run = self.run
        now = time.time()
        delayed: Counter[str] = Counter()
        for job in run.jobs.values():
            if job.not_before is not None and job.not_before > now:
                delayed[job.state] += 1
        terminal = {str(s.get("name")): bool(s.get("terminal")) for s in run.declared}
        names = list(terminal) + sorted(set(self._counts) - set(terminal))
        rows = []
        for name in names:
            jobs = self._counts[name]
            if terminal.get(name):
                rows.append(StateStatus(name, True, jobs))
                continue
            rows.append(
                StateStatus(
                    name,
                    False,
                    jobs,
                    waiting=jobs - delayed[name],
                    delayed=delayed[name],
                    done=self._done[name],
                    errors=self._errors[name],
                    failed=self._failed[name],
                    paused=name in run.paused,
                )
            )
        finished = sum(self._counts[name] for name, t in terminal.items() if t)
        elapsed = self.clock() - self.started
        return Status(tuple(rows), len(run.jobs), finished, elapsed, self._transitions)

    # -- reading --------------------------------------------------------------------------

    def _reset(self) -> None:
        """Count the run as loaded, and open the journal that continues it."""
        self.close()
        self._rest = b""
        self._counts = Counter(job.state for job in self.run.jobs.values())
        try:
            journal = journal_path(self.path).open("rb")
        except OSError:
            return
        self._journal = journal
        stat = os.fstat(journal.fileno())
        self._journal_id = (stat.st_dev, stat.st_ino)
        self._follow()  # (the records the load already applied are skipped by their seq)

    def _reload(self) -> None:
        self.reloads += 1
        self.run = Run.load(self.path)
        self._reset()

    def _follow(self) -> bool:
        """Apply the journal's new whole lines; False if it was replaced, or cannot be read as
        records that follow on from the run (then the caller loads the run again)."""
        journal = self._journal
        if journal is None:
            return False
        # A chunk at a time: the journal a watcher attaches to may be as big as the run.
        while chunk := journal.read(READ_CHUNK):
            lines = (self._rest + chunk).split(b"\n")
            self._rest = lines.pop()  # what follows the last line break: not whole yet
            if not self._take(lines):
                return False
        try:
            stat = os.stat(journal_path(self.path))
        except FileNotFoundError:
            return False
        return (stat.st_dev, stat.st_ino) == self._journal_id

    def _take(self, lines: list[bytes]) -> bool:
        """Apply the records of whole journal lines; False where one does not follow on."""
        for line in lines:
            if not line.strip():
                continue
            if _FRAMED.match(line):  # a line with its CRC-32 in front
                line, crc = line[9:], line[:8]
                if b"%08x" % zlib.crc32(line + b"\n") != crc:  # (of the record's whole line)
                    return False
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                return False
            if not isinstance(record, dict) or type(record.get("seq")) is not int:
                return False
            if "journal" in record or record["seq"] <= self.run.seq:
                continue  # the header, or a record the run already holds
            if record["seq"] != self.run.seq + 1 or not self._apply(record):
                return False
        return True

    def _apply(self, record: dict[str, Any]) -> bool:
        """Apply a record and count what it did; False if it does not fit (load again)."""
        run = self.run
        try:
            ids = _touched(record)
            before = {i: run.jobs[i].state for i in ids if i in run.jobs}
            apply_record(run, record)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, JorbError):
            return False
        counts = self._counts
        for ident in ids:
            old = before.get(ident)
            if old is not None:
                counts[old] -= 1
            job = run.jobs.get(ident)
            if job is not None:
                counts[job.state] += 1
        ok = record.get("ok")
        if ok is not None:  # a batch of plain successes
            for item in ok:
                self._done[before.get(str(item[0]), "")] += 1
            self._transitions += len(ok)
        elif record.get("op") is None:
            self._transitions += 1
            source = record.get("in") or before.get(record["job"], "")
            if "error" in record:
                self._errors[source] += 1
                if record.get("history") is not None:
                    self._failed[source] += 1
            else:
                self._done[source] += 1
        return True


def _touched(record: dict[str, Any]) -> list[str]:
    """Ids of the jobs a record may move or create."""
    op = record.get("op")
    if "ok" in record:  # a batch of plain successes: [id, to, ctx, time, duration] each
        return [str(item[0]) for item in record["ok"]]
    if op is None:
        kids = record.get("kids") or ()
        return [str(record["job"]), *(str(_field(kid, "id")) for kid in kids)]
    if op == "add":
        return [str(_field(job, "id")) for job in record.get("jobs", ())]
    if op == "redrive":
        return [str(ident) for ident in record.get("jobs", ())]
    return []


def _field(value: Any, name: str) -> Any:
    return value.get(name) if isinstance(value, dict) else getattr(value, name, None)
