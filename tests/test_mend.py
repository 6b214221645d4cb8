"""jorb.mend.fold: a crashed run's journal folded into its file, an edit made meanwhile kept.

The crash here is the journal left behind as a ``kill -9`` would leave it (``Store.finish``
stopped before its last compaction); tests/test_mistakes.py does the same with a real SIGKILL,
from the command line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import DONE, MakeRun

import jorb
from jorb.checkpoint import Store, journal_path, read_journal
from jorb.mend import fold


@pytest.fixture
def crashed(make_run: MakeRun, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Six jobs went new -> hold in a first exec (so the file records that transition); a
    second takes them hold -> done, and job 1's exec also adds two jobs (into "done") and
    pauses "b", changes that go through the journal like transitions; then the process "dies"
    before folding its journal in."""
    holder: list[jorb.Processor] = []

    def new(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        return ctx, "hold"

    def hold(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        if ctx["n"] == 1:
            holder[0].add_jobs([{"n": 10}, {"n": 11}], state="done")
            holder[0].pause("b")
        return ctx, "done"

    def b(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        return ctx, "done"

    def finish(store: Store) -> None:  # as a kill -9 just before the last compaction
        store.executing = False
        store._close_journal()

    run = make_run([{"n": n} for n in range(1, 7)])
    first = [jorb.State("new", exec=new), jorb.State("hold", terminal=True), DONE]
    jorb.Processor(None, first, progress=False).exec(run)
    run = jorb.Run.open(run.path)  # (closed by the first exec)
    states = [jorb.State("hold", exec=hold), jorb.State("b", exec=b), DONE]
    with monkeypatch.context() as patch:
        patch.setattr(Store, "finish", finish)
        holder.append(jorb.Processor(None, states, progress=False))
        holder[0].exec(run)
    path = run.path
    assert path is not None and journal_path(path).exists()
    assert {"add", "pause"} <= {
        record.get("op") for _, record in read_journal(journal_path(path))[1]
    }
    assert set(states_in(path).values()) == {"hold"}  # the file is stale
    return path


def states_in(path: Path) -> dict[str, str]:
    return {job["id"]: job["state"] for job in json.loads(path.read_text())["jobs"]}


def test_fold_without_an_edit_is_what_a_rerun_would_load(crashed: Path) -> None:
    expected = jorb.Run.load(crashed)
    done = fold(crashed)
    assert done.conflict is False and done.transitions >= 3  # the ok batches, the add, the pause
    assert not journal_path(crashed).exists()
    folded = jorb.Run.load(crashed)
    assert {i: j.state for i, j in folded.jobs.items()} == {
        i: j.state for i, j in expected.jobs.items()
    }
    assert folded.paused == {"b"} and len(folded.jobs) == 8 and folded.seq == expected.seq


def test_fold_after_an_edit_keeps_the_edit_and_every_change_the_journal_made(
    crashed: Path,
) -> None:
    doc = json.loads(crashed.read_text())
    for job in doc["jobs"]:
        if job["id"] in ("2", "5"):
            job["state"] = "b"  # the user moves 2 and 5 (the journal moved them on to done)
        if job["id"] == "6":
            del job["ctx"]["n"]
            job["ctx"]["note"] = "mine"  # a ctx edit of a job whose state stays
    crashed.write_text(json.dumps(doc, indent=2))
    with pytest.raises(jorb.JournalConflictError, match="jorb fold"):
        jorb.Run.load(crashed)

    done = fold(crashed)

    assert done.conflict and done.yours == ["2", "5"]
    run = jorb.Run.load(crashed)  # loads: no journal, no conflict
    assert {i: j.state for i, j in run.jobs.items()} == {
        "1": "done",
        "2": "b",
        "3": "done",
        "4": "done",
        "5": "b",
        "6": "done",
        "7": "done",
        "8": "done",
    }
    assert run.paused == {"b"} and run.next_id == 9
    # Job 6's state was not moved by the edit: the journal's record of it wins, ctx included
    # (the edited ctx is in the copy set aside).
    assert run.jobs["6"].ctx == {"n": 6}
    assert done.edited_aside is not None and done.journal_aside is not None
    assert json.loads(done.edited_aside.read_text()) == doc
    assert [r["seq"] for _, r in read_journal(done.journal_aside)[1]][-1] == run.seq


def test_fold_refuses_a_run_a_process_holds(crashed: Path) -> None:
    holder = jorb.Run.open(crashed)
    try:
        with pytest.raises(jorb.RunLockedError):
            fold(crashed)
    finally:
        holder.close()


def test_the_conflict_counts_transitions_not_journal_lines(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Plain successes of async execs share one journal record per group commit: the count a
    # user is told must be the jobs' moves, not the journal's lines.
    async def new(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        return ctx, "done"

    def finish(store: Store) -> None:  # as a kill -9 just before the last compaction
        store.executing = False
        store._close_journal()

    run = make_run([{"n": n} for n in range(6)])
    with monkeypatch.context() as patch:
        patch.setattr(Store, "finish", finish)
        jorb.Processor(None, [jorb.State("new", exec=new), DONE], progress=False).exec(run)
    path = run.path
    assert path is not None
    records = [record for _, record in read_journal(journal_path(path))[1]]
    assert len(records) < 6 and sum(len(r.get("ok", ())) for r in records) == 6  # batched
    doc = json.loads(path.read_text())
    doc["jobs"][0]["ctx"]["note"] = "edited"
    path.write_text(json.dumps(doc, indent=2))

    with pytest.raises(jorb.JournalConflictError, match=r"still holds 6 transition\(s\)"):
        jorb.Run.load(path)
