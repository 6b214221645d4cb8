"""How an exec ends when it does not simply complete, and what the user is told.

A part of the processor, like ``commit`` and ``steering``: the coordinator builds one per
exec. It keeps the first bug in the script an exec stopped at (an ``ExecResultError``, with
``stop_on_bug``), a ``SystemExit``/``KeyboardInterrupt`` an exec raised, a Ctrl-C or SIGTERM
(:func:`take_signals` routes them to :meth:`Stops.interrupt` while the exec runs), and the errors
of the exec for the end-of-exec summary; when the exec is over, :meth:`Stops.raise_stop` prints
the one message that says what happened and how to resume, and raises what ``exec``/``aexec``
must raise. Imports errors, tracebacks, states.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import ExecResultError
from .states import State, exec_name
from .tracebacks import raised_at

if TYPE_CHECKING:
    from .model import Job, Run
    from .processor import Processor

__all__ = ["Stops", "command_line", "say", "take_signals"]

_DIGITS = re.compile(r"\d+")


class Stops:
    """``stops.bug(job, state, error)``, ``stops.exit(job, state, raised)``, ``stops.interrupt()``,
    ``stops.error(...)`` while the exec runs; ``stops.raise_stop(run)`` once it is over."""

    __slots__ = ("bug_error", "exit_raised", "interrupted", "kinds", "lines", "proc")

    def __init__(self, proc: Processor) -> None:
        self.proc = proc
        #: The bug the exec stopped at, as ``exec``/``aexec`` raise it (job id in the message).
        self.bug_error: ExecResultError | None = None
        #: ``(job, state, SystemExit or KeyboardInterrupt)`` an exec raised.
        self.exit_raised: tuple[Job, State, BaseException] | None = None
        #: Whether a Ctrl-C or SIGTERM stopped the exec.
        self.interrupted = False
        self.kinds: collections.Counter[tuple[str, str]] = collections.Counter()
        self.lines: dict[tuple[str, str], str] = {}  # a kind's first message

    def __repr__(self) -> str:
        return f"<Stops bug={self.bug_error!r} exit={self.exit_raised!r} kinds={len(self.kinds)}>"

    def bug(self, job: Job, state: State, error: ExecResultError) -> None:
        """An exec's answer cannot be right: stop the exec (its job stays where it is)."""
        if self.bug_error is None:
            where = raised_at(error)  # (an answer jorb refused names its exec itself)
            said = f"{error} (raised at {where})" if where else str(error)
            self.bug_error = ExecResultError(f"job {job.id} in {state.name!r}: {said}")
            if self.proc._listeners:  # (a live display shows it at once; the end says it too)
                self.proc._note(f"stopping at a bug: job {job.id}: {error}")
        self._stop()

    def exit(self, job: Job, state: State, raised: BaseException) -> None:
        """An exec raised SystemExit or KeyboardInterrupt: stop; exec raises it at the end."""
        if self.exit_raised is None:
            self.exit_raised = (job, state, raised)
            if self.proc._listeners:
                self.proc._note(f"job {job.id}'s exec raised {type(raised).__name__}: stopping")
        self._stop()

    def _stop(self) -> None:
        proc = self.proc
        proc._stopping = True  # no exec starts from now on
        if proc._finished is not None and not proc._finished.done():
            proc._finished.set_result(None)  # running execs finish, as after a first Ctrl-C

    def interrupt(self) -> None:
        """Ctrl-C or SIGTERM: stop gracefully the first time, at once the second."""
        proc = self.proc
        if self.interrupted:
            # Second signal: stop at once. The run file and journal are always loadable.
            show_cursor = b"\x1b[?25h" if os.isatty(1) else b""  # a live display hid it
            os.write(
                2,
                show_cursor
                + f"\njorb: stopped at once; running execs run again when you "
                f"resume: {command_line()}\n".encode(),
            )
            os._exit(130)
        self.interrupted = True
        running = sum(lane.running for lane in proc._lanes.by_name.values())
        message = (
            f"stopping: waiting up to {proc.grace:g}s for {running} running exec(s); "
            f"Ctrl-C again to stop at once"
            if running
            else "stopping: no exec is running; saving the run"
        )
        if proc._listeners:
            proc._note(message)  # a live display prints it above its bars
        else:
            os.write(2, f"\njorb: {message}\n".encode())
        if proc._finished is not None and not proc._finished.done():
            proc._finished.set_result(None)

    def error(self, state: str, record: dict[str, Any]) -> None:
        """Count an error record for the summary (messages differing in numbers as one)."""
        line = f"{record['type'].rpartition('.')[2]}: {str(record['message']).splitlines()[0]}"
        key = (state, _DIGITS.sub("#", line))
        self.kinds[key] += 1
        self.lines.setdefault(key, line)

    def common(self, top: int = 3) -> list[tuple[int, str, str]]:
        """The most common errors of this exec: (count, state, first message of the kind)."""
        return [(count, key[0], self.lines[key]) for key, count in self.kinds.most_common(top)]

    def raise_stop(self, run: Run) -> None:
        """After a stop that was not the run's completion: say what and how to resume, and
        raise what exec/aexec raise (nothing if the run completed)."""
        if self.exit_raised is not None:
            job, state, raised = self.exit_raised
            args = ", ".join(repr(arg) for arg in raised.args)
            say(
                f"jorb: job {job.id}'s exec {exec_name(state.exec)} in state {state.name!r} "
                f"raised {type(raised).__name__}({args}); the run stopped and is saved in "
                f"{run.path}, with job {job.id} still in {state.name!r} (it runs again when "
                f"you resume: {command_line()})"
            )
            raise raised
        if self.bug_error is not None:
            say(
                f"jorb: stopped at a bug in the script: {self.bug_error}\n"
                f"jorb: the run is saved in {run.path}, the job still in its state; fix the "
                f"script and run it again to resume ({command_line()}), or pass "
                f"stop_on_bug=False to jorb.Processor to record such errors and go on"
            )
            raise self.bug_error
        if self.interrupted:
            say_interrupted(run)
            raise SystemExit(130)


