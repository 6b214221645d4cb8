"""The progress display: rendering snapshots, throughput, the plain fallback, the listeners."""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from pathlib import Path

import pytest
from conftest import DONE, process
from rich.console import Console

import jorb
from jorb.progress import (
    LiveProgress,
    Meter,
    PlainProgress,
    Speed,
    make_progress,
    plain_line,
    render,
)
from jorb.status import StateStatus, Status

STATUS = Status(
    (
        StateStatus(
            "new", False, 380, waiting=372, running=8, done=620, errors=3, concurrency=8, rate=4.5
        ),
        StateStatus(
            "edit",
            False,
            12,
            delayed=10,
            running=2,
            done=608,
            failed=1,
            paused=True,
            concurrency=2,
        ),
        StateStatus("upload", False, 0, concurrency=32),
        StateStatus("done", True, 596),
        StateStatus("failed", True, 12),
    ),
    jobs=1000,
    finished=608,
    elapsed=62.0,
    transitions=1240,
)
SPEED = Speed((12.4, 9.8, 0.0, None, None), finished=9.1)


def text(renderable: object, width: int = 100) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.export_text()


def rows(screen: str) -> dict[str, list[str]]:
    """Each table row's words after the state name, bar characters left out."""
    found = {}
    for line in screen.splitlines():
        words = [w for w in line.split() if not set(w) <= set("━╸╺")]
        if words:
            found[words[0]] = words[1:]
    return found


# -- rendering ---------------------------------------------------------------------------------


def test_render_shows_a_row_per_state_in_order_with_its_numbers() -> None:
    screen = text(render(STATUS, SPEED))
    lines = screen.splitlines()
    assert lines[0] == ("jorb 608/1,000 jobs finished (61%) · 1,240 transitions · 0:01:02 elapsed")
    assert lines[1].split() == [
        "state",
        "progress",
        *["jobs", "waiting", "delayed", "running", "done", "errors", "done/s", "eta"],
    ]
    assert [line.split()[0] for line in lines[2:]] == [
        "new",
        "edit",
        "upload",
        "done",
        "failed",
        "total",
    ]
    table = rows(screen)
    # jobs waiting delayed running done errors done/s eta (380 at 12.4/s: 31 s) and notes
    assert table["new"] == ["380", "372", "0", "8/8", "620", "3", "12.4/s", "0:00:31", "≤4.5/s"]
    assert table["edit"] == ["12", "0", "10", "2/2", "608", "0", "9.8/s", "paused", "1", "failed"]
    assert table["upload"] == ["0", "0", "0", "0/32", "0", "0", "0.00/s"]
    assert table["done"] == ["596", "terminal"]
    assert table["failed"] == ["12", "terminal"]
    # totals over the non-terminal states; no eta while paused edit holds jobs
    assert table["total"] == ["1,000", "372", "10", "10", "1,228", "3", "9.1/s", "-"]
    assert all(len(line) <= 100 for line in lines)
    eta_end = lines[1].index("eta") + len("eta")  # numbers are right-aligned under their header
    assert lines[2].index("0:00:31") + len("0:00:31") == eta_end
    assert lines[5].index("terminal") + len("terminal") == eta_end


def test_render_shows_jobs_awaiting_their_children_once_there_are_some() -> None:
    split = StateStatus("split", False, 3, running=1, awaiting=2, done=3, concurrency=4)
    status = Status((split, StateStatus("done", True, 30)), 33, 30, 10.0, 33)
    header, row, *_ = text(render(status)).splitlines()[1:]
    columns = ["jobs", "waiting", "delayed", "awaiting", "running", "done", "errors"]
    assert header.split()[2:9] == columns
    assert row.split()[2:9] == ["3", "0", "0", "2", "1/4", "3", "0"]
    assert "1 running 3 done" in plain_line(status)
    assert "2 awaiting children" in plain_line(status)


def test_render_bars_show_each_states_share() -> None:
    header, *lines = text(render(STATUS, SPEED), width=100).splitlines()[1:]
    # the bar column, then a space, then the jobs column ("1,000" wide, "jobs" right-aligned)
    width = header.index("jobs") - len(" ,") - header.index("progress")
    assert 10 <= width <= 40
    bars: dict[str, int] = {}
    for line in lines:
        name, rest = line.split(maxsplit=1)
        bars[name] = len(rest) - len(rest.lstrip("━╸╺"))  # no colour: the rest of a bar is blank
    # new: 620 done of 1,000 passed through; edit: 608 of 620; upload: nothing yet
    assert bars["new"] == pytest.approx(width * 0.62, abs=1)
    assert bars["edit"] == pytest.approx(width * 608 / 620, abs=1)
    assert bars["upload"] == 0
    assert bars["done"] == pytest.approx(width * 0.596, abs=1)
    assert bars["total"] == pytest.approx(width * 0.608, abs=1)


