"""CPU-bound execs on every core: render Mandelbrot tiles in a jorb.ProcessPool.

Each job renders one tile in pure Python (a few milliseconds of work that holds the GIL, as
parsing, resizing or a model would) and keeps a checksum of it. A ``def`` exec in a thread would
use one core at most; ``jorb.State(..., pool=jorb.ProcessPool(app=Renderer))`` runs the execs
in one worker process per core. ``Renderer`` is the app factory: each worker builds one (the
stand-in for loading a model or opening a client) and its execs receive it.

This is a plain script, without an ``if __name__ == "__main__"`` guard, like every jorb script:
the pool's workers are forked from it when exec starts, so it never runs twice.

Usage::

    .venv/bin/python examples/cpu_pool.py                  # writes runs/cpu_pool.json
    .venv/bin/python examples/cpu_pool.py --fresh --jobs 2000
    .venv/bin/python examples/cpu_pool.py --fresh --threads           # no pool: compare
    .venv/bin/python examples/cpu_pool.py --fresh --dask local        # a local Dask cluster
    .venv/bin/python examples/cpu_pool.py --fresh --dask tcp://scheduler:8786

Kill it while it renders and run it again: the tiles already rendered are not rendered again.
"""

from __future__ import annotations

import argparse
import os
import time
import zlib
from pathlib import Path
from typing import Any

import jorb

ROOT = Path(__file__).resolve().parent.parent

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--run", type=Path, default=ROOT / "runs" / "cpu_pool.json")
parser.add_argument("--jobs", type=int, default=400, help="tiles in a new run")
parser.add_argument("--fresh", action="store_true", help="discard the run file; start over")
parser.add_argument("--threads", action="store_true", help="run the execs in threads instead")
parser.add_argument("--dask", metavar="ADDRESS", help="a Dask scheduler's address, or 'local'")
args = parser.parse_args()

TILE, ITERATIONS = 24, 40


class Renderer:
    """The app: built once per worker process (here, a table of colours)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.palette = bytes((i * 7) % 256 for i in range(ITERATIONS + 1))

    def tile(self, x0: float, y0: float, step: float) -> bytes:
        pixels = bytearray()
        for row in range(TILE):
            for col in range(TILE):
                c = complex(x0 + col * step, y0 + row * step)
                z, n = 0j, 0
                while abs(z) <= 2 and n < ITERATIONS:
                    z, n = z * z + c, n + 1
                pixels.append(self.palette[n])
        return bytes(pixels)


def render(renderer: Renderer, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
    side = overall["side"]
    step = 3.0 / (side * TILE)
    x, y = ctx["tile"] % side, ctx["tile"] // side
    pixels = renderer.tile(-2.0 + x * TILE * step, -1.5 + y * TILE * step, step)
    ctx["checksum"] = zlib.crc32(pixels)
    ctx["pid"] = renderer.pid  # which worker rendered it
    return ctx, "done"


if args.threads:
    pool = None
elif args.dask:
    import jorb.dask

    pool = jorb.dask.DaskPool(None if args.dask == "local" else args.dask, app=Renderer)
else:
    pool = jorb.ProcessPool(app=Renderer)  # one worker per core
workers = os.cpu_count() or 1
states = [
    # Many more slots than workers: each is held until its job's transition is on disk.
    jorb.State("new", exec=render, concurrency=64 * workers, pool=pool),
    jorb.State("done", terminal=True),
]

if args.fresh:
    for stale in (args.run, args.run.with_name(args.run.name + ".journal")):
        stale.unlink(missing_ok=True)
side = max(1, int(args.jobs**0.5 + 0.999))
run = jorb.Run.open(args.run, overall={"side": side})
if not run.jobs:
    for tile in range(min(args.jobs, side * side)):
        run.add_job({"tile": tile})
started = time.perf_counter()
cpu = time.process_time()
jorb.Processor(Renderer() if pool is None else None, states, progress=False).exec(run)
wall = time.perf_counter() - started
rendered = [job for job in run.jobs.values() if job.state == "done"]
print(
    f"{len(rendered)} tiles in {wall:.2f}s by {len({j.ctx['pid'] for j in rendered})} "
    f"process(es); this process used {time.process_time() - cpu:.2f}s of CPU"
)
