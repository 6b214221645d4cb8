"""The ``jorb`` command: look into a run file, and steer it, from the shell.

A thin layer: reading commands load the run (``jorb.Run.load`` replays the journal, so they
work while a process runs it) and print what :mod:`jorb.report` computes; changing commands
call :mod:`jorb.control`, which edits the file under the run's lock or hands the change to the
process running it. A user mistake (a missing or corrupt file, an unknown state or job, bad
JSON) prints one line to stderr and exits with status 1 (2 for a bad option), no traceback;
so does anything unexpected, unless ``JORB_TRACEBACK=1`` is set.

What a run file holds is data, never terminal commands or markup: every state name, id, ctx,
error message or traceback printed goes through :func:`safe` (control characters written as
escapes, ``\x1b``) and into a rich ``Text`` (no ``[markup]`` interpreted). New output of
user data must do the same: ``_text(value)``, or ``safe(value)`` for plain strings.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import gc
import json
import os
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import orjson
import typer
from rich.console import Console
from rich.highlighter import JSONHighlighter
from rich.table import Table
from rich.text import Text

from . import __version__, control, mend, report
from .checkpoint import is_locked
from .errors import JorbError
from .model import Run, entry_document
from .states import CANCELLED

__all__ = ["app", "main"]

app = typer.Typer(
    name="jorb",
    help=(
        "Look into a jorb run file and steer it from the shell.\n\n"
        "Reading commands (status, jobs, show, graph, report, watch) work while a process "
        "runs the file. "
        "Changing commands (redrive, cancel, add, pause, resume) edit the file under its lock, "
        "or hand the change to the running process and return once it is applied. "
        "`fold` brings a crashed run's file up to date without the script."
    ),
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class _Console(Console):
    def on_broken_pipe(self) -> None:
        self.quiet = True
        _reader_gone()  # (rich's own answer is to exit 1)


console = _Console(highlight=False)

F = TypeVar("F", bound=Callable[..., None])
RunFile = Annotated[
    Path,
    typer.Argument(
        help="The run file (e.g. runs/migrate.json).", metavar="RUNFILE", show_default=False
    ),
]


def main() -> None:
    """Entry point of the ``jorb`` console script.

    The process is jorb's own and short-lived, so it runs without the cyclic garbage collector
    (it would walk a million-job run's objects, and there are no cycles worth collecting) and
    leaves by ``os._exit`` once its output is flushed: the OS takes the memory back at once,
    where freeing a million jobs object by object took over a second.
    """
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        # Piped into grep or a file, rich would cut every line at 80 columns; COLUMNS still wins.
        console.width = 200
    gc.disable()
    code: Any = 0
    try:
        try:
            app()
        except SystemExit as e:
            code = e.code
        finally:
            sys.stdout.flush()  # here, so a reader gone meanwhile is seen below
    except BrokenPipeError:
        _reader_gone()
    if code is not None and not isinstance(code, int):
        raise SystemExit(code)  # (a message: the interpreter prints it)
    sys.stderr.flush()
    os._exit(code or 0)


def _reader_gone() -> NoReturn:
    """stdout's reader went away (``jorb jobs ... | head``): not an error, and nothing to say."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail again
    raise SystemExit(0)


def _friendly(command: F) -> F:
    """Turn a user mistake into one line on stderr and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except JorbError as e:
            _fail(str(e))
        except BrokenPipeError:
            _reader_gone()
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            _fail(f"{where}{e.strerror or e}")
        except typer.Exit:
            raise
        except Exception as e:
            # A bug, or a run file damaged in a way loading does not catch: still one line.
            if os.environ.get("JORB_TRACEBACK"):
                raise
            _fail(
                f"unexpected {type(e).__name__}: {e} (a damaged run file, or a bug in jorb; "
                f"JORB_TRACEBACK=1 shows where)"
            )

    return wrapper  # type: ignore[return-value]


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"jorb: error: {safe(message, lines=True)}", err=True)
    raise typer.Exit(code)


@app.callback(invoke_without_command=True)
def _options(
    version: Annotated[
        bool, typer.Option("--version", help="Print jorb's version and exit.", is_eager=True)
    ] = False,
) -> None:
    if version:
        typer.echo(f"jorb {__version__}")
        raise typer.Exit()


# -- reading ---------------------------------------------------------------------------------


@app.command()
@_friendly
def status(
    runfile: RunFile,
    as_json: Annotated[
        bool, typer.Option("--json", help="The same facts as one JSON object.")
    ] = False,
) -> None:
    """Per-state counts, errors and timings, and whether the run is complete."""
    run = Run.load(runfile)
    rows = report.states(run)
    if as_json:
        _print_json(_status_document(run, rows, runfile))
        return
    console.print(_headline(run, rows, runfile), soft_wrap=True)
    console.print()
    console.print(_state_table(rows))
    for name, until in report.server_pauses(run).items():
        line = f"{name}: paused by the server until {_when(until)} (its Retry-After)"
        console.print(_text(line, "bold yellow"))
    summaries = report.errors(run)
    if summaries:
        console.print()
        console.print(Text("errors (most common first)", style="bold"))
        for summary in summaries:
            _print_errors(summary)
    if run.changes:
        console.print()
        console.print(Text("recent changes", style="bold"))
        for change in run.changes[-5:]:
            who = f"  ({change['who']})" if change.get("who") else ""
            text = f"  {_when(change.get('time'))}  {change.get('what', '?')}{who}"
            console.print(_text(text), soft_wrap=True)


def _status_document(run: Run, rows: list[report.StateReport], path: Path) -> dict[str, Any]:
    def timing(t: report.Timing | None) -> dict[str, Any] | None:
        return None if t is None else dataclasses.asdict(t)

    return {
        "path": str(path),
        "complete": report.is_complete(run),
        "jobs": len(run.jobs),
        "finished": sum(row.jobs for row in rows if row.terminal),
        "executing": is_locked(path),
        "states": [{**dataclasses.asdict(row), "timing": timing(row.timing)} for row in rows],
        "errors": [dataclasses.asdict(summary) for summary in report.errors(run)],
        "changes": run.changes,
    }


def _state_table(rows: list[report.StateReport]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    columns = (
        "state",
        "jobs",
        "delayed",
        "",
        "errors",
        "in jobs",
        "execs",
        "mean",
        "median",
        "p95",
    )
    for name in columns:
        table.add_column(name, justify="left" if name in ("state", "") else "right")
    executed = any(row.terminal is not None for row in rows)  # else no states are recorded
    for row in rows:
        timing = row.timing
        times = ("", "", "", "")
        if timing is not None:
            times = (
                f"{timing.count:,}",
                _seconds(timing.mean),
                _seconds(timing.median),
                _seconds(timing.p95),
            )
        table.add_row(
            _text(row.name, style="bold"),
            f"{row.jobs:,}",
            f"{row.delayed:,}" if row.delayed else "",
            _mark(row) if executed else "",
            Text(f"{row.errors:,}", style="red") if row.errors else "",
            f"{row.failing:,}" if row.errors else "",
            *times,
        )
    return table


def _print_errors(summary: report.ErrorSummary) -> None:
    head = f"  {summary.state}: {summary.errors:,} error(s) in {summary.jobs:,} job(s)"
    console.print(_text(head))
    for group in summary.common:
        line = _text(f"    {group.count:>6,}× {group.line}")
        console.print(line, no_wrap=True, overflow="ellipsis")
        if group.variants > 1:
            console.print(
                f"{'':12}({group.variants:,} messages differing only in numbers)", style="dim"
            )
    others = summary.groups - len(summary.common)
    if others:
        console.print(f"    ... and {others:,} other kind(s) of error", style="dim")


def _headline(run: Run, rows: list[report.StateReport], path: Path) -> Text:
    total = len(run.jobs)
    finished = sum(row.jobs for row in rows if row.terminal)
    complete = report.is_complete(run)
    text = _text(f"{path}: ", style="bold")
    if complete is None:
        text.append(f"{total:,} jobs, never executed (no states recorded yet)")
    elif complete:
        text.append("complete", style="bold green")
        text.append(f": all {total:,} jobs are in terminal states")
    else:
        text.append("not complete", style="bold yellow")
        text.append(f": {finished:,} of {total:,} jobs are in terminal states")
    if is_locked(path):
        text.append(" · a process is running it now", style="cyan")
    return text


def _mark(row: report.StateReport) -> Text:
    if row.terminal is None:
        return Text("undeclared", style="red")
    if row.terminal:
        return Text("terminal", style="green")
    if row.paused:
        return Text("PAUSED", style="bold yellow")
    return Text("")


@app.command()
@_friendly
def jobs(
    runfile: RunFile,
    state: Annotated[
        str | None, typer.Option("--state", "-s", help="Only jobs in this state.", metavar="STATE")
    ] = None,
    errors: Annotated[
        bool, typer.Option("--errors", "-e", help="Only jobs with errors recorded.")
    ] = False,
    limit: Annotated[
        int,
        typer.Option("--limit", "-n", help="Show at most this many (0: all).", min=0, metavar="N"),
    ] = 50,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per line, every field of each job.")
    ] = False,
) -> None:
    """List jobs (id, state, parent, errors, last error, ctx), optionally filtered."""
    run = Run.load(runfile)
    found = report.find_jobs(run, state, errors=errors)
    shown = found[:limit] if limit else found
    if as_json:
        out = sys.stdout
        for job in shown:
            doc = {field.name: getattr(job, field.name) for field in dataclasses.fields(job)}
            doc["history"] = [entry_document(entry) for entry in job.history]
            out.write(orjson.dumps(doc).decode() + "\n")
        return
    if not found:
        console.print("no jobs match", style="dim")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    fixed = 0
    for name, cells in (
        ("id", [safe(job.id) for job in shown]),
        ("state", [safe(job.state) for job in shown]),
        ("parent", [safe(job.parent or "") for job in shown]),
        ("errors", []),
    ):
        width = max([len(name), *(len(cell) for cell in cells)])
        fixed += width + 2
        table.add_column(name, justify="left" if name == "state" else "right", min_width=width)
    # What is left is shared by the two long columns, cut with an ellipsis.
    room = max(12, (console.width - fixed - 2) // 2)
    table.add_column("last error", overflow="ellipsis", no_wrap=True, max_width=room)
    table.add_column("ctx", overflow="ellipsis", no_wrap=True, max_width=room)
    for job in shown:
        count = sum(len(records) for records in job.errors.values())
        last = report.last_error(job)
        table.add_row(
            _text(job.id),
            _text(job.state),
            _text(job.parent or ""),
            Text(f"{count:,}", style="red") if count else "",
            _text(f"{last[0]}: {report.error_line(last[1])}") if last else "",
            _text(_compact(job.ctx)),
        )
    console.print(table)
    if len(shown) < len(found):
        console.print(
            f"showing {len(shown):,} of {len(found):,} jobs; --limit 0 shows all", style="dim"
        )


@app.command()
@_friendly
def show(
    runfile: RunFile,
    job_id: Annotated[
        str, typer.Argument(help="The job's id.", metavar="JOB_ID", show_default=False)
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="The job, its history, parent and children as JSON.")
    ] = False,
) -> None:
    """One job: its ctx, history, errors with tracebacks, parent and children."""
    run = Run.load(runfile)
    detail = report.job_detail(run, job_id)
    job = detail.job
    steps = report.history(run, job)
    if as_json:
        doc = {field.name: getattr(job, field.name) for field in dataclasses.fields(job)}
        doc["history"] = [  # the keys the run file uses ("from", "to"), and who moved it
            {
                "from": step.source,
                "to": step.target,
                "time": step.time,
                "duration": step.duration,
                "redrive": step.redrive,
            }
            for step in steps
        ]
        parent = detail.parent
        doc["parent"] = (
            None
            if job.parent is None
            else {
                "id": job.parent,
                "state": parent.state if parent is not None else None,
            }
        )
        doc["children"] = [{"id": kid.id, "state": kid.state} for kid in detail.children]
        _print_json(doc)
        return
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("job", _text(job.id))
    facts.add_row("state", _text(job.state))
    if job.key is not None:
        facts.add_row("key", _text(job.key))
    if job.parent is not None:
        where = f" (in {detail.parent.state})" if detail.parent else " (no longer in the file)"
        facts.add_row("parent", _text(job.parent + where))
    if detail.children:
        ids = ", ".join(kid.id for kid in detail.children[:20])
        more = f", ... ({len(detail.children):,} in all)" if len(detail.children) > 20 else ""
        facts.add_row("children", _text(ids + more))
    if job.priority:
        facts.add_row("priority", str(job.priority))
    if job.attempts or job.throttled:
        facts.add_row("attempts", f"{job.attempts} failed, {job.throttled} rate-limited here")
    if job.not_before is not None:
        facts.add_row("not before", _when(job.not_before))
    if job.polls:
        facts.add_row("polls", f"{job.polls:,} (jorb.Next back to the same state; not in history)")
    console.print(facts)
    console.print()
    console.print(Text("ctx", style="bold"))
    console.print(_json(job.ctx))
    if steps:
        console.print()
        console.print(Text("history", style="bold"))
        table = Table(box=None, pad_edge=False, header_style="bold")
        for name in ("time", "from", "to", "took"):
            table.add_column(name, justify="right" if name == "took" else "left")
        cancels = {
            c["id"]
            for c in run.changes
            if isinstance(c, dict)
            and type(c.get("id")) is str
            and str(c.get("what")).startswith("cancel")
        }
        for step, entry in zip(steps, job.steps(), strict=True):
            by = entry.get("redrive")
            moved_by = "cancel" if type(by) is str and by in cancels else "redrive"
            table.add_row(
                _when(step.time),
                _text(step.source),
                _text(step.target),
                moved_by if step.redrive else _seconds(step.duration),
            )
        console.print(table)
    for state, records in job.errors.items():
        for record in records:
            console.print()
            kind = "rate limited" if record.get("rate_limited") else "error"
            head = f"{kind} in {state}, attempt {record.get('attempt', '?')}"
            console.print(_text(f"{head} at {_when(record.get('time'))}", style="bold red"))
            console.print(_text(report.error_line(record)))
            trace = str(record.get("traceback") or "").rstrip()
            if trace:
                console.print(_text(trace, style="dim", lines=True))


class Format(enum.StrEnum):
    mermaid = "mermaid"
    dot = "dot"
    svg = "svg"


@app.command()
@_friendly
def graph(
    runfile: RunFile,
    format: Annotated[
        Format,
        typer.Option("--format", "-f", help="Mermaid flowchart, Graphviz DOT, or an SVG picture."),
    ] = Format.mermaid,
    as_json: Annotated[
        bool, typer.Option("--json", help="States and edges (with counts, timings) as JSON.")
    ] = False,
) -> None:
    """The workflow graph: states with their jobs and median exec time; transitions, kicks and
    redrives as edges with counts; give-ups and the states they lead to in red.

    `jorb graph run.json -f svg > graph.svg` draws it without any other program.
    """
    g = report.graph(Run.load(runfile))
    if as_json:
        _print_json(report.graph_document(g))
        return
    if format is Format.svg:
        from . import svg

        typer.echo(safe(svg.draw(g), lines=True), nl=False)
        return
    text = report.to_dot(g) if format is Format.dot else report.to_mermaid(g)
    typer.echo(safe(text, lines=True), nl=False)


@app.command("report")
@_friendly
def html_report(
    runfile: RunFile,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Where to write it (default: RUNFILE with .html).",
            metavar="FILE",
        ),
    ] = None,
) -> None:
    """Write an HTML report of the run (graph, throughput, durations, errors) that opens offline.

    Needs plotly: `pip install 'jorb[report]'`. Works on a run in progress too.
    """
    from . import report_html

    run = Run.load(runfile)
    target = output or runfile.with_suffix(".html")
    page = report_html.render(run)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(page, encoding="utf-8")
    os.replace(temporary, target)
    typer.echo(safe(f"wrote {target} ({len(page.encode()) / 1e6:.1f} MB)"))


@app.command()
@_friendly
def watch(
    runfile: RunFile,
    interval: Annotated[
        float,
        typer.Option("--interval", help="Seconds between reads of the journal.", min=0.01),
    ] = 0.5,
) -> None:
    """The live table of a run that another process is executing, until that process stops.

    Read-only: it follows the run file and its journal and never takes the run's lock. What
    it cannot know (running execs, concurrency) shows as `-`; done, errors and rates count
    from when the watch began. Not on a terminal, it prints a status line every 5 seconds.
    """
    from . import progress
    from .watch import Watcher

    watcher = Watcher(runfile)
    listener = progress.make_progress(console)
    status = watcher.poll()
    listener.start(status)
    try:
        while not watcher.ended:
            time.sleep(interval)
            status = watcher.poll()
            listener.update(status)
    except KeyboardInterrupt:
        pass
    finally:
        listener.stop(status)
        watcher.close()
    if not watcher.running() and not report.is_complete(watcher.run):
        typer.echo(safe(f"jorb: no process is running {runfile} (not complete)"), err=True)


def _print_json(doc: Any) -> None:
    """``doc`` as indented JSON, control characters in JSON's own escapes (as :func:`_json`)."""
    dumped = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()
    dumped = _CONTROL_BUT_LINES.sub(lambda m: f"\\u{ord(m.group()):04x}", dumped)
    sys.stdout.write(dumped + "\n")


# -- changing --------------------------------------------------------------------------------

Timeout = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        help=(
            "Give up after this many seconds if the process running the run has not applied "
            "the change (it is then withdrawn); default: wait."
        ),
        min=0,
        metavar="SECONDS",
    ),
]