def test_render_narrow_terminal_keeps_the_numbers_and_drops_the_notes() -> None:
    screen = text(render(STATUS, SPEED), width=80)
    assert all(len(line) <= 80 for line in screen.splitlines())
    table = rows(screen)
    assert table["new"] == ["380", "372", "0", "8/8", "620", "3", "12.4/s", "0:00:31"]
    assert table["edit"][-1] == "paused"  # the pause is never cut
    assert "≤4.5/s" not in screen
    # a little wider: the notes come back, cut short
    table = rows(text(render(STATUS, SPEED), width=93))
    assert table["new"][-2:] == ["0:00:31", "≤4.5/s"]
    assert table["edit"][-3:] == ["paused", "1", "fai…"]


def test_an_80_column_terminal_shows_a_big_run_without_cutting_a_number() -> None:
    # Long state names and six-figure counts: the least needed columns make way, whole.
    names = ["clone_repository", "apply_codemod", "run_the_linters", "commit_changes"]
    lanes = tuple(
        StateStatus(
            name,
            False,
            123_456,
            waiting=120_000,
            running=64,
            done=876_544,
            errors=12_345,
            concurrency=64,
        )
        for name in names
    )
    ended = tuple(
        StateStatus(name, True, 250_000) for name in ("done", "clone_failed", "lint_failed")
    )
    status = Status((*lanes, *ended), 1_250_000, 750_000, 5_025.0, 3_506_176)
    speed = Speed((41.5, 40.2, 39.8, 40.0, None, None, None), finished=40.1)
    screen = text(render(status, speed), width=80)
    lines = screen.splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in lines[0]
    table = rows(screen)
    head = lines[1].split()
    assert "eta" in head and "running" in head and "errors" in head and "delayed" not in head
    for name in names:  # a name cut to fit still leads its row, its numbers whole
        row = next(words for first, words in table.items() if name.startswith(first.rstrip("…")))
        assert row[-1].count(":") == 2 and "64/64" in row and "12,345" in row
    assert table["done"][-1] == "terminal"
    finished = Status(status.states, 1_250_000, 1_250_000, 5_025.0, 3_506_176)
    assert text(render(finished, speed), width=60).splitlines()[0].endswith("· complete")


def test_render_before_throughput_is_known_and_when_complete() -> None:
    table = rows(text(render(STATUS)))
    assert table["new"] == ["380", "372", "0", "8/8", "620", "3", "-", "≤4.5/s"]
    assert table["total"][-1] == "-"
    new = StateStatus("new", False, 0, done=5, concurrency=2)
    done = Status((new, StateStatus("done", True, 5)), 5, 5, 1, 5)
    screen = text(render(done, Speed((2.0, None), 2.0)))
    assert screen.splitlines()[0].endswith(
        "5/5 jobs finished (100%) · 5 transitions · 0:00:01 elapsed · complete"
    )
    assert rows(screen)["new"] == ["0", "0", "0", "0/2", "5", "0", "2.0/s"]  # nothing left: no eta


def test_the_runs_eta_waits_for_the_slowest_state() -> None:
    def eta(status: Status, speed: Speed) -> str:
        return rows(text(render(status, speed)))["total"][-1]

    new = StateStatus("new", False, 100, waiting=100, done=50, concurrency=4)
    slow = StateStatus("slow", False, 300, waiting=300, done=10, concurrency=1)
    status = Status((new, slow, StateStatus("done", True, 600)), 1000, 600, 60.0, 660)
    # 400 unfinished at 10 finished/s: 40 s; but slow holds 300 at 1/s: 300 s
    assert eta(status, Speed((10.0, 1.0, None), 10.0)) == "0:05:00"
    assert eta(status, Speed((10.0, 5.0, None), 10.0)) == "0:01:00"
    assert eta(status, Speed((10.0, 20.0, None), 10.0)) == "0:00:40"
    assert eta(status, Speed((10.0, 0.0, None), 10.0)) == "0:00:40"  # slow not measured yet
    assert eta(status, Speed((10.0, 0.0, None), 0.0)) == "-"
    assert "eta 0:05:00 |" in plain_line(status, Speed((10.0, 1.0, None), 10.0))


