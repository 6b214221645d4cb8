"""What the test scripts share: an effects log, file gates and a listener that prints notes.

An *effect* is one line appended (``O_APPEND``: one write, so lines from several processes never
interleave) to the effects file, which survives a ``kill -9``, and printed to stdout, which the
test reads through a pipe to know when to act. A *gate* is a file the test creates to let an exec
go on; the exec polls for it (the script waits, never the test).

Importing it registers SIGUSR1 to print every thread's stack to stderr and end the script: what
the harness sends a script that hangs, before it fails the test.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
from pathlib import Path
from typing import Any

faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)


class Effects:
    """``effects.log("start 3")``: one line in the effects file and on stdout."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(self, line: str) -> None:
        os.write(self._fd, (line + "\n").encode())
        print(line, flush=True)


async def gate(directory: Path, name: str) -> None:
    """Wait until ``directory/name`` or ``directory/all`` exists."""
    while not ((directory / name).exists() or (directory / "all").exists()):
        await asyncio.sleep(0.005)


class Notes:
    """A status listener that logs the processor's notes (paused states, applied changes)."""

    def __init__(self, effects: Effects) -> None:
        self.effects = effects

    def start(self, status: Any) -> None:
        pass

    def update(self, status: Any) -> None:
        pass

    def note(self, message: str) -> None:
        self.effects.log(f"note {message}")

    def stop(self, status: Any) -> None:
        pass
