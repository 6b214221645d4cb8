"""Reports over a run: pure functions of a :class:`~jorb.Run`, no IO, no printing.

What the command line shows comes from here, so a user can build the same reports in Python::

    run = jorb.Run.load("runs/migrate.json")      # works while a process runs it
    for row in jorb.report.states(run):
        print(row.name, row.jobs, row.timing)
    print(jorb.report.to_mermaid(jorb.report.graph(run)))

States come in the order the script declared them at its last exec (``run.declared``), then
any state a job is in that was not declared (after an edit of the file). Timings are the
durations of the execs that moved a job on, from each job's history; a redrive from the
command line is a transition too, but it took no time and is counted apart.
"""

from __future__ import annotations

import heapq
import math
import re
import statistics
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import JorbError, StateError
from .model import Entry, Job, Run, job_errors

__all__ = [
    "ErrorGroup",
    "ErrorSummary",
    "Graph",
    "Histogram",
    "HistoryRow",
    "JobDetail",
    "SlowExec",
    "StateReport",
    "Timeline",
    "Timing",
    "durations",
    "error_line",
    "errors",
    "find_jobs",
    "graph",
    "graph_document",
    "history",
    "is_complete",
    "job_detail",
    "last_error",
    "seconds",
    "slowest",
    "state_names",
    "states",
    "timeline",
    "timings",
    "to_dot",
    "to_mermaid",
]


@dataclass(frozen=True, slots=True)
class Timing:
    """How long the execs of one state took, over the whole history of the run."""

    count: int
    """Execs that moved a job on (failed attempts that were retried are not timed)."""
    mean: float
    """Mean duration in seconds."""
    median: float
    """Median duration in seconds."""
    p95: float
    """95th percentile (nearest rank) in seconds."""
    total: float
    """Sum of the durations in seconds."""


@dataclass(frozen=True, slots=True)
class StateReport:
    """One state of a run, as the file tells it."""

    name: str
    """The state's name."""
    terminal: bool | None
    """Whether it is terminal; None for a state the last exec did not declare."""
    jobs: int
    """Jobs in the state now."""
    paused: bool
    """Whether new exec starts in the state are paused."""
    errors: int
    """Errors recorded in the state, over every job and attempt."""
    failing: int
    """Jobs with at least one error recorded in the state."""
    timing: Timing | None
    """Durations of the state's execs, None if none moved a job on yet."""
    delayed: int = 0
    """Jobs held back until a later time (a delay, or a retry's backoff) as of ``now``."""


@dataclass(frozen=True, slots=True)
class ErrorGroup:
    """Errors whose messages differ only in numbers (ids, counts, hashes)."""

    line: str
    """``"Type: first line of the message"`` of the first error of the group."""
    count: int
    """How many errors."""
    variants: int
    """How many different messages the group holds."""
    jobs: tuple[str, ...] = ()
    """Ids of a few jobs (up to three, first seen first) that had an error of the group."""


@dataclass(frozen=True, slots=True)
class ErrorSummary:
    """The errors recorded in one state, most common first."""

    state: str
    """The state they happened in."""
    errors: int
    """How many error records."""
    jobs: int
    """How many jobs they belong to."""
    common: tuple[ErrorGroup, ...]
    """The most common groups, largest first."""
    groups: int
    """How many groups there are in all."""


@dataclass(frozen=True, slots=True)
class Graph:
    """The observed state graph: states as nodes, transitions with counts as edges."""

    nodes: tuple[tuple[str, bool | None, int], ...]
    """``(state, terminal, jobs in it now)`` in report order."""
    edges: dict[tuple[str, str], int]
    """Transitions made by execs (including giving up on errors), by ``(from, to)``."""
    redrives: dict[tuple[str, str], int]
    """Transitions made by redrives from the command line, by ``(from, to)``."""
    kicks: dict[tuple[str, str], int] = field(default_factory=dict)
    """Jobs created by kicks, by ``(state whose exec kicked, state the new job started in)``."""
    gave_up: dict[tuple[str, str], int] = field(default_factory=dict)
    """Of ``edges``, the ones made by giving up on a job (its retries used up)."""
    timings: dict[str, Timing] = field(default_factory=dict)
    """Per state, how long the execs that moved a job out of it took."""

    @property
    def error_states(self) -> set[str]:
        """States that jobs were routed to by giving up on them."""
        return {target for _, target in self.gave_up}


