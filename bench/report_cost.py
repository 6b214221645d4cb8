"""What the HTML report and its parts cost on a big run, against what ``jorb status`` computes.

    .venv/bin/python bench/report_cost.py                  # 100k jobs, 5 runs of each
    .venv/bin/python bench/report_cost.py --n 1M --runs 3

Builds a run of N jobs in memory, each with 3 transitions of history (new -> a -> b -> done, a
few ms each), one job in 20 with an error in a, one job in 10 kicked by its predecessor, and
times each function of ``jorb.report`` the report uses, then the whole page
(``jorb.report_html.render``), in this process; medians of ``--runs``. The baseline is
``report.states`` + ``report.errors``, what ``jorb status`` computes, measured in the same run.
"""

from __future__ import annotations

import argparse
import random
from typing import Any

from common import human, machine_line, median, parse_counts, table, timed

from jorb import report, report_html, svg
from jorb.model import Job, Run

T0 = 1_800_000_000.0


def build(n: int) -> Run:
    rng = random.Random(1)
    run = Run(None)
    run.declared = [
        {"name": name, "terminal": name in ("done", "failed")}
        for name in ("new", "a", "b", "done", "failed")
    ]
    for i in range(1, n + 1):
        at = T0 + i * 0.001
        history: list[Any] = []
        for source, target in (("new", "a"), ("a", "b"), ("b", "done")):
            took = rng.lognormvariate(-5, 0.5)
            at += took
            history.append((source, target, at, took))
        errors = {}
        if i % 20 == 0:
            errors["a"] = [{"message": f"item {i} timed out", "type": "TimeoutError", "time": at}]
        parent = str(i - 1) if i % 10 == 0 else None
        run.jobs[str(i)] = Job(str(i), "done", {"i": i}, parent, history=history, errors=errors)
    run.next_id = n + 1
    run.kicks = {("a", "new"): n // 10}
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="100k", help="jobs (e.g. 100k, 1M)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    (n,) = parse_counts(args.n)
    run = build(n)
    steps = {
        "status (states + errors)": lambda: (report.states(run), report.errors(run)),
        "graph": lambda: report.graph(run),
        "svg.draw(graph)": lambda: svg.draw(report.graph(run)),
        "timeline": lambda: report.timeline(run),
        "durations": lambda: report.durations(run),
        "slowest": lambda: report.slowest(run),
        "report_html.render": lambda: report_html.render(run),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.runs):  # interleaved, so that the machine's noise falls on all alike
        for name, step in steps.items():
            times[name].append(timed(step))
    base = median(times["status (states + errors)"])
    size = len(report_html.render(run).encode())
    print(f"{human(n)} jobs, {3 * n:,} transitions; {args.runs} runs, medians; {machine_line()}")
    rows = [
        (
            name,
            f"{median(values):.3f}",
            f"{min(values):.3f}–{max(values):.3f}",
            f"{median(values) / base:.2f}×",
        )
        for name, values in times.items()
    ]
    print(table(["step", "median s", "range s", "vs status"], rows))
    print(f"\nthe page: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
