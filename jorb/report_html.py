"""The HTML report of a run: one self-contained file that opens offline (``jorb report``).

::

    html = jorb.report_html.render(jorb.Run.load("runs/migrate.json"))
    Path("report.html").write_text(html)

What it shows comes from :mod:`jorb.report` (pure functions over the run): the workflow graph
(:mod:`jorb.svg`), a table per state, throughput and errors per state over time, how exec
durations spread, the error groups with example job ids, and the slowest execs. The charts are
drawn by plotly.js, which the ``plotly`` package ships (``pip install 'jorb[report]'``): the
whole library is written into the page, a few MB, so the file needs no network. This module is
imported only by ``jorb report``; ``import jorb`` does not import plotly.
"""

from __future__ import annotations

import html
import math
import time
from datetime import datetime
from typing import Any

from . import report, svg
from .errors import JorbError
from .model import Run

__all__ = ["render"]


def render(run: Run, *, now: float | None = None) -> str:
    """The report of ``run`` (finished or still running) as one HTML document."""
    try:
        import plotly.graph_objects as go
        import plotly.io as pio
        from plotly.offline import get_plotlyjs
    except ImportError as e:
        raise JorbError(
            f"the HTML report draws its charts with plotly, which is not installed ({e}); "
            "pip install 'jorb[report]'"
        ) from None
    now = time.time() if now is None else now
    rows = report.states(run, now)
    g = report.graph(run)
    line = report.timeline(run)
    charts = [
        ("throughput", "Execs done per second, per state", _throughput(go, line)),
        ("errors", "Failed attempts per second, per state", _errors(go, line)),
        ("durations", "How long execs took, per state", _durations(go, run)),
    ]
    scripts = []
    sections = []
    for name, title, figure in charts:
        if figure is None:
            sections.append(f"<h2>{title}</h2><p class=note>nothing to show yet</p>")
            continue
        figure.update_layout(
            margin={"l": 60, "r": 20, "t": 10, "b": 50},
            height=340,
            template="plotly_white",
            legend={"orientation": "v"},
        )
        data = pio.to_json(figure, validate=False).replace("<", "\\u003c")
        scripts.append(
            f"(f => Plotly.newPlot('chart-{name}', f.data, f.layout, "
            f"{{displaylogo: false, responsive: true}}))({data});"
        )
        sections.append(f'<h2>{title}</h2><div class="chart" id="chart-{name}"></div>')
    complete = report.is_complete(run)
    finished = sum(row.jobs for row in rows if row.terminal)
    verdict = (
        "complete"
        if complete
        else "never executed"
        if complete is None
        else f"not complete: {finished:,} of {len(run.jobs):,} jobs in terminal states"
    )
    title = f"jorb report: {run.path or 'run'}"
    return "".join(
        [
            "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style>",
            f"<script>{get_plotlyjs()}</script></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            f"<p class=summary><b>{html.escape(verdict)}</b> · {len(run.jobs):,} jobs · ",
            f"{sum(row.errors for row in rows):,} errors · written {_when(now)}</p>",
            "<h2>Workflow</h2><div class=graph>",
            svg.draw(g),
            "</div>",
            _legend(),
            _state_table(rows),
            *sections,
            _error_tables(report.errors(run, top=5)),
            _slowest(report.slowest(run)),
            f"<script>{''.join(scripts)}</script></body></html>\n",
        ]
    )


# -- charts ------------------------------------------------------------------------------------


def _throughput(go: Any, line: report.Timeline | None) -> Any:
    if line is None:
        return None
    figure = go.Figure()
    times = _bin_times(line)
    for state, counts in line.done.items():
        figure.add_trace(
            go.Scatter(
                x=times,
                y=[n / line.width for n in counts],
                name=state,
                mode="lines",
                line={"shape": "hv"},
            )
        )
    figure.update_layout(xaxis_title="time", yaxis_title="execs/s")
    return figure


def _errors(go: Any, line: report.Timeline | None) -> Any:
    if line is None or not line.errors:
        return None
    figure = go.Figure()
    times = _bin_times(line)
    for state, counts in line.errors.items():
        limited = line.rate_limited.get(state, (0,) * len(counts))
        other = [n - k for n, k in zip(counts, limited, strict=True)]
        if any(other):
            figure.add_trace(go.Bar(x=times, y=[n / line.width for n in other], name=state))
        if any(limited):
            figure.add_trace(
                go.Bar(
                    x=times,
                    y=[n / line.width for n in limited],
                    name=f"{state} (rate limited)",
                    marker={"pattern": {"shape": "/"}},
                )
            )
    figure.update_layout(barmode="stack", xaxis_title="time", yaxis_title="errors/s")
    return figure


def _durations(go: Any, run: Run) -> Any:
    hist = report.durations(run)
    if hist is None:
        return None
    figure = go.Figure()
    middles = [(a * b) ** 0.5 for a, b in zip(hist.edges, hist.edges[1:], strict=False)]
    for state, counts in hist.counts.items():
        figure.add_trace(go.Scatter(x=middles, y=list(counts), name=state, mode="lines+markers"))
    ticks = [
        m * 10.0**e
        for e in range(math.floor(math.log10(hist.edges[0])), math.ceil(math.log10(hist.edges[-1])))
        for m in (1, 2, 5)
        if hist.edges[0] <= m * 10.0**e <= hist.edges[-1]
    ]
    figure.update_layout(
        xaxis={
            "type": "log",
            "title": "exec duration (log scale)",
            "tickvals": ticks,
            "ticktext": [report.seconds(v) for v in ticks],
        },
        yaxis_title="execs",
    )
    return figure