@dataclass(frozen=True, slots=True)
class JobDetail:
    """One job with its family."""

    job: Job
    """The job itself (ctx, history, errors)."""
    parent: Job | None
    """The job that kicked it, if any (None also when the parent was deleted from the file)."""
    children: tuple[Job, ...]
    """Jobs it kicked, in creation order."""


# -- states -----------------------------------------------------------------------------------


def state_names(run: Run) -> list[str]:
    """Declared states in declaration order, then undeclared states that hold jobs."""
    names = [str(s.get("name")) for s in run.declared]
    seen = set(names)
    for job in run.jobs.values():
        if job.state not in seen:
            seen.add(job.state)
            names.append(job.state)
    return names


def states(run: Run, now: float | None = None) -> list[StateReport]:
    """A report row per state: jobs now, terminal or not, paused, errors, timing, delayed.

    ``now`` (Unix time, default the current time) decides which jobs are still delayed.
    """
    now = time.time() if now is None else now
    terminal = {str(s.get("name")): bool(s.get("terminal")) for s in run.declared}
    counts = Counter(job.state for job in run.jobs.values())
    delayed = Counter(
        job.state
        for job in run.jobs.values()
        if job.not_before is not None and job.not_before > now
    )
    times = timings(run)
    errors_in: Counter[str] = Counter()
    failing: Counter[str] = Counter()
    for job in run.jobs.values():
        for state, records in job_errors(job).items():
            errors_in[state] += len(records)
            failing[state] += 1 if records else 0
    return [
        StateReport(
            name,
            terminal.get(name),
            counts[name],
            name in run.paused,
            errors_in[name],
            failing[name],
            times.get(name),
            delayed[name],
        )
        for name in state_names(run)
    ]


def server_pauses(run: Run, now: float | None = None) -> dict[str, float]:
    """States a server's ``retry_after`` pauses at ``now`` (Unix time, default the current
    time), each with the Unix time its pause ends, as the rate-limited errors recorded it."""
    now = time.time() if now is None else now
    pauses: dict[str, float] = {}
    for job in run.jobs.values():
        for state, records in job_errors(job).items():
            for record in records:
                until = record.get("paused_until")
                if isinstance(until, int | float) and until > max(now, pauses.get(state, 0.0)):
                    pauses[state] = until
    return pauses


def is_complete(run: Run) -> bool | None:
    """Whether every job sits in a terminal state; None if no exec ever declared the states."""
    if not run.declared:
        return None if run.jobs else True
    terminal = {s.get("name") for s in run.declared if s.get("terminal")}
    return all(job.state in terminal for job in run.jobs.values())


def timings(run: Run) -> dict[str, Timing]:
    """Per state, the durations of the execs that moved a job out of it (redrives left out)."""
    redriven = _redrive_times(run)
    durations: dict[str, list[float]] = {}
    for job in run.jobs.values():
        for entry in job.history:
            source, _, when, took = entry[:4] if type(entry) is tuple else _fields(entry)
            if took == 0.0 and _is_redrive(when, took, redriven):  # (the call, only if it may be)
                continue
            if type(took) is float or isinstance(took, int | float):
                values = durations.get(source) if type(source) is str else None
                if values is None:  # a new state, or a name written in the file as another type
                    values = durations.setdefault(str(source), [])
                values.append(float(took))
    return {state: _timing(values) for state, values in durations.items()}


def _timing(values: list[float]) -> Timing:
    ordered = sorted(values)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    total = math.fsum(ordered)
    return Timing(len(ordered), total / len(ordered), statistics.median(ordered), p95, total)


# -- errors -----------------------------------------------------------------------------------


def errors(run: Run, top: int = 3) -> list[ErrorSummary]:
    """Per state with errors (report order): how many, in how many jobs, the ``top`` groups.

    Messages that differ only in their numbers ("repo-012 not found", "repo-047 not found")
    make one group, shown by its first message.
    """
    by_state: dict[str, dict[str, list[Any]]] = {}  # state -> key -> [first line, count, lines]
    jobs: Counter[str] = Counter()
    for job in run.jobs.values():
        for state, records in job_errors(job).items():
            if not records:
                continue
            jobs[state] += 1
            groups = by_state.setdefault(state, {})
            for record in records:
                line = error_line(record)
                group = groups.setdefault(_NUMBERS.sub("#", line), [line, 0, set(), []])
                group[1] += 1
                group[2].add(line)
                examples = group[3]
                if len(examples) < 3 and (not examples or examples[-1] != job.id):
                    examples.append(job.id)
    order = {name: index for index, name in enumerate(state_names(run))}
    summaries = []
    for state, groups in sorted(by_state.items(), key=lambda kv: order.get(kv[0], 1 << 30)):
        ranked = sorted(groups.values(), key=lambda g: -g[1])  # stable: first seen first
        common = tuple(
            ErrorGroup(line, count, len(lines), tuple(ids))
            for line, count, lines, ids in ranked[:top]
        )
        total = sum(g[1] for g in ranked)
        summaries.append(ErrorSummary(state, total, jobs[state], common, len(ranked)))
    return summaries


