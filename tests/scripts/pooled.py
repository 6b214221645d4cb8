"""A jorb script in the canonical shape (no ``__main__`` guard) whose CPU-bound execs run in a
ProcessPool, for the pool's kill, interrupt and resume tests.

python pooled.py RUN JOBS GATE

Each exec prints ``start JOB PID PPID`` (its worker and the fork server), then reads one byte
from the FIFO GATE before it finishes (the test decides when execs may end), appends its job's
number to RUN.effects and moves the job to ``done``.
"""

from __future__ import annotations

import os
import sys

import jorb

run_path, jobs, gate = sys.argv[1], int(sys.argv[2]), sys.argv[3]


def make_app():
    return {"effects": open(run_path + ".effects", "a")}  # one per worker, never pickled


def crunch(app, overall, ctx):
    # One write, so two workers' lines never interleave on the shared pipe.
    os.write(1, f"start {ctx['i']} {os.getpid()} {os.getppid()}\n".encode())
    total = sum(i * i for i in range(20_000))  # some pure-Python work
    with open(gate, "rb", buffering=0) as fifo:  # (one byte, not a buffer full)
        fifo.read(1)
    app["effects"].write(f"{ctx['i']}\n")
    app["effects"].flush()
    ctx["total"] = total
    return ctx, "done"


pool = jorb.ProcessPool(2, app=make_app)
states = [
    jorb.State("new", exec=crunch, concurrency=2, pool=pool),
    jorb.State("done", terminal=True),
]

run = jorb.Run.open(run_path)
if not run.jobs:
    for i in range(jobs):
        run.add_job({"i": i})
print(f"coordinator {os.getpid()}", flush=True)
jorb.Processor(None, states, progress=False, grace=20).exec(run)
print("finished", flush=True)
