"""The one seam through which every exec runs.

``LocalExecutor`` runs ``async def`` execs on the event loop and ``def`` execs in daemon
threads, started as they are needed; a state with a ``pool`` (``jorb.ProcessPool``,
``jorb.dask.DaskPool``) has its execs sent there. The processor never calls an exec any other way.

A ``def`` exec cannot be killed. One that runs past its timeout (or whose job is cancelled) is
*abandoned*: its attempt ends at once as far as the job is concerned, its thread runs on and
whatever it returns is never used, and it keeps its share of the state's ``concurrency`` until
it actually ends: the next ``def`` exec of that state waits for it. So no more than
``concurrency`` exec bodies of a state are ever alive at once, and one that hangs for ever
holds its slot for ever. ``jorb.ProcessPool`` is the way to a hard limit: a worker process can
be ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from typing import Any, Protocol

from .errors import TimedOut, exec_error
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


class _Threads(futures.Executor):
    """Daemon threads running submitted calls, a new one started only when none is idle.

    Unlike ThreadPoolExecutor's threads, these are not joined when Python exits, so a ``def``
    exec stuck past its timeout (or past Ctrl-C's grace period) cannot keep the process alive;
    and there is no fixed number of them: the states' ``concurrency`` is what bounds them.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads done with their call, about to take (or waiting for) another
        self._name = name
        #: Threads started so far.
        self.started = 0

    def __repr__(self) -> str:
        return f"<Threads {self._name} started={self.started}>"

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()
        # Running from now on, so it cannot be cancelled: a call is never dropped unrun (a
        # thread takes it at once), and whoever gave it up learns of its end from the call.
        future.set_running_or_notify_cancel()
        self._calls.put((future, fn, args, kwargs))
        with self._lock:
            spawn = not self._idle
            self._idle -= not spawn
        if spawn:
            self.started += 1
            name = f"{self._name}_{self.started}"
            threading.Thread(target=self._serve, name=name, daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for _ in range(self.started):
            self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args, kwargs = call
            try:
                result, error = fn(*args, **kwargs), None
            except BaseException as e:
                result, error = None, e
            with self._lock:  # idle before the caller hears back: its next call finds us
                self._idle += 1
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
                del error  # (no cycle through the traceback while the thread waits)


class _Late(Exception):
    """A ``def`` exec ended after its deadline: what it returned (or raised) is not used."""


class LocalExecutor:
    """Async execs on the loop, sync execs in threads; timeouts cancel or abandon the attempt.

    See the module's docstring for what becomes of an abandoned ``def`` exec.
    """

    __slots__ = ("_alive", "_async", "_lock", "_started", "_threads", "_waiting")

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
        self._threads = _Threads("jorb-exec")
        self._alive: dict[str, int] = {}  # per state: exec bodies alive in threads
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}  # calls waiting for one
        self._lock = threading.Lock()  # between the loop and a body it gave up on

    def __repr__(self) -> str:
        return (
            f"<LocalExecutor async={sorted(self._async)} threads={self._threads} "
            f"alive={self._alive}>"
        )

    def direct(self, state: State) -> Callable[..., Any] | None:
        """``state.exec`` itself when awaiting it is all :meth:`call` would do (an async def
        with no pool and no timeout), for the worker loop to call without a wrapper."""
        if state.pool is None and state.timeout is None and state.name in self._async:
            return state.exec
        return None

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
        return await self._in_thread(state, fn, args)

    async def _in_thread(self, state: State, fn: Any, args: tuple[Any, ...]) -> Any:
        loop = asyncio.get_running_loop()
        name, timeout = state.name, state.timeout
        alive = self._alive
        while alive.get(name, 0) >= state.concurrency:
            await self._wait_for_a_slot(loop, name)
        alive[name] = alive.get(name, 0) + 1
        deadline = None if timeout is None else loop.time() + timeout
        body = _Body(fn, args, deadline, loop.time, self._lock)
        future = loop.run_in_executor(self._threads, body.run)
        try:
            result = await (future if timeout is None else asyncio.wait_for(future, timeout))
        except BaseException as e:
            if not future.cancelled():
                self._ended(name)  # the body ended, raising
            elif body.leave(functools.partial(loop.call_soon_threadsafe, self._ended, name)):
                self._ended(name)  # abandoned (a timeout, a cancel) just as it ended
            # else: abandoned; the body frees its slot itself when it ends
            if isinstance(e, TimeoutError) and future.cancelled():
                late = TimedOut(f"timed out after {timeout:g}s (its thread was abandoned)")
                late.stack = _stack_of(body.thread)  # where the thread is: the user's line
                raise late from None
            if isinstance(e, _Late):
                raise TimedOut(
                    f"timed out after {timeout:g}s (it ended later than that: its result is "
                    f"not used)"
                ) from None
            raise  # the exec's own error (its own TimeoutError too), or our cancellation
        self._ended(name)
        return result

    async def _wait_for_a_slot(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        """Wait until an abandoned exec of state ``name`` ends and frees its slot."""
        freed: asyncio.Future[None] = loop.create_future()
        self._waiting.setdefault(name, []).append(freed)
        try:
            await freed
        except asyncio.CancelledError:
            if freed.done() and not freed.cancelled():
                self._wake(name)  # woken, then cancelled: the slot goes to the next in line
            raise

    def _ended(self, name: str) -> None:
        """An exec body of state ``name`` ended in its thread: its slot is free."""
        self._alive[name] -= 1
        if self._waiting:
            self._wake(name)

    def _wake(self, name: str) -> None:
        waiting = self._waiting.get(name)
        while waiting:
            freed = waiting.pop(0)
            if not freed.done():  # (a call cancelled while it waited left a cancelled one)
                freed.set_result(None)
                return

    def stop_waiting(self) -> None:
        """Cancel the calls still waiting for an abandoned exec's slot (the processor is
        stopping: they never started, so there is nothing to wait for)."""
        for waiting in self._waiting.values():
            for freed in waiting:
                freed.cancel()
            waiting.clear()

    def close(self) -> None:
        threads = getattr(self, "_threads", None)  # (None if a pool failed to start)
        if threads is not None:
            threads.shutdown(wait=False)
        while self._started:  # last started first: a later pool's processes were forked
            self._started.pop().close()  # holding copies of an earlier one's sockets


def _stack_of(ident: int | None) -> traceback.StackSummary | None:
    """Where a thread is now (its frames, outermost first), if it still runs."""
    frame = sys._current_frames().get(ident) if ident is not None else None
    return traceback.extract_stack(frame) if frame is not None else None


class _Body:
    """One ``def`` exec in its thread, and who frees its slot when it ends.

    An outcome reached after ``deadline`` is never used. If the loop stops waiting for the body
    (``leave`` before the body ended: a timeout, a cancel), the body frees its slot itself, from
    its thread, when it ends.
    """

    __slots__ = ("_args", "_clock", "_deadline", "_ended", "_fn", "_lock", "_on_end", "thread")

    def __init__(
        self,
        fn: Any,
        args: tuple[Any, ...],
        deadline: float | None,
        clock: Callable[[], float],
        lock: threading.Lock,
    ) -> None:
        self._fn, self._args, self._deadline, self._clock = fn, args, deadline, clock
        self._lock = lock
        self._ended = False
        self._on_end: Callable[[], Any] | None = None
        #: The ident of the thread running the body, once it runs (None before).
        self.thread: int | None = None

    def run(self) -> Any:
        self.thread = threading.get_ident()
        try:
            result = self._fn(*self._args)
        except BaseException as e:
            self._end()
            if self._late():
                raise _Late from None
            if isinstance(e, SystemExit | KeyboardInterrupt):
                raise  # (on the loop, they stop the run)
            error = exec_error(e)  # (an asyncio future refuses a StopIteration, and a
            if error is e:  # GeneratorExit set on one closes the task that awaits it)
                raise
            raise error from None
        self._end()
        if self._late():
            raise _Late
        return result

    def leave(self, on_end: Callable[[], Any]) -> bool:
        """The loop is done with this body: True if it has ended (the caller frees the slot),
        else ``on_end`` is called in its thread when it does."""
        with self._lock:
            if not self._ended:
                self._on_end = on_end
            return self._ended

    def _late(self) -> bool:
        deadline = self._deadline
        return deadline is not None and self._clock() > deadline

    def _end(self) -> None:
        with self._lock:
            self._ended = True
            on_end = self._on_end
        if on_end is not None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for the slot
                on_end()
