"""Chaos: kill a jorb workflow at random, over and over, and check everything after each kill.

The workflow (``worker`` below) has every shape the checkpoint must get right: roots that kick
2 to 6 children each (kicks), a join state where each root waits for its children and adds up
their values (fan-in), children that fail at random and are retried or routed to ``lost``
(retries), and compactions every few dozen KiB of journal (``MIN_COMPACT_BYTES`` is lowered),
so kills land inside snapshot writes too. Every exec appends one line to an effects log
(``pid job state ok|fail``) before it returns.

The driver starts the worker on a run, waits a random 0.05 to 1.2 s, reads the run while it
executes (``Run.load``, like ``jorb status``), then sends SIGKILL, SIGINT or SIGTERM, waits for
the process and checks, after every kill:

- the run file opens (``Run.load``: the snapshot plus the journal);
- no stale lock: nobody holds it once the process is gone;
- no committed transition lost: every job seen before (by a reader during a run, or after a
  kill) is still there, and its history and errors only grew from what was seen;
- no duplicated or missing child: a root past ``new`` has exactly its ``k`` children, with
  the indexes 0..k-1 once each; a root still in ``new`` has none.

When a run completes (the worker exits 0), the final checks: every job terminal, each root's
sum equal to what its children that ended ``done`` hold, and re-executions bounded: every exec
the effects log shows from a process that was never signalled is recorded in the run (in a
history entry or an error), so only killed processes ran anything twice. Then a fresh run.

    .venv/bin/python bench/chaos.py --kills 1000            # the long run (RELIABILITY.md)
    .venv/bin/python bench/chaos.py --kills 400 --pool      # children in a ProcessPool
    .venv/bin/python bench/chaos.py --kills 8 --roots 30    # what the test runs

Prints a summary (kills by signal and by where they landed, lost, duplicated, max
re-executions) and exits 1 on the first violation, with the run's files kept for a look.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}


# -- the workflow ------------------------------------------------------------------------------


def worker(path: Path, effects: Path, pooled: bool = False) -> None:
    """Run (or resume) the chaos workflow on ``path`` until every job is terminal (``pooled``:
    the children's execs in a ``jorb.ProcessPool`` of 2 workers)."""
    import jorb
    from jorb import checkpoint

    checkpoint.MIN_COMPACT_BYTES = 16 << 10  # compact often: kills land in snapshot writes
    checkpoint.COMPACT_RATIO = 0.25
    checkpoint.STEP_BYTES = 0
    log = os.open(effects, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pid = os.getpid()  # (the script's, also in pool workers: the one the driver signals)

    def effect(job: str, state: str, outcome: str) -> None:
        os.write(log, f"{pid} {job} {state} {outcome}\n".encode())

    async def new(app: Any, overall: Any, ctx: dict[str, Any]) -> Any:
        await asyncio.sleep(random.random() * 0.03)
        effect(ctx["id"], "new", "ok")
        kids = [jorb.Kick("child", {"id": f"{ctx['id']}/{i}", "i": i}) for i in range(ctx["k"])]
        return ctx, "sum", kids

    async def child(app: Any, overall: Any, ctx: dict[str, Any]) -> Any:
        await asyncio.sleep(random.random() * 0.03)
        if random.random() < 0.25:
            effect(ctx["id"], "child", "fail")
            raise OSError("flaky")
        effect(ctx["id"], "child", "ok")
        ctx["value"] = value(ctx["id"])
        return ctx, "done"

    def total(app: Any, overall: Any, ctx: dict[str, Any], children: Any) -> Any:
        effect(ctx["id"], "sum", "ok")
        ctx["sum"] = sum(c.ctx["value"] for c in children if c.state == "done")
        ctx["kids"] = len(children)
        return ctx, "done"

    states = [
        jorb.State("new", exec=new, concurrency=4),
        jorb.State(
            "child",
            exec=child,
            concurrency=6,
            retries=2,
            backoff=0.005,
            on_error="lost",
            pool=jorb.ProcessPool(2) if pooled else None,
        ),
        jorb.State("sum", exec=total, join=True),
        jorb.State("done", terminal=True),
        jorb.State("lost", terminal=True),
    ]
    run = jorb.Run.open(path)
    jorb.Processor(None, states, progress=False).exec(run)
    run.close()


def value(ident: str) -> int:
    return sum(ident.encode()) % 97


def new_run(path: Path, roots: int, rng: random.Random) -> None:
    import jorb

    run = jorb.Run.open(path)
    for r in range(roots):
        run.add_job({"id": f"r{r}", "k": rng.randint(2, 6)})
    run.save()
    run.close()


# -- checking ------------------------------------------------------------------------------------


class Violation(Exception):
    pass


Seen = dict[str, tuple[int, int, str]]  # job id -> (history length, error count, state)


def observe(path: Path, seen: Seen, where: str) -> Any:
    """Load the run and check it against what was seen before; returns the run."""
    import jorb

    try:
        run = jorb.Run.load(path)
    except Exception as e:
        raise Violation(f"{where}: the run does not open: {type(e).__name__}: {e}") from None
    for ident, (steps, errors, state) in seen.items():
        job = run.jobs.get(ident)
        if job is None:
            raise Violation(f"{where}: job {ident} (seen before, in {state}) is gone")
        count = sum(len(v) for v in job.errors.values())
        if len(job.history) < steps or count < errors:
            raise Violation(
                f"{where}: job {ident} lost committed work: {steps} steps and {errors} errors "
                f"seen before, {len(job.history)} and {count} now"
            )
    for ident, job in run.jobs.items():
        count = sum(len(v) for v in job.errors.values())
        seen[ident] = (len(job.history), count, job.state)
    check_children(run, where)
    return run


def check_children(run: Any, where: str) -> int:
    """Every root past ``new`` has exactly its k children, indexes 0..k-1; returns the kids."""
    kids: dict[str, list[int]] = {}
    for job in run.jobs.values():
        if job.parent is not None:
            kids.setdefault(job.parent, []).append(job.ctx["i"])
    total = 0
    for job in run.jobs.values():
        if job.parent is not None:
            continue
        got = sorted(kids.get(job.id, []))
        want = list(range(job.ctx["k"])) if job.state != "new" else []
        if got != want:
            raise Violation(
                f"{where}: root {job.id} in {job.state} has children {got}, want {want}"
            )
        total += len(got)
    return total


def final_check(run: Any, effects: Path, signalled: set[int], where: str) -> int:
    """A completed run: all terminal, sums right, executions accounted; returns the max
    re-executions of any (job, state)."""
    by_id = {job.ctx["id"]: job for job in run.jobs.values()}
    for job in run.jobs.values():
        if job.state not in ("done", "lost"):
            raise Violation(f"{where}: job {job.id} ended in {job.state}")
        if job.parent is None and job.state == "done":
            kids = [k for k in run.jobs.values() if k.parent == job.id]
            want = sum(k.ctx["value"] for k in kids if k.state == "done")
            if job.ctx.get("sum") != want or job.ctx.get("kids") != len(kids):
                raise Violation(f"{where}: root {job.id} summed {job.ctx.get('sum')}, want {want}")
    logged: Counter[tuple[str, str]] = Counter()
    clean: Counter[tuple[str, str]] = Counter()
    for line in effects.read_text().splitlines():
        pid, ident, state, _ = line.split()
        logged[ident, state] += 1
        if int(pid) not in signalled:
            clean[ident, state] += 1
    worst = 0
    for (ident, state), count in logged.items():
        job = by_id[ident]
        recorded = len(job.errors.get(state, [])) + sum(
            1 for e in job.steps() if e["from"] == state and e["to"] != "lost"
        )
        if clean[ident, state] > recorded:
            raise Violation(
                f"{where}: {ident} in {state}: {clean[ident, state]} execs by processes never "
                f"signalled, only {recorded} recorded (an exec ran twice without a kill)"
            )
        if recorded > count:
            raise Violation(f"{where}: {ident} in {state}: {recorded} recorded, {count} ran")
        worst = max(worst, count - recorded)
    return worst


def snapshot_seq(path: Path) -> int:
    """The seq of the run file itself (the last snapshot), without its journal."""
    import orjson

    seq: int = orjson.loads(path.read_bytes())["seq"]
    return seq


def landed(path: Path, log_before: int, effects: Path, pid: int, seq_before: int) -> str:
    """Where a SIGKILL landed, from what it left on disk."""
    names = os.listdir(path.parent)
    if any(n.startswith(f".{path.name}.journal.") and n.endswith(".tmp") for n in names):
        return "in a journal reset"
    if any(n.startswith(f".{path.name}.") and n.endswith(".tmp") for n in names):
        return "in a snapshot write"
    journal = path.with_name(path.name + ".journal")
    if journal.exists():
        data = journal.read_bytes()
        if data and not data.endswith(b"\n"):
            return "in a journal append (torn tail)"
    text = effects.read_bytes()[log_before:] if effects.exists() else b""
    if f"{pid} ".encode() not in text:
        return "before any exec (startup, load)"
    if not journal.exists():
        return "after the last checkpoint (exiting)"
    if snapshot_seq(path) > seq_before:
        return "between checkpoints, after a compaction"
    return "between checkpoints (execs in flight)"


# -- the driver ------------------------------------------------------------------------------------


def drive(args: argparse.Namespace) -> dict[str, Any]:
    from jorb.checkpoint import is_locked

    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="jorb-chaos-", dir=args.dir))
    stats: dict[str, Any] = {
        "pool": args.pool,
        "kills": 0,
        "by_signal": Counter(),
        "landed": Counter(),
        "runs_completed": 0,
        "observations": 0,
        "lost": 0,
        "duplicated": 0,
        "max_reexecutions": 0,
        "jobs": 0,
        "transitions": 0,
    }
    started = time.monotonic()
    round_no = 0
    try:
        while stats["kills"] < args.kills:
            round_no += 1
            folder = base / f"round{round_no}"
            folder.mkdir()
            path, effects = folder / "run.json", folder / "effects.log"
            new_run(path, args.roots, rng)
            seen: Seen = {}
            signalled: set[int] = set()
            where = f"round {round_no}"
            while True:
                log_before = effects.stat().st_size if effects.exists() else 0
                seq_before = snapshot_seq(path)
                proc = subprocess.Popen(
                    [sys.executable, __file__, "worker", str(path), str(effects)]
                    + (["pool"] if args.pool else []),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                kill = stats["kills"] < args.kills
                deadline = time.monotonic() + rng.uniform(args.min_delay, args.max_delay)
                while kill and proc.poll() is None and time.monotonic() < deadline:
                    if rng.random() < 0.5:  # a reader racing the writer (jorb status)
                        observe(path, seen, f"{where}, a read during a run")
                        stats["observations"] += 1
                    time.sleep(rng.uniform(0.02, 0.2))  # (the fault injection's own timer)
                if kill and proc.poll() is None:
                    name = rng.choices(list(SIGNALS), weights=[6, 2, 2])[0]
                    proc.send_signal(SIGNALS[name])
                    signalled.add(proc.pid)
                    code = proc.wait()
                    stats["kills"] += 1
                    stats["by_signal"][name] += 1
                    if name == "SIGKILL":
                        place = landed(path, log_before, effects, proc.pid, seq_before)
                        stats["landed"][place] += 1
                    else:
                        stats["landed"][
                            f"{name}: stopped cleanly" if code else f"{name}: done"
                        ] += 1
                    if is_locked(path):
                        raise Violation(f"{where}: the lock is held after its process died")
                    observe(path, seen, f"{where}, after {name} #{stats['kills']}")
                    if args.progress and stats["kills"] % args.progress == 0:
                        print(summary(stats, started), file=sys.stderr, flush=True)
                    continue
                code = proc.wait()
                if code != 0:
                    raise Violation(f"{where}: the worker exited {code} without a signal")
                if is_locked(path):
                    raise Violation(f"{where}: the lock is held after its process exited")
                run = observe(path, seen, f"{where}, completed")
                worst = final_check(run, effects, signalled, where)
                stats["max_reexecutions"] = max(stats["max_reexecutions"], worst)
                stats["runs_completed"] += 1
                stats["jobs"] += len(run.jobs)
                stats["transitions"] += sum(len(j.history) for j in run.jobs.values())
                break
            shutil.rmtree(folder)
    except Violation as e:
        stats["violation"] = str(e)
        stats["kept"] = str(base)
        return stats
    shutil.rmtree(base)
    stats["seconds"] = round(time.monotonic() - started, 1)
    return stats


def summary(stats: dict[str, Any], started: float) -> str:
    return (
        f"{stats['kills']} kills ({dict(stats['by_signal'])}), {stats['runs_completed']} runs "
        f"completed, {time.monotonic() - started:.0f}s"
    )


def main() -> None:
    if len(sys.argv) in (4, 5) and sys.argv[1] == "worker":
        worker(Path(sys.argv[2]), Path(sys.argv[3]), pooled=sys.argv[4:] == ["pool"])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100, help="signals to send in all")
    parser.add_argument("--roots", type=int, default=100, help="root jobs per run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--min-delay", type=float, default=0.05)
    parser.add_argument("--max-delay", type=float, default=1.2)
    parser.add_argument("--dir", default=None, help="where the runs go (default: a temp dir)")
    parser.add_argument("--progress", type=int, default=0, help="a line every N kills")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--pool", action="store_true", help="run the children's execs in a jorb.ProcessPool"
    )
    args = parser.parse_args()
    stats = drive(args)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        for key, value in stats.items():
            print(f"{key}: {dict(value) if isinstance(value, Counter) else value}")
    sys.exit(1 if "violation" in stats else 0)


if __name__ == "__main__":
    main()