def _bin_times(line: report.Timeline) -> list[str]:
    bins = len(next(iter((*line.done.values(), *line.errors.values()))))
    return [
        datetime.fromtimestamp(line.start + i * line.width).isoformat(" ", "milliseconds")
        for i in range(bins)
    ]


# -- tables ------------------------------------------------------------------------------------


def _state_table(rows: list[report.StateReport]) -> str:
    head = "".join(
        f"<th>{h}</th>"
        for h in ("state", "", "jobs", "errors", "in jobs", "execs", "median", "p95", "mean")
    )
    body = []
    for row in rows:
        timing = row.timing
        times = (
            (
                f"{timing.count:,}",
                report.seconds(timing.median),
                report.seconds(timing.p95),
                report.seconds(timing.mean),
            )
            if timing is not None
            else ("", "", "", "")
        )
        kind = "undeclared" if row.terminal is None else "terminal" if row.terminal else ""
        kind += " paused" if row.paused else ""
        cells = (
            f"{row.jobs:,}",
            f"{row.errors:,}" if row.errors else "",
            f"{row.failing:,}" if row.errors else "",
            *times,
        )
        body.append(
            f"<tr><td class=name>{html.escape(row.name)}</td><td>{kind}</td>"
            + "".join(f"<td class=n>{c}</td>" for c in cells)
            + "</tr>"
        )
    return f"<h2>States</h2><table><tr>{head}</tr>{''.join(body)}</table>"


def _error_tables(summaries: list[report.ErrorSummary]) -> str:
    if not summaries:
        return "<h2>Errors</h2><p class=note>no errors recorded</p>"
    parts = ["<h2>Errors (most common first)</h2>"]
    for summary in summaries:
        parts.append(
            f"<h3>{html.escape(summary.state)}: {summary.errors:,} error(s) in "
            f"{summary.jobs:,} job(s)</h3><table class=errors>"
            "<tr><th>count</th><th>error</th><th>messages</th><th>example jobs</th></tr>"
        )
        for group in summary.common:
            parts.append(
                f"<tr><td class=n>{group.count:,}</td><td>{html.escape(group.line)}</td>"
                f"<td class=n>{group.variants:,}</td>"
                f"<td>{html.escape(', '.join(group.jobs))}</td></tr>"
            )
        others = summary.groups - len(summary.common)
        if others:
            parts.append(f"<tr><td></td><td class=note>... and {others:,} other kind(s)</td></tr>")
        parts.append("</table>")
    parts.append(
        "<p class=note>jorb show RUNFILE JOB_ID prints a job's errors with tracebacks.</p>"
    )
    return "".join(parts)


def _slowest(slow: list[report.SlowExec]) -> str:
    if not slow:
        return ""
    rows = "".join(
        f"<tr><td class=n>{html.escape(s.job)}</td><td>{html.escape(s.source)}</td>"
        f"<td>{html.escape(s.target)}</td><td class=n>{report.seconds(s.duration)}</td>"
        f"<td>{_when(s.time)}</td></tr>"
        for s in slow
    )
    return (
        "<h2>Slowest execs</h2><table><tr><th>job</th><th>state</th><th>moved to</th>"
        f"<th>took</th><th>ended</th></tr>{rows}</table>"
    )


def _legend() -> str:
    return (
        "<p class=legend><span class=lane>state</span> <span class=terminal>terminal</span> "
        "<span class=error>given up into</span> · edges: transitions with counts, "
        "<span style='color:#1565c0'>- - kicks</span>, "
        "<span style='color:#c62828'>give-ups</span>, "
        "<span style='color:#ef6c00'>··· redrives</span> · each state: jobs in it now, "
        "median exec</p>"
    )


def _when(value: float) -> str:
    return datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")


_STYLE = """
body { font-family: Helvetica, Arial, sans-serif; margin: 24px 32px; color: #212121; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
h3 { font-size: 14px; margin: 14px 0 4px; }
.summary { color: #424242; } .note { color: #757575; font-size: 13px; }
.graph { overflow-x: auto; border: 1px solid #e0e0e0; border-radius: 6px; padding: 8px; }
.graph svg { max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 3px 10px; text-align: left; border-bottom: 1px solid #eeeeee; }
td.n { text-align: right; font-variant-numeric: tabular-nums; } td.name { font-weight: bold; }
.chart { width: 100%; max-width: 1100px; }
.legend { font-size: 12px; color: #424242; }
.legend span.lane, .legend span.terminal, .legend span.error {
  padding: 1px 6px; border-radius: 3px; border: 1px solid; }
.legend .lane { background: #e3f2fd; border-color: #1565c0; }
.legend .terminal { background: #e8f5e9; border-color: #2e7d32; }
.legend .error { background: #fde0dc; border-color: #c62828; }
"""
