"""What the journal's per-line CRC-32 costs: bench/engine.py's workload with and without it.

    .venv/bin/python bench/checksum_cost.py               # 100k jobs, 5 rounds
    .venv/bin/python bench/checksum_cost.py --n 10k --rounds 2

One process, interleaved rounds (with, without, with, ...), so the load of a shared machine
drifts over both alike: the only difference is ``checkpoint.frame``, which puts each record's
CRC-32 in front of it, swapped for the plain ``b"".join`` of before for the "without" runs
(what loads is not measured: the run is only written). Reports the medians of the wall clock
and of the process CPU per transition, durable (fsync per group commit) and not, and the cost
of ``frame`` alone per record of the workload's size.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import timeit
import zlib
from pathlib import Path
from typing import Any

from common import median, parse_counts, report, table
from engine import STATES, jorb_seconds

from jorb import checkpoint


def plain(records: list[bytes]) -> bytes:
    return b"".join(records)


def measure(n: int, rounds: int, workdir: Path) -> dict[str, Any]:
    framed = checkpoint.frame
    cpu: dict[str, list[float]] = {}
    wall: dict[str, list[float]] = {}
    for _ in range(rounds):
        for durable in (True, False):
            for name, frame in (("crc", framed), ("none", plain)):
                checkpoint.frame = frame  # type: ignore[assignment]
                try:
                    seconds, stats = jorb_seconds(n, durable=durable, workdir=workdir)
                finally:
                    checkpoint.frame = framed  # type: ignore[assignment]
                key = f"{name}-{'durable' if durable else 'nofsync'}"
                wall.setdefault(key, []).append(seconds)
                cpu.setdefault(key, []).append(stats["cpu_s"])
    record = (
        b'{"job":"12345","to":"b","ctx":{"i":12345},"history":{"from":"a","to":"b",'
        b'"time":1733500000.1234567,"duration":0.00012345},"seq":123456}\n'
    )
    batch = [record] * 192
    per = min(timeit.repeat(lambda: framed(batch), number=500, repeat=5)) / 500 / len(batch)
    transitions = n * len(STATES)
    return {
        "n": n,
        "rounds": rounds,
        "wall": {k: median(v) for k, v in wall.items()},
        "cpu_us": {k: median(v) / transitions * 1e6 for k, v in cpu.items()},
        "frame_ns_per_record": per * 1e9,
        "crc32_ns": min(timeit.repeat(lambda: zlib.crc32(record), number=20000, repeat=5))
        / 20000
        * 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", default="100k", help="job counts, e.g. 10k,100k")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="jorb-crc-"))
    try:
        results = [measure(n, args.rounds, workdir) for n in parse_counts(args.n)]
    finally:
        shutil.rmtree(workdir)
    rows = []
    for r in results:
        for mode in ("durable", "nofsync"):
            with_crc, without = r["cpu_us"][f"crc-{mode}"], r["cpu_us"][f"none-{mode}"]
            rows.append(
                [
                    r["n"],
                    mode,
                    f"{r['wall'][f'none-{mode}']:.2f}",
                    f"{r['wall'][f'crc-{mode}']:.2f}",
                    f"{without:.2f}",
                    f"{with_crc:.2f}",
                    f"{with_crc - without:+.2f} ({(with_crc / without - 1) * 100:+.1f}%)",
                ]
            )
    headers = ["jobs", "mode", "wall s, no CRC", "wall s, CRC", "CPU µs/tr, no CRC"]
    headers += ["CPU µs/tr, CRC", "CRC's CPU µs/tr"]
    report("journal checksum cost", results, table(headers, rows), as_json=False)
    for r in results:
        print(
            f"\nframe(): {r['frame_ns_per_record']:.0f} ns per record of 140 bytes "
            f"(zlib.crc32 alone: {r['crc32_ns']:.0f} ns)"
        )


if __name__ == "__main__":
    main()
