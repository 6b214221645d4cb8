"""examples/mapreduce.py with its execs logged, and children held so the test can kill mid-run.

    python mapreduce_kill.py RUN EFFECTS [--hold N]

Every attempt of a ``count`` child logs ``start DOC``, then ``end DOC`` or ``error DOC``; with
``--hold N``, documents ``>= N`` log ``hold DOC`` instead and wait until the process is killed.
The batch's join exec logs ``reduce CHILDREN STATES``. The execs themselves are the example's.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any

from effects import Effects

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import mapreduce

import jorb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("effects", type=Path)
    parser.add_argument("--hold", type=int, default=None)
    parser.add_argument("--docs", type=int, default=100)
    args = parser.parse_args()
    effects = Effects(args.effects)

    async def count(app: Any, overall: Any, ctx: dict[str, Any]) -> Any:
        doc = ctx["doc"]
        effects.log(f"start {doc}")
        if args.hold is not None and doc >= args.hold:
            effects.log(f"hold {doc}")
            await asyncio.Event().wait()  # until SIGKILL
        try:
            result = await mapreduce.count(app, overall, ctx)
        except Exception:
            effects.log(f"error {doc}")
            raise
        effects.log(f"end {doc}")
        return result

    def total(app: Any, overall: Any, ctx: Any, children: list[jorb.Child]) -> Any:
        states = ",".join(sorted({child.state for child in children}))
        effects.log(f"reduce {len(children)} {states}")
        return mapreduce.total(app, overall, ctx, children)

    wrapped = {"count": count, "total": total}
    states = [
        dataclasses.replace(state, exec=wrapped[state.name]) if state.name in wrapped else state
        for state in mapreduce.declare_states()
    ]
    run = mapreduce.open_run(args.run, args.docs, seed=7, fresh=False)
    store = mapreduce.DocumentStore(run.overall["seed"])
    jorb.Processor(store, states, progress=False).exec(run)
    effects.log("finished")


if __name__ == "__main__":
    main()
