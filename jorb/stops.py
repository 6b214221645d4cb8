"""How an exec ends when it does not simply complete, and what the user is told.

A part of the processor, like ``commit`` and ``steering``: the coordinator builds one per
exec. It keeps the first bug in the script an exec stopped at (an ``ExecResultError``, with
``stop_on_bug``), a ``SystemExit``/``KeyboardInterrupt`` an exec raised, and the errors of the
exec for the end-of-exec summary; when the exec is over, :meth:`Stops.raise_stop` prints the
one message that says what happened and how to resume, and raises what ``exec``/``aexec``
must raise. Imports errors, tracebacks, states.
"""

from __future__ import annotations

import collections
import re
import shlex
import sys
from typing import TYPE_CHECKING, Any

from .errors import ExecResultError
from .states import State, exec_name
from .tracebacks import raised_at

if TYPE_CHECKING:
    from .model import Job, Run
    from .processor import Processor

__all__ = ["Stops", "command_line", "say"]

_DIGITS = re.compile(r"\d+")


class Stops:
    """``stops.bug(job, state, error)``, ``stops.exit(job, state, raised)``, ``stops.error(...)``
    while the exec runs; ``stops.raise_stop(run)`` once it is over."""

    __slots__ = ("bug_error", "exit_raised", "kinds", "lines", "proc")

    def __init__(self, proc: Processor) -> None:
        self.proc = proc
        #: The bug the exec stopped at, as ``exec``/``aexec`` raise it (job id in the message).
        self.bug_error: ExecResultError | None = None
        #: ``(job, state, SystemExit or KeyboardInterrupt)`` an exec raised.
        self.exit_raised: tuple[Job, State, BaseException] | None = None
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

    def error(self, state: str, record: dict[str, Any]) -> None:
        """Count an error record for the summary (messages differing in numbers as one)."""
        line = f"{record['type'].rpartition('.')[2]}: {str(record['message']).splitlines()[0]}"
        key = (state, _DIGITS.sub("#", line))
        self.kinds[key] += 1
        self.lines.setdefault(key, line)

    def common(self, top: int = 3) -> list[tuple[int, str, str]]:
        """The most common errors of this exec: (count, state, first message of the kind)."""
        return [(count, key[0], self.lines[key]) for key, count in self.kinds.most_common(top)]

    def raise_stop(self, run: Run, interrupted: bool) -> None:
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
        if interrupted:
            say_interrupted(run)
            raise SystemExit(130)


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