#: Numbers, and hex strings of 8+ characters (hashes, uuids), in an error message.
_NUMBERS = re.compile(r"\b(?=[0-9a-f-]*\d)[0-9a-f-]{8,}\b|\d+(?:\.\d+)?")


def error_line(record: dict[str, Any]) -> str:
    """``"Type: first line of the message"`` for one error record."""
    message = str(record.get("message", "")).strip().splitlines()
    kind = str(record.get("type", "")).rsplit(".", 1)[-1]
    first = message[0] if message else ""
    return f"{kind}: {first}" if kind and first else kind or first or "(no message)"


def last_error(job: Job) -> tuple[str, dict[str, Any]] | None:
    """The most recent error of a job and the state it happened in, if it has any."""
    latest: tuple[str, dict[str, Any]] | None = None
    for state, records in job_errors(job).items():
        for record in records:
            if latest is None or _time(record) >= _time(latest[1]):
                latest = (state, record)
    return latest


def _time(record: dict[str, Any]) -> float:
    value = record.get("time")
    return float(value) if isinstance(value, int | float) else 0.0


# -- jobs ---------------------------------------------------------------------------------------


def find_jobs(run: Run, state: str | None = None, *, errors: bool = False) -> list[Job]:
    """Jobs in creation order, only those in ``state`` and/or with errors if asked.

    An unknown ``state`` (not declared, no job in it) is a StateError naming the known ones.
    """
    if state is not None and state not in state_names(run):
        raise StateError(
            f"no state {state!r} in {run.path} (states: {', '.join(state_names(run)) or 'none'})"
        )
    return [
        job
        for job in run.jobs.values()
        if (state is None or job.state == state) and (not errors or any(job_errors(job).values()))
    ]


def job_detail(run: Run, job_id: str) -> JobDetail:
    """The job ``job_id`` with its parent and children; a JorbError if there is none."""
    job = run.jobs.get(job_id)
    if job is None:
        raise JorbError(f"no job {job_id!r} in {run.path} (ids run 1 to {run.next_id - 1})")
    parent = run.jobs.get(job.parent) if job.parent is not None else None
    return JobDetail(job, parent, tuple(run.children(job_id)))


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One entry of a job's history as ``jorb show`` prints it."""

    time: float | None
    """Unix time of the transition."""
    source: str
    """The state the job left."""
    target: str
    """The state it entered."""
    duration: float | None
    """Seconds the exec took (0 for a redrive)."""
    redrive: bool
    """Whether a redrive from the command line made it, rather than an exec."""


def history(run: Run, job: Job) -> list[HistoryRow]:
    """A job's history, each step marked as an exec's or a redrive's."""
    redriven = _redrive_times(run)
    return [
        HistoryRow(
            _number(step.get("time")),
            str(step.get("from")),
            str(step.get("to")),
            _number(step.get("duration")),
            _is_redrive(step.get("time"), step.get("duration"), redriven),
        )
        for step in job.steps()
    ]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


# -- the graph ----------------------------------------------------------------------------------