@app.command()
@_friendly
def redrive(
    runfile: RunFile,
    source: Annotated[
        str, typer.Option("--from", help="Move jobs in this state...", metavar="STATE")
    ],
    target: Annotated[str, typer.Option("--to", help="...to this one.", metavar="STATE")],
    job_ids: Annotated[
        list[str] | None,
        typer.Option(
            "--job", "-j", help="Only this job (repeat for more); default: all.", metavar="ID"
        ),
    ] = None,
    timeout: Timeout = None,
) -> None:
    """Move jobs from one state to another, keeping their history and errors.

    Typical: `jorb redrive run.json --from failed --to new` after fixing a bug, then rerun
    the script (or let the running one pick them up).
    """
    result = _change(control.redrive, runfile, source, target, job_ids or None, timeout=timeout)
    moved = int(result.get("moved", 0))
    line = f"moved {moved:,} job(s) from {source!r} to {target!r}"
    line += control.left_said("redrive", result)
    if result.get("undeclared"):
        line += (
            f"; {target!r} is a state the run has not seen yet: declare it in the script "
            f"before its next exec"
        )
    typer.echo(safe(line))


@app.command()
@_friendly
def cancel(
    runfile: RunFile,
    job_ids: Annotated[
        list[str] | None,
        typer.Option("--job", "-j", help="Cancel this job (repeat for more).", metavar="ID"),
    ] = None,
    state: Annotated[
        str | None,
        typer.Option("--state", "-s", help="Cancel every job in this state.", metavar="STATE"),
    ] = None,
    to: Annotated[
        str, typer.Option("--to", help="The terminal state they go to.", metavar="STATE")
    ] = CANCELLED,
    timeout: Timeout = None,
) -> None:
    """Move jobs to a terminal state (`cancelled`), cancelling their execs if they run.

    `jorb cancel run.json --job 17` or `--state wait_ci`. A running `async def` exec is
    cancelled, a pooled one's worker process ended, a `def` one abandoned in its thread; the
    move is recorded like a redrive.
    """
    if bool(job_ids) == (state is not None):
        _fail("give --job ID (one or more) or --state STATE, not both or neither", 2)
    result = _change(
        control.cancel, runfile, job_ids=job_ids or None, state=state, to=to, timeout=timeout
    )
    running = result.get("running") or []
    line = f"cancelled {int(result.get('cancelled', 0)):,} job(s) (now in {to!r})"
    if running:
        line += f"; the execs of {len(running):,} were running and were stopped"
    line += control.left_said("cancel", result)
    typer.echo(safe(line))


