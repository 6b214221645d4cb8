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
fsync, a turn of a busy machine's scheduler), and reads every answer waiting in a socket at
once. A call queued behind a slow exec waits for it (its timeout starts when it starts).

A worker that dies fails its exec with :class:`~jorb.WorkerLost` once the fork server has
reaped it, and is replaced; the calls queued behind that exec go to other workers. A timeout
kills the worker running the exec (SIGKILL); the attempt ends once the process is gone. The
fork server and the workers ignore SIGINT (Ctrl-C lets their execs finish within the
processor's grace), and on Linux die with their parent (``PR_SET_PDEATHSIG``), so neither
Ctrl-C nor ``kill -9`` of the script leaves one behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import math
import os
import pickle
import signal
import socket
import struct
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import ExecResultError, JorbError, StateError, TimedOut, WorkerLost

if TYPE_CHECKING:
    from .states import State

__all__ = ["ProcessPool"]

_HEADER = struct.Struct("!I")  # each message: its length, then a pickle
_REPLY = struct.Struct("!qqq")  # fork server -> coordinator: reaped pid, its wait status, new pid
_REQUEST = struct.Struct("!q")  # coordinator -> fork server: the pid to reap first (0: none)
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_CHUNK = 1 << 18  # bytes read from a worker at once
_DEPTH = 64  # calls sent to one worker at most: the one it runs, and the next ones...
_QUEUED = 0.02  # ...as many as take about this many seconds (by the average exec), 2 at least


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
        self._execs = {s.name: s.exec for s in states}
        self._async = {s.name for s in states if s.is_async}
        self._broken, self._closing = None, False
        control, theirs = socket.socketpair()
        parent = os.getpid()
        deathsig = _deathsig_setter()  # (made here: nothing is imported after a fork)
        with _quiet_fork_warning():
            pid = os.fork()
        if pid == 0:  # the fork server: never returns
            control.close()
            _serve_forks(theirs, parent, deathsig, self._execs, self._async, self.app)
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
            self._loop.add_reader(worker.fd, self._on_readable, worker)

    def _await_ready(self, worker: _Worker) -> None:
        try:
            kind, value, _ = pickle.loads(_recv(worker.sock))
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
            ident, _dumps((ident, state.name, args[1:])), loop.create_future(), state.timeout
        )
        self._pending.append(call)
        self._dispatch()
        _hold_clock(loop, +1)
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
                    _send(worker.sock, _dumps((call.ident, None, None)))
            raise
        finally:
            _hold_clock(loop, -1)

    def close(self) -> None:
        """End every worker and the fork server, and wait until they are gone."""
        self._closing = True
        loop, control, server = self._loop, self._control, self._server
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
                control.sendall(_REQUEST.pack(0))
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
                _send(worker.sock, call.payload)
            except OSError:
                ready.remove(worker)  # it died: its reader sees its socket end, and settles
                continue
            if len(worker.calls) == 1:
                self._begin(call)

    def _begin(self, call: _Call) -> None:
        """``call`` is starting in its worker (its predecessors there are done): time it."""
        if call.timeout is not None:
            assert self._loop is not None
            call.timer = self._loop.call_later(call.timeout, self._overrun, call)

    def _overrun(self, call: _Call) -> None:
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
        socket.send_fds(self._control, [_REQUEST.pack(dead.pid if dead else 0)], [theirs.fileno()])
        theirs.close()
        self._requests.append((dead, worker))
        self._workers[worker.fd] = worker

    def _on_reply(self, block: bool = False) -> None:
        """The fork server reaped a worker and forked another."""
        assert self._control is not None
        try:
            data = _recv_exactly(self._control, _REPLY.size)
        except (EOFError, OSError) as e:
            if block:
                raise JorbError("the ProcessPool's fork server died while starting") from e
            self._fail_all(WorkerLost("the pool's fork server process died"))
            return
        _, status, pid = _REPLY.unpack(data)
        dead, worker = self._requests.popleft()
        worker.pid = pid
        if not block and self._loop is not None:
            self._loop.add_reader(worker.fd, self._on_readable, worker)
        if dead is not None and dead.calls:
            call = dead.calls.popleft()  # (the one it was running: the others are requeued)
            if call.timer is not None:
                call.timer.cancel()
            if not call.future.done():
                call.future.set_exception(WorkerLost(_describe_death(dead.pid, status)))

    def _on_readable(self, worker: _Worker) -> None:
        """Read what the worker sent, and handle every whole message in it.

        All of them in this turn of the loop, so the answers that piled up while this process
        was busy (writing the run file, say) settle together, into one commit.
        """
        try:
            data = worker.sock.recv(_CHUNK, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost(worker)
            return
        buffer = worker.buffer
        buffer += data
        start, end = 0, len(buffer)
        while end - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, start)
            if end - start - _HEADER.size < size:
                break
            begin = start + _HEADER.size
            start = begin + size
            try:
                message = pickle.loads(memoryview(buffer)[begin:start])
            except Exception:  # (a class the worker's answer needs cannot be imported here)
                error = sys.exc_info()[1] or JorbError("unreadable")
                message = ("error", _flatten(error), 0.0)
            self._on_message(worker, *message)
        del buffer[:start]

    def _on_message(self, worker: _Worker, kind: str, value: Any, took: float) -> None:
        if kind == "ready":
            self._ready.append(worker)
            self._dispatch()
            return
        if kind == "app":  # its app factory raised: no worker of this pool will do better
            self._broken = JorbError(f"the ProcessPool's app factory failed in a worker:\n{value}")
            self._fail_all(self._broken)
            return
        call = worker.calls.popleft()
        if worker.calls:
            self._begin(worker.calls[0])
        if kind != "skipped":  # how long execs take, on average: how many to queue
            self._took = 0.9 * self._took + 0.1 * took
            self._depth = max(2, min(_DEPTH, math.ceil(_QUEUED / max(self._took, 1e-6))))
        self._dispatch()
        if call.timer is not None:
            call.timer.cancel()
        if call.future.done():
            return
        if kind == "ok":
            call.future.set_result(value)
        else:
            call.future.set_exception(_rebuild(value))

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

    __slots__ = ("buffer", "calls", "fd", "gone", "pid", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pid = 0  # known once the fork server answers
        self.calls: deque[_Call] = deque()  # sent to it: the first runs, the others wait
        self.buffer = bytearray()  # what it sent that is not a whole message yet
        self.gone = False  # its socket ended (it is dead, perhaps not reaped yet)


class _Call:
    """One exec attempt sent (or waiting to be sent) to a worker."""

    __slots__ = ("future", "ident", "overran", "payload", "timeout", "timer", "worker")

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


# -- the fork server's and the workers' side ----------------------------------------------------


def _serve_forks(
    control: socket.socket,
    parent: int,
    deathsig: Callable[[], None],
    execs: dict[str, Any],
    async_names: set[str],
    factory: Callable[[], Any] | None,
) -> NoReturn:
    """The fork server: fork a worker per request, reap the dead. Exits when its socket ends."""
    children: set[int] = set()
    me = os.getpid()
    try:
        _become_child(parent, deathsig)
        gc.freeze()  # the script's objects are never collected here: their pages stay shared
        while True:
            message, fds, _, _ = socket.recv_fds(control, _REQUEST.size, 1)
            if len(message) != _REQUEST.size or len(fds) != 1:
                break  # the coordinator closed its end (or is gone)
            (dead,) = _REQUEST.unpack(message)
            status = 0
            if dead in children:
                _, status = os.waitpid(dead, 0)
                children.discard(dead)
            pid = os.fork()
            if pid == 0:
                control.close()
                sock = socket.socket(fileno=fds[0])
                _serve_execs(sock, me, deathsig, execs, async_names, factory)
            os.close(fds[0])
            children.add(pid)
            control.sendall(_REPLY.pack(dead, status, pid))
    except BaseException:
        pass
    finally:
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
        os._exit(0)


def _serve_execs(
    sock: socket.socket,
    parent: int,
    deathsig: Callable[[], None],
    execs: dict[str, Any],
    async_names: set[str],
    factory: Callable[[], Any] | None,
) -> NoReturn:
    """A worker: make the app, then run one exec per message until the coordinator is gone."""
    try:
        _become_child(parent, deathsig)
        loop: asyncio.AbstractEventLoop | None = None
        try:
            app = None
            if factory is not None:
                app = factory()
                if inspect.isawaitable(app):
                    loop = asyncio.new_event_loop()
                    app = loop.run_until_complete(app)
        except BaseException:
            _send(sock, _dumps(("app", traceback.format_exc(), 0.0)))
            os._exit(1)
        _send(sock, _dumps(("ready", None, 0.0)))
        inbox = _Inbox(sock)
        while inbox.receive():
            ident, name, args = inbox.calls.popleft()
            if ident in inbox.skipped:  # cancelled before its turn came: not run
                inbox.skipped.discard(ident)
                _send(sock, _dumps(("skipped", None, 0.0)))
                continue
            began = time.perf_counter()
            try:
                if name in async_names:
                    loop = loop or asyncio.new_event_loop()
                    result = loop.run_until_complete(execs[name](app, *args))
                else:
                    result = execs[name](app, *args)
                try:
                    answer = _dumps(("ok", result, time.perf_counter() - began))
                except Exception as e:
                    raise ExecResultError(
                        f"the exec's answer cannot be sent back from its worker process ({e}); "
                        f"return plain data: (ctx, next_state[, kicks])"
                    ) from None
            except BaseException as e:
                answer = _dumps(("error", _flatten(e), time.perf_counter() - began))
            _send(sock, answer)
    except BaseException:
        pass
    os._exit(0)


class _Inbox:
    """A worker's side of its socket: the calls sent to it, and the ones it must skip."""

    __slots__ = ("buffer", "calls", "skipped", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.calls: deque[tuple[int, str, tuple[Any, ...]]] = deque()
        self.skipped: set[int] = set()

    def receive(self) -> bool:
        """Read what has arrived (waiting for a call if none is at hand); False at the end.

        Read before each call, so a skip sent while the call waited in the socket is seen.
        """
        flags = socket.MSG_DONTWAIT if self.calls else 0
        while True:
            try:
                data = self.sock.recv(_CHUNK, flags)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            self.buffer += data
            self._decode()
            flags = socket.MSG_DONTWAIT  # (now: only what else is already there)

    def _decode(self) -> None:
        buffer, start = self.buffer, 0
        while len(buffer) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, start)
            if len(buffer) - start - _HEADER.size < size:
                break
            begin = start + _HEADER.size
            start = begin + size
            ident, name, args = pickle.loads(memoryview(buffer)[begin:start])
            if name is None:
                self.skipped.add(ident)
            else:
                self.calls.append((ident, name, args))
        del buffer[:start]


def _hold_clock(loop: asyncio.AbstractEventLoop, by: int) -> None:
    """Count a call in a worker as work in flight for ``jorb.testing``'s virtual clock, which
    must not jump ahead (and fire timeouts) while a real process works."""
    if hasattr(loop, "threads_busy"):
        loop.threads_busy += by


def _become_child(parent: int, deathsig: Callable[[], None]) -> None:
    """Die with ``parent``; leave Ctrl-C to the script; forget its signal handling."""
    deathsig()
    if os.getppid() != parent:  # it died before we could ask to die with it
        os._exit(0)
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)  # (the script's event loop's, shared with it since the fork)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _deathsig_setter() -> Callable[[], None]:
    """A function that makes the calling process get SIGKILL when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return lambda: None
    set_pdeathsig = 1  # PR_SET_PDEATHSIG

    def deathsig() -> None:
        prctl(set_pdeathsig, signal.SIGKILL, 0, 0, 0)

    return deathsig


@contextlib.contextmanager
def _quiet_fork_warning() -> Any:
    # Python 3.12+ warns about fork() in a process with threads (the script's own, say). The
    # fork server runs no Python that another thread could have left half-done: it only forks.
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork")
        yield


# -- messages ------------------------------------------------------------------------------------


def _dumps(value: Any) -> bytes:
    return pickle.dumps(value, _PROTOCOL)


def _send(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv(sock: socket.socket) -> bytes:
    (size,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    return _recv_exactly(sock, size)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = sock.recv(size)
    if len(data) == size:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        if not data:
            raise EOFError
        data = sock.recv(size - got)
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _flatten(error: BaseException) -> tuple[bytes | None, str, str, str]:
    """An exception as it can travel: itself pickled if it survives that, its text anyway."""
    text = "".join(traceback.format_exception(error))
    data: bytes | None
    try:
        data = _dumps(error)
        pickle.loads(data)  # (an exception whose __init__ needs other arguments fails here)
    except Exception:
        data = None
    kind = type(error)
    name = kind.__qualname__
    if kind.__module__ != "builtins":
        name = f"{kind.__module__}.{name}"
    try:
        message = str(error)
    except Exception:
        message = ""
    return data, name, message, text


def _rebuild(value: tuple[bytes | None, str, str, str]) -> BaseException:
    data, name, message, text = value
    error: BaseException | None = None
    if data is not None:
        with contextlib.suppress(Exception):
            error = pickle.loads(data)
    if not isinstance(error, BaseException):
        error = JorbError(f"{name}: {message} (the exception itself could not leave its worker)")
    if not isinstance(error, Exception):  # SystemExit, KeyboardInterrupt... in a worker
        error = JorbError(f"the exec raised {name}: {message}")
    error.__cause__ = _RemoteTraceback(text)
    return error


class _RemoteTraceback(Exception):
    """The traceback an exception had in its worker process, shown as its cause."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


def _describe_death(pid: int, status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(ValueError):
            return f"its worker process ({pid}) was killed by {signal.Signals(sig).name}"
        return f"its worker process ({pid}) was killed by signal {sig}"
    if os.WIFEXITED(status):
        return f"its worker process ({pid}) exited with status {os.WEXITSTATUS(status)}"
    return f"its worker process ({pid}) died"
