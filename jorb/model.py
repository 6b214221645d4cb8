"""The run model: Run, Job, Step and Kick, and their JSON form. No file IO here.

A Run is the whole state of a batch apart from the app context: the run-wide ``overall`` context,
every Job (its state, ctx, history and errors), the id counter, the states declared at the last
exec, paused states and the log of changes applied from the command line. ``checkpoint`` turns it
into bytes on disk and back; the processor is the only thing that moves jobs while it runs.

This module imports nothing that does I/O: ``Run.open``, ``Run.load``, ``Run.save`` and the
file-change check go through ``RunFiles``, which ``checkpoint`` plugs in when it is imported
(``import jorb`` imports it). ``checkpoint`` imports this module, never the reverse.
"""

from __future__ import annotations

import gc
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import compress, islice, repeat
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, SupportsIndex, cast, overload

from .errors import CorruptRunError, JorbError, RunFileError, public

__all__ = ["FORMAT", "FORMAT_VERSION", "Child", "Job", "Kick", "Next", "Run", "Step"]

FORMAT = "jorb-run"
FORMAT_VERSION = 1
#: Latest Unix time a run accepts (the end of year 9999): ``not_before`` past it is no time a
#: job could wait for, only damage (``1e308`` would hold a job forever without a word).
MAX_TIME = 253402300799.0
_NUMBERS = (int, float)

Ctx = dict[str, Any]


class RunFiles(Protocol):
    """The file work behind ``Run.open``, ``Run.load`` and ``Run.save`` (see ``checkpoint``)."""

    def open_run(self, path: Path, overall: Ctx | None) -> Run: ...

    def read_run(self, path: Path) -> Run: ...

    def save_run(self, run: Run) -> None: ...

    def file_stamp(self, path: Path | None) -> tuple[int, int, int] | None: ...


_files: list[RunFiles] = []  # the one plugged in by checkpoint


def plug_files(files: RunFiles) -> None:
    """Give the run model its file work (``checkpoint`` does, once, when imported)."""
    _files[:] = [files]


def _io() -> RunFiles:
    if not _files:  # cannot happen through `import jorb`, which imports checkpoint
        raise RunFileError("jorb.checkpoint is not imported: import jorb first")
    return _files[0]


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
    key: str | None = field(default=None, kw_only=True)
    """At most one job per key in a run: a kick whose key a job already has adds nothing."""


@dataclass(frozen=True, slots=True)
class Next:
    """Returned by an exec in place of the next state's name: go to ``state``, not before
    ``delay`` seconds.

    ``return ctx, jorb.Next("wait_ci", delay=30)``: the job waits as a delayed job (it holds no
    slot, and its not-before time is in the run file, so it survives a restart). A ``Next``
    back to the job's own state (a poll) is counted in ``job.polls`` instead of adding an entry
    to its history, so a job polling all day keeps a history of a few entries.
    """

    state: str
    """The state the job goes to."""
    delay: float | None = field(default=None, kw_only=True)
    """Seconds, from now, before the job may start there."""
    priority: int | None = field(default=None, kw_only=True)
    """The job's priority from now on (None: unchanged)."""


@dataclass(frozen=True, slots=True)
class Child:
    """What a joining exec sees of each child its job kicked (``State(..., join=True)``)."""

    id: str
    """The child's job id."""
    state: str
    """The terminal state the child ended in (``"done"``, ``"failed"``, ...)."""
    ctx: Ctx
    """The child's final context."""