def graph(run: Run) -> Graph:
    """The states and every transition observed in the jobs' histories, with counts.

    Besides the transitions: the kicks (which state's exec created jobs in which state), which
    transitions were give-ups, and each state's exec timings. The kicks are counted as they
    happen (``run.kicks``); for a file written before jorb counted them, they are guessed from
    the times: the parent's last transition before the job, or any job created after it (ids
    grow with time), started its first exec.
    """
    redriven = _redrive_times(run)
    edges: Counter[tuple[str, str]] = Counter()
    redrives: Counter[tuple[str, str]] = Counter()
    gave_up: Counter[tuple[str, str]] = Counter()
    kicks: Counter[tuple[str, str]] = Counter()
    jobs = run.jobs
    for job in jobs.values():
        failed_at = _error_times(job) if job_errors(job) else None
        for entry in job.history:
            source, target, when, took = entry[:4] if type(entry) is tuple else _fields(entry)
            edge = (str(source), str(target))
            if took == 0.0 and _is_redrive(when, took, redriven):
                redrives[edge] += 1
                continue
            edges[edge] += 1
            if failed_at and isinstance(when, int | float) and (edge[0], when) in failed_at:
                gave_up[edge] += 1
    if run.kicks:
        kicks.update(run.kicks)
    born_by = math.inf  # a job was created before any job created after it started
    for job in reversed(jobs.values()) if not run.kicks else ():
        started = _started(job)
        born_by = min(born_by, started)
        if job.parent is not None:
            parent = jobs.get(job.parent)
            kicked_from = _kicking_state(parent, born_by) if parent is not None else None
            if kicked_from is not None:
                kicks[(kicked_from, _first_state(job))] += 1
    names = state_names(run)
    for edge in [*edges, *redrives, *kicks]:
        for name in edge:
            if name not in names:
                names.append(name)
    terminal = {str(s.get("name")): bool(s.get("terminal")) for s in run.declared}
    counts = Counter(job.state for job in jobs.values())
    nodes = tuple((name, terminal.get(name), counts[name]) for name in names)
    return Graph(nodes, dict(edges), dict(redrives), dict(kicks), dict(gave_up), timings(run))


def _error_times(job: Job) -> set[tuple[str, float]]:
    """``(state, time)`` of each error: a give-up's history entry has its error's time."""
    return {
        (state, record["time"])
        for state, records in job_errors(job).items()
        for record in records
        if isinstance(record.get("time"), int | float)
    }


def _first_state(job: Job) -> str:
    if job.history:
        entry = job.history[0]
        return str(entry[0] if type(entry) is tuple else _fields(entry)[0])
    return job.state


def _started(job: Job) -> float:
    """When the job's first exec started (infinity if it has not moved yet)."""
    if not job.history:
        return math.inf
    entry = job.history[0]
    _, _, when, took = entry[:4] if type(entry) is tuple else _fields(entry)
    if isinstance(when, int | float) and isinstance(took, int | float):
        return float(when) - float(took)
    return math.inf


def _kicking_state(parent: Job, born_by: float) -> str | None:
    """The state the parent left at its last transition no later than ``born_by``."""
    source = None
    for entry in parent.history:
        step = entry[:4] if type(entry) is tuple else _fields(entry)
        if not isinstance(step[2], int | float) or step[2] > born_by:
            break
        source = str(step[0])
    return source


def graph_document(g: Graph) -> dict[str, Any]:
    """The graph as plain JSON data (``jorb graph --json``)."""

    def timing(name: str) -> dict[str, Any] | None:
        t = g.timings.get(name)
        if t is None:
            return None
        return {"execs": t.count, "mean": t.mean, "median": t.median, "p95": t.p95}

    def edge_list(found: dict[tuple[str, str], int], **extra: Any) -> list[dict[str, Any]]:
        return [{"from": a, "to": b, "count": n, **extra} for (a, b), n in found.items()]

    errors = g.error_states
    return {
        "nodes": [
            {
                "name": name,
                "terminal": terminal,
                "jobs": jobs,
                "error_state": name in errors,
                "timing": timing(name),
            }
            for name, terminal, jobs in g.nodes
        ],
        "edges": [
            *(
                {
                    "from": a,
                    "to": b,
                    "count": n,
                    "kind": "exec",
                    "gave_up": g.gave_up.get((a, b), 0),
                }
                for (a, b), n in g.edges.items()
            ),
            *edge_list(g.kicks, kind="kick"),
            *edge_list(g.redrives, kind="redrive"),
        ],
    }


