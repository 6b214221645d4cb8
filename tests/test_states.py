"""Declarations: what is rejected before any work starts, and how the message names it."""

from __future__ import annotations

import dataclasses
import enum
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import DONE, MakeRun, process

import jorb


def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
    return ctx, "done"


BAD_DECLARATIONS: dict[str, tuple[list[jorb.State], list[str]]] = {
    "duplicate": (
        [jorb.State("fetch", exec=work), jorb.State("fetch", exec=work), DONE],
        ["'fetch'", "twice"],
    ),
    "concurrency-0": (
        [jorb.State("fetch", exec=work, concurrency=0), DONE],
        ["'fetch'", "concurrency"],
    ),
    "concurrency-negative": (
        [jorb.State("fetch", exec=work, concurrency=-3), DONE],
        ["'fetch'", "concurrency", "-3"],
    ),
    "on-error-undeclared": (
        [jorb.State("fetch", exec=work, on_error="quarantine"), DONE],
        ["'fetch'", "'quarantine'"],
    ),
    "terminal-with-exec": (
        [jorb.State("fetch", exec=work), jorb.State("done", exec=work, terminal=True)],
        ["'done'", "exec"],
    ),
    "non-terminal-without-exec": (
        [jorb.State("fetch", exec=work), jorb.State("review"), DONE],
        ["'review'", "exec"],
    ),
    "timeout-0": (
        [jorb.State("fetch", exec=work, timeout=0), DONE],
        ["'fetch'", "timeout"],
    ),
    "timeout-negative": (
        [jorb.State("fetch", exec=work, timeout=-1.5), DONE],
        ["'fetch'", "timeout"],
    ),
    "timeout-on-terminal": (
        [jorb.State("fetch", exec=work), jorb.State("done", terminal=True, timeout=5.0)],
        ["'done'", "timeout"],
    ),
    "retries-negative": (
        [jorb.State("fetch", exec=work, retries=-1), DONE],
        ["'fetch'", "retries"],
    ),
    "rate-not-a-rate": (
        [jorb.State("fetch", exec=work, rate=5), DONE],  # type: ignore[arg-type]
        ["'fetch'", "rate"],
    ),
    "error-state-not-terminal": (
        [jorb.State("fetch", exec=work), jorb.State("failed", exec=work), DONE],
        ["'failed'", "terminal"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_DECLARATIONS))
def test_bad_declarations_raise_state_error_naming_the_culprit(case: str) -> None:
    states, fragments = BAD_DECLARATIONS[case]
    with pytest.raises(jorb.StateError) as raised:
        jorb.Processor(None, states, progress=False)
    assert isinstance(raised.value, jorb.JorbError)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_every_culprit_is_named_at_once() -> None:
    states = [
        jorb.State("a", exec=work, concurrency=0),
        jorb.State("b", exec=work, on_error="nowhere"),
        jorb.State("c"),
        jorb.State("d", exec=work),
        jorb.State("d", exec=work),
        DONE,
    ]
    with pytest.raises(jorb.StateError) as raised:
        jorb.Processor(None, states, progress=False)
    message = str(raised.value)
    for name in ("'a'", "'b'", "'nowhere'", "'c'", "'d'"):
        assert name in message


def test_a_duplicated_state_still_has_its_own_problems_reported() -> None:
    # The first "b" routes errors nowhere; the second "b" must not hide that.
    states = [
        jorb.State("b", exec=work, on_error="nowhere"),
        jorb.State("b", exec=work),
        DONE,
    ]
    with pytest.raises(jorb.StateError) as raised:
        jorb.Processor(None, states, progress=False)
    assert "twice" in str(raised.value)
    assert "'nowhere'" in str(raised.value)


def test_good_declarations_are_accepted_and_the_error_state_is_implicit() -> None:
    processor = jorb.Processor(None, [jorb.State("fetch", exec=work), DONE], progress=False)
    assert list(processor.states) == ["fetch", "done", "failed", "cancelled"]
    assert processor.states["failed"].terminal
    custom = jorb.Processor(
        None, [jorb.State("fetch", exec=work), DONE], error_state="dead", progress=False
    )
    assert "dead" in custom.states and custom.states["dead"].terminal


class Name(enum.StrEnum):
    """State names kept as a str enum, as some scripts keep their constants."""

    FETCH = "fetch"
    SPLIT = "split"
    PART = "part"
    WAIT = "wait"
    BAD = "bad"
    DONE = "done"
    DEAD = "dead"


def test_states_named_by_a_str_enum_run_and_their_jobs_hold_plain_names(
    make_run: MakeRun,
) -> None:
    # A name that is a str (a subclass of it included) is a valid declaration: the run goes
    # through, and its jobs hold plain str names, as jobs loaded from the file do.
    run = make_run([{"n": i} for i in range(3)], "fetch")
    states = [jorb.State(Name.FETCH, exec=work), jorb.State(Name.DONE, terminal=True)]

    process(states, run)

    assert run.counts() == {"done": 3}
    for job in run.jobs.values():
        assert type(job.state) is str
        assert [(type(a), type(b)) for a, b, *_ in job.history] == [(str, str)]
    assert jorb.Run.load(run.path or Path()).counts() == {"done": 3}


def test_an_enum_member_names_a_state_wherever_a_script_gives_one(make_run: MakeRun) -> None:
    # Returned as the next state, in a Next, in a Kick, as on_error and as the error state: the
    # member is its state, and every job and history entry holds the plain str.
    def split(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        if ctx["n"] == 0:
            raise RuntimeError("boom")  # retries used up: on_error
        if ctx["n"] == 1:
            return ctx, Name.WAIT, [jorb.Kick(Name.PART, {"part": 1})]
        return ctx, jorb.Next(Name.DONE)

    def part(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        raise RuntimeError("no retries, no on_error: the processor's error state")

    def wait(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        return ctx, Name.DONE

    run = make_run()
    run.add_job({"n": 0}, Name.SPLIT)
    run.add_jobs([{"n": 1}, {"n": 2}], Name.SPLIT)
    states = [
        jorb.State(Name.SPLIT, exec=split, on_error=Name.BAD),
        jorb.State(Name.PART, exec=part),
        jorb.State(Name.WAIT, exec=wait),
        jorb.State(Name.BAD, terminal=True),
        jorb.State(Name.DONE, terminal=True),
        jorb.State(Name.DEAD, terminal=True),
    ]

    process(states, run, error_state=Name.DEAD)

    assert run.counts() == {"bad": 1, "done": 2, "dead": 1}
    for job in run.jobs.values():
        assert type(job.state) is str
        assert all(type(a) is str and type(b) is str for a, b, *_ in job.history)
    assert jorb.Run.load(run.path or Path()).counts() == {"bad": 1, "done": 2, "dead": 1}

    # And to steer from Python: the move is made, and recorded with plain names.
    processor = jorb.Processor(None, states, progress=False, error_state=Name.DEAD)
    processor.redrive(Name.DEAD, Name.DONE)
    processor.exec(run)
    assert run.counts() == {"bad": 1, "done": 3}
    (moved,) = [job for job in run.jobs.values() if job.parent is not None]  # the kicked part
    assert [entry[:2] for entry in moved.history] == [("part", "dead"), ("dead", "done")]
    assert all(type(a) is str and type(b) is str for a, b, *_ in moved.history)


def test_jobs_in_undeclared_states_stop_exec_and_leave_the_file_alone(
    make_run: MakeRun, tmp_path: Path
) -> None:
    ran: list[str] = []

    def fetch(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        ran.append(ctx["n"])
        return ctx, "done"

    run = make_run([{"n": 1}, {"n": 2}], state="fetch")
    run.add_job({"n": 3}, state="ghost")
    run.add_job({"n": 4}, state="spook")
    run.add_job({"n": 5}, state="ghost")
    run.save()
    path = tmp_path / "run.json"
    before = path.read_bytes()

    with pytest.raises(jorb.StateError) as raised:
        process([jorb.State("fetch", exec=fetch), DONE], run)

    message = str(raised.value)
    for fragment in ("'ghost'", "'spook'", "run.json"):
        assert fragment in message
    for ident in ("3", "4", "5"):  # the jobs, by id
        assert re.search(rf"\b{ident}\b", message.replace(str(tmp_path), "")), ident
    assert "'fetch'" not in message
    assert ran == []  # no work started
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "run.json"
    ]


def test_a_loaded_run_with_undeclared_states_is_refused_too(
    make_run: MakeRun, tmp_path: Path
) -> None:
    run = make_run([{"n": 1}], state="old_name")
    run.save()
    run.close()
    path = tmp_path / "run.json"
    before = path.read_bytes()

    loaded = jorb.Run.load(path)
    with pytest.raises(jorb.StateError, match="old_name"):
        process([jorb.State("new_name", exec=work), DONE], loaded)
    loaded.close()
    assert path.read_bytes() == before


# -- State and Rate values --------------------------------------------------------------------


def test_a_state_is_a_frozen_value() -> None:
    state = jorb.State("fetch", exec=work, concurrency=4, retries=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.concurrency = 8  # type: ignore[misc]
    assert (state.concurrency, state.retries, state.on_error, state.terminal) == (4, 2, None, False)
    assert jorb.State("fetch", exec=work, concurrency=4, retries=2) == state


@pytest.mark.parametrize(
    ("args", "fragment"),
    [((0,), "n"), ((-2,), "n"), ((5, 0), "per"), ((5, -1.0), "per")],
)
def test_a_rate_rejects_non_positive_numbers(args: tuple[float, ...], fragment: str) -> None:
    with pytest.raises(jorb.JorbError, match=fragment):
        jorb.Rate(*args)


def test_a_rate_keeps_its_configuration() -> None:
    rate = jorb.Rate(5, per=2.0)
    assert (rate.n, rate.per) == (5, 2.0)
    assert jorb.Rate(10).per == 1.0
