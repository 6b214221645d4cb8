"""Running the scripts of this directory from tests: a subprocess whose stdout is read as it goes.

script = Script(tmp_path, "steer.py", run, effects, gates, "--jobs", 3)
script.until(lambda lines: "start 0" in lines)   # blocks on the pipe, never sleeps
script.finish()                                  # exit status 0, or the stderr in the failure

A script that prints nothing for ``STUCK`` seconds is sent SIGUSR1 before the test fails: the
scripts (through effects.py) print every thread's stack to stderr then, and the failure shows it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

#: Longest a test waits for a line it expects (real seconds): a guard against a hang, not a wait.
STUCK = 15.0
#: Longest a hung script gets to print its threads' stacks and exit after SIGUSR1.
DUMP = 5.0


class Script:
    """One run of a script in this directory (or any path), stdout read line by line."""

    def __init__(self, tmp: Path, script: str | Path, *args: Any) -> None:
        self.stderr_path = tmp / f"stderr-{os.getpid()}-{id(self)}.txt"
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / script), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=ROOT,
        )
        #: Every stdout line seen so far (without the newline).
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._eof = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def until(self, done: Callable[[list[str]], bool], timeout: float = STUCK) -> list[str]:
        """Read stdout until ``done(lines)`` holds; fail (with the output) if it never does."""
        while not done(self.lines):
            if self._eof:
                self._fail("the script exited first")
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                self._fail(f"nothing for {timeout}s", hung=True)
            if line is None:
                self._eof = True
                self.proc.wait()
            else:
                self.lines.append(line)
        return self.lines

    def saw(self, line: str) -> list[str]:
        """Read until ``line`` has been printed."""
        return self.until(lambda lines: line in lines)

    def kill(self) -> None:
        """SIGKILL, then reap."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._stderr.close()

    def finish(self, timeout: float = STUCK) -> list[str]:
        """Wait for a clean exit and return every stdout line."""
        self.until(lambda _lines: self._eof, timeout)
        self._stderr.close()
        if self.proc.returncode != 0:
            self._fail(f"exit status {self.proc.returncode}")
        return self.lines

    def stop(self) -> None:
        """Kill the script if it still runs (test cleanup)."""
        if self.proc.poll() is None:
            self.kill()
        if not self._stderr.closed:
            self._stderr.close()

    def _fail(self, why: str, *, hung: bool = False) -> NoReturn:
        if hung and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # (effects.py: the stacks, then the end)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(DUMP)
            self.proc.kill()
            self.proc.wait()
        if not self._stderr.closed:
            self._stderr.flush()
        stderr = self.stderr_path.read_text()
        raise AssertionError(
            f"{why}; stdout so far:\n" + "\n".join(self.lines[-40:]) + f"\nstderr:\n{stderr}"
        )
