"""A run to steer from outside: gated jobs the test lets through one by one.

    python steer.py RUN EFFECTS GATES [--jobs N] [--concurrency C] [--wait-inbox] [--again]

States: ``new`` (async exec: logs ``start N``, waits for the gate file ``GATES/N`` or
``GATES/all``, logs ``end N``, goes to ``done``), ``probe`` (logs ``probe N``, goes to ``done``),
and the terminal ``parked``, ``done``, ``failed``. ``N`` is the job's ``ctx["n"]``. With
``--jobs N`` a new run gets jobs ``n = 0..N-1`` in ``new``. The processor's notes are logged as
``note ...``. With ``--wait-inbox`` the script opens the run, logs ``opened``, and only calls exec
once a request is waiting in the run's inbox (a change made between ``Run.open`` and ``exec``).
With ``--again``, after exec returns it logs ``exec returned``, waits for the gate file
``GATES/again`` and calls exec on the same Run a second time (logging ``refused: ...`` if
jorb refuses to overwrite a file changed meanwhile).
The last line is ``finished`` and the run's counts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from effects import Effects, Notes, gate

import jorb
from jorb.control import inbox_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("effects", type=Path)
    parser.add_argument("gates", type=Path)
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--wait-inbox", action="store_true")
    parser.add_argument("--again", action="store_true")
    args = parser.parse_args()
    effects = Effects(args.effects)

    async def work(app: Any, overall: Any, ctx: dict[str, Any]) -> Any:
        n = ctx["n"]
        effects.log(f"start {n}")  # synchronous: logged in the very loop step the exec starts
        await gate(args.gates, str(n))
        effects.log(f"end {n}")
        return ctx, "done"

    async def probe(app: Any, overall: Any, ctx: dict[str, Any]) -> Any:
        effects.log(f"probe {ctx['n']}")
        return ctx, "done"

    states = [
        jorb.State("new", exec=work, concurrency=args.concurrency),
        jorb.State("probe", exec=probe),
        jorb.State("parked", terminal=True),
        jorb.State("done", terminal=True),
        jorb.State("failed", terminal=True),
    ]
    run = jorb.Run.open(args.run)
    if not run.jobs:
        for n in range(args.jobs):
            run.add_job({"n": n})
    if args.wait_inbox:
        effects.log("opened")
        inbox = inbox_path(args.run)
        while not (inbox.exists() and any(p.suffix == ".json" for p in inbox.iterdir())):
            time.sleep(0.005)
    jorb.Processor(None, states, progress=False, listeners=[Notes(effects)]).exec(run)
    if args.again:
        effects.log("exec returned")
        while not (args.gates / "again").exists():
            time.sleep(0.005)
        try:
            jorb.Processor(None, states, progress=False, listeners=[Notes(effects)]).exec(run)
        except jorb.RunFileError as e:  # the file changed under the stale Run: refused
            effects.log(f"refused: {e}")
    effects.log(f"finished {sorted(run.counts().items())}")


if __name__ == "__main__":
    main()
