"""jorb.dask.DaskPool on real Dask clusters: a scheduler and two workers as separate processes
on 127.0.0.1, started here (``dask scheduler`` / ``dask worker``), and the local cluster
``DaskPool()`` starts by itself.

Execs count what runs at once in a file under ``flock`` (the workers are not this process's
children). Nothing sleeps: processes are followed through their output pipes, execs meet at
counters with a deadline only a broken pool reaches.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import dask
import pytest
from conftest import DONE, STUCK, MakeRun, errors_of, process
from scripts.harness import Proc
from test_pool import alive, wait_gone

import jorb
import jorb.dask

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


class Cluster:
    """A Dask scheduler and ``workers`` worker processes (``threads`` each, no nanny)."""

    def __init__(self, workers: int, threads: int) -> None:
        env = {
            **os.environ,
            # A worker that dies fails its task at once, so jorb sees (and retries) each death.
            "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
            # The workers import this module's execs by name, as a cluster imports a package.
            "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
        }
        self.procs: list[subprocess.Popen[str]] = []
        self.lines: queue.Queue[tuple[int, str]] = queue.Queue()
        scheduler = self._start(
            ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0"], env
        )
        line = self._wait_for(scheduler, "Scheduler at:")
        #: ``tcp://127.0.0.1:PORT``
        self.address = line.split("Scheduler at:")[1].strip()
        #: The worker processes (each one Dask worker: there is no nanny).
        self.workers = []
        for _ in range(workers):
            worker = self._start(
                [
                    "distributed.cli.dask_worker",
                    self.address,
                    "--no-nanny",
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    str(threads),
                ],
                env,
            )
            self.workers.append(worker)
        for worker in self.workers:
            self._wait_for(worker, "Registered to:")

    def _start(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", *args, "--no-dashboard"],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=TESTS,
        )
        self.procs.append(proc)
        assert proc.stderr is not None
        threading.Thread(target=self._read, args=(proc.pid, proc.stderr), daemon=True).start()
        return proc

    def _read(self, pid: int, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put((pid, line))

    def _wait_for(self, proc: subprocess.Popen[str], text: str) -> str:
        """Block until ``proc`` logs a line containing ``text`` (through its stderr pipe)."""
        deadline = time.monotonic() + 60  # (importing dask on a busy machine is slow)
        seen: list[str] = []
        while True:
            try:
                pid, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {text!r} from {proc.args}:\n{''.join(seen)}") from None
            if pid == proc.pid:
                seen.append(line)
                if text in line:
                    return line
            else:
                self.lines.put((pid, line))  # another process's line: not ours to take

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()
        for proc in self.procs:
            proc.wait()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Two workers of two threads each, shared by the tests that kill nothing."""
    started = Cluster(workers=2, threads=2)
    yield started
    started.close()