class Step(NamedTuple):
    """One entry of a job's history, read by name: ``job.steps()``, or ``jorb.Step(*entry)``.

    ``job.history`` keeps each entry as a plain tuple, ``(from, to, time, duration)``, with the
    change's id fifth when ``jorb redrive`` made the move: CPython's cyclic GC stops tracking
    a plain tuple of strings and numbers (never a tuple subclass such as this one), and a run
    keeps millions of them. A Step reads like the JSON object the entry is in the run file,
    ``{"from", "to", "time", "duration"}`` (plus ``"redrive"``): ``step["from"]``,
    ``step.get("redrive")``, ``dict(step)``, and it compares equal to that object and to the
    plain tuple it reads (:meth:`entry`).
    """

    source: str
    """The state the job left (``"from"``)."""
    target: str
    """The state it entered (``"to"``)."""
    time: float
    """Unix time of the move."""
    duration: float
    """Seconds the exec took (0 for a redrive)."""
    redrive: str | None = None
    """Id of the change that made the move, when ``jorb redrive`` did."""

    @overload
    def __getitem__(self, key: str) -> Any: ...
    @overload
    def __getitem__(self, key: SupportsIndex) -> Any: ...
    @overload
    def __getitem__(self, key: slice) -> tuple[Any, ...]: ...
    def __getitem__(self, key: str | SupportsIndex | slice) -> Any:
        if not isinstance(key, str):
            return tuple.__getitem__(self, key)
        index = _STEP_KEYS.get(key)
        if index is None or (index == 4 and self.redrive is None):
            raise KeyError(key)
        return tuple.__getitem__(self, index)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` as in the JSON object, or ``default``."""
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self) -> list[str]:
        """The JSON object's keys (so ``dict(step)`` and ``{**step}`` work)."""
        return _KEYS if self.redrive is None else _REDRIVE_KEYS

    def items(self) -> list[tuple[str, Any]]:
        """The JSON object's (key, value) pairs."""
        return list(self.as_dict().items())

    def values(self) -> list[Any]:
        """The JSON object's values."""
        return list(self.as_dict().values())

    def __contains__(self, key: object) -> bool:
        return key in _STEP_KEYS and (key != "redrive" or self.redrive is not None)

    def as_dict(self) -> dict[str, Any]:
        """The JSON object the step is written as."""
        entry = {
            "from": self.source,
            "to": self.target,
            "time": self.time,
            "duration": self.duration,
        }
        if self.redrive is not None:
            entry["redrive"] = self.redrive
        return entry

    def entry(self) -> tuple[Any, ...]:
        """The plain tuple ``job.history`` keeps for this step (four values, or five with a
        redrive's change id)."""
        return tuple(self) if self.redrive is not None else tuple(self)[:4]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, dict):
            return self.as_dict() == other
        if isinstance(other, Step):
            other = other.entry()
        return self.entry() == other

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self.entry())


_STEP_KEYS = {"from": 0, "to": 1, "time": 2, "duration": 3, "redrive": 4}
_KEYS = ["from", "to", "time", "duration"]
_REDRIVE_KEYS = [*_KEYS, "redrive"]

_NEW_LIST: Any = object()  # Job(history=...) not given: a new list


#: A history entry: ``(from, to, time, duration[, redrive])``, or an object of another shape
#: that a user wrote into the file.
Entry = tuple[Any, ...] | dict[str, Any]


class _Stamped:
    """Job's base: one slot that is not a field (not in the file, ``asdict``, ``__init__``).

    ``_epoch``: the run's ``_epoch`` when a record last changed the job (unset: never). A
    snapshot copies a job's bytes from the one before it only if that one was written after.
    """

    __slots__ = ("_epoch",)
    _epoch: int  # (declared for type checkers; not a dataclass field: this base is no dataclass)


#: ``_set_epoch(job, epoch)`` sets ``job._epoch`` (for ``map``: a plain store is faster inline).
_set_epoch: Callable[[Job, int], None] = _Stamped.__dict__["_epoch"].__set__


def stamp_all(jobs: Iterable[Job]) -> None:
    """Stamp every job as written by the snapshot about to be written whole (epoch 0, older
    than any), so that while an exec runs every job has an ``_epoch`` to compare."""
    deque(map(_set_epoch, jobs, repeat(0)), maxlen=0)


@dataclass(init=False, repr=False, eq=False)
class Job(_Stamped):
    """One unit of work moving through the states. Field order is the order in the run file.

    A dataclass whose ``__slots__`` and ``__init__`` are written out, to keep a job small (a
    run holds millions): ``errors`` and ``polls``, which few jobs ever have, are properties over
    one slot, ``_rare``, which holds None or ``(errors or None, polls)``. So a job holds no
    empty dict (64 B), and a slot less (an object of 12 slots takes 128 B, of 13, 144).
    """

    __slots__ = (
        "_rare",
        "attempts",
        "ctx",
        "history",
        "id",
        "key",
        "not_before",
        "parent",
        "priority",
        "state",
        "throttled",
    )

    id: str
    """Unique within the run, never reused (a counter kept in the run)."""
    state: str
    """The state the job is in; edit it in the run file to redrive."""
    ctx: Ctx
    """The job's own JSON context, as the last exec returned it."""
    parent: str | None
    """Id of the job whose exec kicked this one, or None."""
    priority: int
    """Higher starts first within a state."""
    not_before: float | None
    """Unix time before which the job may not start (a delay, or a retry's backoff)."""
    attempts: int
    """Failed attempts in the current state since the job entered it."""
    throttled: int
    """Rate-limited attempts in the current state since the job entered it."""
    history: list[Entry]
    """Transitions, oldest first: each a plain tuple ``(from, to, time, duration)`` (a redrive's
    adds the change's id), or the object as written if one was edited into the file in another
    shape. :meth:`steps` gives them as :class:`Step`, read by name."""
    if not TYPE_CHECKING:  # (a field here; to a type checker, the property below)
        errors: dict[str, list[dict[str, Any]]]
        """Errors grouped by the state they happened in (made when first read)."""
    key: str | None
    """The job's unique key, if it was added with one: at most one job per key in a run."""
    if not TYPE_CHECKING:  # (the same)
        polls: int
        """How many times an exec sent the job back to its own state with :class:`Next`
        (counted here, not in ``history``)."""

    def __init__(
        self,
        id: str,
        state: str,
        ctx: Ctx,
        parent: str | None = None,
        priority: int = 0,
        not_before: float | None = None,
        attempts: int = 0,
        throttled: int = 0,
        history: list[Entry] = _NEW_LIST,
        errors: dict[str, list[dict[str, Any]]] | None = None,
        key: str | None = None,
        polls: int = 0,
    ) -> None:
        self.id = id
        self.state = state
        self.ctx = ctx
        self.parent = parent
        self.priority = priority
        self.not_before = not_before
        self.attempts = attempts
        self.throttled = throttled
        self.history = [] if history is _NEW_LIST else history
        self.key = key
        self._rare: tuple[Any, Any] | None = (
            None if errors is None and polls == 0 and type(polls) is int else (errors, polls)
        )

    @property
    def errors(self) -> dict[str, list[dict[str, Any]]]:
        """Errors grouped by the state they happened in: the same dict each time, made when
        first read, which the reader may write into."""
        errors, polls = self._rare or _NO_RARE
        if errors is None:
            errors = {}
            self._rare = (errors, polls)
        return errors

    @errors.setter
    def errors(self, errors: dict[str, list[dict[str, Any]]]) -> None:
        self._rare = (errors, (self._rare or _NO_RARE)[1])

    @property
    def polls(self) -> int:
        """How many times an exec sent the job back to its own state with :class:`Next`
        (counted here, not in ``history``)."""
        return (self._rare or _NO_RARE)[1]

    @polls.setter
    def polls(self, polls: int) -> None:
        self._rare = ((self._rare or _NO_RARE)[0], polls)

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.state!r} attempts={self.attempts} parent={self.parent}>"

    def steps(self) -> list[Step | dict[str, Any]]:
        """The history, each entry a :class:`Step` (``step["from"]``, ``step.target``, ...);
        an entry edited into the file in another shape stays the object it is."""
        return [entry if isinstance(entry, Mapping) else Step(*entry) for entry in self.history]


_NO_ERRORS: Mapping[str, list[dict[str, Any]]] = MappingProxyType({})


_NO_RARE = (None, 0)  # a Job's _rare when it is None: no errors, no polls


def job_errors(job: Job) -> Mapping[str, list[dict[str, Any]]]:
    """``job.errors`` for reading, without making an empty dict for a job that has none (for
    scans of a whole run: a report, the run file)."""
    rare = job._rare
    return (rare[0] if rare is not None else None) or _NO_ERRORS


_JOB_FIELDS = frozenset(Job.__annotations__)
_REDRIVE_FIELDS = frozenset(_REDRIVE_KEYS)


class Run:
    """The serializable group of jobs, with the run-wide context.

    ``run = jorb.Run.open("runs/x.json", overall={...})`` reopens the file if it exists,
    ``run.add_job({"repo": r})`` adds work, ``jorb.Processor(app, states).exec(run)`` drives it.
    """

    __slots__ = (
        "_epoch",
        "_holder",
        "_keys",
        "_stamp",
        "changes",
        "declared",
        "jobs",
        "kicks",
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
        #: Jobs created by kicks, by (state whose exec kicked, state the new job started in).
        self.kicks: dict[tuple[str, str], int] = {}
        #: Sequence number of the last journal record folded into this snapshot.
        self.seq = 0
        self._holder: Any = None  # the checkpoint.Store holding the run's lock, if any
        self._stamp: tuple[int, int, int] | None = None  # the file as last read or written
        self._keys: dict[str, str] | None = None  # job ids by key, built when first needed
        # Counts the snapshots a store wrote of this run; ``apply_record`` stamps every job it
        # changes with it (``Job._epoch``).
        self._epoch = 0

    # -- opening and saving (the file work lives in checkpoint) -------------------------

    @classmethod
    @public
    def open(cls, path: str | Path, overall: Ctx | None = None) -> Run:
        """Reopen the run at ``path`` (taking its lock), or create it with ``overall``.

        A reopened run keeps the ``overall`` stored in its file.
        """
        run = _io().open_run(Path(path), overall)
        run.remember_file()
        return run

    @classmethod
    @public
    def load(cls, path: str | Path) -> Run:
        """Read an existing run file (and replay its journal) without taking its lock."""
        run = _io().read_run(Path(path))
        run.remember_file()
        return run

    @public
    def save(self) -> None:
        """Write the whole run to its file atomically (taking the run's lock if not held)."""
        if self._holder is None:
            self.check_file()
        _io().save_run(self)
        self.remember_file()

    def remember_file(self) -> None:
        """Note the file as this process last read or wrote it (see :meth:`check_file`)."""
        self._stamp = _io().file_stamp(self.path)

    def check_file(self) -> None:
        """Refuse to overwrite a run file changed since this process last read or wrote it.

        Between two execs (or after one) the lock is free, so a command may have edited the
        file; writing this in-memory run over it would silently undo that.
        """
        if self.path is not None and _io().file_stamp(self.path) != self._stamp:
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

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        """``with jorb.Run.open(path) as run:`` releases the lock at the end of the block."""
        self.close()

    # -- jobs ------------------------------------------------------------------------------

    @public
    def add_job(
        self,
        ctx: Ctx,
        state: str = "new",
        *,
        delay: float | None = None,
        priority: int = 0,
        not_before: float | None = None,
        key: str | None = None,
    ) -> Job:
        """Add a job in ``state``; it reaches disk at the next checkpoint or ``save()``.

        ``delay`` (seconds from now) or ``not_before`` (Unix time) hold it back without
        taking a slot; higher ``priority`` starts first within its state. With a ``key`` that a
        job of the run already has, nothing is added and that job is returned: an enqueue
        script that adds with keys can be rerun.
        """
        self._refuse_while_executing()
        if key is not None:
            check_key(key)
            existing = self.keyed().get(key)
            if existing is not None:
                return self.jobs[existing]
        return self.new_job(state, ctx, None, _not_before(delay, not_before), priority, key)

    def _refuse_while_executing(self) -> None:
        if self._holder is not None and self._holder.executing:
            raise JorbError(
                "add_job while the run is executing would bypass the checkpoint: "
                "return jorb.Kick(...) from an exec, call processor.add_jobs(...), or use "
                "`jorb add` from a shell"
            )

    def add_jobs(
        self,
        ctxs: Iterable[Ctx],
        state: str = "new",
        *,
        delay: float | None = None,
        priority: int = 0,
        not_before: float | None = None,
        key: Callable[[Ctx], str] | None = None,
    ) -> list[Job]:
        """Add a job per ctx, all in ``state``, in one call: ``add_job`` for many at once.

        The same rules and options as :meth:`add_job` (given once for all), about ten times
        faster per job: a million jobs take about a second. Nothing is added if any ctx is
        not a dict. They reach disk at the next checkpoint or ``save()``. ``key(ctx)`` gives
        each job's key: for a key the run already has (or an earlier ctx of the call), no job
        is added and the list holds the job that has it.
        """
        self._refuse_while_executing()
        ctxs = list(ctxs)
        for i, ctx in enumerate(ctxs):
            if type(ctx) is not dict and not isinstance(ctx, dict):
                raise JorbError(f"add_jobs: ctx {i} must be a dict, not {type(ctx).__name__}")
        state = _new_state(state, priority)
        if key is not None:
            return self._add_keyed(ctxs, state, key, delay, priority, not_before)
        when = _not_before(delay, not_before)
        start = self.next_id
        ids = list(map(str, range(start, start + len(ctxs))))
        # A million jobs are three million new containers: the collector, walking them again
        # and again as they come, would take as long as making them (they make no cycles).
        collecting = gc.isenabled()
        gc.disable()
        try:
            jobs = list(map(Job, ids, repeat(state), ctxs, repeat(None), repeat(priority)))
            if when is not None:
                for job in jobs:
                    job.not_before = when
            self.jobs.update(zip(ids, jobs, strict=True))
        finally:
            if collecting:
                gc.enable()
        if collecting and len(jobs) >= 10_000 and not gc.get_freeze_count():
            # Hand them to the oldest generation unwalked (as loading a run does), instead
            # of the next young collection walking all of them once for nothing.
            gc.freeze()
            gc.unfreeze()
        self.next_id = start + len(ctxs)
        return jobs

    def _add_keyed(
        self,
        ctxs: list[Ctx],
        state: str,
        key: Callable[[Ctx], str],
        delay: float | None,
        priority: int,
        not_before: float | None,
    ) -> list[Job]:
        """``add_jobs`` with keys: the new ones added in one call, the others looked up."""
        keys = [check_key(key(ctx)) for ctx in ctxs]
        index, fresh = self.keyed(), dict[str, Ctx]()
        for k, ctx in zip(keys, ctxs, strict=True):
            if k not in index:
                fresh.setdefault(k, ctx)
        made = self.add_jobs(
            list(fresh.values()), state, delay=delay, priority=priority, not_before=not_before
        )
        for k, job in zip(fresh, made, strict=True):
            job.key = k
            index[k] = job.id
        return [self.jobs[index[k]] for k in keys]

    def new_job(
        self,
        state: str,
        ctx: Ctx,
        parent: str | None,
        not_before: float | None,
        priority: int,
        key: str | None = None,
    ) -> Job:
        """Create and register a job with the next id (used for adds and kicks)."""
        if not isinstance(ctx, dict):
            raise JorbError(f"a job's ctx must be a dict, not {type(ctx).__name__}")
        state = _new_state(state, priority)
        job = Job(str(self.next_id), state, ctx, parent, priority, not_before, key=key)
        self.next_id += 1
        self.jobs[job.id] = job
        if key is not None:
            self.keyed()[key] = job.id
        return job

    def keyed(self) -> dict[str, str]:
        """Job ids by key, for the jobs that have one (built on first use, then kept up to date
        by every add and kick; a key a hand edit gave two jobs names the first)."""
        keys = self._keys
        if keys is None:
            keys = self._keys = {}
            for job in self.jobs.values():
                if job.key is not None:
                    keys.setdefault(job.key, job.id)
        return keys

    def note_key(self, job: Job) -> None:
        """Index a job just registered with a key (no-op until the index is first built)."""
        if self._keys is not None and job.key is not None:
            self._keys.setdefault(job.key, job.id)

    def counts(self) -> dict[str, int]:
        """Number of jobs in each state, states in order of first appearance."""
        return dict(Counter(job.state for job in self.jobs.values()))

    def children(self, job_id: str) -> list[Job]:
        """Jobs whose parent is ``job_id`` (a scan: for reports, not hot paths)."""
        return [job for job in self.jobs.values() if job.parent == job_id]

    def __repr__(self) -> str:
        return f"<Run {self.path} jobs={len(self.jobs)} next_id={self.next_id}>"

    # -- JSON form -------------------------------------------------------------------------

    def to_document(self, *, jobs: bool = True) -> dict[str, Any]:
        """The run as the JSON document of its file (encode it with ``default=json_default``);
        with ``jobs=False``, its ``"jobs"`` list left empty."""
        doc = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "seq": self.seq,
            "next_id": self.next_id,
            "overall": self.overall,
            "states": self.declared,
            "paused": sorted(self.paused),
            "changes": self.changes,
        }
        if self.kicks:  # (a run without kicks keeps the file's shape as it was)
            doc["kicks"] = [{"by": a, "into": b, "jobs": n} for (a, b), n in self.kicks.items()]
        doc["jobs"] = job_documents(list(self.jobs.values()), []) if jobs else []
        return doc

    @classmethod
    def from_document(cls, doc: Any, path: Path | None) -> Run:
        """Build a Run from a parsed run file, checking its shape; errors name what and where."""
        run = cls.from_head(doc, path)
        where = _where(path)
        if "jobs" not in doc:
            raise CorruptRunError(f'{where}: no "jobs" list (a run file lists its jobs)')
        run.read_jobs(_check(doc, "jobs", list, where, []))
        return run

    @classmethod
    def from_head(cls, doc: Any, path: Path | None) -> Run:
        """A Run from a parsed run file's keys other than ``"jobs"``, checked; no jobs yet."""
        where = _where(path)
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
        for index, declared in enumerate(run.declared):
            if type(declared) is not dict or not _name(declared.get("name")):
                raise CorruptRunError(
                    f'{where}: "states" entry {index} is not a {{"name": ..., "terminal": ...}} '
                    f"object with a state name"
                )
            if type(declared.get("terminal", False)) is not bool:
                raise CorruptRunError(
                    f'{where}: "states" entry {index}: "terminal" must be true or false'
                )
        paused = _check(doc, "paused", list, where, [])
        if not all(isinstance(name, str) for name in paused):
            raise CorruptRunError(f'{where}: "paused" must list state names (strings)')
        run.paused = set(paused)
        run.changes = _check(doc, "changes", list, where, [])
        for index, change in enumerate(run.changes):
            problem = change_problem(change)
            if problem is not None:
                raise CorruptRunError(f'{where}: "changes" entry {index}: {problem}')
        run.next_id = _check(doc, "next_id", int, where, 1)
        for kick in _check(doc, "kicks", list, where, []):
            if not isinstance(kick, dict) or not isinstance(kick.get("jobs"), int):
                raise CorruptRunError(f'{where}: "kicks" must list {{"by", "into", "jobs"}}')
            run.kicks[(str(kick.get("by")), str(kick.get("into")))] = kick["jobs"]
        return run

    def read_jobs(self, raws: list[Any], start: int = 0) -> None:
        """Check job objects read from the run file and add them (``start``: the index of the
        first in the file's list); ``next_id`` moves past every numeric id.

        A list of usual jobs is checked and built by :func:`usual_jobs`, then added by
        :meth:`add_read`. A list with anything else in it is read a job at a time, so that the
        first problem in it is the one reported.
        """
        jobs = usual_jobs(raws)
        if jobs is None:
            self._read_one_by_one(raws, start)
        else:
            self.add_read([job.id for job in jobs], jobs)

    def add_read(self, ids: list[str], jobs: list[Job]) -> None:
        """Add jobs read from the run file (and checked), with their ids, in their order;
        ``next_id`` moves past every numeric id. A CorruptRunError if an id is taken.

        A million jobs pass through here on a reopen, so the work is kept in C where it can be:
        added by one ``dict.update``, and only ids long enough to be a number at or past
        ``next_id`` looked at one by one.
        """
        known = self.jobs
        size = len(known)
        known.update(zip(ids, jobs, strict=True))
        if len(known) != size + len(ids):
            earlier, seen = set(islice(known, size)), set()
            for ident in ids:
                if ident in earlier or ident in seen:
                    raise CorruptRunError(f"{_where(self.path)}: job id {ident!r} appears twice")
                seen.add(ident)
        # Only ids at least as long as next_id are looked at (picked in C): a shorter one is a
        # smaller number. (Below 1, next_id is hand-written, and its sign makes it longer than
        # ids that are past it: then all are.)
        shortest = len(str(self.next_id)) if self.next_id >= 1 else 0
        for ident in compress(ids, map(shortest.__le__, map(len, ids))):
            self._count_past(ident)

    def _read_one_by_one(self, raws: list[Any], start: int) -> None:
        where = _where(self.path)
        for index, raw in enumerate(raws, start):
            job = _usual_job(raw) or _checked_job(raw, f"{where}: jobs[{index}]")
            if self.jobs.setdefault(job.id, job) is not job:
                raise CorruptRunError(f"{where}: job id {job.id!r} appears twice")
            self._count_past(job.id)

    def _count_past(self, ident: str) -> None:
        """Move ``next_id`` past ``ident`` if it is a number. (Not past "²", a digit int()
        refuses, nor a number of thousands of digits, past int()'s limit of 4300.)"""
        if ident.isascii() and ident.isdigit() and len(ident) < 4000:
            number = int(ident)
            if number >= self.next_id:
                self.next_id = number + 1


def job_document(job: Job) -> dict[str, Any]:
    """A job's object in the run file: its id, state and ctx, and every other field that is
    not at its default (a million jobs' ``"parent": null`` lines are a fifth of a file)."""
    return job_documents([job], [])[0]


def job_documents(jobs: list[Job], entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects of ``jobs`` in the run file (see :func:`job_document`), made to be encoded
    at once and dropped.

    ``entries`` is a pool of history objects, filled in place and grown as needed. A snapshot
    passes the same pool for each chunk of jobs it encodes: building (and freeing) a fresh
    dict for each of a run's millions of history entries was half the cost of encoding it,
    and filling one in costs far less. So the documents share the pool's dicts: they hold what
    they say only until the pool is passed again.
    """
    docs = []
    used, pooled = 0, len(entries)
    for job in jobs:
        doc: dict[str, Any] = {"id": job.id, "state": job.state, "ctx": job.ctx}
        if job.key is not None:
            doc["key"] = job.key
        if job.parent is not None:
            doc["parent"] = job.parent
        if job.priority:
            doc["priority"] = job.priority
        if job.not_before is not None:
            doc["not_before"] = job.not_before
        if job.attempts:
            doc["attempts"] = job.attempts
        if job.throttled:
            doc["throttled"] = job.throttled
        history = job.history
        if history:
            steps = []
            for e in history:
                if type(e) is tuple and len(e) == 4:  # (the usual entry, without a call)
                    if used == pooled:
                        entries.append({"from": None, "to": None, "time": None, "duration": None})
                        pooled += 1
                    entry = entries[used]
                    used += 1
                    entry["from"], entry["to"], entry["time"], entry["duration"] = e
                    steps.append(entry)
                else:
                    try:
                        steps.append(entry_document(e))
                    except UnwritableEntry as error:
                        raise UnwritableEntry(f"job {job.id}: {error}") from None
            doc["history"] = steps
        rare = job._rare
        if rare is not None:
            errors, polls = rare
            if errors:
                doc["errors"] = errors
            if polls:
                doc["polls"] = polls
        docs.append(doc)
    return docs


class UnwritableEntry(ValueError):
    """A history entry a script put in a job has no form in the run file (checkpoint turns it
    into a CheckpointError naming the file)."""


def entry_document(entry: Entry) -> dict[str, Any]:
    """A history entry's object in the run file; an UnwritableEntry if it has no such form."""
    if isinstance(entry, Mapping):
        return entry if type(entry) is dict else dict(entry)
    if isinstance(entry, tuple | list) and len(entry) in (4, 5):
        return Step(*entry).as_dict()
    raise UnwritableEntry(
        f"a history entry must be (from, to, time, duration[, redrive]) or an object, "
        f"not {entry!r:.80}"
    )


def json_default(value: Any) -> Any:
    """orjson's ``default`` for run documents and jobs: a Step (which a script may have put in
    a history) is written as its JSON object."""
    if isinstance(value, Step):
        return value.as_dict()
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def usual_jobs(raws: list[Any]) -> list[Job] | None:
    """The Jobs for a list of job objects all of the usual, valid shape (one ``map``), else None
    (see :func:`_usual_job`)."""
    jobs = list(map(_usual_job, raws))
    return cast("list[Job]", jobs) if all(jobs) else None  # (a Job is true; `None in` calls ==)


def job_from_dict(raw: Any, where: str) -> Job:
    """Check one job object from a run file or journal and build the Job."""
    return _usual_job(raw) or _checked_job(raw, where)


def _usual_job(raw: Any) -> Job | None:
    """The Job for a job object of the usual, valid shape, else None.

    A million jobs must load in seconds: this is one cheap test, and anything it does not
    accept goes through the checks that name what is wrong (the corrupt-file tests hold both
    to the same verdicts). State names are interned: a million jobs share one ``"done"``.
    """
    if type(raw) is not dict:
        return None
    if raw.keys() <= _PLAIN_KEYS:  # (most jobs: fewer keys to look at, no keyword call)
        return _plain_job(raw)
    try:
        job = Job(**raw)
    except TypeError:  # no "id", "state" or "ctx", or a key that is not a field
        return None
    not_before, history = job.not_before, job.history
    errors, polls = job._rare or _NO_RARE
    if not (
        type(job.id) is str
        and job.id != ""
        and type(job.state) is str
        and job.state != ""
        and type(job.ctx) is dict
        and (job.parent is None or type(job.parent) is str)
        and type(job.priority) is int
        and (
            not_before is None
            or ((type(not_before) is float or type(not_before) is int) and _in_time(not_before))
        )
        and type(job.attempts) is int
        and type(job.throttled) is int
        and type(history) is list
        and (
            (errors is None and "errors" not in raw)  # (not an explicit null)
            or (type(errors) is dict and (not errors or _errors_ok(errors)))
        )
        and (job.key is None or (type(job.key) is str and job.key != ""))
        and type(polls) is int
    ):
        return None
    if history:
        steps = _steps(history)
        if steps is None:
            return None
        job.history = steps
    if errors is not None and not errors:  # ("errors": {}, as older jorbs wrote for every job)
        job._rare = None if polls == 0 else (None, polls)
    job.state = sys.intern(job.state)
    return job


_PLAIN_KEYS = frozenset(("id", "state", "ctx", "history"))
_ABSENT: Any = object()


def _plain_job(raw: dict[str, Any]) -> Job | None:
    """:func:`_usual_job` for a job object with no keys but these four (the same verdicts)."""
    ident, state, ctx = raw.get("id"), raw.get("state"), raw.get("ctx")
    if not (
        type(ident) is str
        and ident != ""
        and type(state) is str
        and state != ""
        and type(ctx) is dict
    ):
        return None
    history = raw.get("history", _ABSENT)
    if history is _ABSENT:
        return Job(ident, sys.intern(state), ctx)
    if type(history) is not list:
        return None
    if history:
        history = _steps(history)
        if history is None:
            return None
    return Job(ident, sys.intern(state), ctx, history=history)


def _errors_ok(errors: dict[str, Any]) -> bool:
    return all(
        type(records) is list and all(type(r) is dict for r in records)
        for records in errors.values()
    )


def _steps(history: list[Any]) -> list[Entry] | None:
    """A history as read, its entries of the usual shape as tuples (state names interned);
    None if an entry is not an object with "from" and "to"."""
    intern = sys.intern
    steps: list[Entry] = []
    for entry in history:
        if type(entry) is dict and len(entry) == 4:  # with these four keys, exactly those
            source, target = entry.get("from"), entry.get("to")
            when, took = entry.get("time"), entry.get("duration")
            if (
                type(source) is str
                and type(target) is str
                and type(when) is float
                and type(took) is float
            ):
                steps.append((intern(source), intern(target), when, took))
                continue
        step = _as_step(entry)
        if step is None:
            return None
        steps.append(step)
    return steps


def _as_step(entry: Any) -> Entry | None:
    """One history entry as read (the unusual shapes): a tuple if it is a step, the object as
    it is if it is another object with "from" and "to", else None."""
    if not isinstance(entry, dict) or "from" not in entry or "to" not in entry:
        return None
    source, target = entry["from"], entry["to"]
    when: Any = entry.get("time")
    took: Any = entry.get("duration")
    redrive = entry.get("redrive")
    if (
        entry.keys() <= _REDRIVE_FIELDS
        and type(source) is str
        and type(target) is str
        and type(when) in (float, int)
        and type(took) in (float, int)
        and (redrive is None if "redrive" not in entry else type(redrive) is str)
    ):
        step = (sys.intern(source), sys.intern(target), when, took)
        return step if redrive is None else (*step, redrive)
    return entry


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
    unknown = set(raw) - _JOB_FIELDS
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
        _check(raw, "errors", dict, where, {}) or None,
        _check(raw, "key", (str, type(None)), where, None),
        _check(raw, "polls", int, where, 0),
    )
    if job.key == "":
        raise CorruptRunError(f'{where}: "key" is empty')
    if not job.state:
        raise CorruptRunError(f'{where}: "state" is empty')
    if job.not_before is not None and not _in_time(job.not_before):
        raise CorruptRunError(
            f'{where}: "not_before" {job.not_before!r} is no time (past the year 9999): a job '
            f"would wait for it forever. Set it to null to let the job start"
        )
    for state, records in job_errors(job).items():
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise CorruptRunError(f'{where}: "errors" of {state!r} is not a list of objects')
    steps = []
    for index, entry in enumerate(job.history):
        step = _as_step(entry)
        if step is None:
            raise CorruptRunError(f'{where}: "history" entry {index} is not a {{from, to}} object')
        steps.append(step)
    job.history = steps
    job.state = sys.intern(job.state)
    return job


def check_key(key: Any) -> str:
    """A job's key as given, if it is one (a non-empty string); a JorbError if not."""
    if not isinstance(key, str) or not key:
        raise JorbError(f"a job's key must be a non-empty string, not {key!r}")
    return key


def plain_name(name: Any) -> Any:
    """A state name given as a subclass of str (a ``StrEnum`` member) as the plain str it is
    equal to, so that the member and its value are one state everywhere; anything else as it
    is (validation says what is wrong with it)."""
    return str.__str__(name) if isinstance(name, str) and type(name) is not str else name


def _new_state(state: Any, priority: Any) -> str:
    """A new job's state, checked with its priority: the plain str, interned."""
    if not isinstance(state, str) or not state:
        raise JorbError(f"a job's state must be a non-empty string, not {state!r}")
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise JorbError(f"priority must be an int, not {priority!r}")
    return sys.intern(plain_name(state))


def _not_before(delay: float | None, not_before: float | None) -> float | None:
    if delay is not None and not_before is not None:
        raise JorbError("give delay or not_before, not both")
    if delay is not None:
        if not 0 <= delay <= MAX_TIME:
            raise JorbError(f"delay must be >= 0 seconds (and before the year 9999), not {delay!r}")
        return time.time() + delay
    if not_before is not None and not (type(not_before) in (int, float) and _in_time(not_before)):
        raise JorbError(f"not_before must be a Unix time before the year 9999, not {not_before!r}")
    return not_before


def _where(path: Path | None) -> str:
    return str(path) if path is not None else "run document"


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


def transitions_in(record: dict[str, Any]) -> int:
    """How many transitions (or changes) a journal record holds: a batch of plain successes
    (``"ok"``) one per entry, any other record one."""
    return len(record["ok"]) if "ok" in record else 1


def apply_record(run: Run, record: dict[str, Any]) -> None:
    """Apply one journal record to ``run`` (live or on replay)."""
    run.seq = record["seq"]
    ok = record.get("ok")
    if ok is not None:  # plain successes settled together (live: applied by batch, apply_ok)
        jobs, intern = run.jobs, sys.intern
        for entry in ok:  # (live, the processor gives each state's name as it is declared)
            entry[1] = intern(entry[1])
        apply_ok(run, ok, [jobs[entry[0]] for entry in ok])
        return
    epoch = run._epoch
    op = record.get("op")
    if op is None:  # an exec's record, one per transition: applied here, without a call
        job = run.jobs[record["job"]]
        job._epoch = epoch
        error = record.get("error")
        if error is not None:
            job.errors.setdefault(record["in"], []).append(error)
        if "ctx" in record:
            job.ctx = record["ctx"]
        step = record.get("history")
        if step is not None:  # the record's {"from", "to", "time", "duration"}, as a tuple
            intern = sys.intern
            job.history.append(
                (intern(step["from"]), intern(step["to"]), step["time"], step["duration"])
            )
        job.state = sys.intern(record["to"])
        # A success's record leaves these out: it resets them.
        job.attempts = record.get("attempts", 0)
        job.throttled = record.get("throttled", 0)
        job.not_before = record.get("not_before")
        if "priority" in record:  # a Next that set it
            job.priority = record["priority"]
        if "polls" in record:  # a Next back to the same state: counted, not in history
            job.polls = record["polls"]
        kids = record.get("kids")
        if kids:
            kicks = run.kicks
            source = step["from"] if step is not None else record.get("in", job.state)
            for raw in kids:
                kid = raw if isinstance(raw, Job) else job_from_dict(raw, "journal")
                run.jobs[kid.id] = kid
                kid._epoch = epoch  # (new, so in no chunk of the last snapshot: to be sure)
                run.note_key(kid)
                edge = (source, kid.state)
                kicks[edge] = kicks.get(edge, 0) + 1
            run.next_id = max(run.next_id, record["next_id"])
        return
    if op == "add":
        for raw in record["jobs"]:
            job = raw if isinstance(raw, Job) else job_from_dict(raw, "journal")
            run.jobs[job.id] = job
            run.note_key(job)
            job._epoch = epoch
        run.next_id = max(run.next_id, record["next_id"])
    elif op == "pause":
        run.paused.add(record["name"])
    elif op == "resume":
        run.paused.discard(record["name"])
    elif op == "redrive" or op == "cancel":  # (a cancel is recorded like a redrive)
        for ident in record["jobs"]:
            job = run.jobs[ident]
            job._epoch = epoch
            to = sys.intern(record["to"])
            job.history.append((job.state, to, record["time"], 0.0, record["change"]["id"]))
            job.state = to
            job.attempts = job.throttled = 0
            job.not_before = None
    else:
        raise CorruptRunError(f"journal record {record['seq']}: unknown op {op!r}")
    run.changes.append(record["change"])


def apply_ok(run: Run, ok: list[list[Any]], jobs: list[Job]) -> None:
    """Apply the entries of a record of plain successes, ``[id, to, ctx, time, duration]``
    each, to ``jobs`` (the jobs they name, in order), leaving ``run.seq`` as it is.

    ``apply_record`` does this for the whole record; the commit path does it for each
    worker's batch as it settles (its jobs and entries are still in the CPU's caches then),
    and sets the record's ``seq`` when the turn's record is written. Each ``to`` is the state's
    name interned, as every job's state is (so a million histories share a few strings).
    """
    epoch = run._epoch
    for job, (_, to, ctx, when, duration) in zip(jobs, ok, strict=True):
        job.history.append((job.state, to, when, duration))
        job.ctx = ctx
        job.state = to
        # A success resets these (see the exec record in apply_record).
        job.attempts = job.throttled = 0
        job.not_before = None
        job._epoch = epoch


def _is_time(value: Any) -> bool:
    return type(value) in (int, float) and -MAX_TIME <= value <= MAX_TIME


def _in_time(value: float) -> bool:
    return -MAX_TIME <= value <= MAX_TIME


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def change_problem(change: Any) -> str | None:
    """What is wrong with an entry of a run's ``changes`` (None: nothing)."""
    if type(change) is not dict:
        return f"a change must be an object, not {_kind(change)}"
    if "id" in change and type(change["id"]) is not str:
        return 'a change\'s "id" must be a string'
    return None


def record_problem(run: Run, record: dict[str, Any]) -> str | None:
    """What is wrong with a journal record read back, before it is applied to ``run`` (None:
    nothing). Replay holds every record to this, so applying it cannot fail half-way, and the
    run it leaves holds only what a run file may hold: what it folds into then loads."""
    ok = record.get("ok")
    if ok is not None:  # (a batch of plain successes: [id, to, ctx, time, duration] each)
        found = _successes_jobs(run, ok)
        return found if isinstance(found, str) else None
    op = record.get("op")
    if op is None:
        return _exec_record_problem(run, record)
    if op == "add":
        problem = _new_jobs_problem(run, record.get("jobs"), record)
    elif op in ("pause", "resume"):
        problem = None if _name(record.get("name")) else '"name" must be a state name'
    elif op == "redrive" or op == "cancel":  # (a cancel is recorded like a redrive)
        ids = record.get("jobs")
        if not _name(record.get("to")):
            problem = '"to" must be a state name'
        elif type(ids) is not list or not all(type(i) is str and i in run.jobs for i in ids):
            problem = '"jobs" must list ids of jobs in the run'
        elif not _is_time(record.get("time")):
            problem = '"time" must be a time'
        else:
            change = record.get("change")
            problem = (
                None
                if type(change) is dict and type(change.get("id")) is str
                else ('a redrive\'s "change" must have a string "id"')
            )
    else:
        return f"unknown op {op!r}"
    return problem or change_problem(record.get("change"))


def replay_record(run: Run, record: dict[str, Any]) -> str | None:
    """Check a journal record read back and apply it to ``run``: what is wrong with it (then
    nothing is applied), or None once applied. ``record_problem`` then ``apply_record``, with
    a batch of successes' jobs looked up once for both (a replay is mostly those)."""
    ok = record.get("ok")
    if ok is None:
        problem = record_problem(run, record)
        if problem is None:
            apply_record(run, record)
        return problem
    found = _successes_jobs(run, ok)
    if isinstance(found, str):
        return found
    run.seq = record["seq"]
    apply_ok(run, ok, found)
    return None


def _name(value: Any) -> bool:
    return type(value) is str and value != ""


def _successes_jobs(run: Run, ok: Any) -> list[Job] | str:
    """The jobs a batch of plain successes names, each looked up once (what is wrong with it,
    if anything: a string). Each entry's state name is interned on the way."""
    # (A journal replayed after a crash is mostly these entries: the checks are inlined.)
    if type(ok) is not list:
        return '"ok" must be a list'
    get, numbers, intern = run.jobs.get, _NUMBERS, sys.intern
    found: list[Job] = []
    append = found.append
    for entry in ok:
        if type(entry) is not list or len(entry) != 5:
            return '"ok" must hold [id, to, ctx, time, duration] lists'
        ident, to, ctx, when, took = entry
        job = get(ident) if type(ident) is str else None
        if job is None:
            return f"{ident!r:.40} is no job of the run"
        if (
            type(to) is not str
            or not to
            or type(ctx) is not dict
            or type(when) not in numbers
            or not -MAX_TIME <= when <= MAX_TIME
        ):
            return f"job {ident}: a success needs a state name, a ctx object and a time"
        if type(took) not in numbers:
            return f"job {ident}: a duration must be a number"
        entry[1] = intern(to)
        append(job)
    return found


def _exec_record_problem(run: Run, record: dict[str, Any]) -> str | None:
    # (Every record of a journal replayed after a crash comes through here: checks inlined.)
    get = record.get
    ident, to = get("job"), get("to")
    if type(ident) is not str or ident not in run.jobs:
        return f'"job" {ident!r:.40} is no job of the run'
    if type(to) is not str or not to:
        return '"to" must be a state name'
    if "ctx" in record and type(record["ctx"]) is not dict:
        return '"ctx" must be an object'
    error = get("error")
    if error is not None and (type(error) is not dict or not _name(get("in"))):
        return 'an "error" must be an object, with the state it happened "in"'
    step = get("history")
    if step is not None:
        if type(step) is not dict:
            return '"history" must be a {from, to, time, duration} object'
        source, target = step.get("from"), step.get("to")
        when: Any = step.get("time")
        if not (
            type(source) is str
            and source
            and type(target) is str
            and target
            and type(when) in (float, int)
            and -MAX_TIME <= when <= MAX_TIME
            and type(step.get("duration")) in (float, int)
        ):
            return '"history" must be a {from, to, time, duration} object'
    if len(record) != 5 or step is None or "ctx" not in record:
        # (else it holds seq, job, to, ctx and history, all checked: a success's record)
        if not _count(get("attempts", 0)) or not _count(get("throttled", 0)):
            return '"attempts" and "throttled" must be counts'
        not_before = get("not_before")
        if not_before is not None and not _is_time(not_before):
            return '"not_before" must be a time'
        if type(get("priority", 0)) is not int or not _count(get("polls", 0)):
            return '"priority" must be an int and "polls" a count'  # (a jorb.Next's)
        kids = get("kids")
        if kids:
            return _new_jobs_problem(run, kids, record)
    return None


def _new_jobs_problem(run: Run, raws: Any, record: dict[str, Any]) -> str | None:
    """Jobs a record creates: each a valid job object, with an id the run has not used."""
    if type(raws) is not list:
        return "the new jobs must be a list"
    if type(record.get("next_id")) is not int:
        return '"next_id" must be an int'
    seen: set[str] = set()
    for raw in raws:
        if isinstance(raw, Job):
            raw = job_document(raw)
        try:
            job = job_from_dict(raw, "a new job")
        except CorruptRunError as e:
            return str(e)
        if job.id in run.jobs or job.id in seen:
            return f"job id {job.id!r} is taken"
        ident = job.id
        if (
            ident.isascii()
            and ident.isdigit()
            and (
                len(ident) > 19 or int(ident) >= record["next_id"]  # (19 digits: past any int64)
            )
        ):
            return f'job id {job.id!r} is not below the record\'s "next_id"'  # (reused later)
        seen.add(job.id)
    return None


def parent_cycle(run: Run) -> list[str] | None:
    """Ids of jobs that are each other's ancestors (only a hand edit makes one: a kicked job
    always gets a newer id than its parent), or None. Fan-in would wait on them forever."""
    jobs = run.jobs
    done: set[str] = set()
    for start in jobs:
        path: list[str] = []
        on_path: set[str] = set()
        ident: str | None = start
        while ident is not None and ident in jobs and ident not in done:
            if ident in on_path:
                return path[path.index(ident) :]
            path.append(ident)
            on_path.add(ident)
            ident = jobs[ident].parent
        done.update(path)
    return None
