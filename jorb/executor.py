"""The one seam through which every exec runs.

``LocalExecutor`` runs ``async def`` execs on the event loop and ``def`` execs in a thread pool
sized to the sync states' combined concurrency; a state with a ``pool`` (``jorb.ProcessPool``,
``jorb.dask.DaskPool``) has its execs sent there. The processor never calls an exec any other way.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import traceback
from collections.abc import Iterable, Sequence
from concurrent import futures
from typing import Any, Protocol

from .errors import TimedOut
from .states import State

__all__ = ["Executor", "LocalExecutor", "Pool"]


class Executor(Protocol):
    """Runs one attempt of a state's exec and returns what it returned (or raises)."""

    async def call(self, state: State, args: tuple[Any, ...]) -> Any:
        """Run ``state.exec(*args)`` (``app, overall, ctx[, children]``) within its timeout."""
        ...

    def close(self) -> None:
        """Release resources (threads) once the processor is done."""
        ...


class Pool(Protocol):
    """Where a state's execs run when it has one: ``State(..., pool=jorb.ProcessPool())``.

    Started as an exec starts (before any job: a pool that cannot start stops the exec there),
    closed when it ends. ``call`` gets the same arguments as an executor's; ``args[0]`` is the
    processor's app, which a pool replaces with the app its worker made.
    """

    def start(self, states: Sequence[State]) -> None:
        """Get ready to run ``states``' execs (called on the processor's running loop)."""
        ...

    async def call(self, state: State, args: tuple[Any, ...]) -> Any:
        """Run one attempt of ``state``'s exec and return what it returned (or raise)."""
        ...

    def close(self) -> None:
        """Stop: end the workers (no process of the pool is left behind)."""
        ...


class _DaemonThreads(futures.Executor):
    """A fixed set of daemon threads running submitted calls.

    Unlike ThreadPoolExecutor's threads, these are not joined when Python exits, so a ``def``
    exec stuck past its timeout (or past Ctrl-C's grace period) cannot keep the process alive.
    """

    def __init__(self, threads: int, name: str) -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.threads = threads
        for n in range(threads):
            threading.Thread(target=self._serve, name=f"{name}_{n}", daemon=True).start()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for _ in range(self.threads):
            self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args, kwargs = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:
                future.set_exception(e)


def _noting_thread(thread: list[int], fn: Any, args: tuple[Any, ...]) -> Any:
    thread.append(threading.get_ident())
    return fn(*args)


def _stack_of(ident: int) -> traceback.StackSummary | None:
    """Where a thread is now (its frames, outermost first), if it still runs."""
    frame = sys._current_frames().get(ident)
    return traceback.extract_stack(frame) if frame is not None else None


class LocalExecutor:
    """Async execs on the loop, sync execs in threads; timeouts cancel or abandon the attempt.

    A timed-out ``def`` exec cannot be killed: its thread runs on and its result is ignored;
    its thread is a daemon, so it never keeps the process from exiting.
    """

    __slots__ = ("_async", "_pool", "_pools", "_started")

    def __init__(self, states: Iterable[State]) -> None:
        states = [s for s in states if s.exec is not None]
        self._started: list[Pool] = []  # the states' pools, in the order they started
        for pool in dict.fromkeys(s.pool for s in states if s.pool is not None):
            try:
                pool.start([s for s in states if s.pool is pool])
            except BaseException:
                self.close()
                raise
            self._started.append(pool)
        states = [s for s in states if s.pool is None]
        self._async = {s.name for s in states if s.is_async}
        threads = sum(s.concurrency for s in states if s.name not in self._async)
        self._pools = 1
        self._pool = _DaemonThreads(threads, "jorb-exec") if threads else None

    def __repr__(self) -> str:
        return f"<LocalExecutor async={sorted(self._async)} pool={self._pool}>"

    async def call(self, state: State, args: tuple[Any, ...]) -> Any:
        if state.pool is not None:
            return await state.pool.call(state, args)
        fn: Any = state.exec
        timeout = state.timeout
        if state.name in self._async:
            if timeout is None:
                return await fn(*args)
            deadline = asyncio.timeout(timeout)
            try:
                async with deadline:
                    return await fn(*args)
            except TimeoutError:
                if not deadline.expired():
                    raise  # the exec's own TimeoutError, not ours
                raise TimedOut(f"timed out after {timeout:g}s") from None
        loop = asyncio.get_running_loop()
        if timeout is None:
            return await loop.run_in_executor(self._pool, fn, *args)
        thread: list[int] = []  # the thread running it, to say where it was at the timeout
        future = loop.run_in_executor(self._pool, _noting_thread, thread, fn, args)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            if not future.cancelled():
                raise  # the exec's own TimeoutError, not ours
            stack = _stack_of(thread[0]) if thread else None
            self._abandon()
            late = TimedOut(f"timed out after {timeout:g}s (its thread was abandoned)")
            late.stack = stack
            raise late from None

    def _abandon(self) -> None:
        """A thread is stuck in an abandoned exec: give new calls a fresh pool of threads.

        The old pool's threads finish what they run (their results are ignored) and exit.
        """
        old = self._pool
        assert old is not None
        self._pools += 1
        self._pool = _DaemonThreads(old.threads, f"jorb-exec-{self._pools}")
        old.shutdown(wait=False)

    def close(self) -> None:
        threads = getattr(self, "_pool", None)  # (None too if a pool failed to start)
        if threads is not None:
            threads.shutdown(wait=False)
        while self._started:  # last started first: a later pool's processes were forked
            self._started.pop().close()  # holding copies of an earlier one's sockets