@app.command()
@_friendly
def add(
    runfile: RunFile,
    state: Annotated[
        str, typer.Option("--state", "-s", help="The jobs' first state.", metavar="STATE")
    ] = "new",
    ctx: Annotated[
        list[str] | None,
        typer.Option(
            "--ctx", "-c", help="The job's ctx, a JSON object (repeat for more).", metavar="JSON"
        ),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", "-f", help="A JSON-lines file, a ctx per line (- for stdin).", metavar="FILE"
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            "-k",
            help=(
                "Each job's unique key is the value of this ctx field: a job whose key the "
                "run has is not added (so the command can be rerun)."
            ),
            metavar="FIELD",
        ),
    ] = None,
    priority: Annotated[
        int, typer.Option("--priority", help="Higher starts first in its state.", metavar="N")
    ] = 0,
    delay: Annotated[
        float | None,
        typer.Option(
            "--delay", help="Seconds from now before they may start.", min=0, metavar="SECONDS"
        ),
    ] = None,
    timeout: Timeout = None,
) -> None:
    """Add jobs: `jorb add run.json --ctx '{"repo": "a/b"}'` or `--file jobs.jsonl`."""
    if bool(ctx) == (file is not None):
        _fail("give --ctx JSON (one or more) or --file JSONL, not both or neither", 2)
    if file is not None:
        text = sys.stdin.read() if str(file) == "-" else file.read_text()
        where = "stdin" if str(file) == "-" else str(file)
        sources = [(f"{where} line {n}", line) for n, line in enumerate(text.splitlines(), 1)]
        sources = [(place, line) for place, line in sources if line.strip()]
    else:
        sources = [("--ctx", value) for value in ctx or []]
    ctxs = [_json_object(place, value) for place, value in sources]
    if not ctxs:
        _fail(f"{file}: no jobs in it", 2)
    keys = None
    if key is not None:
        keys = [_key_of(place, ctx, key) for (place, _), ctx in zip(sources, ctxs, strict=True)]
    result = _change(
        control.add,
        runfile,
        ctxs,
        state,
        keys=keys,
        priority=priority,
        delay=delay,
        timeout=timeout,
    )
    ids = [str(i) for i in result.get("ids", [])]
    shown = ", ".join(ids) if len(ids) <= 10 else f"{ids[0]} to {ids[-1]}"
    line = f"added {len(ids):,} job(s) in {state!r}" + (f": {shown}" if ids else "")
    skipped = int(result.get("skipped", 0))
    if skipped:
        line += f"; skipped {skipped:,} whose key the run already has"
    typer.echo(safe(line))