def to_mermaid(g: Graph) -> str:
    """The graph as a Mermaid flowchart: terminal states rounded, error states red, kicks
    dashed and labelled "kick", redrives dotted; each state with its jobs now and median exec."""
    ids = {name: f"s{index}" for index, (name, _, _) in enumerate(g.nodes)}
    lines = ["flowchart LR"]
    for name, terminal, jobs in g.nodes:
        label = _mermaid_text(node_label(g, name, jobs))
        lines.append(f'    {ids[name]}(["{label}"])' if terminal else f'    {ids[name]}["{label}"]')
    for (a, b), count in sorted(g.edges.items(), key=_edge_order(ids)):
        lines.append(f"    {ids[a]} -->|{count:,}| {ids[b]}")
    for (a, b), count in sorted(g.kicks.items(), key=_edge_order(ids)):
        lines.append(f'    {ids[a]} ==>|"kick {count:,}"| {ids[b]}')
    for (a, b), count in sorted(g.redrives.items(), key=_edge_order(ids)):
        lines.append(f'    {ids[a]} -.->|"redrive {count:,}"| {ids[b]}')
    errors = [ids[name] for name, _, _ in g.nodes if name in g.error_states]
    if errors:
        lines.append("    classDef error fill:#fdd,stroke:#c00")
        lines.append(f"    class {','.join(errors)} error")
    return "\n".join(lines) + "\n"


