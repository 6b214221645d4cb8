"""Fan-in: a job in a join state waits for every child it kicked, then sees how each one ended.

In-process tests pin the semantics (failed children, grandchildren, no children, no slot held,
waiting across a restart); subprocess tests run examples/mapreduce.py for real and kill it with
SIGKILL while its children run.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DONE, MakeRun, process
from scripts_steer.harness import ROOT, STUCK, Script

import jorb

Ctx = dict[str, Any]


def _drive(processor: jorb.Processor, run: jorb.Run) -> None:
    """``aexec`` on the virtual clock; a run still stuck after a virtual hour fails the test."""
    jorb.testing.run(asyncio.wait_for(processor.aexec(run), 3600))


sys.path.insert(0, str(ROOT / "examples"))
import mapreduce  # noqa: E402 - the example under test


@pytest.fixture
def scripts() -> Iterator[list[Script]]:
    """Scripts a test starts; any still running at the end is killed."""
    started: list[Script] = []
    yield started
    for script in started:
        script.stop()


def _kick_squares(n: int) -> Any:
    def split(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        return ctx, "sum", [jorb.Kick("square", {"x": x}) for x in range(n)]

    return split


# -- the join exec and what it sees -------------------------------------------------------------


def test_a_parent_sums_its_hundred_children_once_all_have_ended(make_run: MakeRun) -> None:
    ended: list[str] = []  # child ids, in the order their execs returned
    seen: list[list[jorb.Child]] = []

    async def square(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        await asyncio.sleep(random.uniform(0, 0.002))
        ctx["y"] = ctx["x"] ** 2
        return ctx, "squared"

    def total(app: Any, overall: Ctx, ctx: Ctx, children: list[jorb.Child]) -> Any:
        seen.append(children)
        ctx["ended_before"] = len(ended)
        ctx["sum"] = sum(child.ctx["y"] for child in children)
        return ctx, "done"

    async def logged_square(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        result = await square(app, overall, ctx)
        ended.append(str(ctx["x"]))
        return result

    states = [
        jorb.State("split", exec=_kick_squares(100)),
        jorb.State("square", exec=logged_square, concurrency=8),
        jorb.State("sum", exec=total, join=True),
        jorb.State("squared", terminal=True),
        DONE,
    ]
    run = make_run([{}], state="split")

    process(states, run)

    parent = run.jobs["1"]
    assert parent.state == "done"
    assert parent.ctx["sum"] == sum(x * x for x in range(100))
    assert parent.ctx["ended_before"] == 100  # the join exec ran after every child returned
    assert len(seen) == 1  # and exactly once
    children = seen[0]
    assert [child.id for child in children] == [job.id for job in run.children("1")]
    assert sorted(child.ctx["x"] for child in children) == list(range(100))
    assert {child.state for child in children} == {"squared"}
    assert all(isinstance(child, jorb.Child) for child in children)
    # In the file: the parent left "sum" no earlier than the last child reached its end.
    last_child = max(job.steps()[-1]["time"] for job in run.children("1"))
    assert parent.steps()[-1]["from"] == "sum"
    assert parent.steps()[-1]["time"] >= last_child
    assert run.counts() == {"done": 1, "squared": 100}


def test_a_parent_sees_its_failed_children_and_decides(make_run: MakeRun) -> None:
    def fetch(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        if ctx["page"] in (2, 4):
            raise ConnectionError(f"page {ctx['page']}: server closed the connection")
        if ctx["page"] == 3:
            return ctx, "skipped"  # an outcome that is not an error: routed, not raised
        ctx["rows"] = 10
        return ctx, "fetched"

    def split(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        return ctx, "merge", [jorb.Kick("fetch", {"page": page}) for page in range(5)]

    def merge(app: Any, overall: Ctx, ctx: Ctx, children: list[jorb.Child]) -> Any:
        ctx["ended"] = {str(child.ctx["page"]): child.state for child in children}
        ctx["rows"] = sum(child.ctx.get("rows", 0) for child in children)
        failed = [child.id for child in children if child.state == "failed"]
        ctx["failed"] = failed
        return ctx, "partial" if failed else "done"

    states = [
        jorb.State("split", exec=split),
        jorb.State("fetch", exec=fetch, concurrency=3, retries=1, backoff=0),
        jorb.State("merge", exec=merge, join=True),
        jorb.State("fetched", terminal=True),
        jorb.State("skipped", terminal=True),
        jorb.State("partial", terminal=True),
        DONE,
        jorb.State("failed", terminal=True),
    ]
    run = make_run([{}], state="split")

    process(states, run)

    parent = run.jobs["1"]
    assert parent.state == "partial"
    assert parent.ctx["ended"] == {
        "0": "fetched",
        "1": "fetched",
        "2": "failed",
        "3": "skipped",
        "4": "failed",
    }
    assert parent.ctx["rows"] == 20
    by_page = {job.ctx["page"]: job for job in run.children("1")}
    assert sorted(parent.ctx["failed"]) == sorted([by_page[2].id, by_page[4].id])
    # The failed children keep their errors: both attempts, with the message.
    for page in (2, 4):
        errors = by_page[page].errors["fetch"]
        assert len(errors) == 2
        assert "server closed the connection" in errors[-1]["message"]


def test_grandchildren_are_not_awaited(make_run: MakeRun) -> None:
    # The parent kicks one child; the child kicks a grandchild and ends. The parent's join exec
    # waits for the grandchild to start, and the grandchild is held until that join exec has run:
    # if the parent waited for grandchildren too, the grandchild would give up after STUCK s.
    grandchild_running = threading.Event()
    parent_joined = threading.Event()
    joined_while: list[bool] = []

    def split(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        return ctx, "sum", [jorb.Kick("child", {"level": 1})]

    def child(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        return ctx, "done", [jorb.Kick("grandchild", {"level": 2})]

    def grandchild(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        grandchild_running.set()
        if not parent_joined.wait(STUCK):
            raise AssertionError("the parent's join waited for its grandchild")
        return ctx, "done"

    def total(app: Any, overall: Ctx, ctx: Ctx, children: list[jorb.Child]) -> Any:
        joined_while.append(grandchild_running.wait(STUCK))
        ctx["children"] = [[c.ctx["level"], c.state] for c in children]
        parent_joined.set()
        return ctx, "done"

    states = [
        jorb.State("split", exec=split),
        jorb.State("child", exec=child),
        jorb.State("grandchild", exec=grandchild),
        jorb.State("sum", exec=total, join=True),
        DONE,
    ]
    run = make_run([{}], state="split")

    process(states, run)

    parent = run.jobs["1"]
    assert parent.ctx["children"] == [[1, "done"]]  # only its own child, not the grandchild
    assert joined_while == [True]  # the join ran while the grandchild was mid-exec
    assert run.counts() == {"done": 3}
    (kid,) = run.children("1")
    (grandkid,) = run.children(kid.id)
    # The grandchild finished after the grandparent's join exec had run.
    assert grandkid.steps()[-1]["time"] >= parent.steps()[-1]["time"]


def test_waiting_in_a_join_state_holds_no_slot(make_run: MakeRun) -> None:
    # "sum" has one slot. Parent A's children are held until parent B's join exec has run: if A
    # held the slot while waiting, B's join could never run and A's children would give up.
    b_summed = threading.Event()

    def split(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        return ctx, "sum", [jorb.Kick("work", {"of": ctx["name"]}) for _ in range(3)]

    def work(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        if ctx["of"] == "a" and not b_summed.wait(STUCK):
            raise AssertionError("parent a's wait blocked parent b's join")
        return ctx, "done"

    order: list[str] = []

    def total(app: Any, overall: Ctx, ctx: Ctx, children: list[jorb.Child]) -> Any:
        order.append(ctx["name"])
        if ctx["name"] == "b":
            b_summed.set()
        ctx["states"] = sorted(child.state for child in children)
        return ctx, "done"

    states = [
        jorb.State("split", exec=split, concurrency=2),
        jorb.State("work", exec=work, concurrency=6),
        jorb.State("sum", exec=total, concurrency=1, join=True),
        DONE,
    ]
    run = make_run([{"name": "a"}], state="split")
    run.add_job({"name": "b"}, state="split")

    process(states, run)

    assert order == ["b", "a"]
    assert {
        job.ctx["name"]: job.ctx["states"] for job in run.jobs.values() if job.parent is None
    } == {
        "a": ["done", "done", "done"],
        "b": ["done", "done", "done"],
    }


def test_a_join_job_without_children_runs_at_once(make_run: MakeRun) -> None:
    seen: dict[str, list[jorb.Child]] = {}

    def nothing_to_kick(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        return ctx, "sum", []

    def total(app: Any, overall: Ctx, ctx: Ctx, children: list[jorb.Child]) -> Any:
        seen[ctx["name"]] = children
        return ctx, "done"

    states = [
        jorb.State("split", exec=nothing_to_kick),
        jorb.State("sum", exec=total, join=True),
        DONE,
    ]
    run = make_run([{"name": "kicked none"}], state="split")
    run.add_job({"name": "added in sum"}, state="sum")

    process(states, run)

    assert seen == {"kicked none": [], "added in sum": []}
    assert run.counts() == {"done": 2}


def test_children_kicked_in_several_steps_are_all_awaited(make_run: MakeRun) -> None:
    def first(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        return ctx, "second", [jorb.Kick("work", {"step": 1}), jorb.Kick("work", {"step": 1})]

    def second(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        return ctx, "sum", [jorb.Kick("work", {"step": 2})]

    def work(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        return ctx, "done"

    def total(app: Any, overall: Ctx, ctx: Ctx, children: list[jorb.Child]) -> Any:
        ctx["steps"] = sorted(child.ctx["step"] for child in children)
        return ctx, "done"

    states = [
        jorb.State("first", exec=first),
        jorb.State("second", exec=second),
        jorb.State("work", exec=work),
        jorb.State("sum", exec=total, join=True),
        DONE,
    ]
    run = make_run([{}], state="first")

    process(states, run)

    assert run.jobs["1"].ctx["steps"] == [1, 1, 2]


@pytest.mark.parametrize("unfinished", [3, 0])
def test_waiting_survives_a_restart(make_run: MakeRun, tmp_path: Path, unfinished: int) -> None:
    # The file as a killed process leaves it: the parent already in its join state, some of its
    # children still to run (or none: then it joins at once).
    run = make_run(name="restart.json")
    parent = run.add_job({}, state="sum")
    for i in range(4):
        state = "work" if i < unfinished else "done"
        run.new_job(state, {"i": i, "ran": False}, parent.id, None, 0)
    run.save()
    run.close()

    ended: list[int] = []

    def work(app: Any, overall: Ctx, ctx: Ctx) -> Any:
        ctx["ran"] = True
        ended.append(ctx["i"])
        return ctx, "done"

    def total(app: Any, overall: Ctx, ctx: Ctx, children: list[jorb.Child]) -> Any:
        ctx["ended_before"] = len(ended)
        ctx["seen"] = [[child.ctx["i"], child.state] for child in children]
        return ctx, "done"

    states = [
        jorb.State("work", exec=work, concurrency=2),
        jorb.State("sum", exec=total, join=True),
        DONE,
    ]
    reopened = make_run(name="restart.json")

    process(states, reopened)

    parent = reopened.jobs[parent.id]
    assert parent.state == "done"
    assert parent.ctx["ended_before"] == unfinished
    assert parent.ctx["seen"] == [[i, "done"] for i in range(4)]
    assert sorted(ended) == list(range(unfinished))


# -- the example, run for real --------------------------------------------------------------------


def _expected(docs: int, seed: int = 7) -> tuple[int, list[int]]:
    """The total and the unreadable documents, straight from the fake store."""
    store = mapreduce.DocumentStore(seed)
    texts = {doc: store.text(doc) for doc in range(docs)}
    total = sum(len(text.split()) for text in texts.values() if text is not None)
    return total, sorted(doc for doc, text in texts.items() if text is None)


def test_the_mapreduce_example_runs(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "wc.json"
    command = [sys.executable, str(ROOT / "examples" / "mapreduce.py"), "--run", str(path)]

    first = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    again = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)

    assert first.returncode == 0, first.stderr
    assert again.returncode == 0, again.stderr
    total, missing = _expected(100)
    assert missing  # the seed makes some documents unreadable: the parent must decide
    assert f"batch 1: {total} words in {100 - len(missing)} documents (done;" in first.stdout
    assert "fetches this pass: 0" in again.stdout  # a finished run does no work again
    run = jorb.Run.load(path)
    batch = run.jobs["1"]
    assert (batch.state, batch.ctx["total"], batch.ctx["missing"]) == ("done", total, missing)
    assert run.counts() == {"done": 1, "counted": 100 - len(missing), "unreadable": len(missing)}
    assert mapreduce.DEFAULT_RUN == ROOT / "runs" / "mapreduce.json"


def test_mapreduce_survives_kill_9_while_children_run(
    tmp_path: Path, scripts: list[Script]
) -> None:
    path, effects = tmp_path / "mr.json", tmp_path / "effects.log"
    docs, hold, concurrency = 100, 40, 16
    total, missing = _expected(docs)

    # First run: documents >= 40 block once started. Kill when every slot holds one of them.
    first = Script(tmp_path, "mapreduce_kill.py", path, effects, "--hold", hold)
    scripts.append(first)
    first.until(lambda lines: sum(line.startswith("hold ") for line in lines) == concurrency)
    assert any(line.startswith("end ") for line in first.lines)  # some children had finished
    first.kill()

    at_kill = jorb.Run.load(path)  # snapshot + journal, exactly what survived the kill
    assert at_kill.jobs["1"].state == "total"  # the parent waits in its join state
    assert len(at_kill.children("1")) == docs  # every child was kicked with the parent's move
    unfinished = {job.ctx["doc"] for job in at_kill.children("1") if job.state == "count"}
    assert unfinished >= set(range(hold, hold + concurrency))  # the held ones were mid-exec
    log_at_kill = effects.read_text().splitlines()

    second = Script(tmp_path, "mapreduce_kill.py", path, effects)
    scripts.append(second)
    second.finish()

    run = jorb.Run.load(path)
    batch = run.jobs["1"]
    assert (batch.state, batch.ctx["total"], batch.ctx["missing"]) == ("done", total, missing)
    children = run.children("1")
    assert len(run.jobs) == docs + 1
    assert sorted(job.ctx["doc"] for job in children) == list(range(docs))  # each exactly once
    # Only children that had not reached disk as finished ran again after the kill.
    log = effects.read_text().splitlines()
    rerun = {int(line.split()[1]) for line in log[len(log_at_kill) :] if line.startswith("start ")}
    assert rerun <= unfinished
    assert rerun >= set(range(hold, docs))  # (the held and never started ones did run)
    # The join exec ran once, after every child's last attempt, and saw them all terminal.
    reduces = [line for line in log if line.startswith("reduce ")]
    assert reduces == [f"reduce {docs} counted,unreadable"]
    last_child_line = max(
        i for i, line in enumerate(log) if line.split()[0] in ("start", "end", "error")
    )
    assert log.index(reduces[0]) > last_child_line
    ends = Counter(int(line.split()[1]) for line in log if line.startswith("end "))
    assert set(ends) == set(range(docs)) - set(missing)


# -- fan-in and steering together ---------------------------------------------------------------


def test_redriving_a_child_back_to_work_makes_its_parent_wait_again(make_run: MakeRun) -> None:
    # A child ended in "failed" while its parent waited for the others; a redrive sends it back
    # to work, and the parent, whose other children all end meanwhile, joins only once the
    # redriven child has ended again.
    class App:
        processor: jorb.Processor
        tries: Counter[int]

    def split(app: App, overall: Ctx, ctx: Ctx) -> Any:
        return ctx, "sum", [jorb.Kick("work", {"i": i}) for i in range(3)]

    async def work(app: App, overall: Ctx, ctx: Ctx) -> Any:
        app.tries[ctx["i"]] += 1
        if ctx["i"] == 0 and app.tries[0] == 1:
            raise ValueError("first attempt fails")  # at t=0
        if ctx["i"] == 0:
            await asyncio.sleep(120)  # redriven at t=60, it ends at t=180
        if ctx["i"] == 2:
            await asyncio.sleep(120)  # the last of the others ends at t=120
        return ctx, "done"

    async def conductor(app: App, overall: Ctx, ctx: Ctx) -> Any:
        await asyncio.sleep(60)  # virtual: child 0 has failed by now, child 2 still works
        app.processor.redrive("failed", "work")
        return ctx, "done"

    def total(app: App, overall: Ctx, ctx: Ctx, children: list[jorb.Child]) -> Any:
        ctx["seen"] = [child.state for child in children]
        ctx["tries"] = sum(app.tries.values())
        return ctx, "done"

    states = [
        jorb.State("split", exec=split),
        jorb.State("work", exec=work, concurrency=3),
        jorb.State("sum", exec=total, join=True),
        jorb.State("conduct", exec=conductor),
        DONE,
        jorb.State("failed", terminal=True),
    ]
    run = make_run([{}], state="split")
    run.add_job({}, state="conduct")
    app = App()
    app.tries = Counter()
    app.processor = jorb.Processor(app, states, progress=False)

    _drive(app.processor, run)

    assert run.jobs["1"].ctx["seen"] == ["done", "done", "done"]
    assert run.jobs["1"].ctx["tries"] == 4  # joined after the redriven child's second try
    assert app.tries == {0: 2, 1: 1, 2: 1}
    child0 = next(job for job in run.children("1") if job.ctx["i"] == 0)
    assert [(h["from"], h["to"]) for h in child0.steps()] == [
        ("work", "failed"),
        ("failed", "work"),
        ("work", "done"),
    ]


def test_a_join_released_by_a_redrive_starts_after_the_redrive_is_on_disk(
    make_run: MakeRun,
) -> None:
    # The parent waits in "sum" for its children, parked in a paused state. A redrive ends
    # them, which releases the parent; its join exec depends on that (it sees the children
    # "skipped"), so the redrive must be on disk when it starts: a crash at that moment must
    # not leave the join's side effects done with the children still open on disk.
    class App:
        processor: jorb.Processor

    on_disk: list[list[str]] = []

    def split(app: App, overall: Ctx, ctx: Ctx) -> Any:
        return ctx, "sum", [jorb.Kick("slow", {"i": i}) for i in range(2)]

    async def slow(app: App, overall: Ctx, ctx: Ctx) -> Any:
        return ctx, "done"

    async def conductor(app: App, overall: Ctx, ctx: Ctx) -> Any:
        await asyncio.sleep(60)  # virtual time: the parent waits in "sum" by now
        app.processor.redrive("slow", "skipped")
        return ctx, "done"

    async def total(app: App, overall: Ctx, ctx: Ctx, children: list[jorb.Child]) -> Any:
        disk = jorb.Run.load(run.path)  # what a restart would see now
        on_disk.append([kid.state for kid in disk.children("1")])
        ctx["seen"] = [child.state for child in children]
        return ctx, "done"

    states = [
        jorb.State("split", exec=split),
        jorb.State("slow", exec=slow),
        jorb.State("sum", exec=total, join=True),
        jorb.State("conduct", exec=conductor),
        jorb.State("skipped", terminal=True),
        DONE,
    ]
    run = make_run([{}], state="split")
    run.add_job({}, state="conduct")
    app = App()
    app.processor = jorb.Processor(app, states, progress=False)
    app.processor.pause("slow")

    _drive(app.processor, run)

    assert run.jobs["1"].state == "done"
    assert run.jobs["1"].ctx["seen"] == ["skipped", "skipped"]
    assert on_disk == [["skipped", "skipped"]]  # not ["slow", "slow"]


def test_a_parent_released_but_not_started_waits_again_for_a_redriven_child(
    make_run: MakeRun,
) -> None:
    # The parent's only child fails, so the parent is released from waiting; "sum" is paused,
    # so it sits in the queue. A redrive sends the child back to work, then "sum" resumes. The
    # parent must wait again until the child has ended, not start at once and be handed a
    # child still in "work" (found by tests/test_stress.py, seed 47).
    class App:
        processor: jorb.Processor
        tries = 0

    def split(app: App, overall: Ctx, ctx: Ctx) -> Any:
        return ctx, "sum", [jorb.Kick("work", {})]

    async def work(app: App, overall: Ctx, ctx: Ctx) -> Any:
        app.tries += 1
        if app.tries == 1:
            loop = asyncio.get_running_loop()
            loop.call_later(60, app.processor.redrive, "failed", "work")
            loop.call_later(60, app.processor.resume, "sum")
            raise ValueError("first attempt fails")  # the child ends in "failed"
        await asyncio.sleep(60)  # the second attempt takes a minute (virtual)
        return ctx, "done"

    def total(app: App, overall: Ctx, ctx: Ctx, children: list[jorb.Child]) -> Any:
        ctx["seen"] = [child.state for child in children]
        return ctx, "done"

    states = [
        jorb.State("split", exec=split),
        jorb.State("work", exec=work),
        jorb.State("sum", exec=total, join=True),
        DONE,
        jorb.State("failed", terminal=True),
    ]
    run = make_run([{}], state="split")
    app = App()
    app.processor = jorb.Processor(app, states, progress=False)
    app.processor.pause("sum")

    _drive(app.processor, run)

    assert app.tries == 2
    assert run.jobs["1"].ctx["seen"] == ["done"]  # not ["work"]


def test_a_parent_joining_again_waits_for_children_it_redrove_back_to_work(
    make_run: MakeRun,
) -> None:
    # The parent's join exec sends its (ended) children back to work and returns to "sum", to
    # join them again. Its own record reaches disk before the redrive's: it must still be
    # counted as having open children then, not be queued with none and join again at once,
    # handed children still in "work".
    class App:
        processor: jorb.Processor

    joins: list[list[str]] = []

    def split(app: App, overall: Ctx, ctx: Ctx) -> Any:
        return ctx, "sum", [jorb.Kick("work", {"i": i}) for i in range(2)]

    async def work(app: App, overall: Ctx, ctx: Ctx) -> Any:
        await asyncio.sleep(60)  # virtual time
        return ctx, "done"

    def total(app: App, overall: Ctx, ctx: Ctx, children: list[jorb.Child]) -> Any:
        joins.append([child.state for child in children])
        if len(joins) == 1:
            app.processor.redrive("done", "work")  # the children run again...
            return ctx, "sum"  # ...and the parent waits for them again
        return ctx, "done"

    states = [
        jorb.State("split", exec=split),
        jorb.State("work", exec=work, concurrency=2),
        jorb.State("sum", exec=total, join=True),
        DONE,
    ]
    run = make_run([{}], state="split")
    app = App()
    app.processor = jorb.Processor(app, states, progress=False)

    _drive(app.processor, run)

    assert joins == [["done", "done"], ["done", "done"]]  # not [..., ["work", "work"]]