def _key_of(place: str, ctx: dict[str, Any], field: str) -> str:
    value = ctx.get(field)
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        _fail(f"{place}: --key {field}: the ctx has no string or number {field!r} to key it", 2)
    return str(value)


@app.command()
@_friendly
def pause(
    runfile: RunFile,
    state: Annotated[
        str, typer.Argument(help="The state to pause.", metavar="STATE", show_default=False)
    ],
    timeout: Timeout = None,
) -> None:
    """Stop new exec starts in a state (running ones finish); kept across restarts."""
    _change(control.pause, runfile, state, timeout=timeout)
    typer.echo(
        safe(f"paused {state!r}: no new execs start in it until `jorb resume {runfile} {state}`")
    )


@app.command()
@_friendly
def resume(
    runfile: RunFile,
    state: Annotated[
        str, typer.Argument(help="The state to resume.", metavar="STATE", show_default=False)
    ],
    timeout: Timeout = None,
) -> None:
    """Let a paused state start execs again."""
    _change(control.resume, runfile, state, timeout=timeout)
    typer.echo(f"resumed {state!r}")


@app.command()
@_friendly
def withdraw(runfile: RunFile) -> None:
    """Take back the changes waiting for the process running the run (none is applied).

    For a change whose command was interrupted (Ctrl-C) before the process picked it up.
    """
    taken_back = []
    for file, req in control.waiting(runfile):
        if control.withdraw(file):
            args = req.get("args") or {}
            what = " ".join(f"{k}={v!r}" for k, v in args.items() if k != "ctxs")
            if "ctxs" in args:
                what = f"{len(args['ctxs'] or []):,} job(s) {what}"
            taken_back.append(f"  {req.get('op')} {what}  (asked {_when(req.get('time'))})")
    if not taken_back:
        typer.echo("no change is waiting")
        return
    typer.echo(f"withdrew {len(taken_back)} change(s); none was applied:")
    for line in taken_back:
        typer.echo(safe(line))


