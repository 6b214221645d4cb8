"""A fan-out workflow for the durability tests: roots kick children, every exec logs its effect.

    python fanout.py RUN EFFECTS [--roots 40] [--kids 8] [--durable 1] [--compact-always]
                     [--encode-chunk JOBS] [--stall STATE] [--hold STATE] [--grace SECONDS]
                     [--max-pending N] [--instant] [--fsync-thread]

Each exec appends ``"key state"`` to EFFECTS (opened O_APPEND, so a line is never torn) and
writes the same line to stdout: the test reads stdout as its progress signal. It records its
effect in the job's ctx (``ctx[state] = True``). Roots have keys ``r0``, ``r1``, ...; the
children of root ``rN`` have keys ``rN/0``, ``rN/1``, ... so a duplicate is easy to spot.

``--stall STATE`` makes every exec of STATE wait (for an hour) after logging, to hold execs in
flight for the Ctrl-C tests; ``--hold STATE`` makes them wait until a line (or the end) comes
on stdin, so the test decides when they finish. ``--compact-always`` compacts the journal after
every batch, so kills land in compactions too; ``--encode-chunk`` writes each snapshot a few
jobs at a time, so they land between its pieces. ``--max-pending`` is the Processor's
(transitions settled and not yet on disk, across the run); ``--instant`` makes the ``async
def`` execs return without waiting, so they settle many at a time and that bound is what holds
a crash's re-runs; ``--fsync-thread`` fsyncs the journal on the store's thread
(``checkpoint.FSYNC_ON_LOOP``).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import os
import random
import signal
import sys
import threading
import time
from typing import Any

import jorb
import jorb.checkpoint

#: How many execs may be in flight at once, all states together (the tests' re-execution bound).
CONCURRENCY = {"new": 4, "split": 3, "child": 6, "check": 2}
#: The default ``--max-pending``: each state's share is PENDING // 4 settled transitions.
PENDING = 8


def main() -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)  # (harness.py: a hang)
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("effects")
    parser.add_argument("--roots", type=int, default=40)
    parser.add_argument("--kids", type=int, default=8)
    parser.add_argument("--durable", type=int, default=1)
    parser.add_argument("--compact-always", action="store_true")
    parser.add_argument("--encode-chunk", type=int, default=None)
    parser.add_argument("--stall", default=None)
    parser.add_argument("--hold", default=None)
    parser.add_argument("--grace", type=float, default=30.0)
    parser.add_argument("--max-pending", type=int, default=PENDING)
    parser.add_argument("--instant", action="store_true")
    parser.add_argument("--fsync-thread", action="store_true")
    args = parser.parse_args()
    if args.compact_always:
        jorb.checkpoint.MIN_COMPACT_BYTES = 0
        jorb.checkpoint.COMPACT_RATIO = 0.0
    if args.fsync_thread:
        jorb.checkpoint.FSYNC_ON_LOOP = False
    if args.encode_chunk:
        jorb.checkpoint.ENCODE_CHUNK = args.encode_chunk
    effects = os.open(args.effects, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def effect(state: str, ctx: dict[str, Any]) -> None:
        line = f"{ctx['key']} {state}\n".encode()
        os.write(effects, line)
        os.write(1, line)
        ctx[state] = True

    released = threading.Event()  # --hold: a line came on stdin
    if args.hold:

        def release() -> None:
            sys.stdin.buffer.readline()
            released.set()

        threading.Thread(target=release, daemon=True).start()

    async def wait() -> None:
        if not args.instant:
            await asyncio.sleep(random.uniform(0, 0.002))

    async def pause(state: str) -> None:
        await wait()
        if state == args.stall:
            await asyncio.sleep(3600)
        if state == args.hold and not released.is_set():
            await asyncio.get_running_loop().run_in_executor(None, released.wait)

    async def new(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        await wait()
        effect("new", ctx)
        await pause("new")
        return ctx, "split"

    async def split(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        await wait()
        effect("split", ctx)
        await pause("split")
        kicks = [jorb.Kick("child", {"key": f"{ctx['key']}/{i}"}) for i in range(args.kids)]
        return ctx, "done", kicks

    async def child(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        await wait()
        effect("child", ctx)
        await pause("child")
        return ctx, "check"

    def check(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        time.sleep(random.uniform(0, 0.001))  # the work itself: a thread busy for a moment
        effect("check", ctx)
        return ctx, "done"

    states = [
        jorb.State("new", exec=new, concurrency=CONCURRENCY["new"]),
        jorb.State("split", exec=split, concurrency=CONCURRENCY["split"]),
        jorb.State("child", exec=child, concurrency=CONCURRENCY["child"]),
        jorb.State("check", exec=check, concurrency=CONCURRENCY["check"]),
        jorb.State("done", terminal=True),
    ]
    run = jorb.Run.open(args.run)
    if not run.jobs:
        for i in range(args.roots):
            run.add_job({"key": f"r{i}"})
    processor = jorb.Processor(
        None,
        states,
        progress=False,
        durable=bool(args.durable),
        grace=args.grace,
        max_pending=args.max_pending,
    )
    processor.exec(run)


if __name__ == "__main__":
    main()
