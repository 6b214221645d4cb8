"""Helpers shared by the benchmark scripts: timing, medians, machine facts, markdown tables.

Standard library only, so every script runs with nothing but jorb installed (the peers
script runs this module under its own virtualenv too).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` takes on the wall clock, after a full garbage collection."""
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def parse_counts(text: str) -> list[int]:
    """``"10k,100k,1M"`` -> ``[10000, 100000, 1000000]``."""
    units = {"k": 1_000, "m": 1_000_000}
    counts = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = units.get(part[-1:], 1)
        counts.append(int(float(part.rstrip("km")) * scale))
    return counts


def human(n: float) -> str:
    """``100000`` -> ``"100k"``, ``1000000`` -> ``"1M"``."""
    for scale, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= scale and n % scale == 0:
            return f"{n // scale:g}{suffix}"
    return f"{n:g}"


def rate(n: float) -> str:
    """A rate with thousands separators: ``123456.7`` -> ``"123,457"``."""
    return f"{n:,.0f}"


def rss_bytes() -> int:
    """This process's resident set size now, in bytes (from /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process image's peak resident set size in bytes (``VmHWM``).

    Not ``ru_maxrss``: Linux keeps that across fork and exec, so a child of a parent that
    had just built a 1M-job run reported the parent's size as its own peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> dict[str, Any]:
    """What a reader needs to compare figures: date, cores, CPU, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def machine_line() -> str:
    m = machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{m['date']} · {m['cores']} cores · {m['cpu']} · Python {m['python']} · load {load}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table, numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(_numeric(r[i]) for r in cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                v.rjust(w) if num else v.ljust(w)
                for v, w, num in zip(values, widths, numeric, strict=True)
            )
            + " |"
        )

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if num else "-" * (w + 2)
            for w, num in zip(widths, numeric, strict=True)
        )
        + "|"
    )
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def _numeric(text: str) -> bool:
    return (
        text.replace(",", "")
        .replace(".", "")
        .replace("×", "")
        .replace("x", "")
        .strip(" %s")
        .isdigit()
    )


def run_child(args: Sequence[str], *, timeout: float = 600) -> dict[str, Any]:
    """Run a Python child (fresh process) that prints one JSON object as its last line."""
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def report(title: str, results: Any, markdown: str, as_json: bool) -> None:
    """Print a benchmark's results: JSON, or a header (machine, command) and a markdown table."""
    if as_json:
        print(json.dumps(results))
        return
    print(f"{title}: {machine_line()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print()
    print(markdown)
