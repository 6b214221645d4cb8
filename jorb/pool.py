"""``ProcessPool``: a state's execs in worker processes, one exec per worker at a time.

How execs reach the workers: by ``fork``, not by pickling. A jorb script is an ordinary,
unguarded script (no ``if __name__ == "__main__"``), so a worker that re-imported it
(``spawn``, ``forkserver``) would run the whole script again. Instead, when ``exec`` starts,
the pool forks one *fork server* from the script's process: by then the script has defined
every exec and its app factory, and jorb has started no thread of its own. The fork server is
single-threaded and forks each worker (and each replacement) from that snapshot. A worker
already holds every exec in memory, lambdas and closures included; only a state's name, the
``overall`` and ``ctx`` travel to it (pickled, over a socket), and the exec's answer comes back.

Lifetimes: the pool starts with ``exec`` and ends with it. A worker runs the app factory once,
then execs one at a time: ``def`` execs directly, ``async def`` ones on the worker's own event
loop. The coordinator sends a worker its next calls before it needs them (about 20 ms of work,
by the average exec, at least one), so it goes on working while the coordinator is busy (an
fsync, a turn of a busy machine's scheduler). While a worker has work queued, the coordinator
reads its answers every 2 ms (``_TICK``), all workers' in one turn, so they settle into one
commit (one fsync), rather than waking at each. A call queued behind a slow exec waits for it
(its timeout starts when it starts).

A worker that dies fails its exec with :class:`~jorb.WorkerLost` once the fork server has
reaped it, and is replaced; the calls queued behind that exec go to other workers. A timeout
kills the worker running the exec (SIGKILL); the attempt ends once the process is gone. The
fork server and the workers ignore SIGINT (Ctrl-C lets their execs finish within the
processor's grace), and on Linux die with their parent (``PR_SET_PDEATHSIG``), so neither
Ctrl-C nor ``kill -9`` of the script leaves one behind.

This module is the coordinator's side; the fork server's and the workers' is ``jorb.forkserver``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import pickle
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import JorbError, StateError, TimedOut, WorkerLost
from .forkserver import (
    CHUNK,
    HEADER,
    REPLY,
    REQUEST,
    deathsig_setter,
    describe_death,
    dumps,
    flatten,
    quiet_fork_warning,
    rebuild,
    recv,
    recv_exactly,
    send,
    serve_forks,
)

if TYPE_CHECKING:
    from .states import State

__all__ = ["ProcessPool"]

_DEPTH = 64  # calls sent to one worker at most: the one it runs, and the next ones...
_QUEUED = 0.02  # ...as many as take about this many seconds (by the average exec), 2 at least
#: While a busy worker answers, its socket is read every this many seconds, not at each answer
#: (see ``ProcessPool._read``).
_TICK = 0.002


def _load(worker: _Worker) -> int:
    return len(worker.calls)


class ProcessPool:
    """Worker processes for CPU-bound execs: ``State("resize", exec=resize, pool=pool)``.

    ``pool = jorb.ProcessPool(app=make_app)`` runs one worker per core; ``app`` is a
    zero-argument callable (plain or ``async def``) run once in each worker process, and what
    it returns is the ``app`` those execs receive. Give a pooled state a ``concurrency`` well
    above the pool's workers (64 times them for millisecond execs), so workers always have
    their next calls at hand.
    One pool may serve several states of one processor; it starts and stops with each exec.
    """

    __slots__ = (
        "_async",
        "_broken",
        "_calls",
        "_closing",
        "_control",
        "_depth",
        "_execs",
        "_loop",
        "_pending",
        "_ready",
        "_requests",
        "_server",
        "_tick",
        "_ticks",
        "_took",
        "_workers",
        "app",
        "workers",
    )

    def __init__(self, workers: int | None = None, *, app: Callable[[], Any] | None = None) -> None:
        if not hasattr(os, "fork"):
            raise JorbError("jorb.ProcessPool needs os.fork (Linux or macOS)")
        if workers is None:
            workers = os.cpu_count() or 1
        if type(workers) is not int or workers < 1:
            raise StateError(f"ProcessPool(workers={workers!r}): workers must be an int >= 1")
        if app is not None and not callable(app):
            raise StateError(
                f"ProcessPool(app={app!r}): app must be a zero-argument callable that returns "
                f"the app, run once in each worker (pass the factory, not what it makes)"
            )
        #: How many worker processes run execs.
        self.workers = workers
        #: The factory each worker calls once to make the ``app`` its execs receive.
        self.app = app
        self._server: int | None = None  # the fork server's pid, while started
        self._control: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._execs: dict[str, Any] = {}
        self._async: set[str] = set()
        self._workers: dict[int, _Worker] = {}  # by their socket's descriptor
        self._ready: list[_Worker] = []  # started, alive
        self._pending: deque[_Call] = deque()
        self._requests: deque[tuple[_Worker | None, _Worker]] = deque()  # (dead, new), sent
        self._broken: JorbError | None = None
        self._closing = False
        self._calls = 0  # calls made: the next one's number
        self._took = _QUEUED  # seconds an exec takes, on average (a moving one)
        self._depth = 2  # calls a worker is sent at most, from that average
        self._tick: asyncio.TimerHandle | None = None  # the next read, while answers come
        self._ticks = _TICK  # (0: read each answer as it comes)

    def __repr__(self) -> str:
        if self._server is None:
            return f"<ProcessPool workers={self.workers} (not started)>"
        busy = sum(len(w.calls) for w in self._workers.values())
        return (
            f"<ProcessPool workers={self.workers} busy={busy} queued={len(self._pending)} "
            f"server={self._server}>"
        )

    # -- the coordinator's side ------------------------------------------------------------------

    def start(self, states: Sequence[State]) -> None:
        """Fork the fork server and the workers for ``states``; wait until each has its app.

        Called by the executor as ``exec`` starts, on the processor's running loop. Raises
        :class:`~jorb.JorbError` if the app factory fails in a worker.
        """
        if self._server is not None:
            raise JorbError(f"{self!r} is already in use by another exec; give each its own pool")
        self._loop = asyncio.get_running_loop()
        # On jorb.testing's virtual clock, a tick would not come while a worker works.
        self._ticks = 0.0 if hasattr(self._loop, "threads_busy") else _TICK
        self._execs = {s.name: s.exec for s in states}
        self._async = {s.name for s in states if s.is_async}
        self._broken, self._closing = None, False
        control, theirs = socket.socketpair()
        parent = os.getpid()
        deathsig = deathsig_setter()  # (made here: nothing is imported after a fork)
        for stream in (sys.stdout, sys.stderr):  # (or a worker could write it out again)
            with contextlib.suppress(Exception):
                stream.flush()
        with quiet_fork_warning():
            pid = os.fork()
        if pid == 0:  # the fork server: never returns
            control.close()
            serve_forks(theirs, parent, deathsig, self._execs, self._async, self.app)
        theirs.close()
        self._server, self._control = pid, control
        try:
            for _ in range(self.workers):
                self._request(None)
            for _ in range(self.workers):
                self._on_reply(block=True)
            for worker in list(self._workers.values()):
                self._await_ready(worker)
        except BaseException:
            self.close()
            raise
        self._loop.add_reader(control.fileno(), self._on_reply)
        for worker in self._workers.values():
            self._listen(worker)

    def _await_ready(self, worker: _Worker) -> None:
        try:
            kind, value, *_ = pickle.loads(recv(worker.sock))
        except (EOFError, OSError) as e:
            raise JorbError(f"a ProcessPool worker ({worker.pid}) died while starting") from e
        if kind == "app":
            raise JorbError(f"the ProcessPool's app factory failed in a worker:\n{value}")
        self._ready.append(worker)

    async def call(self, state: State, args: tuple[Any, ...]) -> Any:
        """Run one attempt of ``state``'s exec in a worker; ``args[0]`` (the app) stays here."""
        if self._broken is not None:
            raise self._broken
        loop = self._loop
        assert loop is not None, "the pool is not started"
        self._calls += 1
        ident = self._calls
        call = _Call(
            ident, dumps((ident, state.name, args[1:])), loop.create_future(), state.timeout
        )
        self._pending.append(call)
        self._dispatch()
        hold_clock(loop, +1)
        try:
            return await call.future
        except WorkerLost as e:
            if not call.overran:
                raise
            raise TimedOut(
                f"timed out after {state.timeout:g}s (its worker process was ended)"
            ) from e
        except asyncio.CancelledError:
            call.future.cancel()
            worker = call.worker
            if worker is None:
                with contextlib.suppress(ValueError):
                    self._pending.remove(call)
            elif worker.calls and worker.calls[0] is call:
                self._kill(worker)  # a cancelled exec does not run on in its worker
            elif not worker.gone:  # queued in its socket: the worker is to skip it
                with contextlib.suppress(OSError):
                    send(worker.sock, dumps((call.ident, None, None)))
            raise
        finally:
            hold_clock(loop, -1)

    def close(self) -> None:
        """End every worker and the fork server, and wait until they are gone."""
        self._closing = True
        loop, control, server = self._loop, self._control, self._server
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for worker in self._workers.values():
            if loop is not None and not loop.is_closed():
                loop.remove_reader(worker.fd)
            for call in worker.calls:
                call.future.cancel()
            worker.sock.close()
        for call in self._pending:
            call.future.cancel()
        self._workers.clear()
        self._ready.clear()
        self._pending.clear()
        if control is not None:
            if loop is not None and not loop.is_closed():
                loop.remove_reader(control.fileno())
            # "Stop" (a request without a socket): the fork server kills and reaps its workers
            # and exits. (Not only the socket's end: a copy of ours lives on in the processes
            # of a pool started after this one.)
            with contextlib.suppress(OSError):
                control.sendall(REQUEST.pack(0))
            control.close()
        if server is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(server, 0)
        self._server = self._control = None

    def _dispatch(self) -> None:
        """Hand queued calls to the least busy workers, up to ``self._depth`` each.

        A worker holds its next calls in its socket while it runs one, so it goes on working
        while this process is busy elsewhere (writing the run file, say).
        """
        pending, ready = self._pending, self._ready
        while pending and ready:
            worker = min(ready, key=_load)
            if len(worker.calls) >= self._depth:
                return
            call = pending.popleft()
            if call.future.done():
                continue  # cancelled while it waited
            call.worker = worker
            worker.calls.append(call)
            try:
                send(worker.sock, call.payload)
            except OSError:
                ready.remove(worker)  # it died: its reader sees its socket end, and settles
                continue
            call.sent = time.monotonic()
            if len(worker.calls) == 1:
                self._begin(call, call.sent)

    def _begin(self, call: _Call, started: float) -> None:
        """``call`` started in its worker at ``started`` (``time.monotonic()``): time it."""
        call.started = started
        if call.timeout is not None:
            assert self._loop is not None
            late = max(0.0, time.monotonic() - started)  # (its answer before waited unread)
            call.timer = self._loop.call_later(call.timeout - late, self._overrun, call)

    def _overrun(self, call: _Call) -> None:
        worker = call.worker
        if worker is not None and not worker.gone:
            self._read(worker)  # (its answer may be waiting in the socket, unread)
        if not call.future.done() and call.worker is not None:
            call.overran = True
            self._kill(call.worker)

    def _kill(self, worker: _Worker) -> None:
        # Only while its socket is open: until then the fork server has not reaped it, so the
        # pid is still this worker's.
        if not worker.gone and worker.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)

    def _request(self, dead: _Worker | None) -> None:
        """Ask the fork server for a new worker (reaping ``dead`` first)."""
        assert self._control is not None and self._loop is not None
        ours, theirs = socket.socketpair()
        worker = _Worker(ours)
        socket.send_fds(self._control, [REQUEST.pack(dead.pid if dead else 0)], [theirs.fileno()])
        theirs.close()
        self._requests.append((dead, worker))
        self._workers[worker.fd] = worker

    def _on_reply(self, block: bool = False) -> None:
        """The fork server reaped a worker and forked another."""
        assert self._control is not None
        try:
            data = recv_exactly(self._control, REPLY.size)
        except (EOFError, OSError) as e:
            if block:
                raise JorbError("the ProcessPool's fork server died while starting") from e
            self._fail_all(WorkerLost("the pool's fork server process died"))
            return
        _, status, pid = REPLY.unpack(data)
        dead, worker = self._requests.popleft()
        worker.pid = pid
        if not block and self._loop is not None:
            self._listen(worker)
        if dead is not None and dead.calls:
            call = dead.calls.popleft()  # (the one it was running: the others are requeued)
            if call.timer is not None:
                call.timer.cancel()
            if not call.future.done():
                call.future.set_exception(WorkerLost(describe_death(dead.pid, status)))

    def _on_readable(self, worker: _Worker) -> None:
        """The worker sent something: handle it; read on by the tick if it stays busy."""
        if self._read(worker):
            self._hold(worker)

    def _on_tick(self) -> None:
        """Read what each held worker answered in the last tick, all in this turn of the loop,
        so those answers settle into one commit."""
        self._tick = None
        now = time.monotonic()
        for worker in list(self._workers.values()):
            if worker.listened or worker.gone or not worker.pid:
                continue
            if self._read(worker):
                self._hold(worker)
            elif worker.calls and now - worker.calls[0].started < 4 * self._took:
                self._hold(worker)  # (its exec should end soon)
            else:
                self._listen(worker)  # (a long one: wait for its answer)

    def _hold(self, worker: _Worker) -> None:
        """Read ``worker``'s next answers at the tick if it has work enough queued to stay busy
        meanwhile, else as they come."""
        if worker.gone or self._closing:
            return
        calls = len(worker.calls)
        if not self._ticks or calls < 2 or calls * self._took < 2 * self._ticks:
            self._listen(worker)
            return
        assert self._loop is not None
        if worker.listened:
            self._loop.remove_reader(worker.fd)
            worker.listened = False
        if self._tick is None:
            self._tick = self._loop.call_later(self._ticks, self._on_tick)

    def _listen(self, worker: _Worker) -> None:
        """Read what ``worker`` sends as it comes."""
        if not worker.listened and not worker.gone and self._loop is not None:
            self._loop.add_reader(worker.fd, self._on_readable, worker)
            worker.listened = True

    def _read(self, worker: _Worker) -> int:
        """Read what the worker sent, and handle every whole message in it; how many answers.

        A worker that has answered and has calls enough queued to stay busy for two ticks is
        read every ``_TICK`` seconds (by ``_on_tick``), not as each answer arrives: the calls
        queued keep it busy meanwhile, their slots are held until their answers are read (so
        what a crash can make run again is unchanged), and the answers of a tick, from every
        worker, settle together, into one commit (one fsync) rather than one each. A call's
        timeout counts from when its worker started it, read from the answer before it.
        """
        answers = 0
        buffer = worker.buffer
        while True:
            try:
                data = worker.sock.recv(CHUNK, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return answers
            except OSError:
                data = b""
            if not data:
                self._lost(worker)
                return answers
            buffer += data
            start, end = 0, len(buffer)
            while end - start >= HEADER.size:
                (size,) = HEADER.unpack_from(buffer, start)
                if end - start - HEADER.size < size:
                    break
                begin = start + HEADER.size
                start = begin + size
                try:
                    message = pickle.loads(memoryview(buffer)[begin:start])
                except Exception:  # (a class the worker's answer needs cannot be imported here)
                    error = sys.exc_info()[1] or JorbError("unreadable")
                    message = ("error", flatten(error), 0.0, time.monotonic())
                answers += self._on_message(worker, *message)
            del buffer[:start]
            if len(data) < CHUNK:
                return answers

    def _on_message(self, worker: _Worker, kind: str, value: Any, took: float, ended: float) -> int:
        if kind == "ready":
            self._ready.append(worker)
            self._dispatch()
            return 0
        if kind == "app":  # its app factory raised: no worker of this pool will do better
            self._broken = JorbError(f"the ProcessPool's app factory failed in a worker:\n{value}")
            self._fail_all(self._broken)
            return 0
        call = worker.calls.popleft()
        if worker.calls:  # the next one started when this one ended, or when it arrived
            self._begin(worker.calls[0], max(ended, worker.calls[0].sent))
        if kind != "skipped":  # how long execs take, on average: how many to queue
            self._took = 0.9 * self._took + 0.1 * took
            self._depth = max(2, min(_DEPTH, math.ceil(_QUEUED / max(self._took, 1e-6))))
        self._dispatch()
        if call.timer is not None:
            call.timer.cancel()
        if call.future.done():
            return 1
        if kind == "ok":
            call.future.set_result(value)
        else:
            call.future.set_exception(rebuild(value))
        return 1

    def _lost(self, worker: _Worker) -> None:
        """A worker's socket ended: it is dead. Replace it; its call fails once it is reaped.

        The calls queued behind that one never started: they go back to the front of the queue.
        """
        if worker.gone:
            return
        worker.gone = True
        if self._loop is not None:
            self._loop.remove_reader(worker.fd)
        worker.sock.close()
        self._workers.pop(worker.fd, None)
        with contextlib.suppress(ValueError):
            self._ready.remove(worker)
        while len(worker.calls) > 1:
            call = worker.calls.pop()
            call.worker = None
            if call.timer is not None:
                call.timer.cancel()
            self._pending.appendleft(call)
        if self._closing or self._broken is not None:
            return
        try:
            self._request(worker)
        except OSError:
            self._fail_all(WorkerLost("the pool's fork server process died"))
            return
        self._dispatch()

    def _fail_all(self, error: JorbError) -> None:
        """The pool cannot go on (its fork server died, its app factory fails): say so."""
        if self._broken is None:
            self._broken = error
        calls = [*self._pending, *(c for w in self._workers.values() for c in w.calls)]
        calls += [c for dead, _ in self._requests if dead is not None for c in dead.calls]
        self._pending.clear()
        for call in calls:
            if not call.future.done():
                call.future.set_exception(type(error)(*error.args))


class _Worker:
    """The coordinator's view of one worker process."""

    __slots__ = ("buffer", "calls", "fd", "gone", "listened", "pid", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pid = 0  # known once the fork server answers
        self.calls: deque[_Call] = deque()  # sent to it: the first runs, the others wait
        self.buffer = bytearray()  # what it sent that is not a whole message yet
        self.gone = False  # its socket ended (it is dead, perhaps not reaped yet)
        self.listened = False  # its socket is read as data comes (else at the tick)


class _Call:
    """One exec attempt sent (or waiting to be sent) to a worker."""

    __slots__ = (
        "future",
        "ident",
        "overran",
        "payload",
        "sent",
        "started",
        "timeout",
        "timer",
        "worker",
    )

    def __init__(
        self, ident: int, payload: bytes, future: asyncio.Future[Any], timeout: float | None
    ) -> None:
        self.ident = ident
        self.payload = payload
        self.future = future
        self.timeout = timeout
        self.timer: asyncio.TimerHandle | None = None
        self.worker: _Worker | None = None
        self.overran = False
        self.sent = 0.0  # when it was sent to its worker (time.monotonic())
        self.started = 0.0  # when its worker started it, once known


def hold_clock(loop: asyncio.AbstractEventLoop, by: int) -> None:
    """Count a call in a worker as work in flight for ``jorb.testing``'s virtual clock, which
    must not jump ahead (and fire timeouts) while a real process works."""
    if hasattr(loop, "threads_busy"):
        loop.threads_busy += by
