"""Live progress: a rich table of bars per state on a terminal, plain status lines elsewhere.

``Processor(..., progress=True)`` (the default) adds ``make_progress()`` to its listeners. On a
terminal it shows one row per declared state, in declaration order, redrawn four times a
second (here 80 columns wide)::

    jorb 608/1,000 jobs finished (61%) · 1,240 transitions · 0:01:02 elapsed
    state  progress    jobs waiting delayed running  done errors done/s      eta
    new    ━━━━━━       380     372       0     8/8   620      3 12.4/s  0:00:31
    edit   ━━━━━━━━━╸    12       0      10     2/2   608      0  9.8/s   paused
    done   ━━━━━╸       596                                             terminal
    failed               12                                             terminal
    total  ━━━━━━     1,000     372      10      10 1,228      3  9.1/s  0:00:43

A state's bar is its ``done`` against ``done + jobs`` (what passed through it in this process
against what is still in it); a terminal state's bar is its share of all jobs. ``done/s`` is
measured over the last 30 seconds and ``eta`` is the jobs in the state at that pace; the total
row's rate is jobs reaching terminal states, and its eta the later of what that rate and the
slowest state predict (none while a paused state holds jobs, nor for a join's jobs then). A
state worked off long ago shows its average over the exec (dim) instead of the window's 0/s.
A wider terminal also shows each state's current rate limit and how many jobs it gave up on;
a terminal too short for every row leaves states out, never the total row (named
``(total)`` if a state is called ``total``).

Whatever the user's execs print (or log through a handler on stdout/stderr) appears above the
table without tearing it. When stdout is not a terminal (CI, ``nohup``, a pipe) it prints a
plain status line to stderr every few seconds and one at the end instead.

Everything shown comes from the processor's :class:`~jorb.Status` snapshots, which carry their
own clock (``elapsed``): throughput is measured over a sliding window of snapshots, so a test
can hand-build snapshots and render them into a fixed-width ``Console`` to compare text. This
is the only module of the core that imports rich.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from rich.cells import cell_len, set_cell_size
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.control import Control
from rich.live import Live
from rich.live_render import LiveRender
from rich.segment import ControlType, Segment
from rich.text import Span, Text

from .status import StateStatus, Status, StatusListener

__all__ = [
    "LiveProgress",
    "Meter",
    "PlainProgress",
    "Speed",
    "make_progress",
    "plain_line",
    "print_summary",
    "render",
    "summary",
]

#: Seconds of snapshots that throughput is measured over.
WINDOW = 30.0
#: Throughput is not shown until the window spans at least this many seconds.
MIN_SPAN = 1.0


def make_progress(
    console: Console | None = None,
    *,
    stream: IO[str] | None = None,
    every: float = 5.0,
    refresh_per_second: float = 4.0,
) -> StatusListener:
    """The listener ``progress=True`` adds: live bars if ``console`` (stdout) is a terminal.

    Otherwise a :class:`PlainProgress` writing a line to ``stream`` (stderr) every ``every``
    seconds.
    """
    console = console or Console()
    if console.is_terminal and not console.is_dumb_terminal:
        return LiveProgress(console, refresh_per_second=refresh_per_second)
    return PlainProgress(stream, every=every)


# -- throughput --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Speed:
    """Throughput over the sliding window, as of one snapshot."""

    done: tuple[float | None, ...]
    """Execs done per second, per state row (None until the window spans ``MIN_SPAN``)."""
    finished: float | None
    """Jobs reaching terminal states per second."""

    @classmethod
    def unknown(cls, status: Status) -> Speed:
        return cls(tuple(None for _ in status.states), None)


class Meter:
    """Turns a stream of snapshots into throughput over the last ``window`` seconds.

    ``speed = meter.add(status)``; time is the snapshots' own ``elapsed``.
    """

    __slots__ = ("_samples", "window")

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int, tuple[int, ...]]] = deque()

    def __repr__(self) -> str:
        return f"<Meter window={self.window:g}s samples={len(self._samples)}>"

    def add(self, status: Status) -> Speed:
        """Record ``status`` and return the throughput as of it."""
        sample = (status.elapsed, status.finished, tuple(row.done for row in status.states))
        samples = self._samples
        if samples and (sample[0] < samples[-1][0] or len(sample[2]) != len(samples[-1][2])):
            samples.clear()  # a new exec (the clock went back) or other states
        samples.append(sample)
        while len(samples) > 2 and sample[0] - samples[1][0] >= self.window:
            samples.popleft()
        first = samples[0]
        span = sample[0] - first[0]
        if span < MIN_SPAN:
            return Speed.unknown(status)
        done = tuple((now - then) / span for now, then in zip(sample[2], first[2], strict=True))
        return Speed(done, (sample[1] - first[1]) / span)


# -- rendering ---------------------------------------------------------------------------------

_HEADERS = ("jobs", "waiting", "delayed", "awaiting", "running", "done", "errors", "done/s", "eta")
_AWAITING = _HEADERS.index("awaiting")
#: Columns left out, in this order, when the terminal is too narrow for all of them (the bar
#: first shrinks to BAR_MIN, then long state names are cut to NAME_MIN).
_DROPPED_FIRST = tuple(_HEADERS.index(h) for h in ("delayed", "waiting", "done/s", "awaiting"))
NAME_MIN = 10
BAR_MIN, BAR_FAIR, BAR_MAX = 10, 20, 40
NAME_MAX = 24

Cell = tuple[str, str]
"""Text and its style."""


@dataclass(frozen=True, slots=True)
class _Bar:
    completed: int
    total: int
    style: str


@dataclass(frozen=True, slots=True)
class _Row:
    name: Cell
    bar: _Bar
    numbers: tuple[Cell, ...]
    """One per header in ``_HEADERS``."""
    note: tuple[Cell, ...]
    """Notes after the numbers (current rate, jobs given up on)."""


def render(status: Status, speed: Speed | None = None, *, fit: bool = False) -> RenderableType:
    """The display for one snapshot: a summary line, a row per state, then the total.

    The bars take the width the numbers leave (10 to 40 columns); notes (a state's current
    rate limit, jobs it gave up on) come last and are cut short, then left out, when the
    terminal is narrow; narrower still, the least needed columns go, long state names are cut,
    and last the bars shrink, so that every number and marker ("paused", "terminal") shows.
    With ``fit``, a terminal too short for every row leaves out states (empty terminal states
    first, then other terminal states, then idle ones, then the last) and says how many, so that
    the total row always shows.
    """
    return _Board(status, speed or Speed.unknown(status), fit)


class _Board:
    """Lays the rows out for the console's width when rich renders them.

    The layout is done by hand (plain string widths, no rich Table): a frame costs well under a
    millisecond, and it is cached, so redrawing an unchanged snapshot costs nothing more.
    """

    __slots__ = ("_cache", "fit", "speed", "status")

    def __init__(self, status: Status, speed: Speed, fit: bool = False) -> None:
        self.status = status
        self.speed = speed
        self.fit = fit
        self._cache: tuple[int, bool, int | None, Text] | None = None

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        colour = console.color_system is not None and not console.no_color
        height = options.size.height if self.fit else None
        cache = self._cache
        if cache is None or cache[:3] != (width, colour, height):
            cache = self._cache = (width, colour, height, self._layout(width, colour, height))
        yield cache[3]

    def _layout(self, width: int, colour: bool, height: int | None = None) -> Text:
        status, speed = self.status, self.speed
        # A join's jobs wait for children that a paused state may hold: no ETA then.
        stalled = any(row.paused and row.jobs for row in status.states if not row.terminal)
        rows = [
            _terminal_row(row, status.jobs)
            if row.terminal
            else _lane_row(row, rate, status.elapsed, stalled)
            for row, rate in zip(status.states, speed.done, strict=True)
        ]
        if height is not None and len(rows) + 3 > height:
            rows = _fewer(rows, status, max(0, height - 4))
        rows.append(_total_row(status, speed))
        # Fan-in: the column for jobs awaiting their children appears once some do.
        joins = any(row.awaiting for row in status.states)
        shown = [i for i in range(len(_HEADERS)) if i != _AWAITING or joins]
        name_width = min(NAME_MAX, max(_width(row.name[0]) for row in [*rows, _HEAD]))
        widths = {i: max(len(row.numbers[i][0]) for row in [*rows, _HEAD]) for i in shown}
        room = width - name_width - sum(widths.values()) - len(shown) - 1  # bar + gap + notes
        for i in _DROPPED_FIRST:  # too narrow for every column: the least needed go first
            if room >= BAR_MIN:
                break
            if i in widths:
                room += widths.pop(i) + 1
                shown.remove(i)
        if room < BAR_MIN:
            cut = min(name_width - NAME_MIN, BAR_MIN - room)
            name_width, room = name_width - max(0, cut), room + max(0, cut)
        need = max(sum(_width(value) for value, _ in row.note) for row in rows)
        # Bars first (at least BAR_FAIR wide), then notes, cut short, if 6 columns are left.
        bar = max(BAR_FAIR, min(BAR_MAX, room - (need + 1 if need else 0)))
        notes = room - bar - 1 if need and room - bar - 1 >= 6 else 0
        if not notes:  # (narrower than BAR_MIN only when nothing else is left to give way)
            bar = min(BAR_MAX, max(0, room))
        out = _Lines()
        out.cut(_summary(status, width), width)
        for row in [_HEAD, *rows]:
            out.add("\n")
            out.cell(row.name, name_width, left=True)
            out.add(" ")
            out.bar(row.bar, bar, colour)
            for i in shown:
                out.add(" ")
                out.cell(row.numbers[i], widths[i], left=False)
            if notes and row.note:
                out.add(" ")
                out.cut(row.note, notes)
        return out.text()


_HEAD = _Row(
    ("state", "bold"),
    _Bar(0, 0, "progress"),
    tuple((header, "bold") for header in _HEADERS),
    (),
)


class _Lines:
    """Builds one Text from pieces: plain strings and style spans, no per-piece rich work."""

    __slots__ = ("parts", "size", "spans")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.spans: list[Span] = []
        self.size = 0

    def add(self, value: str, style: str = "") -> None:
        if style:
            self.spans.append(Span(self.size, self.size + len(value), style))
        self.parts.append(value)
        self.size += len(value)

    def cell(self, cell: Cell, width: int, *, left: bool) -> None:
        value, style = cell
        size = _width(value)
        if size > width:
            value, size = set_cell_size(value, width - 1) + "…", width
        pad = " " * (width - size)
        self.add(pad if not left else "")
        self.add(value, style)
        self.add(pad if left else "")

    def cut(self, cells: tuple[Cell, ...], width: int) -> None:
        """Add ``cells`` within ``width`` columns, the last one cut with an ellipsis."""
        for value, style in cells:
            size = _width(value)
            if size > width:
                self.add(set_cell_size(value, width - 1) + "…", style)
                return
            self.add(value, style)
            width -= size

    def bar(self, bar: _Bar, width: int, colour: bool) -> None:
        """Like rich's ProgressBar: half-cell steps; the unfilled part is drawn only in colour
        (without colour, as with ``NO_COLOR``, it is left blank so the bar still reads)."""
        if bar.style == "progress":  # the header
            self.add("progress"[:width].ljust(width), "bold")
            return
        if bar.total <= 0:
            self.add(" " * width)
            return
        halves = int(width * 2 * min(bar.completed, bar.total) / bar.total)
        full, half = divmod(halves, 2)
        style = "bar.finished" if bar.completed >= bar.total else bar.style
        self.add("━" * full + ("╸" if half else ""), style)
        rest = width - full - half
        if rest and colour:
            self.add(("╺" if full and not half else "━") + "━" * (rest - 1), "bar.back")
        elif rest:
            self.add(" " * rest)

    def text(self) -> Text:
        # A terminal too narrow for a line cuts it short; it never wraps.
        return Text("".join(self.parts), spans=self.spans, no_wrap=True, overflow="ellipsis")


def _width(value: str) -> int:
    """Terminal columns ``value`` takes (ASCII, the usual case, without rich's tables)."""
    return len(value) if value.isascii() else cell_len(value)


def _summary(status: Status, width: int) -> tuple[Cell, ...]:
    """The line above the table; on a narrow terminal the count of transitions goes first,
    then the time elapsed, so that "complete" still shows."""
    share = status.finished / status.jobs if status.jobs else 1.0
    finished = (f"{status.finished:,}/{status.jobs:,} jobs finished ({share:.0%})", "")
    transitions = (f" · {status.transitions:,} transitions", "")
    elapsed = (f" · {_clock(status.elapsed)} elapsed", "")
    end = ((" · complete", "bold green"),) if status.complete else ()
    for middle in ((transitions, elapsed), (elapsed,), ()):
        cells = (("jorb ", "bold"), finished, *middle, *end)
        if sum(_width(value) for value, _ in cells) <= width:
            break
    return cells


def _fewer(rows: list[_Row], status: Status, room: int) -> list[_Row]:
    """``room`` of the state rows, in their order, then a line saying how many are not shown."""
    hidden = len(rows) - room
    if hidden <= 0:
        return rows

    def expendable(index: int) -> tuple[int, int]:
        row = status.states[index]
        if row.terminal:
            return (0 if not row.jobs else 1, -index)
        idle = not (row.jobs or row.running)
        return (2 if idle else 3, -index)

    dropped = set(sorted(range(len(rows)), key=expendable)[:hidden])
    kept = [row for index, row in enumerate(rows) if index not in dropped]
    more = _Row((f"… {hidden} more", "dim"), _Bar(0, 0, ""), (("", ""),) * len(_HEADERS), ())
    return [*kept, more]


def _lane_row(row: StateStatus, rate: float | None, elapsed: float, stalled: bool) -> _Row:
    eta = None if not rate else row.jobs / rate
    speed = (_per_second(rate), "")
    if not rate and not row.jobs and not row.running and row.done and elapsed > 0:
        # Worked off long ago, the window's 0/s says nothing: the average over the exec does.
        speed = (_per_second(row.done / elapsed), "dim")
    if row.paused:
        when = ("paused", "bold yellow")
    elif row.awaiting and stalled:
        when = ("-", "")  # its children may sit in a paused state
    else:
        when = (_eta(eta, row.jobs), "")
    return _Row(
        (row.name, "bold"),
        _Bar(row.done, row.done + row.jobs, "bar.complete"),
        (
            (f"{row.jobs:,}", ""),
            (f"{row.waiting:,}", ""),
            (f"{row.delayed:,}", ""),
            (f"{row.awaiting:,}", ""),
            # (no concurrency: a watcher's row, which cannot know what runs)
            (f"{row.running:,}/{row.concurrency:,}" if row.concurrency else "-", ""),
            (f"{row.done:,}", ""),
            (f"{row.errors:,}", "red" if row.errors else ""),
            speed,
            when,
        ),
        _notes(row),
    )


def _terminal_row(row: StateStatus, total: int) -> _Row:
    blank = ("", "")
    numbers = ((f"{row.jobs:,}", ""), *[blank] * 7, ("terminal", "dim"))
    return _Row((row.name, "bold"), _Bar(row.jobs, total, "bar.finished"), numbers, ())


def _total_row(status: Status, speed: Speed) -> _Row:
    lanes = [row for row in status.states if not row.terminal]
    unfinished = status.jobs - status.finished
    eta = _run_eta(status, speed)
    errors = sum(row.errors for row in lanes)
    known = any(row.concurrency for row in lanes) or not lanes  # (not for a watcher)
    label = "total"
    while any(row.name == label for row in status.states):  # a state of the user's own name
        label = f"({label})"
    return _Row(
        (label, "bold"),
        _Bar(status.finished, status.jobs, "bar.complete"),
        (
            (f"{status.jobs:,}", ""),
            (f"{sum(row.waiting for row in lanes):,}", ""),
            (f"{sum(row.delayed for row in lanes):,}", ""),
            (f"{sum(row.awaiting for row in lanes):,}", ""),
            (f"{sum(row.running for row in lanes):,}" if known else "-", ""),
            (f"{sum(row.done for row in lanes):,}", ""),
            (f"{errors:,}", "red" if errors else ""),
            (_per_second(speed.finished), ""),
            (_eta(eta, unfinished), ""),
        ),
        (),
    )


def _notes(row: StateStatus) -> tuple[Cell, ...]:
    notes = []
    if row.paused_until is not None:
        notes.append((f"{_server_pause(row.paused_until)} ", "bold yellow"))
    if row.rate is not None:
        notes.append((f"≤{_per_second(row.rate)}", "cyan"))
    if row.failed:
        notes.append((f"{' ' if notes else ''}{row.failed:,} failed", "red"))
    return tuple(notes)


def plain_line(status: Status, speed: Speed | None = None) -> str:
    """One status line for logs: totals, then each state's numbers."""
    speed = speed or Speed.unknown(status)
    unfinished = status.jobs - status.finished
    eta = _run_eta(status, speed)
    head = f"jorb [{_clock(status.elapsed)}] {status.finished:,}/{status.jobs:,} finished"
    if unfinished and speed.finished is not None:
        head += f", {_per_second(speed.finished)}, eta {_eta(eta, unfinished)}"
    parts = [head]
    for row, rate in zip(status.states, speed.done, strict=True):
        if row.terminal:
            parts.append(f"{row.name} {row.jobs:,}")
            continue
        words = [row.name]
        if row.paused:
            words.append("PAUSED")
        if row.paused_until is not None:
            words.append(_server_pause(row.paused_until))
        words.append(f"{row.waiting:,} waiting")
        if row.delayed:
            words.append(f"{row.delayed:,} delayed")
        if row.awaiting:
            words.append(f"{row.awaiting:,} awaiting children")
        if row.concurrency or row.running:
            words.append(f"{row.running:,} running")
        words.append(f"{row.done:,} done")
        if row.errors:
            words.append(f"{row.errors:,} errors")
        if row.failed:
            words.append(f"{row.failed:,} gave up")
        if rate:
            words.append(_per_second(rate))
        parts.append(" ".join(words))
    return " | ".join(parts)


def _server_pause(until: float) -> str:
    return f"paused by the server until {time.strftime('%H:%M:%S', time.localtime(until))}"


def _per_second(rate: float | None) -> str:
    if rate is None:
        return ""
    if rate >= 100:
        return f"{rate:,.0f}/s"
    if rate >= 1:
        return f"{rate:.1f}/s"
    return f"{rate:.2f}/s"


def _run_eta(status: Status, speed: Speed) -> float | None:
    """Seconds until every job is terminal, at the pace jobs finish, but never sooner than the
    slowest state can work off what it holds; None if unknown, or if a paused state holds jobs."""
    unfinished = status.jobs - status.finished
    if not unfinished or not speed.finished:
        return None
    eta = unfinished / speed.finished
    for row, rate in zip(status.states, speed.done, strict=True):
        if row.terminal or not row.jobs:
            continue
        if row.paused:
            return None
        if rate:
            eta = max(eta, row.jobs / rate)
    return eta


def _eta(seconds: float | None, remaining: int) -> str:
    if remaining == 0:
        return ""
    if not seconds or seconds > 99 * 3600:
        return "-"
    return _clock(math.ceil(seconds))


def _clock(seconds: float) -> str:
    whole = int(seconds + 0.5)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


# -- the end-of-exec summary -------------------------------------------------------------------


def summary(status: Status, errors: list[tuple[int, str, str]], width: int = 100) -> str:
    """What ``exec`` prints to stderr when it ends with its display on: jobs per terminal
    state, the average throughput, and ``errors`` (``(count, state, message)``, most common
    first) of this exec."""
    ends = ", ".join(
        f"{row.name} {row.jobs:,}" for row in status.states if row.terminal and row.jobs
    )
    ends = f": {ends}" if ends else ""
    if status.finished == status.jobs:
        head = f"jorb: complete: all {status.jobs:,} jobs are in terminal states{ends}"
    else:
        head = (
            f"jorb: stopped: {status.finished:,} of {status.jobs:,} jobs in terminal states{ends}"
        )
    elapsed = max(status.elapsed, 1e-9)
    execs = status.transitions  # every settled exec, failed attempts too
    failed = sum(row.errors for row in status.states)
    outcome = f" ({execs - failed:,} succeeded, {failed:,} failed)" if failed else ""
    lines = [
        head,
        f"jorb: {execs:,} execs in {_clock(status.elapsed)}{outcome}, "
        f"{_per_second(execs / elapsed)} on average",
    ]
    if errors:
        lines.append("jorb: most common errors of this exec:")
        for count, state, message in errors:
            line = f"  {count:>7,}× {state}: {message}"
            lines.append(line if len(line) <= width else line[: width - 1] + "…")
    return "\n".join(lines)


def print_summary(status: Status, errors: list[tuple[int, str, str]]) -> None:
    """Print :func:`summary` to stderr."""
    print(summary(status, errors), file=sys.stderr, flush=True)


# -- the two listeners -------------------------------------------------------------------------


class LiveProgress:
    """Redraws :func:`render` on a terminal ``refresh_per_second`` times a second (rich Live).

    The snapshot is taken on the event loop by :meth:`update`; rich's refresh thread renders
    the latest one, so the engine never waits for the terminal.
    """

    def __init__(self, console: Console, *, refresh_per_second: float = 4.0) -> None:
        self.console = console
        self.refresh_per_second = refresh_per_second
        self._meter = Meter()
        self._view: tuple[Status, Speed] | None = None
        self._board: tuple[tuple[Status, Speed], RenderableType] | None = None
        self._live: Live | None = None
        self._restore: list[tuple[logging.StreamHandler[Any], IO[str]]] = []
        self._fit = True  # a frame no taller than the terminal (off for the last one)

    def __repr__(self) -> str:
        return f"<LiveProgress live={self._live is not None} {self._meter!r}>"

    def start(self, status: Status) -> None:
        self._view = (status, self._meter.add(status))
        stdout, stderr = sys.stdout, sys.stderr
        self._fit = True
        self._live = Live(
            console=self.console,
            get_renderable=self._renderable,
            refresh_per_second=self.refresh_per_second,
            # Only streams on a terminal: output sent to a file or a pipe stays there.
            redirect_stdout=_isatty(stdout),
            redirect_stderr=_isatty(stderr),
        )
        if isinstance(getattr(self._live, "_live_render", None), LiveRender):
            self._live._live_render = _Reflowing(self._renderable(), self.console)
        self._live.start(refresh=True)
        self._restore = _redirect_logging({stdout: sys.stdout, stderr: sys.stderr})

    def update(self, status: Status) -> None:
        self._view = (status, self._meter.add(status))

    def note(self, message: str) -> None:
        self.console.print(Text(f"jorb: {message}", style="yellow"))

    def stop(self, status: Status) -> None:
        self._view = (status, self._meter.add(status))
        for handler, stream in self._restore:
            handler.setStream(stream)
        self._restore = []
        self._fit = False  # the last frame stays on the screen: every row of it
        if self._live is not None:
            self._live.stop()  # draws the last frame and leaves it on the screen
            self._live = None

    def _renderable(self) -> RenderableType:
        view, board = self._view, self._board
        if view is None:
            return Text("")
        if board is None or board[0] is not view:  # unchanged: redraw the laid-out frame
            board = self._board = (view, render(*view, fit=self._fit))
        return board[1]


class _Reflowing(LiveRender):
    """rich's LiveRender, aware that a terminal made narrower wraps the lines drawn before.

    Before each frame, rich moves the cursor up one row per line of the last frame and erases
    it; once the window has narrowed, a line drawn wider now takes several rows (terminals
    re-wrap their lines), and the rows rich did not count stayed on the screen as fragments.
    This one counts the rows each line takes at the console's width now.
    """

    def __init__(self, renderable: RenderableType, console: Console) -> None:
        super().__init__(renderable)
        self.console = console
        self.widths: list[int] = []  # columns each line of the last frame took

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        widths: list[int] = []
        line: list[str] = []
        for segment in super().__rich_console__(console, options):
            if isinstance(segment, Segment) and not segment.control:
                if segment.text == "\n":
                    widths.append(cell_len("".join(line).rstrip()))
                    line = []
                else:
                    line.append(segment.text)
            yield segment
        widths.append(cell_len("".join(line).rstrip()))
        self.widths = widths

    def position_cursor(self) -> Control:
        if self._shape is None:
            return Control()
        width = max(1, self.console.width)
        rows = sum(max(1, -(-w // width)) for w in self.widths) if self.widths else self._shape[1]
        return Control(
            ControlType.CARRIAGE_RETURN,
            (ControlType.ERASE_IN_LINE, 2),
            *(((ControlType.CURSOR_UP, 1), (ControlType.ERASE_IN_LINE, 2)) * (rows - 1)),
        )


class PlainProgress:
    """Writes :func:`plain_line` to ``stream`` (stderr): at start, every ``every`` s, at the end."""

    def __init__(self, stream: IO[str] | None = None, *, every: float = 5.0) -> None:
        self.stream = stream
        self.every = every
        self._meter = Meter()
        self._next = 0.0
        self._last = ""  # the last status line written

    def __repr__(self) -> str:
        return f"<PlainProgress every={self.every:g}s>"

    def start(self, status: Status) -> None:
        self._next = status.elapsed + self.every
        self._status(plain_line(status, self._meter.add(status)))

    def update(self, status: Status) -> None:
        speed = self._meter.add(status)
        if status.elapsed >= self._next:
            self._next = status.elapsed + self.every
            self._status(plain_line(status, speed))

    def note(self, message: str) -> None:
        self._write(f"jorb: {message}")

    def stop(self, status: Status) -> None:
        line = plain_line(status, self._meter.add(status))
        if line != self._last:  # (a run with nothing left to do would say it twice)
            self._status(line)

    def _status(self, line: str) -> None:
        self._last = line
        self._write(line)

    def _write(self, line: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()


def _isatty(stream: IO[str] | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (ValueError, OSError):  # a closed or detached stream
        return False


def _redirect_logging(
    moved: dict[IO[str], IO[str]],
) -> list[tuple[logging.StreamHandler[Any], IO[str]]]:
    """Point logging handlers that write to a redirected std stream at its replacement.

    A ``logging.StreamHandler`` keeps the stream it was created with, so a handler set up
    before the display (``logging.basicConfig()``) would write under the bars and tear them.
    Returns what to put back.
    """
    restore = []
    for handler in _stream_handlers():
        target = moved.get(handler.stream)
        if target is not None and target is not handler.stream:
            restore.append((handler, handler.stream))
            handler.setStream(target)
    return restore


def _stream_handlers() -> Iterator[logging.StreamHandler[Any]]:
    loggers: list[Any] = [logging.getLogger()]
    loggers.extend(logging.Logger.manager.loggerDict.values())
    seen: set[int] = set()
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if (
                isinstance(handler, logging.StreamHandler)
                and not isinstance(handler, logging.FileHandler)
                and id(handler) not in seen
            ):
                seen.add(id(handler))
                yield handler
