"""Shared helpers for jorb's tests: runs in tmp_path, processors without progress, counters."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

import jorb
import jorb.testing
from jorb.model import entry_document

#: A terminal "done" state, shared by most tests.
DONE = jorb.State("done", terminal=True)

#: How long a barrier may wait before the test is declared stuck (real seconds). A guard against
#: hanging forever when the engine is broken, never a way to wait for something to happen.
STUCK = 5.0

#: Real seconds after which :func:`process` interrupts an exec that should long have finished.
RUN_LIMIT = 60.0

MakeRun = Callable[..., jorb.Run]


def pytest_configure(config: pytest.Config) -> None:
    """Run the suite with SIGINT's usual disposition, however pytest was started.

    A shell without job control starts a background job (``./dev.sh test &``, a script's
    ``cmd &``) with SIGINT ignored, and every process a test starts would inherit that: jorb, as
    Python itself, leaves an ignored SIGINT ignored, so the Ctrl-C tests' scripts would never
    see their SIGINT (they hung until the harness gave up), nor would :func:`process`'s watchdog.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[MakeRun]:
    """``make_run(jobs=[ctx, ...], state="new", name="run.json", overall=None)``: an open Run.

    Every run it opens is closed (its lock released) when the test ends.
    """
    opened: list[jorb.Run] = []

    def make(
        jobs: Iterable[dict[str, Any]] = (),
        state: str = "new",
        *,
        name: str = "run.json",
        overall: dict[str, Any] | None = None,
    ) -> jorb.Run:
        run = jorb.Run.open(tmp_path / name, overall=overall)
        opened.append(run)
        for ctx in jobs:
            run.add_job(ctx, state)
        return run

    yield make
    for run in opened:
        run.close()


def process(
    states: Sequence[jorb.State], run: jorb.Run, app: Any = None, **options: Any
) -> jorb.Run:
    """``Processor(app, states, progress=False, **options).exec(run)`` on a real event loop.

    A watchdog presses Ctrl-C if exec is still going after ``RUN_LIMIT`` real seconds, so an
    engine that never finishes fails the test instead of hanging the suite.
    """
    processor = jorb.Processor(app, states, progress=False, **options)
    if threading.current_thread() is not threading.main_thread():
        return processor.exec(run)
    lock = threading.Lock()
    running, fired = [True], threading.Event()

    def interrupt() -> None:
        with lock:
            if running[0]:
                fired.set()
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    watchdog = threading.Timer(RUN_LIMIT, interrupt)
    watchdog.daemon = True
    watchdog.start()
    try:
        return processor.exec(run)
    except SystemExit:
        if fired.is_set():
            raise AssertionError(f"exec was still running after {RUN_LIMIT:g}s") from None
        raise
    finally:
        with lock:
            running[0] = False
        watchdog.cancel()


def process_fake_clock(
    states: Sequence[jorb.State], run: jorb.Run, app: Any = None, **options: Any
) -> jorb.Run:
    """Like :func:`process`, but on jorb.testing's virtual clock (rates and delays cost nothing).

    A watchdog cancels the run if it takes ``STUCK`` real seconds, so a virtual clock that stops
    moving fails the test instead of hanging the suite.
    """
    processor = jorb.Processor(app, states, progress=False, **options)

    async def guarded() -> jorb.Run:
        try:
            with watchdog(STUCK):
                return await processor.aexec(run)
        except asyncio.CancelledError:
            raise AssertionError(
                f"the run on the virtual clock was still going after {STUCK:g} real seconds "
                f"(virtual time {asyncio.get_running_loop().time():g}s): it never finished, "
                f"or its clock stopped"
            ) from None

    return jorb.testing.run(guarded())


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Cancel the running task if the block takes ``seconds`` of real time: a guard that turns
    a hang (or a virtual clock that stopped moving) into a failure, never a wait."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    timer = threading.Timer(seconds, loop.call_soon_threadsafe, (task.cancel,))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def errors_of(run: jorb.Run) -> dict[str, list[str]]:
    """Every recorded error message by job id: the explanation when a count comes out wrong."""
    return {
        job.id: [e["message"] for records in job.errors.values() for e in records]
        for job in run.jobs.values()
        if job.errors
    }


class Notes:
    """A listener keeping the processor's notes (what it tells the user above the bars)."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def start(self, status: jorb.Status) -> None: ...

    def update(self, status: jorb.Status) -> None: ...

    def note(self, message: str) -> None:
        self.notes.append(message)

    def stop(self, status: jorb.Status) -> None: ...


def job_dict(job: jorb.Job) -> dict[str, Any]:
    """Every field of a job, as its JSON object holds it (history entries as objects), for
    comparing a reloaded run with the one in memory or with the file."""
    return {**asdict(job), "history": [entry_document(entry) for entry in job.history]}


class InFlight:
    """Counts execs in flight (thread-safe) and remembers the most seen at once.

    ``with counter: ...`` around the body of an exec. The first time ``target`` execs are in
    flight together the counter is *full*: ``wait_full()`` blocks a ``def`` exec until then and
    ``await await_full()`` an ``async def`` one, both failing loudly if it never happens.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.now = 0
        self.max = 0
        self.entered = 0
        self.full = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def __enter__(self) -> InFlight:
        with self._lock:
            self.now += 1
            self.entered += 1
            self.max = max(self.max, self.now)
            if self.now >= self.target and not self.full.is_set():
                self.full.set()
                for loop, event in self._waiters:
                    loop.call_soon_threadsafe(event.set)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.now -= 1

    def wait_full(self) -> None:
        if not self.full.wait(STUCK):
            raise AssertionError(f"never {self.target} in flight at once (max {self.max})")

    async def await_full(self) -> None:
        event = asyncio.Event()
        with self._lock:
            if self.full.is_set():
                return
            self._waiters.append((asyncio.get_running_loop(), event))
        try:
            await asyncio.wait_for(event.wait(), STUCK)
        except TimeoutError:
            raise AssertionError(
                f"never {self.target} in flight at once (max {self.max})"
            ) from None


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A FIFO the script's execs read a byte from; the test holds it open to write bytes."""
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR)  # also a reader, so opening never blocks and it never hits EOF
    yield fifo, fd
    os.close(fd)