def to_dot(g: Graph) -> str:
    """The graph in Graphviz DOT: terminal states double-circled, error states red, kicks bold
    blue, redrives dashed; each state with its jobs now and median exec."""
    lines = ["digraph jorb {", "    rankdir=LR;", "    node [shape=box];"]
    errors = g.error_states
    for name, terminal, jobs in g.nodes:
        shape = ", shape=doublecircle" if terminal else ""
        colour = ", color=red, fontcolor=red" if name in errors else ""
        label = _dot_id(node_label(g, name, jobs))
        lines.append(f"    {_dot_id(name)} [label={label}{shape}{colour}];")
    ids = {name: name for name, _, _ in g.nodes}
    for (a, b), count in sorted(g.edges.items(), key=_edge_order(ids)):
        colour = ", color=red" if (a, b) in g.gave_up else ""
        lines.append(f'    {_dot_id(a)} -> {_dot_id(b)} [label="{count:,}"{colour}];')
    for (a, b), count in sorted(g.kicks.items(), key=_edge_order(ids)):
        lines.append(
            f'    {_dot_id(a)} -> {_dot_id(b)} [label="kick {count:,}", style=bold, color=blue];'
        )
    for (a, b), count in sorted(g.redrives.items(), key=_edge_order(ids)):
        lines.append(f'    {_dot_id(a)} -> {_dot_id(b)} [label="redrive {count:,}", style=dashed];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def node_label(g: Graph, name: str, jobs: int) -> str:
    """``"name (jobs now)"``, then `` · median`` of its execs if any were timed."""
    timing = g.timings.get(name)
    label = f"{name} ({jobs:,})"
    return f"{label} · {seconds(timing.median)}" if timing is not None else label


def seconds(value: float) -> str:
    """A duration for people: ``"850µs"``, ``"12ms"``, ``"3.40s"``, ``"2m05s"``, ``"1h02m"``."""
    if value < 0.001:
        return f"{value * 1e6:.0f}µs"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 60:
        return f"{value:.2f}s"
    minutes, rest = divmod(int(value + 0.5), 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _edge_order(ids: dict[str, str]) -> Any:
    order = {name: index for index, name in enumerate(ids)}
    return lambda item: (order[item[0][0]], order[item[0][1]])


def _mermaid_text(text: str) -> str:
    return text.replace("&", "#amp;").replace('"', "#quot;").replace("|", "#124;")


def _dot_id(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- over time ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timeline:
    """Execs and errors per state in equal time bins, from the first transition to the last."""

    start: float
    """Unix time the first bin starts at."""
    width: float
    """Seconds per bin."""
    done: dict[str, tuple[int, ...]]
    """Per state, execs that moved a job out of it, per bin (redrives left out)."""
    errors: dict[str, tuple[int, ...]]
    """Per state, failed attempts (rate limits and timeouts included), per bin."""
    rate_limited: dict[str, tuple[int, ...]]
    """Of ``errors``, the rate-limited attempts."""


def timeline(run: Run, bins: int = 60) -> Timeline | None:
    """Throughput and errors per state over time in ``bins`` bins; None if nothing is timed."""
    done = [(str(source), float(when)) for _, source, _, when, _ in _exec_steps(run)]
    failed = [
        (state, float(record["time"]), bool(record.get("rate_limited")))
        for job in run.jobs.values()
        for state, records in job_errors(job).items()
        for record in records
        if isinstance(record.get("time"), int | float)
    ]
    times = [when for _, when in done] + [when for _, when, _ in failed]
    if not times:
        return None
    start, end = min(times), max(times)
    width = max((end - start) / bins, 1e-3)

    def binned(events: list[tuple[str, float]]) -> dict[str, tuple[int, ...]]:
        found: dict[str, list[int]] = {}
        for state, when in events:
            counts = found.get(state)
            if counts is None:
                counts = found[state] = [0] * bins
            counts[min(bins - 1, int((when - start) / width))] += 1
        order = {name: index for index, name in enumerate(state_names(run))}
        return {k: tuple(found[k]) for k in sorted(found, key=lambda k: order.get(k, 1 << 30))}

    return Timeline(
        start,
        width,
        binned(done),
        binned([(state, when) for state, when, _ in failed]),
        binned([(state, when) for state, when, limited in failed if limited]),
    )


@dataclass(frozen=True, slots=True)
class Histogram:
    """How exec durations spread, per state, over bins spaced evenly on a log scale."""

    edges: tuple[float, ...]
    """Bin edges in seconds, ``bins + 1`` of them (a duration of 0 counts in the first bin)."""
    counts: dict[str, tuple[int, ...]]
    """Per state, execs per bin."""


def durations(run: Run, bins: int = 30) -> Histogram | None:
    """Exec durations per state (the execs that moved a job on); None if none are timed."""
    found: dict[str, list[float]] = {}
    for _, source, _, _, took in _exec_steps(run):
        found.setdefault(str(source), []).append(float(took))
    positive = [t for values in found.values() for t in values if t > 0]
    if not positive:
        return None
    low, high = math.log10(min(positive)), math.log10(max(positive))
    high = max(high, low + 1e-6)
    step = (high - low) / bins
    edges = tuple(10 ** (low + i * step) for i in range(bins + 1))
    counts: dict[str, tuple[int, ...]] = {}
    for name in state_names(run) + sorted(set(found) - set(state_names(run))):
        values = found.get(name)
        if not values:
            continue
        row = [0] * bins
        for took in values:
            index = 0 if took <= 0 else int((math.log10(took) - low) / step)
            row[min(bins - 1, max(0, index))] += 1
        counts[name] = tuple(row)
    return Histogram(edges, counts)


@dataclass(frozen=True, slots=True)
class SlowExec:
    """One exec, among the slowest of the run."""

    job: str
    """The job's id."""
    source: str
    """The state it ran in."""
    target: str
    """Where it moved the job."""
    duration: float
    """Seconds it took."""
    time: float
    """Unix time it ended."""


def slowest(run: Run, top: int = 10) -> list[SlowExec]:
    """The ``top`` longest execs that moved a job on, longest first."""
    found = heapq.nlargest(top, _exec_steps(run), key=lambda step: float(step[4]))
    return [
        SlowExec(job.id, str(a), str(b), float(took), float(when))
        for job, a, b, when, took in found
    ]


def _exec_steps(run: Run) -> Iterator[tuple[Job, Any, Any, Any, Any]]:
    """Every timed history entry made by an exec: ``(job, from, to, time, duration)``."""
    redriven = _redrive_times(run)
    for job in run.jobs.values():
        for entry in job.history:
            source, target, when, took = entry[:4] if type(entry) is tuple else _fields(entry)
            if not isinstance(took, int | float) or not isinstance(when, int | float):
                continue
            if took == 0.0 and _is_redrive(when, took, redriven):
                continue
            yield job, source, target, when, took


# -- telling redrives from execs ------------------------------------------------------------------


def _redrive_times(run: Run) -> set[float]:
    """When redrives (and cancels, recorded like them) were applied: their history entries
    carry that time (and take none)."""
    return {
        float(change[key])
        for change in run.changes
        if isinstance(change, dict)
        and str(change.get("what", "")).startswith(("redrove", "cancelled"))
        for key in ("applied", "time")
        if isinstance(change.get(key), int | float)
    }


def _is_redrive(when: Any, took: Any, redriven: set[float]) -> bool:
    return took == 0.0 and isinstance(when, int | float) and when in redriven


def _fields(entry: Entry) -> tuple[Any, ...]:
    """A history entry's (from, to, time, duration), whatever its shape (a big run's report
    reads millions of plain tuples directly, not through ``job.steps()``)."""
    if isinstance(entry, Mapping):
        return entry.get("from"), entry.get("to"), entry.get("time"), entry.get("duration")
    return tuple(entry[:4])  # (a list, or a Step a script appended)
