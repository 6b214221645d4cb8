"""jorb.ProcessPool with real worker processes: overlap counted, kills, timeouts, no orphans.

Counters shared with the workers live in ``multiprocessing`` shared memory made before exec
starts (the workers are forked from this process, so they inherit it). Nothing sleeps to wait:
execs meet at counters with a deadline that only a broken pool reaches, processes are waited
for through pidfds and pipes.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DONE, STUCK, MakeRun, errors_of, process, process_fake_clock
from scripts.harness import Proc

import jorb

FORK = multiprocessing.get_context("fork")


def child_pids() -> set[int]:
    """This process's live child processes (the pool's fork server, while it runs)."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # (a thread that just ended)
            pids.update(int(p) for p in (task / "children").read_text().split())
    return pids


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: set[int], timeout: float = STUCK) -> None:
    """Block until every process in ``pids`` has exited (through pidfds: no polling)."""
    fds = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds.append(os.pidfd_open(pid))
    try:
        deadline = time.monotonic() + timeout
        waiting = set(fds)
        while waiting:
            ready, _, _ = select.select(
                list(waiting), [], [], max(0.0, deadline - time.monotonic())
            )
            if not ready:
                raise AssertionError(
                    f"still alive after {timeout}s: {[p for p in pids if alive(p)]}"
                )
            waiting -= set(ready)
    finally:
        for fd in fds:
            os.close(fd)


@pytest.fixture(autouse=True)
def no_pool_left_behind() -> Iterator[None]:
    before = child_pids()
    yield
    assert child_pids() <= before, "a pool process outlived its exec"


def spin_until(done: Any, seconds: float = STUCK) -> int:
    """Pure-Python work (holding the GIL) until ``done()`` or ``seconds`` pass; the work done."""
    deadline = time.monotonic() + seconds
    work = 0
    while not done() and time.monotonic() < deadline:
        work += sum(range(2_000))
    return work


# -- overlap, app and the ways an exec can end ---------------------------------------------------