def take_signals(
    loop: asyncio.AbstractEventLoop, handler: Callable[[], None]
) -> Callable[[], None]:
    """Call ``handler`` on SIGINT and SIGTERM while the exec runs, unless someone else handles
    them: take the default handlers, or asyncio.run's own (which would cancel the main task,
    with a traceback and no grace period). Returns what puts the previous handlers back."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # (signals only reach the main thread)
    for signum in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(signum)
        bound = getattr(current, "func", current)  # (asyncio.run's is a partial)
        ours_to_take = current in (signal.SIG_DFL, signal.default_int_handler) or isinstance(
            getattr(bound, "__self__", None), asyncio.Runner
        )
        if not ours_to_take:
            continue
        try:
            loop.add_signal_handler(signum, handler)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # a loop without signal support: Ctrl-C raises KeyboardInterrupt
        previous[signum] = current

    def restore() -> None:
        for signum, current in previous.items():
            loop.remove_signal_handler(signum)
            signal.signal(signum, current)

    return restore


def say_interrupted(run: Run) -> None:
    say(
        f"jorb: interrupted; progress is saved in {run.path}. "
        f"Run the script again to resume: {command_line()}"
    )


def say(message: str) -> None:
    """One message to the user on stderr (the display is stopped by then)."""
    print(message, file=sys.stderr, flush=True)


def command_line() -> str:
    """The command that ran this script: the interpreter as invoked, then ``sys.argv``.

    ``sys.argv`` as the script left it, so a script that consumed a one-off flag (``--fresh``)
    by removing it is not told to start over.
    """
    if not sys.orig_argv or not sys.argv or not sys.argv[0]:
        return "your script"
    script = sys.argv[0]
    if script != "-c" and script in sys.orig_argv[1:]:
        interpreter = sys.orig_argv[: sys.orig_argv.index(script, 1)]
        return shlex.join([*interpreter, *sys.argv])
    return shlex.join(sys.orig_argv)  # python -c / -m: as invoked