def test_plain_line_reads_as_one_log_line() -> None:
    assert plain_line(STATUS, SPEED) == (
        "jorb [0:01:02] 608/1,000 finished, 9.1/s, eta -"
        " | new 372 waiting 8 running 620 done 3 errors 12.4/s"
        " | edit PAUSED 0 waiting 10 delayed 2 running 608 done 1 gave up 9.8/s"
        " | upload 0 waiting 0 running 0 done"
        " | done 596 | failed 12"
    )


# -- throughput --------------------------------------------------------------------------------


def snapshot(elapsed: float, done: int, finished: int) -> Status:
    rows_ = (
        StateStatus("new", False, 100 - done, waiting=100 - done, done=done, concurrency=1),
        StateStatus("done", True, finished),
    )
    return Status(rows_, 100, finished, elapsed, done)


def test_meter_measures_over_a_sliding_window() -> None:
    meter = Meter(window=10.0)
    assert meter.add(snapshot(0.0, 0, 0)) == Speed((None, None), None)
    assert meter.add(snapshot(0.5, 1, 1)).finished is None  # under a second: not yet
    assert meter.add(snapshot(2.0, 8, 8)) == Speed((4.0, 0.0), 4.0)
    # 2 per second for a long while: the fast start slides out of the window
    speed = Speed((None, None), None)
    for second in range(3, 30):
        speed = meter.add(snapshot(float(second), 8 + 2 * (second - 2), 8 + 2 * (second - 2)))
    assert speed.done == (pytest.approx(2.0), 0.0)
    assert speed.finished == pytest.approx(2.0)


def test_meter_starts_again_when_the_clock_goes_back() -> None:
    meter = Meter()
    meter.add(snapshot(0.0, 0, 0))
    meter.add(snapshot(5.0, 50, 50))
    assert meter.add(snapshot(0.0, 0, 0)) == Speed((None, None), None)


# -- the listeners -------------------------------------------------------------------------------


def test_make_progress_picks_bars_on_a_terminal_and_lines_elsewhere() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(make_progress(terminal), LiveProgress)
    assert isinstance(make_progress(Console(file=io.StringIO())), PlainProgress)