@app.command()
@_friendly
def fold(runfile: RunFile) -> None:
    """Fold a crashed run's journal into its file, without the script.

    After `kill -9` the file lags behind its journal; fold it in before editing the file. If
    the file was edited already, both are kept: your edit for the jobs whose state you
    changed, the journal's transitions for the others, and a copy of each file as it was.
    """
    done = mend.fold(runfile)
    if not done.conflict:
        if done.transitions:
            said = f"folded {done.transitions:,} transition(s) from the journal into {runfile}"
            typer.echo(safe(said))
        else:
            typer.echo(safe(f"{runfile} has no unsaved transitions: nothing to fold"))
        return
    yours = done.yours
    shown = ", ".join(yours[:10]) + (", ..." if len(yours) > 10 else "")
    won = (
        f"; where the journal had also moved a job ({shown}), your edit won, and that "
        f"job's {done.dropped:,} journal transition(s) run again"
        if yours
        else ""
    )
    said = (
        f"{runfile} had been edited after the crash; kept both sides:\n"
        f"  the journal: {done.transitions:,} transition(s) applied\n"
        f"  your edit:   kept{won}\n"
        f"  as they were: {done.edited_aside} (your edited file) and {done.journal_aside} "
        f"(the journal); to go back: `mv {done.edited_aside} {runfile}` and "
        f"`mv {done.journal_aside} {runfile}.journal`"
    )
    typer.echo(safe(said, lines=True))


