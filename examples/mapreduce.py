"""Map-reduce with fan-in: count the words of 100 documents in parallel, then add them up.

One job, the *batch*, kicks a ``count`` job per document and moves on to ``total``, a join state
(``jorb.State("total", exec=total, join=True)``). There it waits, holding no slot, until every
document it kicked has ended; then its exec runs once, with a fourth argument: ``children``, one
``jorb.Child(id, state, ctx)`` per document, in the order they were kicked. Each child says where
it ended (``"counted"``, or ``"unreadable"`` when its retries ran out), so the parent decides: it
adds up what was counted, lists what was not, and finishes ``done`` or ``incomplete``.

Nothing touches the network: a fake document store answers after a few milliseconds, and a few
documents (chosen by the seed) are always unreadable.

Usage::

    .venv/bin/python examples/mapreduce.py                  # writes runs/mapreduce.json
    .venv/bin/python examples/mapreduce.py --docs 1000 --fresh
    .venv/bin/python examples/mapreduce.py --run /tmp/wc.json

Kill it (Ctrl-C, ``kill -9``) while the documents are being counted and run it again: the batch is
still waiting in ``total``, the documents already counted are not counted again, and the sum comes
out the same. Then look at the batch: ``jorb show runs/mapreduce.json 1``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import jorb

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN = ROOT / "runs" / "mapreduce.json"

Ctx = dict[str, Any]

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


# -- the outside world (fake) --------------------------------------------------------------------


class DocumentStore:
    """A fake document store: document ``i`` of a seed is always the same text, or unreadable."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.fetches = 0

    def text(self, doc: int) -> str | None:
        """The text of ``doc`` (None if it is unreadable): what the store would send."""
        fate = random.Random(f"{self.seed}:{doc}")
        if fate.random() < 0.03:
            return None
        return " ".join(fate.choice(WORDS) for _ in range(fate.randint(50, 500)))

    async def fetch(self, doc: int) -> str:
        self.fetches += 1
        await asyncio.sleep(random.uniform(0.001, 0.004))  # one round trip
        text = self.text(doc)
        if text is None:
            raise OSError(f"document {doc}: checksum mismatch, the stored copy is damaged")
        return text


# -- the execs ---------------------------------------------------------------------------------


def split(store: DocumentStore, overall: Ctx, ctx: Ctx) -> tuple[Ctx, str, list[jorb.Kick]]:
    """The map: one ``count`` child per document. The batch then waits in ``total``."""
    kicks = [jorb.Kick("count", {"doc": doc}) for doc in range(ctx["docs"])]
    return ctx, "total", kicks


async def count(store: DocumentStore, overall: Ctx, ctx: Ctx) -> tuple[Ctx, str]:
    text = await store.fetch(ctx["doc"])
    ctx["words"] = len(text.split())  # the result travels in the child's ctx, not the text
    return ctx, "counted"


def total(
    store: DocumentStore, overall: Ctx, ctx: Ctx, children: list[jorb.Child]
) -> tuple[Ctx, str]:
    """The reduce: runs once every child has ended, and sees how each one ended."""
    counted = [child for child in children if child.state == "counted"]
    ctx["total"] = sum(child.ctx["words"] for child in counted)
    ctx["counted"] = len(counted)
    ctx["missing"] = sorted(child.ctx["doc"] for child in children if child.state != "counted")
    # The parent decides what a failed child means: here, a few missing documents are tolerated.
    enough = len(ctx["missing"]) <= overall["max_missing"]
    return ctx, "done" if enough else "incomplete"


def declare_states() -> list[jorb.State]:
    return [
        jorb.State("split", exec=split),
        jorb.State(
            "count", exec=count, concurrency=16, retries=1, backoff=0.01, on_error="unreadable"
        ),
        jorb.State("total", exec=total, join=True),  # fan-in: waits for every child it kicked
        jorb.State("counted", terminal=True),
        jorb.State("unreadable", terminal=True),
        jorb.State("done", terminal=True),
        jorb.State("incomplete", terminal=True),
        jorb.State("failed", terminal=True),
    ]


# -- the script --------------------------------------------------------------------------------


def open_run(path: Path, docs: int, seed: int, fresh: bool) -> jorb.Run:
    if fresh:
        jorb.Run.open(path).close()  # refuses (RunLockedError) while another process runs it
        for stale in (path, path.with_name(path.name + ".journal")):
            stale.unlink(missing_ok=True)
    run = jorb.Run.open(path, overall={"seed": seed, "max_missing": max(1, docs // 10)})
    if not run.jobs:
        run.add_job({"docs": docs}, state="split")  # the batch: job 1
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=100, help="documents in a new run")
    parser.add_argument("--seed", type=int, default=7, help="seed of a new run's fake store")
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN, help="the run file")
    parser.add_argument("--fresh", action="store_true", help="discard the run file; start over")
    args = parser.parse_args(argv)

    run = open_run(args.run, args.docs, args.seed, args.fresh)
    store = DocumentStore(run.overall["seed"])
    jorb.Processor(store, declare_states()).exec(run)  # blocks until every job is terminal

    for batch in (job for job in run.jobs.values() if job.parent is None):
        result = batch.ctx
        print(
            f"batch {batch.id}: {result['total']} words in {result['counted']} documents "
            f"({batch.state}; {len(result['missing'])} unreadable: {result['missing']})"
        )
    print(f"fetches this pass: {store.fetches}; inspect it: {_jorb()} show {_shown(run.path)} 1")


def _jorb() -> str:
    """How to run the jorb command from here: ``jorb`` if it is on PATH, else via Python."""
    if shutil.which("jorb"):
        return "jorb"
    return f"{shlex.quote(sys.executable)} -m jorb"


def _shown(path: Path | None) -> str:
    """The run path relative to the current directory when it is below it."""
    assert path is not None
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()
