"""Reports over a run: built by hand in memory, so each number is known in advance."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import process

import jorb
from jorb import JorbError, Run, StateError, report
from jorb.model import Job

T0 = 1_800_000_000.0
REDRIVE = T0 + 500.0


def step(a: str, b: str, at: float, took: float) -> tuple[str, str, float, float]:
    """A history entry as a job holds it."""
    return (a, b, at, took)


def error(message: str, kind: str = "ValueError", at: float = T0, attempt: int = 1) -> dict:
    return {
        "message": message,
        "type": kind,
        "traceback": f"Traceback (most recent call last):\n{kind}: {message}\n",
        "time": at,
        "attempt": attempt,
        "rate_limited": False,
    }


@pytest.fixture
def run() -> Run:
    """new -> edit -> done/failed; job 2 kicked 3 and 4; job 5 was redriven failed -> new."""
    run = Run(None)
    run.declared = [
        {"name": "new", "terminal": False},
        {"name": "edit", "terminal": False},
        {"name": "done", "terminal": True},
        {"name": "failed", "terminal": True},
    ]
    run.paused = {"edit"}
    jobs = [
        Job(
            "1",
            "done",
            {"n": 1},
            history=[step("new", "edit", T0, 1.0), step("edit", "done", T0 + 1, 2.0)],
        ),
        Job(
            "2",
            "done",
            {"n": 2},
            history=[step("new", "edit", T0, 3.0), step("edit", "done", T0 + 2, 4.0)],
        ),
        Job("3", "edit", {"f": "a"}, parent="2"),
        Job(
            "4",
            "failed",
            {"f": "b"},
            parent="2",
            history=[step("edit", "failed", T0 + 3, 0.5)],
            errors={"edit": [error("bad file b", attempt=1), error("bad file b", attempt=2)]},
        ),
        Job(
            "5",
            "new",
            {"n": 5},
            history=[
                {"from": "new", "to": "failed", "time": T0 + 4, "duration": 5.0},  # by hand
                step("failed", "new", REDRIVE, 0.0),
            ],
            errors={
                "new": [
                    error("timed out after 5s", "jorb.errors.TimedOut"),
                    error("boom", at=T0 + 9),
                ]
            },
        ),
        Job("6", "weird", {"n": 6}),
    ]
    for job in jobs:
        run.jobs[job.id] = job
    run.next_id = 7
    run.changes = [
        {
            "id": "c1",
            "what": "redrove 1 job(s) 'failed' -> 'new'",
            "time": T0 + 499,
            "applied": REDRIVE,
        }
    ]
    return run


def test_states_in_declaration_order_with_counts_marks_errors_and_timings(run: Run) -> None:
    rows = {row.name: row for row in report.states(run)}
    assert list(rows) == ["new", "edit", "done", "failed", "weird"]
    assert [(r.jobs, r.terminal, r.paused) for r in rows.values()] == [
        (1, False, False),
        (1, False, True),
        (2, True, False),
        (1, True, False),
        (1, None, False),  # in the file, but not declared at the last exec
    ]
    assert (rows["new"].errors, rows["new"].failing) == (2, 1)
    assert (rows["edit"].errors, rows["edit"].failing) == (2, 1)
    new = rows["new"].timing
    assert new is not None
    assert (new.count, new.mean, new.median, new.p95, new.total) == (3, 3.0, 3.0, 5.0, 9.0)
    edit = rows["edit"].timing
    assert edit is not None and (edit.count, edit.median, edit.p95) == (3, 2.0, 4.0)
    assert rows["done"].timing is None
    # the redrive took no time and is not a "failed" exec
    assert "failed" not in report.timings(run)


def test_completeness(run: Run) -> None:
    assert report.is_complete(run) is False
    for job in run.jobs.values():
        job.state = "done"
    assert report.is_complete(run) is True
    run.declared = []
    assert report.is_complete(run) is None  # never executed: which states are terminal?


def test_errors_per_state_most_common_first(run: Run) -> None:
    summaries = report.errors(run, top=1)
    assert [(s.state, s.errors, s.jobs, s.groups) for s in summaries] == [
        ("new", 2, 1, 2),
        ("edit", 2, 1, 1),
    ]
    assert summaries[1].common == (report.ErrorGroup("ValueError: bad file b", 2, 1, ("4",)),)
    assert report.errors(run)[0].common == (
        report.ErrorGroup("TimedOut: timed out after 5s", 1, 1, ("5",)),
        report.ErrorGroup("ValueError: boom", 1, 1, ("5",)),
    )
    assert report.last_error(run.jobs["5"]) == ("new", run.jobs["5"].errors["new"][1])
    assert report.last_error(run.jobs["1"]) is None


def test_errors_that_differ_only_in_numbers_group_together() -> None:
    run = Run(None)
    messages = [
        "repo-012 not found",
        "repo-047 not found",
        "repo-012 not found",
        "took 3.5s, limit 2s",
        "commit 3f2a9c1d0b not found",
        "commit 77ab00ee12 not found",
        "repo-x not found",
    ]
    for n, message in enumerate(messages, 1):
        run.jobs[str(n)] = Job(str(n), "failed", {}, errors={"a": [error(message, at=T0 + n)]})
    (summary,) = report.errors(run, top=5)
    assert (summary.errors, summary.jobs, summary.groups) == (7, 7, 4)
    assert summary.common == (
        report.ErrorGroup("ValueError: repo-012 not found", 3, 2, ("1", "2", "3")),
        report.ErrorGroup("ValueError: commit 3f2a9c1d0b not found", 2, 2, ("5", "6")),
        report.ErrorGroup("ValueError: took 3.5s, limit 2s", 1, 1, ("4",)),
        report.ErrorGroup("ValueError: repo-x not found", 1, 1, ("7",)),
    )


def test_graph_counts_exec_transitions_and_redrives_apart(run: Run) -> None:
    g = report.graph(run)
    assert [name for name, _, _ in g.nodes] == ["new", "edit", "done", "failed", "weird"]
    assert g.nodes[2] == ("done", True, 2)
    assert g.edges == {
        ("new", "edit"): 2,
        ("edit", "done"): 2,
        ("edit", "failed"): 1,
        ("new", "failed"): 1,
    }
    assert g.redrives == {("failed", "new"): 1}


def test_graph_as_mermaid_and_dot(run: Run) -> None:
    g = report.graph(run)
    assert report.to_mermaid(g) == (
        "flowchart LR\n"
        '    s0["new (1) · 3.00s"]\n'
        '    s1["edit (1) · 2.00s"]\n'
        '    s2(["done (2)"])\n'
        '    s3(["failed (1)"])\n'
        '    s4["weird (1)"]\n'
        "    s0 -->|2| s1\n"
        "    s0 -->|1| s3\n"
        "    s1 -->|2| s2\n"
        "    s1 -->|1| s3\n"
        '    s3 -.->|"redrive 1"| s0\n'
    )
    dot = report.to_dot(g)
    assert dot.startswith("digraph jorb {\n    rankdir=LR;\n")
    assert '    "done" [label="done (2)", shape=doublecircle];\n' in dot
    assert '    "new" [label="new (1) · 3.00s"];\n' in dot
    assert '    "new" -> "edit" [label="2"];\n' in dot
    assert '    "failed" -> "new" [label="redrive 1", style=dashed];\n' in dot
    assert dot.endswith("}\n")


def test_graph_labels_survive_odd_state_names() -> None:
    run = Run(None)
    run.declared = [{"name": 'say "hi" | bye', "terminal": False}, {"name": "ok", "terminal": True}]
    run.jobs["1"] = Job("1", "ok", {}, history=[step('say "hi" | bye', "ok", T0, 1.0)])
    g = report.graph(run)
    assert '    s0["say #quot;hi#quot; #124; bye (0) · 1.00s"]\n' in report.to_mermaid(g)
    assert '"say \\"hi\\" | bye" -> "ok"' in report.to_dot(g)


def test_find_jobs_filters(run: Run) -> None:
    assert [job.id for job in report.find_jobs(run)] == ["1", "2", "3", "4", "5", "6"]
    assert [job.id for job in report.find_jobs(run, "done")] == ["1", "2"]
    assert [job.id for job in report.find_jobs(run, errors=True)] == ["4", "5"]
    assert [job.id for job in report.find_jobs(run, "failed", errors=True)] == ["4"]
    assert report.find_jobs(run, "failed", errors=False)[0].id == "4"
    with pytest.raises(
        StateError, match=r"no state 'nope' .*states: new, edit, done, failed, weird"
    ):
        report.find_jobs(run, "nope")


def test_job_detail_with_family_and_history(run: Run) -> None:
    detail = report.job_detail(run, "2")
    assert detail.parent is None
    assert [kid.id for kid in detail.children] == ["3", "4"]
    assert report.job_detail(run, "4").parent is run.jobs["2"]
    steps = report.history(run, run.jobs["5"])
    assert [(s.source, s.target, s.duration, s.redrive) for s in steps] == [
        ("new", "failed", 5.0, False),
        ("failed", "new", 0.0, True),
    ]
    with pytest.raises(JorbError, match="no job '9'"):
        report.job_detail(run, "9")


def test_an_empty_run() -> None:
    run = Run(None)
    assert report.states(run) == []
    assert report.errors(run) == []
    assert report.is_complete(run) is True
    assert report.to_mermaid(report.graph(run)) == "flowchart LR\n"


def test_delayed_jobs_are_counted_per_state_as_of_now() -> None:
    run = Run(None)
    run.jobs = {
        "1": Job("1", "new", {}, not_before=T0 + 60),  # still delayed at T0
        "2": Job("2", "new", {}, not_before=T0 - 1),  # was delayed, due now
        "3": Job("3", "new", {}),
        "4": Job("4", "edit", {}, not_before=T0 + 5),  # a retry's backoff
    }
    rows = {row.name: row for row in report.states(run, now=T0)}
    assert (rows["new"].jobs, rows["new"].delayed) == (3, 1)
    assert (rows["edit"].jobs, rows["edit"].delayed) == (1, 1)
    later = {row.name: row.delayed for row in report.states(run, now=T0 + 61)}
    assert later == {"new": 0, "edit": 0}


def test_a_hand_written_entry_of_any_shape_does_not_stop_the_report(run: Run) -> None:
    # A zero duration once made the time a set lookup: a list there raised "unhashable type".
    before = report.timings(run)["new"].count
    run.jobs["6"].history = [
        {"from": "new", "to": "weird", "time": [T0], "duration": 0},
        {"from": "weird", "to": "weird"},
    ]
    timings = report.timings(run)  # the first entry's 0 s counts for "new"; the second has none
    assert timings["new"].count == before + 1 and "weird" not in timings
    edges = report.graph(run).edges
    assert edges[("new", "weird")] == 1 and edges[("weird", "weird")] == 1
    # A state name written as a number is counted under its text, every time.
    run.jobs["6"].history = [{"from": 7, "to": "x", "time": T0, "duration": 1.0}] * 2
    run.jobs["5"].history.append(("7", "x", T0, 3.0))
    assert report.timings(run)["7"] == report.Timing(3, 5 / 3, 1.0, 3.0, 5.0)


def test_timings_count_an_entry_whose_from_is_a_list_or_an_object_under_its_text(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.json"
    run = Run(path, {})
    job = run.add_job({}, "b")
    job.history = [
        {"from": ["a"], "to": "b", "time": T0, "duration": 1.0},
        {"from": {"x": 1}, "to": "b", "time": T0, "duration": 2.0},
    ]
    run.save()
    loaded = Run.load(path)  # it loads: the entries are kept as written
    timings = report.timings(loaded)
    assert timings["['a']"].total == 1.0 and timings["{'x': 1}"].total == 2.0
    assert report.graph(loaded).edges[("['a']", "b")] == 1


# -- pictures: kicks, give-ups, time, durations ------------------------------------------------


@pytest.fixture
def fanout(tmp_path: Path) -> Run:
    """index kicks 3 fetch jobs per job and moves on to a second step; fetch of n=2 always fails
    (one retry, then failed)."""

    def index(app: object, overall: object, ctx: dict) -> tuple:
        kicks = [jorb.Kick("fetch", {"n": n}) for n in range(3)]
        return ctx, "tidy", kicks

    def fetch(app: object, overall: object, ctx: dict) -> tuple:
        if ctx["n"] == 2:
            raise LookupError(f"page {ctx['n']} not found")
        return ctx, "done"

    states = [
        jorb.State("index", exec=index),
        jorb.State("tidy", exec=lambda app, overall, ctx: (ctx, "done")),
        jorb.State("fetch", exec=fetch, retries=1, on_error="failed"),
        jorb.State("done", terminal=True),
        jorb.State("failed", terminal=True),
    ]
    run = jorb.Run.open(tmp_path / "run.json")
    for n in range(2):
        run.add_job({"page": n}, "index")
    process(states, run)
    run.close()
    return Run.load(tmp_path / "run.json")


def test_graph_has_kick_edges_give_ups_and_timings(fanout: Run) -> None:
    g = report.graph(fanout)
    assert g.kicks == {("index", "fetch"): 6}
    assert g.edges[("fetch", "failed")] == 2 and g.gave_up == {("fetch", "failed"): 2}
    assert g.error_states == {"failed"}
    assert g.timings["fetch"].count == 6  # 4 to done, 2 given up
    mermaid = report.to_mermaid(g)
    assert '    s0 ==>|"kick 6"| s2\n' in mermaid
    assert "    class s4 error\n" in mermaid
    dot = report.to_dot(g)
    assert '"index" -> "fetch" [label="kick 6", style=bold, color=blue];' in dot
    assert '"failed" [label="failed (2)", shape=doublecircle, color=red, fontcolor=red];' in dot
    doc = report.graph_document(g)
    assert {"from": "index", "to": "fetch", "count": 6, "kind": "kick"} in doc["edges"]
    failed = next(node for node in doc["nodes"] if node["name"] == "failed")
    assert failed == {
        "name": "failed",
        "terminal": True,
        "jobs": 2,
        "error_state": True,
        "timing": None,
    }


def test_a_kick_is_told_from_the_parents_later_transitions_by_the_jobs_after_it() -> None:
    run = Run(None)
    run.jobs["1"] = Job(
        "1", "done", {}, history=[step("a", "b", T0 + 1, 1), step("b", "done", T0 + 2, 1)]
    )
    # Kicked by 1's exec in a, but waited: its first exec started after 1 left b.
    run.jobs["2"] = Job("2", "done", {}, parent="1", history=[step("c", "done", T0 + 10, 1)])
    # Created after 2 (a larger id), and started before 1 left b: so 2 was born by then.
    run.jobs["3"] = Job("3", "done", {}, history=[step("c", "done", T0 + 1.8, 0.3)])
    assert report.graph(run).kicks == {("a", "c"): 1}
    del run.jobs["3"]  # without it, the best guess is 1's last transition before 2 started
    assert report.graph(run).kicks == {("b", "c"): 1}


def test_timeline_bins_every_exec_and_error_once(run: Run) -> None:
    line = report.timeline(run, bins=10)
    assert line is not None
    assert line.start == T0  # the first exec's end (the redrive at REDRIVE is not an exec)
    assert {k: sum(v) for k, v in line.done.items()} == {"new": 3, "edit": 3}
    assert {k: sum(v) for k, v in line.errors.items()} == {"new": 2, "edit": 2}
    assert line.rate_limited == {}
    assert all(len(v) == 10 for v in [*line.done.values(), *line.errors.values()])
    assert report.timeline(Run(None)) is None


def test_durations_and_slowest_execs(run: Run) -> None:
    hist = report.durations(run, bins=5)
    assert hist is not None and len(hist.edges) == 6
    assert hist.edges[0] == pytest.approx(0.5) and hist.edges[-1] == pytest.approx(5.0)
    assert {k: sum(v) for k, v in hist.counts.items()} == {"new": 3, "edit": 3}
    assert hist.counts["new"][-1] == 1  # the 5 s exec, in the last bin
    slow = report.slowest(run, top=2)
    assert [(s.job, s.source, s.duration) for s in slow] == [("5", "new", 5.0), ("2", "edit", 4.0)]
