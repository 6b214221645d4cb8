"""Running this directory's scripts (or a script by its path) from the tests: real subprocesses,
read by pipe.

    proc = Proc(tmp_path, "fanout.py", run, effects)
    proc.wait_lines(10)          # blocks on the stdout pipe until 10 progress lines (or exit)
    proc.wait_for("stopping", stderr=True)
    proc.kill()                  # a real SIGKILL, then reap
    proc.finish()                # exit status 0, or fail showing stderr

Nothing here sleeps to wait for something: lines arrive through pipes, exits through wait().
A script that hangs (no line, or no exit, for ``STUCK`` seconds) is sent SIGUSR1 before the
test fails: this directory's scripts register ``faulthandler`` for it, so every thread's stack
goes to stderr and the script ends (any other simply ends); the failure shows that stderr.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, NoReturn

HERE = Path(__file__).resolve().parent

#: Longest a test waits for a line or an exit (real seconds): a guard against a hang, not a wait.
STUCK = 20.0
#: Longest a hung script gets to print its threads' stacks and exit after SIGUSR1.
DUMP = 5.0

#: What each script runs first: SIGUSR1 prints every thread's stack to stderr, then ends it
#: (``chain``: SIGUSR1's default action follows the dump).
#:     faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)


class Proc:
    """One run of a script from this directory; stdout and stderr collected line by line."""

    def __init__(self, tmp: Path, script: str, *args: Any) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, str(HERE / script), *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp,
        )
        #: Every stdout line seen so far (decoded, without the newline).
        self.lines: list[str] = []
        #: Every stderr line seen so far.
        self.err_lines: list[str] = []
        self._queue: queue.Queue[tuple[list[str], str | None]] = queue.Queue()
        self._open = 2
        for stream, into in ((self.popen.stdout, self.lines), (self.popen.stderr, self.err_lines)):
            threading.Thread(target=self._read, args=(stream, into), daemon=True).start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def eof(self) -> bool:
        """Both pipes are closed: the script has exited."""
        return self._open == 0

    def _read(self, stream: IO[bytes], into: list[str]) -> None:
        for line in stream:
            self._queue.put((into, line.decode(errors="replace").rstrip("\n")))
        self._queue.put((into, None))

    def _next(self, timeout: float) -> None:
        if not self._take(timeout):
            self._stuck(f"no output for {timeout}s")

    def _stuck(self, what: str) -> NoReturn:
        """The script hangs: have it print its threads' stacks (SIGUSR1, see above), read its
        output to the end (for ``DUMP`` seconds at most), kill it, and fail showing stderr."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + DUMP
        while not self.eof and (left := deadline - time.monotonic()) > 0 and self._take(left):
            pass
        self.popen.kill()
        raise AssertionError(
            f"{what}; its last stdout lines: {self.lines[-5:]}; its stderr (and its threads' "
            f"stacks if it printed them):\n{self.stderr()}"
        )

    def _take(self, timeout: float) -> bool:
        """Collect the next line (or end of a pipe); False if none came within ``timeout``."""
        try:
            into, line = self._queue.get(timeout=timeout)
        except queue.Empty:
            return False
        if line is None:
            self._open -= 1
        else:
            into.append(line)
        return True

    def wait_lines(self, count: int, timeout: float = STUCK) -> bool:
        """Block until ``count`` stdout lines were seen; False if the script exited first."""
        while len(self.lines) < count and not self.eof:
            self._next(timeout)
        return len(self.lines) >= count

    def wait_before_output(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the script prints a stdout line (or exits) first."""
        deadline = time.monotonic() + seconds
        seen = len(self.lines)
        while len(self.lines) == seen and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0 or not self._take(left):
                return

    def wait_for(self, text: str, *, stderr: bool = False, timeout: float = STUCK) -> None:
        """Block until a stdout (or stderr) line contains ``text``."""
        lines = self.err_lines if stderr else self.lines
        while not any(text in line for line in lines):
            if self.eof:
                raise AssertionError(f"exited before printing {text!r}\n{self.stderr()}")
            self._next(timeout)

    def release(self) -> None:
        """Write a line to the script's stdin (``fanout.py --hold``: the held execs go on)."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(b"go\n")
        self.popen.stdin.flush()

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def kill(self) -> int:
        """SIGKILL and reap; returns the exit status (-9, or 0 if it had just finished)."""
        self.popen.kill()
        return self.wait()

    def wait(self, timeout: float = STUCK) -> int:
        """Reap the process (reading its pipes to the end) and return its exit status."""
        try:
            code: int | None = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            self._stuck(f"still running after {timeout}s")
        while not self.eof:
            self._next(timeout)
        assert self.popen.stdin is not None
        self.popen.stdin.close()
        return code

    def finish(self, timeout: float = STUCK) -> None:
        """Wait for the script to exit 0 by itself."""
        code = self.wait(timeout)
        assert code == 0, f"exit status {code}\n{self.stderr()}"

    def stderr(self) -> str:
        """Stderr seen so far."""
        return "\n".join(self.err_lines)

    def stop(self) -> None:
        """Make sure the script is gone (for teardown)."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
