"""Touch the machine's free memory once, so that the benchmarks after it measure jorb, not the
hypervisor backing guest memory on first touch.

    .venv/bin/python bench/warm_memory.py            # 80% of MemAvailable
    .venv/bin/python bench/warm_memory.py --gb 14

Why: on this project's VM a page of memory the guest has not touched since boot (or since the
host took it back, which it does soon after the guest frees it) costs ~10 µs to fault in. A
benchmark that holds a few GB (a 1M-job run holds ~3 GB) and then writes a snapshot gets fresh
pages for the page cache, and on a cold VM its `write()`s cost 10x: measured 2026-12-06,
writing 578 MB while holding 3 GB took 1.08 s of CPU cold and 0.12 s right after this script
(0.11 s holding nothing); `engine.py --n 1M` went from 9.9 to 7.5 s of CPU. A machine that has
run for a while has its memory backed, so warm is what a user sees; the small benchmarks never
get past the warm pages. Run this immediately before any figure at 1M jobs.
"""

from __future__ import annotations

import argparse
import time


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("warm_memory.py: no MemAvailable in /proc/meminfo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, help="how much to touch (default: 80%% of available)")
    args = parser.parse_args()
    size = int(args.gb * (1 << 30)) if args.gb else int(available_bytes() * 0.8)
    page = 4096
    start = time.perf_counter()
    block = bytearray(size)  # (zero pages, mapped on first write)
    for offset in range(0, size, page):
        block[offset] = 1
    del block
    seconds = time.perf_counter() - start
    per_page = seconds / (size / page) * 1e6
    print(f"touched {size / (1 << 30):.1f} GB in {seconds:.1f} s ({per_page:.2f} µs a page)")


if __name__ == "__main__":
    main()