class Counter:
    """Execs in flight across processes: ``with counter:`` around an exec's body.

    The state lives in a file, read and written under ``flock``; the object pickles as a path.
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        Path(self.path).write_text("0 0")

    def _change(self, by: int) -> tuple[int, int]:
        with open(self.path, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            now, most = map(int, f.read().split())
            now += by
            most = max(most, now)
            f.seek(0)
            f.truncate()
            f.write(f"{now} {most}")
            return now, most

    def __enter__(self) -> Counter:
        self._change(+1)
        return self

    def __exit__(self, *exc: object) -> None:
        self._change(-1)

    @property
    def most(self) -> int:
        return self._change(0)[1]


def spin_until(done: Any, seconds: float = STUCK) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        sum(range(2_000))


# The execs below run on the Dask workers, which import them from this module by name.


def make_app(made: str) -> dict[str, Any]:
    with open(made, "a") as f:
        f.write(f"{os.getpid()}\n")
    return {"pid": os.getpid(), "lock": threading.Lock()}


class AppFactory:
    def __init__(self, made: Path) -> None:
        self.made = str(made)

    def __call__(self) -> dict[str, Any]:
        return make_app(self.made)


def crunch(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
    counter = Counter.__new__(Counter)
    counter.path = overall["counter"]
    with counter:
        spin_until(lambda: counter.most >= 3, 30)  # (the first execs wait, busy, for a third)
        ctx["work"] = sum(range(50_000))
    with app["lock"]:
        ctx["pid"], ctx["app"] = os.getpid(), app["pid"]
    return ctx, "fetch"


async def fetch(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
    import asyncio

    await asyncio.sleep(0)
    ctx["fetch_pid"] = os.getpid()
    return ctx, "done"


def test_execs_overlap_on_the_workers_and_never_exceed_concurrency(
    cluster: Cluster, make_run: MakeRun, tmp_path: Path
) -> None:
    made = tmp_path / "made"
    counter = Counter(tmp_path / "counter")
    pool = jorb.dask.DaskPool(cluster.address, app=AppFactory(made))
    states = [
        jorb.State("new", exec=crunch, concurrency=3, pool=pool),  # 4 worker threads: 3 at most
        jorb.State("fetch", exec=fetch, concurrency=4, pool=pool),
        DONE,
    ]
    run = make_run([{"i": i} for i in range(12)], overall={"counter": counter.path})

    process(states, run)

    assert run.counts() == {"done": 12}, errors_of(run)
    assert counter.most == 3  # three exec bodies at once, never four
    worker_pids = {w.pid for w in cluster.workers}
    assert {job.ctx["pid"] for job in run.jobs.values()} == worker_pids  # both workers worked
    assert {job.ctx["fetch_pid"] for job in run.jobs.values()} <= worker_pids
    assert all(job.ctx["pid"] == job.ctx["app"] for job in run.jobs.values())
    assert sorted(map(int, made.read_text().split())) == sorted(worker_pids)  # once per worker


def exec_holding_a_socket(sock: socket.socket) -> Any:
    def work(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
        sock.sendall(b"x")
        return ctx, "done"

    return work


def test_what_cannot_travel_or_connect_stops_the_exec_before_any_job(make_run: MakeRun) -> None:
    with socket.socket() as sock:
        pool = jorb.dask.DaskPool("tcp://127.0.0.1:9")
        states = [jorb.State("new", exec=exec_holding_a_socket(sock), pool=pool), DONE]
        run = make_run([{"i": 0}])
        with pytest.raises(jorb.StateError, match="state 'new': its exec cannot be sent"):
            process(states, run)

    states = [jorb.State("new", exec=fetch, pool=pool), DONE]
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
        pytest.raises(jorb.JorbError, match=r"cannot reach the Dask scheduler at tcp://127\.0"),
    ):
        process(states, run)

    job = run.jobs["1"]
    assert (job.state, job.errors, job.history) == ("new", {}, [])  # no job was tried
    with pytest.raises(jorb.StateError, match="scheduler address"):
        jorb.dask.DaskPool(8786)  # type: ignore[arg-type]


def overrun(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
    spin_until(lambda: os.path.exists(overall["release"]))  # (freed when the test ends)
    return ctx, "done"


def test_a_timeout_abandons_the_task_and_is_recorded(
    cluster: Cluster, make_run: MakeRun, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    pool = jorb.dask.DaskPool(cluster.address)
    states = [jorb.State("new", exec=overrun, timeout=0.5, on_error="failed", pool=pool), DONE]
    run = make_run([{"i": 0}], overall={"release": str(release)})
    try:
        process(states, run)
    finally:
        release.touch()

    [error] = run.jobs["1"].errors["new"]
    assert error["type"] == "jorb.errors.TimedOut"
    assert error["message"] == "timed out after 0.5s (its Dask task was abandoned)"
    assert run.jobs["1"].state == "failed"


def killed_once(app: Any, overall: dict[str, Any], ctx: dict[str, Any]) -> Any:
    if ctx["i"] == 3:
        with contextlib.suppress(FileExistsError):
            os.close(os.open(overall["marker"], os.O_CREAT | os.O_EXCL))  # the first attempt
            fd = os.open(overall["fifo"], os.O_WRONLY)
            os.write(fd, f"{os.getpid()}\n".encode())  # "kill me", to the test
            os.close(fd)
            spin_until(lambda: False)  # busy until it is killed
            raise AssertionError("this worker was to be killed")
    ctx["pid"] = os.getpid()
    return ctx, "done"


def test_a_worker_killed_mid_exec_is_worker_lost_and_the_job_is_retried(
    make_run: MakeRun, tmp_path: Path
) -> None:
    fifo = tmp_path / "kill-me"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDWR)  # (never blocks the exec's open; never sees EOF)
    victims: list[int] = []

    def killer() -> None:
        data = os.read(reader, 64)  # blocks until the exec writes its pid
        victims.append(int(data))
        os.kill(victims[0], signal.SIGKILL)

    own = Cluster(workers=2, threads=1)
    try:
        threading.Thread(target=killer, daemon=True).start()
        pool = jorb.dask.DaskPool(own.address)
        states = [
            jorb.State("new", exec=killed_once, concurrency=2, retries=1, backoff=0, pool=pool),
            DONE,
        ]
        overall = {"fifo": str(fifo), "marker": str(tmp_path / "marker")}
        run = make_run([{"i": i} for i in range(8)], overall=overall)

        process(states, run)
    finally:
        own.close()
        os.close(reader)

    assert run.counts() == {"done": 8}, errors_of(run)  # nothing lost
    [victim] = victims
    job = run.jobs["4"]
    [error] = job.errors["new"]
    assert error["type"] == "jorb.errors.WorkerLost"
    assert job.ctx["pid"] != victim and not alive(victim)


def test_the_canonical_script_runs_on_a_local_cluster_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "cpu.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "cpu_pool.py"),
            "--run",
            str(path),
            "--jobs",
            "40",
            "--dask",
            "local",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    run = jorb.Run.load(path)
    assert run.counts() == {"done": 40}, errors_of(run)
    pids = {int(job.ctx["pid"]) for job in run.jobs.values()}
    assert len(pids) >= 1 and os.getpid() not in pids
    wait_gone(pids)  # the local cluster's workers ended with the script


class Starts:
    """The FIFO ``pooled.py``'s execs write ``start JOB PID PPID`` lines into, on a cluster."""

    def __init__(self, run_path: Path) -> None:
        os.mkfifo(f"{run_path}.starts")
        self.fd = os.open(f"{run_path}.starts", os.O_RDWR)  # (never blocks a writer's open)
        self.lines: list[str] = []

    def wait(self, count: int, timeout: float = STUCK) -> None:
        """Block until ``count`` execs have started."""
        while len(self.lines) < count:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            assert ready, f"only {len(self.lines)} execs started"
            self.lines.extend(os.read(self.fd, 4096).decode().splitlines())

    def close(self) -> None:
        os.close(self.fd)


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    found, todo = set(), [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = {int(k) for k in (task / "children").read_text().split()}
                todo.extend(kids - found)
                found |= kids
    return found


def test_a_coordinator_killed_mid_run_leaves_no_local_cluster_behind(
    tmp_path: Path, gate: tuple[Path, int]
) -> None:
    fifo, fd = gate
    path = tmp_path / "pooled.json"
    starts = Starts(path)
    proc = Proc(tmp_path, "pooled.py", path, 12, fifo, "local")
    try:
        starts.wait(2, timeout=60)  # (a local cluster takes a while to start on a busy machine)
        cluster = descendants(proc.pid)  # `python -m jorb.dask` and its worker processes
        assert len(cluster) >= 2
        assert proc.kill() == -signal.SIGKILL
        os.write(fd, b"xx")  # (the two execs held at the gate may end, if their worker lives)
        wait_gone(cluster, timeout=60)  # the cluster saw its script's pipe close, and ended
    finally:
        proc.stop()
        starts.close()


def test_a_coordinator_killed_mid_run_resumes_on_the_cluster_to_the_end(
    cluster: Cluster, tmp_path: Path, gate: tuple[Path, int]
) -> None:
    fifo, fd = gate
    path = tmp_path / "pooled.json"
    starts = Starts(path)

    proc = Proc(tmp_path, "pooled.py", path, 12, fifo, cluster.address)
    try:
        starts.wait(2, timeout=60)  # two execs mid-run on the cluster, held at the gate
        os.write(fd, b"xxxx")  # let four finish
        starts.wait(6)
        assert proc.kill() == -signal.SIGKILL

        # Its two tasks still hold two of the cluster's four threads (Dask cannot stop a task):
        # they and the resumed run's execs all pass the gate.
        os.write(fd, b"x" * 30)
        proc = Proc(tmp_path, "pooled.py", path, 12, fifo, cluster.address)
        proc.finish(timeout=60)
    finally:
        proc.stop()
        starts.close()
    run = jorb.Run.load(path)
    assert run.counts() == {"done": 12}, errors_of(run)
    seen = [int(n) for n in Path(f"{path}.effects").read_text().split()]
    assert sorted(set(seen)) == list(range(12))  # every job's work was done
