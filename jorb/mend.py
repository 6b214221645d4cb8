"""Mending a run without its script: fold a crashed run's journal into its file.

After a crash (``kill -9``, a power cut) the run file is the last snapshot and the journal
beside it holds the transitions made since. The next ``Run.open`` folds them in, but the
script is not always at hand, and a user who edits the stale file first has two versions of
the run that disagree. ``jorb fold RUNFILE`` (:func:`fold`) settles both cases::

    folded = jorb.mend.fold(Path("runs/x.json"))

With no edit, the journal is folded in, exactly as a rerun of the script would. With an edit
(the file no longer is the snapshot the journal continues), nothing is thrown away: the
journal's records are applied to the *edited* file, except to the jobs the edit moved: those
whose state is no longer the one their last recorded transition led to (the edit is newer,
so it wins for them, and their transitions in the journal run again; see :func:`_keep`). The
edited file and the journal, as they were, are set aside beside the run under names that say
what they are, so either side can be restored by hand.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import (
    Records,
    Store,
    _read_snapshot,
    _replay,
    atomic_write,
    journal_path,
    read_journal,
)
from .errors import JournalConflictError, RunFileError
from .model import Job, Run, apply_record, transitions_in

__all__ = ["Folded", "fold"]


@dataclass(frozen=True, slots=True)
class Folded:
    """What :func:`fold` did."""

    transitions: int
    """Journal records applied to the run file."""
    conflict: bool = False
    """Whether the file had been edited after the crash (both sides were kept)."""
    yours: list[str] = field(default_factory=list)
    """Ids of the jobs whose state the edit changed: the edit was kept for them."""
    dropped: int = 0
    """Journal records not applied (they were of those jobs): their execs run again."""
    edited_aside: Path | None = None
    """The edited file as it was, kept beside the run."""
    journal_aside: Path | None = None
    """The journal as it was, kept beside the run."""


def fold(path: Path) -> Folded:
    """Fold the journal of the run at ``path`` into the file, under the run's lock.

    Raises ``RunLockedError`` if a process runs it (that process folds its own journal), and
    ``RunFileError``/``CorruptRunError`` if the files cannot be read.
    """
    path = Path(path)
    if not path.exists():  # (before the lock: taking it would create the lock file)
        raise RunFileError(f"{path}: no such run file")
    with Store(path) as store:
        jpath = journal_path(path)
        header, records = read_journal(jpath)
        with contextlib.closing(records):
            run, snapshot = _read_snapshot(path, checksum=header is not None)
            base = run.seq
            if header is None:
                return Folded(0)
            counted = [0]
            try:
                _replay(run, path, snapshot, header, _counting(records, base, counted))
            except JournalConflictError:
                pass
            else:
                store.compact(run, finish=True)
                return Folded(counted[0])
        return _merge(path, store)


def _counting(records: Records, base: int, counted: list[int]) -> Records:
    """``records`` as they are, adding up the transitions of those after ``base``."""
    for line, record in records:
        if record["seq"] > base:
            counted[0] += transitions_in(record)
        yield line, record


def _merge(path: Path, store: Store) -> Folded:
    """The journal applied to the edited file, but not to the jobs whose state it changed."""
    jpath = journal_path(path)
    edited_bytes = path.read_bytes()
    run, _ = _read_snapshot(path, checksum=False)
    base = run.seq
    yours: set[str] = set()  # jobs the edit moved: the journal's records of them are dropped
    seen: set[str] = set()  # jobs the journal touched, whose state was compared once
    applied = dropped = 0
    last = base
    _, records = read_journal(jpath)
    with contextlib.closing(records):
        for _, record in records:
            if record["seq"] <= base:
                continue
            last = record["seq"]
            kept = _keep(run, record, yours, seen)
            taken = 0 if kept is None else transitions_in(kept)
            applied, dropped = applied + taken, dropped + transitions_in(record) - taken
            if kept is not None:
                apply_record(run, kept)
    run.seq = max(run.seq, last)  # a journal left behind by a crash from here on is folded in
    stamp = time.strftime("%Y%m%d-%H%M%S")
    edited_aside = path.with_name(f"{path.name}.edited-{stamp}")
    journal_aside = path.with_name(f"{path.name}.journal.folded-{stamp}")
    atomic_write(edited_aside, edited_bytes)
    try:
        os.link(jpath, journal_aside)  # the same bytes, kept under a second name
    except OSError:
        atomic_write(journal_aside, jpath.read_bytes())
    store.compact(run, finish=True)  # the merged run; the journal (its first name) goes
    return Folded(
        applied,
        conflict=True,
        yours=sorted(yours, key=_numeric),
        dropped=dropped,
        edited_aside=edited_aside,
        journal_aside=journal_aside,
    )


def _keep(
    run: Run, record: dict[str, Any], yours: set[str], seen: set[str]
) -> dict[str, Any] | None:
    """The part of ``record`` to apply to the edited run (None: nothing of it).

    A job is *yours* (the edit moved it, so the edit wins for it and the journal's records of
    it are dropped) when the edited file has it in another state than the one it was in when
    the journal first touched it: the state its last recorded transition led to, or, for a job
    with none yet, the state the journal's first record of it names (a transition's ``from``,
    or the state a failed attempt happened ``in``). A job with neither takes the journal's side.
    """
    if "ok" in record:  # plain successes written together: [id, to, ctx, time, duration] each
        ok = [entry for entry in record["ok"] if _touch(run, entry[0], None, yours, seen)]
        return {**record, "ok": ok} if ok else None
    op = record.get("op")
    if op is None:  # an exec's record
        step = record.get("history")
        before = step["from"] if isinstance(step, dict) else record.get("in")
        if not _touch(run, record["job"], before, yours, seen):
            return None
        kids = record.get("kids") or []
        if any(_kid_id(kid) in run.jobs for kid in kids):
            raise RunFileError(
                f"{_path_of(run)}: the journal's record {record['seq']} creates job(s) the edited "
                f"file already has; fold cannot merge them. Restore one side by hand"
            )
        return record
    if op == "redrive":
        jobs = [i for i in record["jobs"] if _touch(run, i, None, yours, seen)]
        return {**record, "jobs": jobs} if jobs else None
    if op == "add":
        jobs = [job for job in record["jobs"] if _kid_id(job) not in run.jobs]
        return {**record, "jobs": jobs} if jobs else None
    return record  # pause, resume


def _touch(run: Run, ident: str, before: str | None, yours: set[str], seen: set[str]) -> bool:
    """Whether the journal's record of job ``ident`` applies (see :func:`_keep`)."""
    job = run.jobs.get(ident)
    if job is None or ident in yours:
        return False  # deleted by the edit (or a child of a dropped record), or moved by it
    if ident not in seen:
        seen.add(ident)
        was = _last_state(job) or before
        if was is not None and job.state != was:
            yours.add(ident)
            return False
    return True


def _last_state(job: Job) -> str | None:
    """The state the job's last recorded transition led to (None if it has none)."""
    if not job.history:
        return None
    entry = job.history[-1]
    to = entry.get("to") if isinstance(entry, dict) else entry[1]
    return to if isinstance(to, str) else None


def _kid_id(raw: Any) -> str:
    return str(raw["id"] if isinstance(raw, dict) else raw.id)


def _path_of(run: Run) -> str:
    return str(run.path) if run.path is not None else "the run"


def _numeric(ident: str) -> tuple[int, str]:
    return (int(ident), "") if ident.isdigit() else (0, ident)
