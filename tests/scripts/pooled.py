"""A jorb script in the canonical shape (no ``__main__`` guard) whose CPU-bound execs run in a
ProcessPool, for the pool's kill, interrupt and resume tests.

python pooled.py RUN JOBS GATE [DASK_ADDRESS | local]

Each exec prints ``start JOB PID PPID`` (its worker and the fork server), then reads one byte
from the FIFO GATE before it finishes (the test decides when execs may end), appends its job's
number to RUN.effects and moves the job to ``done``. With a Dask scheduler's address the execs
run in a ``jorb.dask.DaskPool`` on that cluster, and write their lines into the FIFO RUN.starts
(a Dask worker's stdout is not the script's).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

import jorb

faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)  # (harness.py: a hang)
run_path, jobs, gate = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dask = sys.argv[4] if len(sys.argv) > 4 else None


def make_app():
    return {"effects": open(run_path + ".effects", "a")}  # one per worker, never pickled


def crunch(app, overall, ctx):
    # One write, so two workers' lines never interleave on the shared pipe.
    line = f"start {ctx['i']} {os.getpid()} {os.getppid()}\n".encode()
    if overall["dask"]:
        fd = os.open(run_path + ".starts", os.O_WRONLY)
        os.write(fd, line)
        os.close(fd)
    else:
        os.write(1, line)
    total = sum(i * i for i in range(20_000))  # some pure-Python work
    with open(gate, "rb", buffering=0) as fifo:  # (one byte, not a buffer full)
        fifo.read(1)
    app["effects"].write(f"{ctx['i']}\n")
    app["effects"].flush()
    ctx["total"] = total
    return ctx, "done"


if dask:
    import jorb.dask

    pool = jorb.dask.DaskPool(None if dask == "local" else dask, app=make_app)
else:
    pool = jorb.ProcessPool(2, app=make_app)
states = [
    jorb.State("new", exec=crunch, concurrency=2, pool=pool),
    jorb.State("done", terminal=True),
]

run = jorb.Run.open(run_path, overall={"dask": bool(dask)})
if not run.jobs:
    for i in range(jobs):
        run.add_job({"i": i})
print(f"coordinator {os.getpid()}", flush=True)
jorb.Processor(None, states, progress=False, grace=20).exec(run)
print("finished", flush=True)
