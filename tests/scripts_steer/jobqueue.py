"""A run for the job-queue tests: keyed jobs, polls with jorb.Next, NoRetry, cancellable execs.

    python jobqueue.py RUN EFFECTS GATES [--jobs N] [--state S] [--concurrency C]

Every start adds jobs ``n = 0..N-1`` in state ``S`` (default ``new``) with the key ``job-N``:
a rerun (after a kill) adds nothing. States:

- ``new``: async; logs ``start N``, waits for the gate ``GATES/N`` (or ``all``), logs ``end N``.
- ``sync``: a ``def`` exec in a thread; logs ``sync start N``, waits for the same gate, logs
  ``sync end N``.
- ``poll``: async; logs ``poll N`` and comes back in an hour (``jorb.Next("poll", delay=3600)``)
  unless the gate ``GATES/poll-N`` exists.
- ``check``: async; logs ``check N`` and raises ``jorb.NoRetry`` (it has ``retries=5``).

A listener logs ``delayed K`` each time the number of delayed jobs changes, and the processor's
notes as ``note ...``. The last line is ``finished`` and the run's counts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from effects import Effects, Notes, gate

import jorb


class Delays(Notes):
    """Logs the processor's notes, and the number of delayed jobs when it changes."""

    def __init__(self, effects: Effects) -> None:
        super().__init__(effects)
        self.delayed = 0

    def update(self, status: Any) -> None:
        delayed = sum(row.delayed for row in status.states)
        if delayed != self.delayed:
            self.delayed = delayed
            self.effects.log(f"delayed {delayed}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("effects", type=Path)
    parser.add_argument("gates", type=Path)
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--state", default="new")
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    effects = Effects(args.effects)

    def opened(name: str) -> bool:
        return (args.gates / name).exists() or (args.gates / "all").exists()

    async def work(app: Any, overall: Any, ctx: dict[str, Any]) -> Any:
        effects.log(f"start {ctx['n']}")
        await gate(args.gates, str(ctx["n"]))
        effects.log(f"end {ctx['n']}")
        return ctx, "done"

    def sync(app: Any, overall: Any, ctx: dict[str, Any]) -> Any:
        effects.log(f"sync start {ctx['n']}")
        while not opened(str(ctx["n"])):
            time.sleep(0.005)  # the thread waits for its gate (the test never sleeps)
        effects.log(f"sync end {ctx['n']}")
        return ctx, "done"

    async def poll(app: Any, overall: Any, ctx: dict[str, Any]) -> Any:
        effects.log(f"poll {ctx['n']}")
        if opened(f"poll-{ctx['n']}"):
            return ctx, "done"
        return ctx, jorb.Next("poll", delay=3600)

    async def check(app: Any, overall: Any, ctx: dict[str, Any]) -> Any:
        effects.log(f"check {ctx['n']}")
        raise jorb.NoRetry(f"job {ctx['n']} can never pass")

    c = args.concurrency
    states = [
        jorb.State("new", exec=work, concurrency=c),
        jorb.State("sync", exec=sync, concurrency=c),
        jorb.State("poll", exec=poll, concurrency=c),
        jorb.State("check", exec=check, retries=5),
        jorb.State("done", terminal=True),
        jorb.State("failed", terminal=True),
    ]
    run = jorb.Run.open(args.run)
    for n in range(args.jobs):
        run.add_job({"n": n}, args.state, key=f"job-{n}")
    effects.log(f"jobs {len(run.jobs)}")
    listener = Delays(effects)
    jorb.Processor(None, states, progress=False, listeners=[listener], status_interval=0.01).exec(
        run
    )
    effects.log(f"finished {sorted(run.counts().items())}")


if __name__ == "__main__":
    main()