def _change(
    apply: Callable[..., dict[str, Any]], path: Path, *args: Any, **options: Any
) -> dict[str, Any]:
    """Apply a change through :mod:`jorb.control`, saying so when a process will apply it."""
    if path.exists() and is_locked(path):
        typer.echo("jorb: a process is running this run; handing the change to it...", err=True)
    if options.get("timeout") is None:
        options.pop("timeout", None)  # (so a stand-in for a control function need not take it)
    try:
        return apply(path, *args, **options)
    except TimeoutError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail(
            f"interrupted while waiting; the change stays queued in {control.inbox_path(path)} "
            f"and is applied when the process running the run next looks there "
            f"(`jorb withdraw {path}` takes it back)",
            130,
        )


def _json_object(place: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        _fail(f"{place}: not valid JSON ({e.msg} at column {e.colno}): {text[:60]}", 2)
    if not isinstance(value, dict):
        _fail(f"{place}: a ctx must be a JSON object {{...}}, not {type(value).__name__}", 2)
    return value


# -- formatting --------------------------------------------------------------------------------


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return ""
    if value < 1:
        return f"{value * 1000:.0f}ms" if value >= 0.001 else f"{value * 1000:.2f}ms"
    if value < 60:
        return f"{value:.2f}s"
    minutes, seconds = divmod(int(value + 0.5), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _when(value: Any) -> str:
    if not isinstance(value, int | float):
        return ""
    try:
        return datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):  # a time no calendar holds: show the number
        return f"{value!r} (no date)"


def _compact(ctx: dict[str, Any]) -> str:
    return orjson.dumps(ctx).decode()


# -- terminal safety -----------------------------------------------------------------------------

#: What a terminal must never receive from a run file: C0 controls (ESC starts every escape
#: sequence), DEL, C1 controls (0x9b is a one-byte CSI on some terminals) and the Unicode
#: bidirectional controls (they reorder what is shown: "Trojan Source").
_OTHERS = "\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[\x00-\x1f{_OTHERS}]")
_CONTROL_BUT_LINES = re.compile(f"[\x00-\x08\x0b-\x1f{_OTHERS}]")  # (tab and line feed kept)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(value: object, *, lines: bool = False) -> str:
    """``value`` as text fit for a terminal: every control character written as an escape
    (``\\x1b``, ``\\u202e``), so a state name or an error message cannot move the cursor,
    retitle or clear the screen, or reorder what is shown. ``lines`` keeps line breaks and
    tabs (a traceback)."""
    text = value if type(value) is str else str(value)
    pattern = _CONTROL_BUT_LINES if lines else _CONTROL
    return pattern.sub(_escape, text) if pattern.search(text) else text


def _text(value: object, style: str = "", *, lines: bool = False) -> Text:
    """User data as a rich Text: escaped (:func:`safe`), and no ``[markup]`` read in it."""
    return Text(safe(value, lines=lines), style=style)


def _json(value: Any) -> Text:
    """A JSON value indented and highlighted, its control characters in JSON's own escapes
    (``\\u001b``: the text still reads as the same JSON). ``json.dumps`` escapes C0 controls
    inside strings itself; the line breaks left are the indent's own, so they stay."""
    dumped = json.dumps(value, indent=2, ensure_ascii=False)
    dumped = _CONTROL_BUT_LINES.sub(lambda m: f"\\u{ord(m.group()):04x}", dumped)
    text = JSONHighlighter()(dumped)
    text.no_wrap = True
    return text
