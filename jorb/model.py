"""The run model: Run, Job and Kick, and their JSON form. No file IO here.

A Run is the whole state of a batch apart from the app context: the run-wide ``overall`` context,
every Job (its state, ctx, history and errors), the id counter, the states declared at the last
exec, paused states and the log of changes applied from the command line. ``checkpoint`` turns it
into bytes on disk and back; the processor is the only thing that moves jobs while it runs.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CorruptRunError, JorbError, RunFileError

__all__ = ["FORMAT", "FORMAT_VERSION", "Child", "Job", "Kick", "Run"]

FORMAT = "jorb-run"
FORMAT_VERSION = 1

Ctx = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Kick:
    """A request, returned by an exec, to create a new job.

    ``return ctx, "done", [jorb.Kick("upload", {"file": f}) for f in files]``
    """

    state: str
    """State the new job starts in."""
    ctx: Ctx
    """The new job's context (JSON-serializable)."""
    delay: float | None = field(default=None, kw_only=True)
    """Seconds, counted from the job's creation, before it may start."""
    priority: int = field(default=0, kw_only=True)
    """Higher starts first within its state; FIFO among equals."""


@dataclass(frozen=True, slots=True)
class Child:
    """What a joining exec sees of each child its job kicked (``State(..., join=True)``)."""

    id: str
    """The child's job id."""
    state: str
    """The terminal state the child ended in (``"done"``, ``"failed"``, ...)."""
    ctx: Ctx
    """The child's final context."""