def test_plain_progress_writes_at_start_every_few_seconds_and_at_the_end() -> None:
    out = io.StringIO()
    listener = PlainProgress(out, every=5.0)
    listener.start(snapshot(0.0, 0, 0))
    for tenth in range(1, 120):  # 12 s of updates, five a second
        listener.update(snapshot(tenth / 10, tenth // 2, tenth // 2))
    listener.note("state 'new' is paused")
    listener.stop(snapshot(12.0, 60, 60))
    lines = out.getvalue().splitlines()
    assert [line.split("]")[0] for line in lines] == [
        "jorb [0:00:00",
        "jorb [0:00:05",
        "jorb [0:00:10",
        "jorb: state 'new' is paused",
        "jorb [0:00:12",
    ]
    assert lines[-1] == (
        "jorb [0:00:12] 60/100 finished, 5.0/s, eta 0:00:08"
        " | new 40 waiting 0 running 60 done 5.0/s | done 60"
    )


def test_plain_progress_of_a_run_with_nothing_to_do_says_so_once() -> None:
    out = io.StringIO()
    listener = PlainProgress(out, every=5.0)
    listener.start(snapshot(0.0, 100, 100))
    listener.stop(snapshot(0.0, 100, 100))
    assert out.getvalue().splitlines() == [plain_line(snapshot(0.0, 100, 100), None)]


def test_live_progress_draws_frames_and_leaves_the_last_one() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system=None, width=100)
    listener = make_progress(console, refresh_per_second=50)
    listener.start(snapshot(0.0, 0, 0))
    listener.update(snapshot(1.0, 10, 10))
    listener.note("state 'new' is paused")
    listener.stop(snapshot(2.0, 20, 20))
    screen = out.getvalue()
    assert "jorb: state 'new' is paused" in screen
    last = screen[screen.rindex("jorb 20/100") :]
    assert rows(last)["new"] == ["80", "80", "0", "0/1", "20", "0", "10.0/s", "0:00:08"]
    assert rows(last)["total"][-2:] == ["10.0/s", "0:00:08"]


def test_redirect_logging_points_handlers_at_the_display_and_back() -> None:
    from jorb.progress import _redirect_logging

    original, display = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(original)
    file_handler = logging.FileHandler("/dev/null", delay=True)
    logger = logging.getLogger("jorb-test-redirect")
    logger.addHandler(handler)
    logger.addHandler(file_handler)
    try:
        restore = _redirect_logging({original: display})
        logger.warning("during")
        for moved, stream in restore:
            moved.setStream(stream)
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
        logger.removeHandler(file_handler)
    assert display.getvalue() == "during\n"
    assert original.getvalue() == "after\n"
    assert [moved for moved, _ in restore] == [handler]


def test_processor_feeds_a_progress_listener_to_the_end(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system=None, width=100)

    def step(app: object, overall: object, ctx: dict[str, int]) -> tuple[dict[str, int], str]:
        if ctx["n"] == 3:
            raise ValueError("three is bad")
        return ctx, "done"

    run = jorb.Run.open(tmp_path / "run.json")
    for n in range(5):
        run.add_job({"n": n})
    try:
        states = [jorb.State("new", exec=step, concurrency=2), DONE]
        process(states, run, listeners=[make_progress(console)])
    finally:
        run.close()
    screen = out.getvalue()
    last = rows(screen[screen.rindex("jorb 5/5") :])
    assert last["new"][:6] == ["0", "0", "0", "0/2", "4", "1"]
    assert last["done"] == ["4", "terminal"]
    assert last["failed"] == ["1", "terminal"]
    assert "complete" in screen


def test_listeners_start_with_the_run_as_loaded(tmp_path: Path) -> None:
    """StatusListener.start: "``status`` is the run as loaded" (the first plain line, too)."""
    seen: list[Status] = []

    class Recorder:
        def start(self, status: Status) -> None:
            seen.append(status)

        def update(self, status: Status) -> None:
            pass

        def note(self, message: str) -> None:
            pass

        def stop(self, status: Status) -> None:
            seen.append(status)

    run = jorb.Run.open(tmp_path / "run.json")
    for n in range(5):
        run.add_job({"n": n})
    states = [jorb.State("new", exec=lambda app, overall, ctx: (ctx, "done")), DONE]
    process(states, run, listeners=[Recorder()])
    assert [(s.jobs, s.finished) for s in seen] == [(5, 0), (5, 5)]
    assert seen[0].states[0].waiting == 5


def test_a_48_column_terminal_still_shows_paused_and_terminal() -> None:
    # The numbers and markers need 43 columns here: the bars shrink to the 5 left rather than
    # let the last column ("paused", "terminal") be cut off every row.
    screen = text(render(STATUS, SPEED), width=48)
    assert all(len(line) <= 48 for line in screen.splitlines())
    table = rows(screen)
    assert table["edit"][-1] == "paused"
    assert table["done"][-1] == table["failed"][-1] == "terminal"


def test_a_server_pause_shows_in_the_table_and_the_plain_line() -> None:
    until = time.mktime((2026, 12, 6, 12, 0, 31, 0, 0, -1))
    paused = dataclasses.replace(STATUS.states[0], paused_until=until)
    status = dataclasses.replace(STATUS, states=(paused, *STATUS.states[1:]))

    table = rows(text(render(status, SPEED), width=140))
    line = plain_line(status, SPEED)

    assert table["new"][-7:] == ["paused", "by", "the", "server", "until", "12:00:31", "≤4.5/s"]
    assert " | new paused by the server until 12:00:31 372 waiting" in line


# -- the findings of issue 17 --------------------------------------------------------------------


def test_a_state_worked_off_long_ago_shows_its_average_not_0_per_second() -> None:
    status = Status(
        (
            StateStatus("fetch", False, 0, done=6000, concurrency=8),
            StateStatus("parse", False, 40, waiting=40, done=5960, concurrency=8),
            StateStatus("done", True, 5960),
        ),
        6000,
        5960,
        120.0,
        11960,
    )
    table = rows(text(render(status, Speed((0.0, 50.0, None), 50.0))))
    assert table["fetch"][-1] == "50.0/s"  # 6,000 in 120 s; the last 30 s saw none
    assert table["parse"][-2:] == ["50.0/s", "0:00:01"]  # still working: the window's rate


def tall(states: int) -> Status:
    rows_ = [
        StateStatus(f"s{i}", False, 10, waiting=10, done=5, concurrency=1) for i in range(states)
    ]
    rows_ += [StateStatus("ok", True, 50), StateStatus("empty", True, 0)]
    return Status(tuple(rows_), 50 + 10 * states, 50, 10.0, 60)


def on_terminal(renderable: object, width: int, height: int) -> list[str]:
    console = Console(
        width=width, height=height, record=True, file=io.StringIO(), color_system=None
    )
    console.print(renderable)
    return console.export_text().splitlines()


def test_a_short_terminal_leaves_out_states_never_the_total() -> None:
    status = tall(8)  # 10 state rows + summary, header and total: 13 lines
    lines = on_terminal(render(status, fit=True), 100, 10)
    assert len(lines) == 10
    assert rows(lines[-1])["total"][0] == "130"
    assert lines[-2].split()[:3] == ["…", "4", "more"]
    # The terminal states went first (the empty one before the other), then the last states.
    assert [line.split()[0] for line in lines[2:-2]] == ["s0", "s1", "s2", "s3", "s4", "s5"]
    # Tall enough: every row, and no "more" line; not fitted (the last frame): every row.
    assert len(on_terminal(render(status, fit=True), 100, 13)) == 13
    assert len(on_terminal(render(status), 100, 10)) == 13


def test_a_state_named_total_is_not_mistaken_for_the_total_row() -> None:
    status = Status(
        (
            StateStatus("map", False, 0, done=100),
            StateStatus("total", False, 1, awaiting=1, concurrency=1),
            StateStatus("done", True, 100),
        ),
        101,
        100,
        5.0,
        100,
    )
    lines = text(render(status)).splitlines()
    names = [line.split()[0] for line in lines[2:]]
    assert names == ["map", "total", "done", "(total)"]
    assert rows(lines[-1])["(total)"][0] == "101"


def test_a_join_waiting_on_a_paused_state_shows_no_eta() -> None:
    def join_eta(paused: bool) -> str:
        status = Status(
            (
                StateStatus("split", False, 0, done=1),
                StateStatus("count", False, 50, waiting=50, done=50, paused=paused),
                StateStatus("total", False, 1, awaiting=1, concurrency=1),
                StateStatus("done", True, 50),
            ),
            101,
            50,
            10.0,
            51,
        )
        return rows(text(render(status, Speed((0.1, 5.0, 0.1, None), 5.0))))["total"][-1]

    assert join_eta(paused=False) == "0:00:10"  # 1 job at 0.1/s
    assert join_eta(paused=True) == "-"


def test_the_plain_line_counts_the_jobs_each_state_gave_up_on() -> None:
    status = Status(
        (
            StateStatus("push", False, 5, waiting=5, done=40, failed=3, concurrency=4),
            StateStatus("done", True, 40),
        ),
        48,
        40,
        10.0,
        43,
    )
    assert "push 5 waiting 0 running 40 done 3 gave up" in plain_line(status)


def test_a_narrowed_window_has_the_whole_old_frame_erased() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system=None, width=100, height=40)
    listener = LiveProgress(console, refresh_per_second=0.01)  # (frames drawn here by hand)
    listener.start(STATUS)
    wide = out.getvalue()
    frame = wide[wide.rindex("jorb 608") :].split("\n")
    assert max(len(line.rstrip()) for line in frame) > 50
    console.width = 40  # the user drags the window narrower; the old lines now wrap
    listener.note("narrower")
    listener.stop(STATUS)
    moves = out.getvalue()[len(wide) :].split("jorb: narrower")[0]
    # The cursor goes up over every row the old lines now take, not one per line.
    rows_now = sum(-(-len(line.rstrip()) // 40) or 1 for line in frame)
    assert moves.count("\x1b[1A") == rows_now - 1 > len(frame) - 1


def test_a_watchers_rows_show_what_they_cannot_know_as_a_dash() -> None:
    # jorb watch's rows have no concurrency: it cannot tell which jobs are running.
    status = Status(
        (StateStatus("new", False, 5, waiting=5, done=3), StateStatus("done", True, 3)),
        8,
        3,
        2.0,
        3,
    )
    table = rows(text(render(status)))
    assert table["new"][:5] == ["5", "5", "0", "-", "3"]
    assert table["total"][:5] == ["8", "5", "0", "-", "3"]
    assert "running" not in plain_line(status)
