"""Run, Job and Kick through the public API: opening, adding, ids, and the run file's form."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import pytest
from conftest import DONE, MakeRun, job_dict, process, process_fake_clock

import jorb

#: What a job object in the run file means by each key it leaves out.
JOB_DEFAULTS: dict[str, Any] = {
    "parent": None,
    "priority": 0,
    "not_before": None,
    "attempts": 0,
    "throttled": 0,
    "history": [],
    "errors": {},
    "key": None,
    "polls": 0,
}

# -- Run.open / add_job / counts --------------------------------------------------------------


def test_open_creates_a_run_then_reopens_it_with_its_own_overall(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "migrate.json"
    run = jorb.Run.open(path, overall={"workdir": "/w"})
    assert run.jobs == {}
    assert run.overall == {"workdir": "/w"}
    run.add_job({"repo": "a"})
    run.add_job({"repo": "b"}, state="edit")
    run.save()
    run.close()
    assert path.exists()

    again = jorb.Run.open(path, overall={"workdir": "/elsewhere"})
    try:
        assert again.overall == {"workdir": "/w"}  # the file's overall wins on reopen
        assert {i: (j.state, j.ctx) for i, j in again.jobs.items()} == {
            "1": ("new", {"repo": "a"}),
            "2": ("edit", {"repo": "b"}),
        }
    finally:
        again.close()


def test_a_run_opened_in_a_with_block_is_released_at_its_end(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    with jorb.Run.open(path) as run:
        run.add_job({"n": 1})
        run.save()
        with pytest.raises(jorb.RunLockedError):
            jorb.Run.open(path)
    with jorb.Run.open(path) as again:  # the lock was released: it reopens in this process
        assert [job.ctx for job in again.jobs.values()] == [{"n": 1}]


def test_a_jobs_errors_and_polls_keep_what_is_written_into_them(make_run: MakeRun) -> None:
    # (Few jobs have either: the two share a slot, and the dict is made when first read.)
    run = make_run()
    fresh, written, replaced = (run.add_job({"n": n}) for n in range(3))
    assert fresh.errors == {} and fresh.errors is fresh.errors and fresh.polls == 0
    written.errors["edit"] = [{"error": "boom", "time": 1.0}]
    written.polls = 2
    written.errors.setdefault("edit", []).append({"error": "again", "time": 2.0})
    replaced.polls = 5
    replaced.errors = {"push": [{"error": "denied", "time": 3.0}]}
    replaced.polls += 1
    run.save()

    on_disk = json.loads(run.path.read_bytes())["jobs"]  # type: ignore[union-attr]
    assert [("errors" in raw, "polls" in raw) for raw in on_disk] == [(False, False)] + [
        (True, True)
    ] * 2  # (the fresh job's were read, never written)
    again = jorb.Run.load(run.path)  # type: ignore[arg-type]
    assert [(job.errors, job.polls) for job in again.jobs.values()] == [
        ({}, 0),
        ({"edit": [{"error": "boom", "time": 1.0}, {"error": "again", "time": 2.0}]}, 2),
        ({"push": [{"error": "denied", "time": 3.0}]}, 6),
    ]
    made = jorb.Job("9", "new", {}, errors={"a": []}, polls=4)
    assert (made.errors, made.polls, jorb.Job("10", "new", {}).errors) == ({"a": []}, 4, {})


def test_add_job_defaults_to_state_new_and_counts_by_state(make_run: MakeRun) -> None:
    run = make_run()
    first = run.add_job({"n": 1})
    assert (first.id, first.state, first.ctx, first.parent) == ("1", "new", {"n": 1}, None)
    assert (first.history, first.errors, first.priority, first.not_before) == ([], {}, 0, None)
    run.add_job({"n": 2})
    run.add_job({"n": 3}, state="review")
    run.add_job({"n": 4}, "done")

    assert run.counts() == {"new": 2, "review": 1, "done": 1}
    assert list(run.jobs) == ["1", "2", "3", "4"]
    assert all(run.jobs[i].id == i for i in run.jobs)


def test_add_job_rejects_what_cannot_be_a_job(make_run: MakeRun) -> None:
    run = make_run()
    with pytest.raises(jorb.JorbError, match="dict"):
        run.add_job(["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(jorb.JorbError, match="delay"):
        run.add_job({}, delay=-1)
    assert run.jobs == {}


def test_add_jobs_adds_one_job_per_ctx_as_add_job_would(make_run: MakeRun, tmp_path: Path) -> None:
    run = make_run([{"n": 0}])
    before = time.time()
    added = run.add_jobs(({"n": i} for i in range(1, 4)), "review", delay=30.0, priority=2)
    one = run.add_job({"n": 4}, "review", delay=30.0, priority=2)

    assert [job.id for job in added] == ["2", "3", "4"] and one.id == "5"
    assert [job.ctx for job in added] == [{"n": 1}, {"n": 2}, {"n": 3}]
    for job in added:
        assert (job.state, job.priority, job.parent, job.history, job.errors) == (
            "review",
            2,
            None,
            [],
            {},
        )
        assert job.not_before is not None and before + 30 <= job.not_before <= time.time() + 30
    run.save()
    run.close()
    stored = jorb.Run.load(tmp_path / "run.json").jobs
    assert [(stored[i].state, stored[i].ctx) for i in "2345"] == [
        ("review", {"n": n}) for n in range(1, 5)
    ]


def test_add_jobs_adds_nothing_if_one_ctx_cannot_be_a_job(make_run: MakeRun) -> None:
    run = make_run()
    with pytest.raises(jorb.JorbError, match="ctx 2 must be a dict"):
        run.add_jobs([{"n": 1}, {"n": 2}, ["no"]])  # type: ignore[list-item]
    with pytest.raises(jorb.JorbError, match="priority"):
        run.add_jobs([{"n": 1}], priority="high")  # type: ignore[arg-type]
    with pytest.raises(jorb.JorbError, match="state"):
        run.add_jobs([{"n": 1}], state="")
    assert run.jobs == {} and run.add_job({}).id == "1"


def test_jobs_added_in_bulk_are_run_by_a_processor(make_run: MakeRun) -> None:
    async def double(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        return {"n": ctx["n"] * 2}, "done"

    run = make_run()
    run.add_jobs([{"n": i} for i in range(1000)])
    process([jorb.State("new", exec=double, concurrency=8), DONE], run)
    assert sorted(job.ctx["n"] for job in run.jobs.values()) == list(range(0, 2000, 2))


def test_add_jobs_while_the_run_executes_is_refused(make_run: MakeRun) -> None:
    refused: list[str] = []

    async def try_adding(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        try:
            run.add_jobs([{"n": 1}])
        except jorb.JorbError as e:
            refused.append(str(e))
        return ctx, "done"

    run = make_run([{"n": 0}])
    process([jorb.State("new", exec=try_adding), DONE], run)
    assert len(refused) == 1 and "processor.add_jobs" in refused[0]
    assert len(run.jobs) == 1


def test_ids_are_never_reused_after_deletion(make_run: MakeRun, tmp_path: Path) -> None:
    run = make_run([{"n": i} for i in range(3)])
    del run.jobs["3"]
    assert run.add_job({"n": 99}).id == "4"
    run.save()
    run.close()

    # A user deletes the newest jobs from the file by hand; ids still move on.
    path = tmp_path / "run.json"
    doc = json.loads(path.read_text())
    doc["jobs"] = [j for j in doc["jobs"] if j["id"] == "1"]
    path.write_text(json.dumps(doc, indent=2))
    reopened = make_run(name="run.json")
    assert list(reopened.jobs) == ["1"]
    assert reopened.add_job({"n": 5}).id == "5"

    # Kicked children take fresh ids too, never one a deleted job had.
    def split(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        return ctx, "done", [jorb.Kick("done", {"child": i}) for i in range(2)]

    process([jorb.State("new", exec=split), DONE], reopened)
    assert sorted(reopened.jobs, key=int) == ["1", "5", "6", "7", "8", "9"]


def test_add_job_stores_delay_and_priority(make_run: MakeRun, tmp_path: Path) -> None:
    run = make_run()
    before = time.time()
    job = run.add_job({"n": 1}, delay=60.0, priority=7)
    after = time.time()
    assert job.priority == 7
    assert job.not_before is not None and before + 60.0 <= job.not_before <= after + 60.0
    run.save()

    stored = jorb.Run.load(tmp_path / "run.json").jobs["1"]
    assert (stored.priority, stored.not_before) == (7, job.not_before)


def test_a_delayed_job_holds_no_slot_and_starts_after_its_delay(make_run: MakeRun) -> None:
    started: dict[str, float] = {}

    async def note(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        started[ctx["name"]] = asyncio.get_running_loop().time()
        return ctx, "done"

    run = make_run()
    run.add_job({"name": "later"}, delay=60.0)
    run.add_job({"name": "now"})

    process_fake_clock([jorb.State("new", exec=note, concurrency=1), DONE], run)

    # With one slot, "now" could not start before "later" if the delayed job held the slot.
    assert started["now"] < 1.0
    assert 59.0 <= started["later"] - started["now"] <= 61.0
    assert run.counts() == {"done": 2}


# -- the finished run on disk -----------------------------------------------------------------

SECRET = "APP-SENTINEL-5f1c9a"


class App:
    """An app context holding something that must never be written down."""

    def __init__(self) -> None:
        self.token = SECRET
        self.calls: Counter[int] = Counter()

    def __repr__(self) -> str:
        return f"<App token={self.token}>"


async def _fetch(app: App, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
    ctx["token_length"] = len(app.token)
    app.calls[ctx["n"]] += 1
    if ctx["n"] % 4 == 0 and app.calls[ctx["n"]] == 1:
        raise ConnectionError(f"flaky fetch of {ctx['n']} with {type(app).__name__}")
    kicks = [jorb.Kick("part", {"of": ctx["n"], "i": i}) for i in range(ctx["n"] % 3)]
    return ctx, "store", kicks


def _store(app: App, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
    if ctx["n"] == 5:
        raise PermissionError(f"cannot store {ctx['n']} in {overall['bucket']}")
    return {**ctx, "stored": True}, "done"


async def _part(app: App, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
    return {**ctx, "ok": True}, "done"


STATES = [
    jorb.State("new", exec=_fetch, concurrency=3, retries=1, backoff=0),
    jorb.State("store", exec=_store, concurrency=2, retries=1, backoff=0),
    jorb.State("part", exec=_part, concurrency=2),
    DONE,
]


@pytest.fixture
def finished(make_run: MakeRun) -> jorb.Run:
    """A finished run with kicks, retried errors, a routed failure and multi-step histories."""
    run = make_run([{"n": n} for n in range(9)], overall={"bucket": "b1"})
    process(STATES, run, App())
    return run


def test_the_finished_run_reloads_with_everything_intact(finished: jorb.Run) -> None:
    assert finished.path is not None
    loaded = jorb.Run.load(finished.path)

    assert loaded.overall == {"bucket": "b1"}
    assert list(loaded.jobs) == list(finished.jobs)
    for ident, job in finished.jobs.items():
        assert job_dict(loaded.jobs[ident]) == job_dict(job)
    assert loaded.next_id == finished.next_id
    assert loaded.counts() == finished.counts() == {"done": 17, "failed": 1}

    # And the outcome is what the execs did: spot-check what reloaded.
    five = loaded.jobs["6"]
    assert five.ctx["n"] == 5 and five.state == "failed"
    assert [e["type"] for e in five.errors["store"]] == ["PermissionError"] * 2
    assert "cannot store 5 in b1" in five.errors["store"][0]["traceback"]
    four = loaded.jobs["5"]
    assert [e["message"] for e in four.errors["new"]] == ["flaky fetch of 4 with App"]
    assert [(h["from"], h["to"]) for h in four.steps()] == [("new", "store"), ("store", "done")]
    parts = [j for j in loaded.jobs.values() if j.parent is not None]
    assert len(parts) == 9 and all(j.ctx["ok"] for j in parts)
    for job in loaded.jobs.values():
        for step in job.steps():
            assert set(step.keys()) == {"from", "to", "time", "duration"}
            assert step["duration"] >= 0
            assert abs(step["time"] - time.time()) < 3600
        for records in job.errors.values():
            for error in records:
                assert {"message", "type", "traceback", "time", "attempt"} <= set(error)


def test_the_run_file_alone_holds_the_finished_run(finished: jorb.Run) -> None:
    # Not only Run.load: the JSON file by itself, read by any JSON reader, is complete.
    assert finished.path is not None
    doc = json.loads(finished.path.read_text())
    assert [{**JOB_DEFAULTS, **raw} for raw in doc["jobs"]] == [
        job_dict(job) for job in finished.jobs.values()
    ]
    assert doc["overall"] == {"bucket": "b1"}


def test_the_app_context_never_reaches_disk(finished: jorb.Run, tmp_path: Path) -> None:
    assert finished.jobs["2"].ctx["token_length"] == len(SECRET)  # the execs did use it
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert finished.path in files
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path


def test_the_run_file_is_indented_json_a_user_can_find_and_replace_in(
    finished: jorb.Run,
) -> None:
    assert finished.path is not None
    text = finished.path.read_text()
    doc = json.loads(text)

    assert doc["format"] == "jorb-run"
    assert isinstance(doc["version"], int)
    lines = text.splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    assert lines[1].startswith('  "') and not lines[1].startswith("   ")
    for line in lines:
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0, line
        assert _one_value_per_line(line.strip()), line
    assert text.count('"state"') == len(doc["jobs"]) == 18  # only jobs carry a "state" key
    assert text.count('"state": "done"') == 17
    assert text.count('"from"') == text.count('"to"') == sum(len(j["history"]) for j in doc["jobs"])
    assert doc["jobs"][0]["id"] == "1"
    assert list(doc["jobs"][0])[:3] == ["id", "state", "ctx"]
    declared = {s["name"]: s["terminal"] for s in doc["states"]}
    assert declared == {
        "new": False,
        "store": False,
        "part": False,
        "done": True,
        "failed": True,
        "cancelled": True,  # declared for `jorb cancel`, like the error state
    }


def _one_value_per_line(line: str) -> bool:
    """Whether a pretty-printed JSON line holds at most one key and one scalar or opener."""
    if line.endswith(","):
        line = line[:-1]
    keyed = re.fullmatch(r'("(?:[^"\\]|\\.)*"): (.+)', line)
    value = keyed.group(2) if keyed else line
    if value in ("{", "[", "}", "]", "{}", "[]"):
        return True
    try:
        parsed = json.loads(value)
    except ValueError:
        return False
    return not isinstance(parsed, dict | list)


def test_editing_a_state_in_the_file_redrives_the_job(
    finished: jorb.Run, make_run: MakeRun
) -> None:
    assert finished.path is not None
    finished.close()
    text = finished.path.read_text()
    finished.path.write_text(text.replace('"state": "failed"', '"state": "store"'))

    def store_fixed(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        return {**ctx, "stored": True}, "done"

    run = make_run(name=finished.path.name)
    states = [jorb.State("store", exec=store_fixed), *(s for s in STATES if s.name != "store")]
    process(states, run, App())

    job = run.jobs["6"]
    assert (job.state, job.ctx["stored"]) == ("done", True)
    assert len(job.errors["store"]) == 2  # the old errors are kept
    assert [h["to"] for h in job.steps()][-2:] == ["failed", "done"]
    assert run.counts() == {"done": 18}


def test_a_corrupt_run_file_is_a_jorb_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"format": "jorb-run", "version": 1, "jobs": [\n')
    with pytest.raises(jorb.JorbError, match=r"broken\.json"):
        jorb.Run.load(path)
    with pytest.raises(jorb.JorbError, match=r"missing\.json"):
        jorb.Run.load(tmp_path / "missing.json")


# -- history entries and the file's defaults --------------------------------------------------


def test_a_history_step_reads_like_the_object_in_the_file() -> None:
    step = jorb.Step("new", "edit", 1_795_000_000.5, 0.25)
    assert (step["from"], step["to"], step["time"], step["duration"]) == (
        "new",
        "edit",
        1_795_000_000.5,
        0.25,
    )
    assert (
        dict(step)
        == step.as_dict()
        == {"from": "new", "to": "edit", "time": 1_795_000_000.5, "duration": 0.25}
    )
    assert step == dict(step) and dict(step) == step and step != {**step, "to": "done"}
    assert "from" in step and "redrive" not in step and step.get("redrive") is None
    with pytest.raises(KeyError):
        step["redrive"]
    redriven = jorb.Step("failed", "new", 1_795_000_001.0, 0.0, "c0ffee")
    assert redriven["redrive"] == "c0ffee" and list(redriven.keys())[-1] == "redrive"
    assert dict(redriven.items()) == redriven.as_dict()
    assert list(redriven.values()) == ["failed", "new", 1_795_000_001.0, 0.0, "c0ffee"]
    # Being a tuple, a Step iterates (and json.dumps writes it) as its values: dict() it.
    assert json.loads(json.dumps([dict(step)])) == [step.as_dict()]


def test_a_step_equals_the_plain_tuple_entry_it_reads(finished: jorb.Run, tmp_path: Path) -> None:
    # job.steps() gives "the same entries" as job.history: a Step read from an entry, or one a
    # script appends, compares equal to the plain tuple (Step has a fifth field, redrive=None).
    job = finished.jobs["5"]
    assert job.steps() == job.history
    assert jorb.Step(*job.history[0]) == job.history[0]
    run = jorb.Run(tmp_path / "steps.json")
    mine = run.add_job({}, "done")
    mine.history.append(jorb.Step("new", "done", 1_795_000_000.5, 0.25))
    run.save()
    assert jorb.Run.load(tmp_path / "steps.json").jobs[mine.id].history == mine.history


def test_a_history_entry_in_a_dict_subclass_is_written_as_the_object_it_is(
    tmp_path: Path,
) -> None:
    # Any mapping a script appends is the object it is, not a tuple of its keys.
    run = jorb.Run(tmp_path / "run.json")
    job = run.add_job({}, "b")
    entry = {"from": "a", "to": "b", "time": 1_795_000_000.5, "duration": 0.25}
    job.history.append(OrderedDict(entry))
    assert [dict(step) for step in job.steps()] == [entry]
    run.save()
    assert jorb.Run.load(tmp_path / "run.json").jobs[job.id].steps() == [entry]


def test_history_entries_are_plain_tuples_the_gc_lets_go_of(finished: jorb.Run) -> None:
    # A million jobs' history must not be walked by every full collection: CPython untracks a
    # plain tuple of strings and floats, never a tuple subclass such as Step.
    assert finished.path is not None
    loaded = jorb.Run.load(finished.path)
    for run in (finished, loaded):
        entries = [entry for job in run.jobs.values() for entry in job.history]
        assert len(entries) > 20 and all(type(entry) is tuple for entry in entries)
        gc.collect()
        assert not any(gc.is_tracked(entry) for entry in entries)
    job = loaded.jobs["5"]
    assert [(step.source, step["to"]) for step in job.steps()] == [
        (source, target) for source, target, *_ in job.history
    ]


def test_history_round_trips_through_the_file_and_the_journal_unchanged(
    finished: jorb.Run,
) -> None:
    # ``finished`` built its histories live, from the records it journaled.
    assert finished.path is not None
    text = finished.path.read_bytes()
    loaded = jorb.Run.load(finished.path)
    for ident, job in finished.jobs.items():
        assert all(type(step) is jorb.Step for step in loaded.jobs[ident].steps())
        assert loaded.jobs[ident].history == job.history
    doc = json.loads(text)
    assert [raw.get("history", []) for raw in doc["jobs"]] == [
        [dict(step) for step in job.steps()] for job in loaded.jobs.values()
    ]
    assert jorb.checkpoint.encode_run(loaded) == text  # written back byte for byte


def test_a_file_with_every_field_written_out_loads_the_same(finished: jorb.Run) -> None:
    assert finished.path is not None
    slim = finished.path.read_bytes()
    doc = json.loads(slim)
    assert all("parent" not in raw for raw in doc["jobs"] if raw["ctx"].get("n") is not None)
    doc["jobs"] = [{**JOB_DEFAULTS, **raw} for raw in doc["jobs"]]  # as older jorbs wrote it
    finished.path.write_text(json.dumps(doc, indent=2))
    full = jorb.Run.load(finished.path)
    assert [job_dict(job) for job in full.jobs.values()] == [
        job_dict(job) for job in finished.jobs.values()
    ]
    finished.close()
    full.save()
    assert finished.path.read_bytes() == slim


def test_loaded_jobs_share_their_state_names(finished: jorb.Run) -> None:
    assert finished.path is not None
    loaded = jorb.Run.load(finished.path)
    done = [job for job in loaded.jobs.values() if job.state == "done"]
    assert len(done) == 17
    assert all(job.state is done[0].state for job in done)
    targets = [step["to"] for job in done for step in job.steps() if step["to"] == "done"]
    assert all(name is done[0].state for name in targets)
