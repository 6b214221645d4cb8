"""The processes of a ``ProcessPool``: its fork server, its workers, and their messages.

The coordinator (``jorb.pool``) forks the fork server once, as ``exec`` starts; the fork server
forks each worker when asked, reaps the dead, and ends them all when told to stop or when its
socket ends. A worker makes its app, then runs the calls that arrive on its socket in order, each
answered with ``(kind, value, seconds, ended)``: ``("ok", answer, s, t)``, ``("error", flattened,
s, t)``, ``("skipped", None, 0, t)`` for one cancelled before its turn (``t``: when it ended, by
``time.monotonic()``, which all processes share), after a first ``("ready", None, 0, 0)`` (or
``("app", traceback, 0, 0)`` if the factory failed). Every message on a worker's socket is a
4-byte length and a pickle; the fork server's requests and replies are fixed-size structs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import os
import pickle
import signal
import socket
import struct
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn

from .errors import ExecResultError, JorbError, exec_error

HEADER = struct.Struct("!I")  # each message: its length, then a pickle
REPLY = struct.Struct("!qqq")  # fork server -> coordinator: reaped pid, its wait status, new pid
REQUEST = struct.Struct("!q")  # coordinator -> fork server: the pid to reap first (0: none)
PROTOCOL = pickle.HIGHEST_PROTOCOL
CHUNK = 1 << 18  # bytes read from a socket at once


def serve_forks(
    control: socket.socket,
    parent: int,
    deathsig: Callable[[], None],
    execs: dict[str, Any],
    async_names: set[str],
    factory: Callable[[], Any] | None,
) -> NoReturn:
    """The fork server: fork a worker per request, reap the dead; at "stop" or the end of its
    socket, kill and reap its workers and exit."""
    children: set[int] = set()
    me = os.getpid()
    try:
        _become_child(parent, deathsig)
        gc.freeze()  # the script's objects are never collected here: their pages stay shared
        while True:
            message, fds, _, _ = socket.recv_fds(control, REQUEST.size, 1)
            if len(message) != REQUEST.size or len(fds) != 1:
                break  # the coordinator closed its end (or is gone)
            (dead,) = REQUEST.unpack(message)
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
            control.sendall(REPLY.pack(dead, status, pid))
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
            send(sock, dumps(("app", traceback.format_exc(), 0.0, 0.0)))
            os._exit(1)
        send(sock, dumps(("ready", None, 0.0, 0.0)))
        inbox = _Inbox(sock)
        while inbox.receive():
            ident, name, args = inbox.calls.popleft()
            if ident in inbox.skipped:  # cancelled before its turn came: not run
                inbox.skipped.discard(ident)
                send(sock, dumps(("skipped", None, 0.0, time.monotonic())))
                continue
            began = time.monotonic()
            try:
                if name in async_names:
                    loop = loop or asyncio.new_event_loop()
                    result = loop.run_until_complete(execs[name](app, *args))
                else:
                    result = execs[name](app, *args)
                ended = time.monotonic()
                try:
                    answer = dumps(("ok", result, ended - began, ended))
                except Exception as e:
                    raise ExecResultError(
                        f"the exec's answer cannot be sent back from its worker process ({e}); "
                        f"return plain data: (ctx, next_state[, kicks])"
                    ) from None
            except BaseException as e:
                ended = time.monotonic()
                answer = dumps(("error", flatten(e), ended - began, ended))
            send(sock, answer)
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
        while True:
            # With a call at hand, only what is already there; without one, wait. (A skip can
            # come alone: one for a call the coordinator did not know had started.)
            flags = socket.MSG_DONTWAIT if self.calls else 0
            try:
                data = self.sock.recv(CHUNK, flags)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            self.buffer += data
            self._decode()

    def _decode(self) -> None:
        buffer, start = self.buffer, 0
        while len(buffer) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer, start)
            if len(buffer) - start - HEADER.size < size:
                break
            begin = start + HEADER.size
            start = begin + size
            ident, name, args = pickle.loads(memoryview(buffer)[begin:start])
            if name is None:
                self.skipped.add(ident)
            else:
                self.calls.append((ident, name, args))
        del buffer[:start]


def _become_child(parent: int, deathsig: Callable[[], None]) -> None:
    """Die with ``parent``; leave Ctrl-C to the script; forget its signal handling."""
    deathsig()
    if os.getppid() != parent:  # it died before we could ask to die with it
        os._exit(0)
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)  # (the script's event loop's, shared with it since the fork)
    # Ctrl-C is the coordinator's to handle. A handler that does nothing, not SIG_IGN: a
    # program an exec starts (``subprocess.run``) gets the default back, where SIG_IGN stays.
    signal.signal(signal.SIGINT, _ignore)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _ignore(signum: int, frame: Any) -> None:
    pass


def deathsig_setter() -> Callable[[], None]:
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
def quiet_fork_warning() -> Any:
    # Python 3.12+ warns about fork() in a process with threads (the script's own, say). The
    # fork server runs no Python that another thread could have left half-done: it only forks.
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork")
        yield


# -- messages ------------------------------------------------------------------------------------


def dumps(value: Any) -> bytes:
    return pickle.dumps(value, PROTOCOL)


def send(sock: socket.socket, data: bytes) -> None:
    sock.sendall(HEADER.pack(len(data)) + data)


def recv(sock: socket.socket) -> bytes:
    (size,) = HEADER.unpack(recv_exactly(sock, HEADER.size))
    return recv_exactly(sock, size)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
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


def flatten(error: BaseException) -> tuple[bytes | None, str, str, str]:
    """An exception as it can travel: itself pickled if it survives that, its text anyway."""
    text = "".join(traceback.format_exception(error))
    data: bytes | None
    try:
        data = dumps(error)
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


def rebuild(value: tuple[bytes | None, str, str, str]) -> Exception:
    """What ``flatten`` sent, as the job's error (``errors.exec_error``), its worker's
    traceback as its cause."""
    data, name, message, text = value
    error: BaseException | None = None
    if data is not None:
        with contextlib.suppress(Exception):
            error = pickle.loads(data)
    if not isinstance(error, BaseException):
        error = JorbError(f"{name}: {message} (the exception itself could not leave its worker)")
    # (A SystemExit or KeyboardInterrupt in a worker is that job's error, not the run's end.)
    error = exec_error(error)
    error.__cause__ = _RemoteTraceback(text)
    return error


class _RemoteTraceback(Exception):
    """The traceback an exception had in its worker process, shown as its cause."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


def describe_death(pid: int, status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(ValueError):
            return f"its worker process ({pid}) was killed by {signal.Signals(sig).name}"
        return f"its worker process ({pid}) was killed by signal {sig}"
    if os.WIFEXITED(status):
        return f"its worker process ({pid}) exited with status {os.WEXITSTATUS(status)}"
    return f"its worker process ({pid}) died"