def test_cpu_bound_execs_overlap_in_workers_and_never_exceed_concurrency(make_run: MakeRun) -> None:
    counts = FORK.Array("i", 2)  # [running now, most at once]; its lock is shared too

    def crunch(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        with counts.get_lock():
            counts[0] += 1
            counts[1] = max(counts[1], counts[0])
        spin_until(lambda: counts[1] >= 2)  # (the first exec waits, busy, for a second one)
        ctx["work"] = sum(range(50_000))  # and then some more CPU-bound work
        ctx["pid"] = os.getpid()
        with counts.get_lock():
            counts[0] -= 1
        return ctx, "done"

    pool = jorb.ProcessPool(3)
    states = [jorb.State("new", exec=crunch, concurrency=2, pool=pool), DONE]
    run = make_run([{"i": i} for i in range(12)])

    process(states, run)

    assert run.counts() == {"done": 12}, errors_of(run)
    assert counts[1] == 2  # two exec bodies ran at once, never three (though 3 workers were idle)
    pids = {job.ctx["pid"] for job in run.jobs.values()}
    assert len(pids) >= 2 and os.getpid() not in pids


def test_the_app_factory_runs_once_per_worker_and_async_execs_run_on_its_loop(
    make_run: MakeRun, tmp_path: Path
) -> None:
    made = tmp_path / "made"

    def make_app() -> dict[str, Any]:
        with made.open("a") as f:
            f.write(f"{os.getpid()}\n")
        return {"pid": os.getpid(), "lock": threading.Lock()}  # (a lock cannot be pickled)

    async def fetch(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        await asyncio.sleep(0)
        ctx["loop"] = id(asyncio.get_running_loop())
        ctx["fetch_pid"] = os.getpid()
        ctx["fetch_app"] = app["pid"]
        return ctx, "parse"

    def parse(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        with app["lock"]:
            ctx["parse_pid"], ctx["parse_app"] = os.getpid(), app["pid"]
        ctx["seen"] = overall["seed"]
        return ctx, "done"

    pool = jorb.ProcessPool(2, app=make_app)
    states = [
        jorb.State("new", exec=fetch, concurrency=4, pool=pool),
        jorb.State("parse", exec=parse, concurrency=4, pool=pool),
        DONE,
    ]
    run = make_run([{"i": i} for i in range(20)], overall={"seed": 7})

    process(states, run, app=object())  # the processor's own app never travels

    assert run.counts() == {"done": 20}, errors_of(run)
    factories = made.read_text().split()
    assert len(factories) == 2 and len(set(factories)) == 2  # once in each of the 2 workers
    for job in run.jobs.values():
        assert job.ctx["fetch_pid"] == job.ctx["fetch_app"]  # each exec got its worker's app
        assert job.ctx["parse_pid"] == job.ctx["parse_app"]
        assert str(job.ctx["parse_pid"]) in factories and job.ctx["seen"] == 7
    loops: dict[int, set[int]] = {}
    for job in run.jobs.values():
        loops.setdefault(job.ctx["fetch_pid"], set()).add(job.ctx["loop"])
    assert all(len(ids) == 1 for ids in loops.values())  # one loop per worker, kept


def test_a_worker_killed_mid_exec_is_worker_lost_and_the_job_is_retried(
    make_run: MakeRun,
) -> None:
    victim = FORK.Value("i", 0)  # the pid of the worker to kill, once it is mid-exec
    started, killed = FORK.Event(), FORK.Event()

    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        if ctx["i"] == 3 and not killed.is_set():
            victim.value = os.getpid()
            started.set()
            spin_until(lambda: False, STUCK)  # busy until it is killed
            raise AssertionError("this worker was to be killed")
        ctx["pid"] = os.getpid()
        return ctx, "done"

    def killer() -> None:
        if started.wait(STUCK):
            killed.set()
            os.kill(victim.value, signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    pool = jorb.ProcessPool(2)
    states = [jorb.State("new", exec=work, concurrency=2, retries=1, backoff=0, pool=pool), DONE]
    run = make_run([{"i": i} for i in range(8)])

    process(states, run)
    thread.join()

    assert run.counts() == {"done": 8}  # nothing lost
    job = run.jobs["4"]  # (ids count from 1)
    assert job.ctx["i"] == 3
    [error] = job.errors["new"]
    assert error["type"] == "jorb.errors.WorkerLost"
    assert f"({victim.value}) was killed by SIGKILL" in error["message"]
    assert job.ctx["pid"] != victim.value  # its second attempt ran in another worker
    assert not alive(victim.value)


def test_a_timeout_ends_the_worker_and_frees_its_slot_only_once_it_is_gone(
    make_run: MakeRun,
) -> None:
    overran = FORK.Value("i", 0)

    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        if ctx["i"] == 0:
            overran.value = os.getpid()
            while True:  # pure Python that never returns: no thread could be stopped here
                pass
        try:
            os.kill(overran.value, 0)
            ctx["previous"] = "alive"
        except ProcessLookupError:
            ctx["previous"] = "gone"
        return ctx, "done"

    pool = jorb.ProcessPool(1)
    states = [jorb.State("new", exec=work, timeout=0.3, on_error="failed", pool=pool), DONE]
    run = make_run([{"i": 0}, {"i": 1}])

    process(states, run)

    assert run.jobs["1"].state == "failed"
    [error] = run.jobs["1"].errors["new"]
    assert error["type"] == "jorb.errors.TimedOut"
    assert error["message"] == "timed out after 0.3s (its worker process was ended)"
    assert run.jobs["2"].state == "done"
    assert run.jobs["2"].ctx["previous"] == "gone"  # the next exec started after it was reaped


def burn(seconds: float) -> None:
    """Pure-Python work for ``seconds`` of this process's CPU time."""
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass


# -- a busy worker's answers, read at the tick ---------------------------------------------------


def test_a_busy_workers_answers_share_commits(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = [0]
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        fsyncs[0] += 1
        real_fsync(fd)

    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        burn(0.0005)
        return ctx, "done"

    pool = jorb.ProcessPool(1)
    states = [jorb.State("new", exec=work, concurrency=64, pool=pool), DONE]
    run = make_run([{"i": i} for i in range(400)])
    monkeypatch.setattr(os, "fsync", counting_fsync)

    process(states, run)

    assert run.counts() == {"done": 400}, errors_of(run)
    # Read at each answer, it was about one fsync per answer (each ends before the next answer
    # comes); read every 2 ms, four or so answers share one.
    assert fsyncs[0] <= 200, fsyncs  # (~90 here; ~270-370 when read at each answer)


def test_in_a_busy_worker_an_exec_that_overruns_times_out_and_no_other(make_run: MakeRun) -> None:
    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        if ctx["i"] == 40:
            while True:  # never returns
                pass
        burn(0.0005)
        return ctx, "done"

    pool = jorb.ProcessPool(1)
    states = [
        jorb.State("new", exec=work, concurrency=32, timeout=1.0, on_error="failed", pool=pool),
        DONE,
    ]
    run = make_run([{"i": i} for i in range(100)])

    process(states, run)

    assert run.counts() == {"done": 99, "failed": 1}, errors_of(run)
    [error] = run.jobs["41"].errors["new"]  # (ids count from 1)
    assert error["type"] == "jorb.errors.TimedOut"
    assert [job.id for job in run.jobs.values() if job.errors] == ["41"]


def test_in_a_busy_worker_a_kill_is_worker_lost_for_the_exec_it_ran_only(
    make_run: MakeRun,
) -> None:
    killed = FORK.Value("i", 0)

    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        if ctx["i"] == 40 and not killed.value:
            killed.value = os.getpid()
            os.kill(os.getpid(), signal.SIGKILL)  # (its answers before this one may be unread)
        burn(0.0005)
        ctx["pid"] = os.getpid()
        return ctx, "done"

    pool = jorb.ProcessPool(1)
    states = [
        jorb.State("new", exec=work, concurrency=32, retries=1, backoff=0, pool=pool),
        DONE,
    ]
    run = make_run([{"i": i} for i in range(100)])

    process(states, run)

    assert run.counts() == {"done": 100}, errors_of(run)  # nothing lost
    [error] = run.jobs["41"].errors["new"]
    assert error["type"] == "jorb.errors.WorkerLost"
    assert f"({killed.value}) was killed by SIGKILL" in error["message"]
    assert [job.id for job in run.jobs.values() if job.errors] == ["41"]  # the one it ran
    assert run.jobs["41"].ctx["pid"] != killed.value


class HoldingError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()  # (so it cannot be pickled, whatever copyreg knows)


def test_errors_cross_back_with_their_type_message_and_worker_traceback(
    make_run: MakeRun,
) -> None:
    limited = FORK.Event()

    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        if ctx["kind"] == "value":
            raise ValueError("bad row 12")
        if ctx["kind"] == "unpicklable":
            raise HoldingError("409: conflict")
        if ctx["kind"] == "limited" and not limited.is_set():
            limited.set()
            raise jorb.RateLimited(retry_after=0.01)
        if ctx["kind"] == "answer":
            return {"f": lambda: 1}, "done"  # cannot be pickled back
        return ctx, "done"

    pool = jorb.ProcessPool(2)
    states = [jorb.State("new", exec=work, concurrency=2, on_error="failed", pool=pool), DONE]
    kinds = ["value", "unpicklable", "limited", "answer"]
    run = make_run([{"kind": k} for k in kinds])

    process(states, run, stop_on_bug=False)  # (recorded and routed, not stopped at)

    by_kind = {job.ctx["kind"]: job for job in run.jobs.values()}
    [value] = by_kind["value"].errors["new"]
    assert (value["type"], value["message"]) == ("ValueError", "bad row 12")
    assert 'raise ValueError("bad row 12")' in value["traceback"]  # the worker's own frame
    [two] = by_kind["unpicklable"].errors["new"]
    assert two["type"] == "jorb.errors.JorbError"  # a stand-in, naming the original
    assert two["message"].startswith("test_pool.HoldingError: 409: conflict")
    assert 'raise HoldingError("409: conflict")' in two["traceback"]
    assert by_kind["limited"].state == "done"  # RateLimited kept its meaning: retried
    [throttled] = by_kind["limited"].errors["new"]
    assert throttled["rate_limited"] is True and by_kind["limited"].attempts == 0
    [answer] = by_kind["answer"].errors["new"]
    assert "cannot be sent back from its worker process" in answer["message"]
    assert by_kind["answer"].state == "failed"


def test_a_pooled_exec_that_raises_stop_iteration_fails_its_attempt(make_run: MakeRun) -> None:
    """StopIteration cannot be set on an asyncio future: sent back from a worker, it must still
    fail the attempt, not leave the job (and the run) hanging."""

    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        if ctx["n"] == 2:
            raise StopIteration  # (a next() on an empty iterator, not caught)
        return ctx, "done"

    pool = jorb.ProcessPool(1)
    states = [jorb.State("new", exec=work, on_error="failed", pool=pool), DONE]
    run = make_run([{"n": 1}, {"n": 2}, {"n": 3}])

    process(states, run)

    assert {job.id: job.state for job in run.jobs.values()} == {
        "1": "done",
        "2": "failed",
        "3": "done",
    }
    assert "StopIteration" in errors_of(run)["2"][0]


class Oops(BaseException):
    """A script's own exception class, derived from BaseException rather than Exception."""


def test_what_a_worker_raises_that_is_not_an_exception_is_its_jobs_error(
    make_run: MakeRun,
) -> None:
    """GeneratorExit, a BaseException of the script's own: from a worker, as on the loop, the
    job's error, naming the type and message, with the worker's traceback; the run goes on."""

    def fail(ctx: dict[str, Any]) -> Any:
        if ctx["raise"] == "GeneratorExit":
            raise GeneratorExit("no more rows")
        if ctx["raise"] == "Oops":
            raise Oops("no more rows")
        return ctx, "done"

    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        return fail(ctx)

    async def work_async(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        await asyncio.sleep(0)
        return fail(ctx)

    pool = jorb.ProcessPool(2)
    states = [
        jorb.State("new", exec=work, concurrency=2, on_error="failed", pool=pool),
        jorb.State("async", exec=work_async, concurrency=2, on_error="failed", pool=pool),
        DONE,
    ]
    raised = ["GeneratorExit", "Oops", "nothing"]
    run = make_run([{"raise": r} for r in raised])
    for r in raised:
        run.add_job({"raise": r}, "async")

    process(states, run)

    for job in run.jobs.values():
        if job.ctx["raise"] == "nothing":
            assert job.state == "done", errors_of(run)
            continue
        assert job.state == "failed"
        [(state, [error])] = job.errors.items()
        name = {"GeneratorExit": "GeneratorExit", "Oops": "test_pool.Oops"}[job.ctx["raise"]]
        assert (error["type"], error["message"]) == (
            "jorb.errors.JorbError",
            f"the exec raised {name}: no more rows",
        ), state
        assert f'raise {job.ctx["raise"]}("no more rows")' in error["traceback"]


def test_an_app_factory_that_fails_stops_the_exec_before_any_job(make_run: MakeRun) -> None:
    def make_app() -> Any:
        raise ConnectionError("no database at db:5432")

    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        return ctx, "done"

    pool = jorb.ProcessPool(2, app=make_app)
    states = [jorb.State("new", exec=work, pool=pool), DONE]
    run = make_run([{"i": 0}])

    with pytest.raises(jorb.JorbError, match="app factory failed") as info:
        process(states, run)

    assert "no database at db:5432" in str(info.value)
    job = run.jobs["1"]
    assert (job.state, job.errors, job.history) == ("new", {}, [])


def test_a_first_checkpoint_that_fails_leaves_no_pool_process_behind(
    make_run: MakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pools start before the run's first checkpoint is written; when that write fails
    (a full disk), the exec stops there and the pool's processes end with it."""

    def disk_full(store: Any, run: jorb.Run) -> None:
        raise jorb.CheckpointError(f"{store.path}: could not write a checkpoint (the disk is full)")

    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        return ctx, "done"

    monkeypatch.setattr(jorb.checkpoint.Store, "begin", disk_full)
    run = make_run([{"i": 0}])
    with pytest.raises(jorb.CheckpointError, match="disk is full"):
        process([jorb.State("new", exec=work, pool=jorb.ProcessPool(2)), DONE], run)
    # (no_pool_left_behind checks that every process the pool started has ended)


def test_a_pool_serves_one_exec_after_another(make_run: MakeRun) -> None:
    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        ctx["pid"] = os.getpid()
        return ctx, "done"

    pool = jorb.ProcessPool(1)
    states = [jorb.State("new", exec=work, pool=pool), DONE]
    first = make_run([{"i": 0}], name="first.json")
    second = make_run([{"i": 1}], name="second.json")

    process(states, first)
    process(states, second)

    assert first.counts() == second.counts() == {"done": 1}
    assert first.jobs["1"].ctx["pid"] != second.jobs["1"].ctx["pid"]  # its own workers each time
    assert "not started" in repr(pool)


def test_two_pools_and_local_states_in_one_processor(make_run: MakeRun) -> None:
    def where(step: str, to: str) -> Any:
        def exec_(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
            ctx[step] = os.getpid()
            return ctx, to

        return exec_

    async def local(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        ctx["local"] = os.getpid()
        return ctx, "done"

    states = [
        jorb.State("new", exec=where("first", "second"), pool=jorb.ProcessPool(1)),
        jorb.State("second", exec=where("second", "thread"), pool=jorb.ProcessPool(1)),
        jorb.State("thread", exec=where("thread", "local")),
        jorb.State("local", exec=local),
        DONE,
    ]
    run = make_run([{"i": i} for i in range(4)])

    process(states, run)  # (and the pools are closed, last first, without a hang)

    assert run.counts() == {"done": 4}, errors_of(run)
    for job in run.jobs.values():
        ctx = job.ctx
        assert ctx["thread"] == ctx["local"] == os.getpid()
        assert len({ctx["first"], ctx["second"], os.getpid()}) == 3


def test_lambdas_and_closures_work_since_nothing_pickles_the_exec(make_run: MakeRun) -> None:
    suffix = "!"  # (a closure: pickle would refuse it; a forked worker already has it)
    states = [
        jorb.State(
            "new",
            exec=lambda app, overall, ctx: ({**ctx, "s": suffix}, "done"),
            pool=jorb.ProcessPool(1),
        ),
        DONE,
    ]
    run = make_run([{"i": 0}])

    process(states, run)

    assert run.jobs["1"].ctx == {"i": 0, "s": "!"}


def test_what_cannot_be_a_pool_is_refused_when_declared() -> None:
    with pytest.raises(jorb.StateError, match="workers must be an int >= 1"):
        jorb.ProcessPool(0)
    with pytest.raises(jorb.StateError, match="pass the factory, not what it makes"):
        jorb.ProcessPool(app={"db": "connection"})  # type: ignore[arg-type]

    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        return ctx, "done"

    with pytest.raises(jorb.StateError, match="terminal state 'done' has a pool"):
        jorb.Processor(None, [jorb.State("done", terminal=True, pool=jorb.ProcessPool(1))])
    with pytest.raises(jorb.StateError, match=r"pool must be a jorb\.ProcessPool"):
        jorb.Processor(None, [jorb.State("new", exec=work, pool="processes"), DONE])  # type: ignore[arg-type]


# -- the canonical script, killed and interrupted for real -----------------------------------------


@pytest.fixture
def reaper() -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    yield procs
    for proc in procs:
        proc.stop()


def pool_pids(proc: Proc) -> set[int]:
    """The workers and the fork server the script's execs reported (``start JOB PID PPID``)."""
    pids: set[int] = set()
    for line in proc.lines:
        if line.startswith("start "):
            pids.update(int(p) for p in line.split()[2:])
    return pids


def starts(proc: Proc) -> int:
    return sum(line.startswith("start ") for line in proc.lines)


def wait_starts(proc: Proc, n: int) -> None:
    """Block until the script has printed ``n`` exec starts."""
    while starts(proc) < n:
        proc.wait_lines(len(proc.lines) + 1)


def pooled(tmp_path: Path, path: Path, fifo: Path, reaper: list[Proc]) -> Proc:
    """``scripts/pooled.py`` running 12 jobs held at ``fifo``, once its coordinator is up."""
    proc = Proc(tmp_path, "pooled.py", path, 12, fifo)
    reaper.append(proc)
    proc.wait_for("coordinator")
    return proc


def effects(run_path: Path) -> list[int]:
    path = Path(f"{run_path}.effects")
    return [int(n) for n in path.read_text().split()] if path.exists() else []


def test_a_coordinator_killed_mid_run_leaves_no_worker_and_resumes_to_the_end(
    tmp_path: Path, gate: tuple[Path, int], reaper: list[Proc]
) -> None:
    fifo, fd = gate
    path = tmp_path / "pooled.json"
    proc = pooled(tmp_path, path, fifo, reaper)
    wait_starts(proc, 2)  # both workers are mid-exec, held at the gate
    os.write(fd, b"xxxx")  # let four execs finish
    wait_starts(proc, 6)
    pids = pool_pids(proc)
    assert len(pids) == 3  # two workers, one fork server

    assert proc.kill() == -signal.SIGKILL
    wait_gone(pids)  # the fork server and the workers died with the script

    os.write(fd, b"x" * 20)  # the resumed run's execs pass the gate
    proc = Proc(tmp_path, "pooled.py", path, 12, fifo)
    reaper.append(proc)
    proc.finish()
    run = jorb.Run.load(path)
    assert run.counts() == {"done": 12}
    seen = effects(path)
    assert sorted(set(seen)) == list(range(12))  # every job's work was done...
    assert len(seen) <= 12 + 2  # ...again at most for the two in flight at the kill
    assert not any(alive(p) for p in pool_pids(proc))


def test_ctrl_c_lets_running_execs_finish_then_no_pool_process_is_left(
    tmp_path: Path, gate: tuple[Path, int], reaper: list[Proc]
) -> None:
    fifo, fd = gate
    path = tmp_path / "pooled.json"
    proc = pooled(tmp_path, path, fifo, reaper)
    wait_starts(proc, 2)
    pids = pool_pids(proc)

    for pid in [proc.pid, *pids]:  # Ctrl-C reaches the whole foreground process group
        os.kill(pid, signal.SIGINT)
    proc.wait_for("stopping", stderr=True)
    os.write(fd, b"xx")  # the two running execs may now finish

    assert proc.wait() == 130
    assert not [pid for pid in pids if alive(pid)]  # gone before the script exited
    run = jorb.Run.load(path)
    assert run.counts() == {"done": 2, "new": 10}  # the two running execs finished and count
    assert sorted(effects(path)) == sorted(
        int(j.ctx["i"]) for j in run.jobs.values() if j.state == "done"
    )


def test_a_call_cancelled_while_queued_in_a_worker_never_runs() -> None:
    started, release = FORK.Event(), FORK.Event()
    ran = FORK.Array("i", 4)

    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        ran[ctx["i"]] = 1
        if ctx["i"] == 1:
            started.set()
            release.wait(STUCK)
        return ctx, "done"

    state = jorb.State("new", exec=work)
    pool = jorb.ProcessPool(1)

    async def scenario() -> list[Any]:
        pool.start([state])
        try:
            first = asyncio.create_task(pool.call(state, (None, {}, {"i": 1})))
            second = asyncio.create_task(pool.call(state, (None, {}, {"i": 2})))
            assert await asyncio.to_thread(started.wait, STUCK)  # 1 runs, 2 waits behind it
            assert "busy=2" in repr(pool)  # (both are in the worker's hands)
            second.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await second  # (its skip is sent to the worker as it is cancelled)
            release.set()
            return [await first, await pool.call(state, (None, {}, {"i": 3}))]
        finally:
            pool.close()

    assert asyncio.run(scenario()) == [({"i": 1}, "done"), ({"i": 3}, "done")]
    assert ran[:] == [0, 1, 0, 1]  # the cancelled call was skipped, the worker went on


def test_on_the_virtual_clock_a_pooled_exec_is_waited_for_in_real_time(
    make_run: MakeRun,
) -> None:
    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        ctx["work"] = sum(range(200_000))  # real time, which the virtual clock must not skip
        return ctx, "done"

    pool = jorb.ProcessPool(1)
    states = [jorb.State("new", exec=work, timeout=1.0, on_error="failed", pool=pool), DONE]
    run = make_run([{"i": i} for i in range(3)])

    process_fake_clock(states, run)

    assert run.counts() == {"done": 3}, errors_of(run)  # no timeout fired by a jumping clock


def test_a_skip_that_comes_too_late_leaves_the_worker_running() -> None:
    # The worker started call 2 before the coordinator read call 1's answer: the coordinator
    # still takes 2 for queued, so cancelling it sends a skip, which the worker sees alone,
    # after 2 ran. It must go on with the next call, not stumble on the lone skip.
    second_started, release = FORK.Event(), FORK.Event()

    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        if ctx["i"] == 2:
            second_started.set()
            release.wait(STUCK)
        return {**ctx, "pid": os.getpid()}, "done"

    state = jorb.State("new", exec=work)
    pool = jorb.ProcessPool(1)

    async def scenario() -> list[Any]:
        pool.start([state])
        try:
            first = asyncio.create_task(pool.call(state, (None, {}, {"i": 1})))
            second = asyncio.create_task(pool.call(state, (None, {}, {"i": 2})))
            await asyncio.sleep(0)  # (both tasks send their calls)
            assert second_started.wait(STUCK)  # (blocking the loop: 1's answer stays unread)
            second.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await second
            release.set()
            return [await first, await pool.call(state, (None, {}, {"i": 3}))]
        finally:
            pool.close()

    (one, _), (three, _) = asyncio.run(scenario())
    assert one["pid"] == three["pid"]  # the same worker answered call 3


def test_a_killed_fork_server_fails_what_remains_and_never_hangs(make_run: MakeRun) -> None:
    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        if ctx["i"] == 2:
            os.kill(os.getppid(), signal.SIGKILL)  # the fork server (its workers die with it)
            spin_until(lambda: False)
        return ctx, "done"

    pool = jorb.ProcessPool(1)
    states = [jorb.State("new", exec=work, retries=2, backoff=0, pool=pool), DONE]
    run = make_run([{"i": i} for i in range(5)])

    process(states, run)  # returns: every job ended somewhere

    assert run.jobs["1"].state == run.jobs["2"].state == "done"
    assert {run.jobs[i].state for i in "345"} == {"failed"}
    for i in "345":  # (job 3 also lost its worker; then nothing could run any more)
        assert "the pool's fork server process died" in errors_of(run)[i][-1]


def test_a_program_an_exec_starts_can_still_be_interrupted(make_run: MakeRun) -> None:
    probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"

    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        ctx["default"] = out.stdout.strip()
        return ctx, "done"

    states = [jorb.State("new", exec=work, pool=jorb.ProcessPool(1)), DONE]
    run = make_run([{"i": 0}])

    process(states, run)

    assert run.jobs["1"].ctx["default"] == "True"  # not SIG_IGN inherited from the worker
