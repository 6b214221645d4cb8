"""Progress overhead: the same 100k-transition run with the live display on and off.

    .venv/bin/python bench/progress_overhead.py              # 5 runs of each, medians
    .venv/bin/python bench/progress_overhead.py --write      # and record them in BENCHMARKS.md

The workload: 50,000 jobs go new -> a -> done (100,000 transitions), each exec an ``async def``
that returns at once, ``concurrency=64`` per state, ``durable=False`` (no fsync), so the engine
is as fast as it gets and the display's share of the time is as large as it gets. Three modes,
interleaved run by run:

- ``off``: ``progress=False``.
- ``bars``: the rich display exactly as on a terminal (a ``force_terminal`` console, 120 columns,
  256 colours, 4 frames a second, fed by the processor 5 times a second) writing to /dev/null.
- ``plain``: the plain status lines used when stdout is not a terminal, to /dev/null.

The time is ``processor.exec(run)`` on the wall clock. The frames the display drew are counted to
show it really drew (about 4 a second; plain lines: one every 5 s, plus one at start and end).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, machine_line, median, rate, table
from rich.console import Console

import jorb
from jorb.progress import LiveProgress, PlainProgress

JOBS = 50_000
CONCURRENCY = 64
HEADING = "## Progress overhead"


async def _step(app: Any, overall: Any, ctx: dict[str, Any]) -> tuple[dict[str, Any], str]:
    return ctx, "a"


async def _last(app: Any, overall: Any, ctx: dict[str, Any]) -> tuple[dict[str, Any], str]:
    return ctx, "done"


STATES = [
    jorb.State("new", exec=_step, concurrency=CONCURRENCY),
    jorb.State("a", exec=_last, concurrency=CONCURRENCY),
    jorb.State("done", terminal=True),
]


class Counting:
    """A /dev/null that counts the frames (or lines) written to it."""

    def __init__(self) -> None:
        self.file = open(os.devnull, "w")  # noqa: SIM115 - closed in close()
        self.frames = 0

    def write(self, text: str) -> int:
        self.frames += text.count(" elapsed") + text.count("jorb [")
        return self.file.write(text)

    def flush(self) -> None:
        self.file.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        self.file.close()


def one_run(mode: str, directory: Path) -> tuple[float, int]:
    """Seconds for one exec of the workload in ``mode``, and frames the display drew."""
    path = directory / f"{mode}.json"
    for leftover in directory.glob(f"{mode}.json*"):
        leftover.unlink()
    run = jorb.Run.open(path)
    for n in range(JOBS):
        run.add_job({"n": n})
    sink = Counting()
    listeners: list[jorb.StatusListener] = []
    if mode == "bars":
        console = Console(file=sink, force_terminal=True, width=120, color_system="256")  # type: ignore[arg-type]
        listeners.append(LiveProgress(console))
    elif mode == "plain":
        listeners.append(PlainProgress(sink, every=5.0))  # type: ignore[arg-type]
    processor = jorb.Processor(None, STATES, progress=False, listeners=listeners, durable=False)
    gc.collect()
    start = time.perf_counter()
    processor.exec(run)
    seconds = time.perf_counter() - start
    sink.close()
    assert run.counts() == {"done": JOBS}, run.counts()
    return seconds, sink.frames


def update_section(path: Path, body: str) -> None:
    """Replace (or append) this benchmark's section of BENCHMARKS.md, leaving the rest alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    try:
        start = lines.index(HEADING)
    except ValueError:
        lines += ["", *body.splitlines()]
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = lines[end:]
        lines[start:end] = [*body.splitlines(), *([""] if tail else [])]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each mode (default 5)")
    parser.add_argument("--write", action="store_true", help="record in BENCHMARKS.md")
    args = parser.parse_args(argv)
    modes = ("off", "bars", "plain")
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    written: dict[str, list[int]] = {mode: [] for mode in modes}
    directory = Path(tempfile.mkdtemp(prefix="jorb-progress-bench-"))
    try:
        one_run("off", directory)  # warm up (imports, allocator)
        for index in range(args.runs):
            for mode in modes if index % 2 == 0 else reversed(modes):
                seconds, size = one_run(mode, directory)
                times[mode].append(seconds)
                written[mode].append(size)
                print(f"run {index + 1} {mode:5} {seconds:6.2f}s", file=sys.stderr)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    base = median(times["off"])
    rows = []
    for mode in modes:
        m = median(times[mode])
        rows.append(
            [
                mode,
                f"{m:.2f}",
                f"{min(times[mode]):.2f}",
                f"{max(times[mode]):.2f}",
                rate(2 * JOBS / m),
                f"{m / base:.3f}×",
                f"{median(written[mode]) / m:.1f}",
            ]
        )
    headers = ["progress", "median s", "min s", "max s", "transitions/s", "vs off", "frames/s"]
    body = "\n".join(
        [
            HEADING,
            "",
            f"`.venv/bin/python bench/progress_overhead.py --runs {args.runs}` · {machine_line()}",
            "",
            f"{2 * JOBS:,} transitions ({JOBS:,} no-op async jobs, new -> a -> done, concurrency "
            f"{CONCURRENCY}, durable=False), {args.runs} runs of each mode interleaved; "
            "`bars` draws the rich display into a terminal-like console on /dev/null.",
            "",
            table(headers, rows),
            "",
            f"Bars cost {median(times['bars']) / base - 1:+.1%} of the run's time "
            f"(plain lines {median(times['plain']) / base - 1:+.1%}).",
        ]
    )
    print(body)
    if args.write:
        update_section(ROOT / "BENCHMARKS.md", body)


if __name__ == "__main__":
    main()
