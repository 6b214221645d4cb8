"""Live progress (placeholder: plain lines; the rich display replaces this)."""

from __future__ import annotations

import sys
import time

from .status import Status, StatusListener


class PlainProgress:
    """Prints one status line every ``every`` seconds to stderr."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self._last = 0.0

    def start(self, status: Status) -> None:
        self._last = time.monotonic()

    def update(self, status: Status) -> None:
        if time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            print(_line(status), file=sys.stderr)

    def note(self, message: str) -> None:
        print(f"jorb: {message}", file=sys.stderr)

    def stop(self, status: Status) -> None:
        print(_line(status), file=sys.stderr)


def _line(status: Status) -> str:
    parts = [f"{s.name}={s.jobs}" for s in status.states]
    return f"jorb: {status.finished}/{status.jobs} finished  " + " ".join(parts)


def make_progress() -> StatusListener:
    return PlainProgress()