@dataclass(slots=True, eq=False)
class Job:
    """One unit of work moving through the states. Field order is the order in the run file."""

    id: str
    """Unique within the run, never reused (a counter kept in the run)."""
    state: str
    """The state the job is in; edit it in the run file to redrive."""
    ctx: Ctx
    """The job's own JSON context, as the last exec returned it."""
    parent: str | None = None
    """Id of the job whose exec kicked this one, or None."""
    priority: int = 0
    """Higher starts first within a state."""
    not_before: float | None = None
    """Unix time before which the job may not start (a delay, or a retry's backoff)."""
    attempts: int = 0
    """Failed attempts in the current state since the job entered it."""
    throttled: int = 0
    """Rate-limited attempts in the current state since the job entered it."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Transitions: ``{"from", "to", "time", "duration"}``; time is Unix seconds."""
    errors: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Errors grouped by the state they happened in."""

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.state!r} attempts={self.attempts} parent={self.parent}>"


_JOB_FIELDS = {name: kind for name, kind in Job.__annotations__.items()}


class Run:
    """The serializable group of jobs, with the run-wide context.

    ``run = jorb.Run.open("runs/x.json", overall={...})`` reopens the file if it exists,
    ``run.add_job({"repo": r})`` adds work, ``jorb.Processor(app, states).exec(run)`` drives it.
    """

    __slots__ = (
        "_holder",
        "_stamp",
        "changes",
        "declared",
        "jobs",
        "next_id",
        "overall",
        "path",
        "paused",
        "seq",
    )

    def __init__(self, path: str | Path | None = None, overall: Ctx | None = None) -> None:
        #: Where the run lives on disk (None for an in-memory run).
        self.path: Path | None = Path(path) if path is not None else None
        #: The run-wide context every exec receives.
        self.overall: Ctx = dict(overall or {})
        #: Every job by id, in creation order.
        self.jobs: dict[str, Job] = {}
        #: The next job id to hand out; ids are never reused.
        self.next_id = 1
        #: States declared at the last exec: ``[{"name": ..., "terminal": ...}]``.
        self.declared: list[dict[str, Any]] = []
        #: States in which new exec starts are paused.
        self.paused: set[str] = set()
        #: Changes applied from the command line: what, when, and the request id.
        self.changes: list[dict[str, Any]] = []
        #: Sequence number of the last journal record folded into this snapshot.
        self.seq = 0
        self._holder: Any = None  # the checkpoint.Store holding the run's lock, if any
        self._stamp: tuple[int, int, int] | None = None  # the file as last read or written

    # -- opening and saving (the file work lives in checkpoint) -------------------------

    @classmethod
    def open(cls, path: str | Path, overall: Ctx | None = None) -> Run:
        """Reopen the run at ``path`` (taking its lock), or create it with ``overall``.

        A reopened run keeps the ``overall`` stored in its file.
        """
        from .checkpoint import open_run

        run = open_run(Path(path), overall)
        run.remember_file()
        return run

    @classmethod
    def load(cls, path: str | Path) -> Run:
        """Read an existing run file (and replay its journal) without taking its lock."""
        from .checkpoint import read_run

        run = read_run(Path(path))
        run.remember_file()
        return run

    def save(self) -> None:
        """Write the whole run to its file atomically (taking the run's lock if not held)."""
        from .checkpoint import save_run

        if self._holder is None:
            self.check_file()
        save_run(self)
        self.remember_file()

    def remember_file(self) -> None:
        """Note the file as this process last read or wrote it (see :meth:`check_file`)."""
        self._stamp = _file_stamp(self.path)

    def check_file(self) -> None:
        """Refuse to overwrite a run file changed since this process last read or wrote it.

        Between two execs (or after one) the lock is free, so a command may have edited the
        file; writing this in-memory run over it would silently undo that.
        """
        if self.path is not None and _file_stamp(self.path) != self._stamp:
            raise RunFileError(
                f"{self.path} changed since this process last read or wrote it (a `jorb` "
                f"command or an edit); writing this run over it would undo that. Reopen it "
                f"with jorb.Run.open({str(self.path)!r}) to work on the current file"
            )

    def close(self) -> None:
        """Release the run's lock. The run stays usable in memory."""
        if self._holder is not None:
            self._holder.close()
            self._holder = None

    # -- jobs ------------------------------------------------------------------------------

    def add_job(
        self,
        ctx: Ctx,
        state: str = "new",
        *,
        delay: float | None = None,
        priority: int = 0,
        not_before: float | None = None,
    ) -> Job:
        """Add a job in ``state``; it reaches disk at the next checkpoint or ``save()``.

        ``delay`` (seconds from now) or ``not_before`` (Unix time) hold it back without
        taking a slot; higher ``priority`` starts first within its state.
        """
        if self._holder is not None and self._holder.executing:
            raise JorbError(
                "add_job while the run is executing would bypass the checkpoint: "
                "return jorb.Kick(...) from an exec, or use `jorb add` from a shell"
            )
        return self.new_job(state, ctx, None, _not_before(delay, not_before), priority)

    def new_job(
        self, state: str, ctx: Ctx, parent: str | None, not_before: float | None, priority: int
    ) -> Job:
        """Create and register a job with the next id (used for adds and kicks)."""
        if not isinstance(ctx, dict):
            raise JorbError(f"a job's ctx must be a dict, not {type(ctx).__name__}")
        if not isinstance(state, str) or not state:
            raise JorbError(f"a job's state must be a non-empty string, not {state!r}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise JorbError(f"priority must be an int, not {priority!r}")
        job = Job(str(self.next_id), state, ctx, parent, priority, not_before)
        self.next_id += 1
        self.jobs[job.id] = job
        return job

    def counts(self) -> dict[str, int]:
        """Number of jobs in each state, states in order of first appearance."""
        return dict(Counter(job.state for job in self.jobs.values()))

    def children(self, job_id: str) -> list[Job]:
        """Jobs whose parent is ``job_id`` (a scan: for reports, not hot paths)."""
        return [job for job in self.jobs.values() if job.parent == job_id]

    def __repr__(self) -> str:
        return f"<Run {self.path} jobs={len(self.jobs)} next_id={self.next_id}>"

    # -- JSON form -------------------------------------------------------------------------

    def to_document(self) -> dict[str, Any]:
        """The run as the JSON document of its file (jobs serialize natively via orjson)."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "seq": self.seq,
            "next_id": self.next_id,
            "overall": self.overall,
            "states": self.declared,
            "paused": sorted(self.paused),
            "changes": self.changes,
            "jobs": list(self.jobs.values()),
        }

    @classmethod
    def from_document(cls, doc: Any, path: Path | None) -> Run:
        """Build a Run from a parsed run file, checking its shape; errors name what and where."""
        where = str(path) if path is not None else "run document"
        if not isinstance(doc, dict):
            raise CorruptRunError(f"{where}: expected a JSON object at the top, got {_kind(doc)}")
        if doc.get("format") != FORMAT:
            raise CorruptRunError(f'{where}: not a jorb run file (no "format": "{FORMAT}")')
        version = doc.get("version")
        if version != FORMAT_VERSION:
            raise CorruptRunError(
                f"{where}: run file version {version!r}; this jorb reads version {FORMAT_VERSION}"
            )
        run = cls(path, _check(doc, "overall", dict, where, {}))
        run.seq = _check(doc, "seq", int, where, 0)
        run.declared = _check(doc, "states", list, where, [])
        paused = _check(doc, "paused", list, where, [])
        if not all(isinstance(name, str) for name in paused):
            raise CorruptRunError(f'{where}: "paused" must list state names (strings)')
        run.paused = set(paused)
        run.changes = _check(doc, "changes", list, where, [])
        if "jobs" not in doc:
            raise CorruptRunError(f'{where}: no "jobs" list (a run file lists its jobs)')
        jobs = _check(doc, "jobs", list, where, [])
        highest = 0
        for index, raw in enumerate(jobs):
            job = job_from_dict(raw, f"{where}: jobs[{index}]")
            if job.id in run.jobs:
                raise CorruptRunError(f"{where}: job id {job.id!r} appears twice")
            run.jobs[job.id] = job
            if job.id.isdigit():
                highest = max(highest, int(job.id))
        run.next_id = max(_check(doc, "next_id", int, where, 1), highest + 1)
        return run


def job_from_dict(raw: Any, where: str) -> Job:
    """Check one job object from a run file or journal and build the Job.

    A million jobs must load in seconds: the usual shape is recognised by one cheap test, and
    only anything else goes through the checks that name what is wrong. The fast test accepts
    nothing those checks refuse (the corrupt-file tests hold both to that).
    """
    if type(raw) is dict and raw.keys() <= _JOB_FIELDS.keys():
        get: Callable[..., Any] = raw.get
        job = Job(
            get("id"),
            get("state"),
            get("ctx"),
            get("parent"),
            get("priority", 0),
            get("not_before"),
            get("attempts", 0),
            get("throttled", 0),
            get("history", []),
            get("errors", {}),
        )
        if _usual(job):
            return job
    return _checked_job(raw, where)


def _usual(job: Job) -> bool:
    """Whether a job just read has the usual, valid shape (one expression, no messages)."""
    not_before = job.not_before
    return (
        type(job.id) is str
        and job.id != ""
        and type(job.state) is str
        and job.state != ""
        and type(job.ctx) is dict
        and (job.parent is None or type(job.parent) is str)
        and type(job.priority) is int
        and (not_before is None or type(not_before) is float or type(not_before) is int)
        and type(job.attempts) is int
        and type(job.throttled) is int
        and type(job.history) is list
        and all(type(step) is dict and "from" in step and "to" in step for step in job.history)
        and type(job.errors) is dict
        and all(
            type(records) is list and all(type(r) is dict for r in records)
            for records in job.errors.values()
        )
    )


def _checked_job(raw: Any, where: str) -> Job:
    if not isinstance(raw, dict):
        raise CorruptRunError(f"{where}: expected a job object, got {_kind(raw)}")
    ident = raw.get("id")
    if isinstance(ident, int) and not isinstance(ident, bool):
        ident = str(ident)
    if not isinstance(ident, str) or not ident:
        raise CorruptRunError(f'{where}: job has no string "id"')
    where = f"{where} (job {ident})"
    for key in ("state", "ctx"):
        if key not in raw:
            raise CorruptRunError(f'{where}: job has no "{key}"')
    unknown = set(raw) - _JOB_FIELDS.keys()
    if unknown:
        raise CorruptRunError(f"{where}: unknown job keys {sorted(unknown)}")
    job = Job(
        ident,
        _check(raw, "state", str, where),
        _check(raw, "ctx", dict, where),
        _check(raw, "parent", (str, type(None)), where, None),
        _check(raw, "priority", int, where, 0),
        _check(raw, "not_before", (int, float, type(None)), where, None),
        _check(raw, "attempts", int, where, 0),
        _check(raw, "throttled", int, where, 0),
        _check(raw, "history", list, where, []),
        _check(raw, "errors", dict, where, {}),
    )
    if not job.state:
        raise CorruptRunError(f'{where}: "state" is empty')
    for index, step in enumerate(job.history):
        if not isinstance(step, dict) or not {"from", "to"} <= step.keys():
            raise CorruptRunError(f'{where}: "history" entry {index} is not a {{from, to}} object')
    for state, records in job.errors.items():
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise CorruptRunError(f'{where}: "errors" of {state!r} is not a list of objects')
    return job


def _file_stamp(path: Path | None) -> tuple[int, int, int] | None:
    """Identity of a file's current content: inode, size, mtime (None if it does not exist)."""
    if path is None:
        return None
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _not_before(delay: float | None, not_before: float | None) -> float | None:
    if delay is not None and not_before is not None:
        raise JorbError("give delay or not_before, not both")
    if delay is not None:
        if delay < 0:
            raise JorbError(f"delay must be >= 0 seconds, not {delay!r}")
        return time.time() + delay
    return not_before


def _kind(value: Any) -> str:
    return type(value).__name__ if value is not None else "null"


def _check(raw: Mapping[str, Any], key: str, kind: Any, where: str, default: Any = None) -> Any:
    value = raw.get(key, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CorruptRunError(f'{where}: "{key}" has the wrong type ({_kind(value)})')
    return value




# -- journal records: the one way a run changes while a processor drives it -----------------
#
# The processor builds a record for every settled exec (and every change applied from the
# command line), applies it to the in-memory run with ``apply_record`` and appends it to the
# journal; loading replays the same records with the same function, so what is on disk after
# a crash is exactly what the process had made durable.


def apply_record(run: Run, record: dict[str, Any]) -> None:
    """Apply one journal record to ``run`` (live or on replay)."""
    run.seq = record["seq"]
    op = record.get("op")
    if op is None:
        _apply_attempt(run, record)
        return
    if op == "add":
        for raw in record["jobs"]:
            job = raw if isinstance(raw, Job) else job_from_dict(raw, "journal")
            run.jobs[job.id] = job
        run.next_id = max(run.next_id, record["next_id"])
    elif op == "pause":
        run.paused.add(record["name"])
    elif op == "resume":
        run.paused.discard(record["name"])
    elif op == "redrive":
        for ident in record["jobs"]:
            job = run.jobs[ident]
            job.history.append(
                {
                    "from": job.state,
                    "to": record["to"],
                    "time": record["time"],
                    "duration": 0.0,
                    "redrive": record["change"]["id"],
                }
            )
            job.state = record["to"]
            job.attempts = job.throttled = 0
            job.not_before = None
    else:
        raise CorruptRunError(f"journal record {record['seq']}: unknown op {op!r}")
    run.changes.append(record["change"])


def _apply_attempt(run: Run, record: dict[str, Any]) -> None:
    job = run.jobs[record["job"]]
    error = record.get("error")
    if error is not None:
        job.errors.setdefault(record["in"], []).append(error)
    if "ctx" in record:
        job.ctx = record["ctx"]
    step = record.get("history")
    if step is not None:
        job.history.append(step)
    job.state = record["to"]
    # A success's record leaves these out: it resets them.
    job.attempts = record.get("attempts", 0)
    job.throttled = record.get("throttled", 0)
    job.not_before = record.get("not_before")
    kids = record.get("kids")
    if kids:
        for raw in kids:
            kid = raw if isinstance(raw, Job) else job_from_dict(raw, "journal")
            run.jobs[kid.id] = kid
        run.next_id = max(run.next_id, record["next_id"])
