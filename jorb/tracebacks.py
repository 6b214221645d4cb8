"""Tracebacks of an exec's errors as its author wants them: from their own code, not jorb's.

An exec is called through jorb's machinery (the worker, the executor, asyncio, a thread of
``concurrent.futures``); a traceback recorded on a job starts at the first frame of the user's
code instead. A timeout also says where the exec was when it was stopped: the frames of the
cancellation it was given (``async def``), or of the thread it abandoned (``def``).
``JORB_TRACEBACK=1`` keeps every frame.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import traceback
from collections.abc import Iterator
from types import TracebackType

from .errors import TimedOut
from .states import short_path

__all__ = ["raised_at", "user_traceback", "where_stopped"]

#: Where the code that calls an exec lives: jorb itself, asyncio, concurrent.futures (their
#: directories), and the threading module a ``def`` exec's thread starts in.
_MACHINERY = (
    *(
        os.path.dirname(path) + os.sep
        for path in (__file__, asyncio.__file__, concurrent.futures.__file__)
        if path
    ),
    threading.__file__,
)


def user_traceback(error: BaseException) -> str:
    """``error``'s traceback as text, from the first frame of the user's code: the frames of
    jorb, asyncio and concurrent.futures that called the exec are left out. A timeout says
    where the exec was waiting when it was stopped."""
    text = "".join(traceback.format_exception(type(error), error, _trimmed(error)))
    if isinstance(error, TimedOut):
        stack = _where_cancelled(error)
        if stack:
            text = (
                "The exec was here when it timed out:\n"
                + "".join(traceback.format_list(stack))
                + text
            )
    return text


def _trimmed(error: BaseException) -> TracebackType | None:
    """The traceback from its first frame outside the machinery (None if it has none there:
    jorb raised it, and its message says where); all of it with ``JORB_TRACEBACK=1``."""
    tb = error.__traceback__
    if os.environ.get("JORB_TRACEBACK"):
        return tb
    while tb is not None and _is_machinery(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return tb


def _is_machinery(filename: str) -> bool:
    return filename.startswith(_MACHINERY)


def _where_cancelled(error: BaseException) -> traceback.StackSummary | None:
    """The user's frames a timeout stopped: from the CancelledError it interrupted (an async
    def exec), or the stack of the thread it abandoned (a def exec)."""
    if isinstance(error, TimedOut) and error.stack:
        frames = [frame for frame in error.stack if not _is_machinery(frame.filename)]
        return traceback.StackSummary.from_list(frames) if frames else None
    for inner in _chain(error):
        if isinstance(inner, asyncio.CancelledError):
            frames = [
                frame
                for frame in traceback.extract_tb(inner.__traceback__)
                if not _is_machinery(frame.filename)
            ]
            return traceback.StackSummary.from_list(frames) if frames else None
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def raised_at(error: BaseException) -> str | None:
    """``crawl.py:14 in fetch``: the innermost frame of the user's code that ``error`` passed
    through (None if it never did: jorb raised it about an exec's answer)."""
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not _is_machinery(frame.filename)
    ]
    if not frames:
        return None
    frame = frames[-1]
    return f"{short_path(frame.filename)}:{frame.lineno} in {frame.name}"


def where_stopped(error: BaseException) -> str | None:
    """``crawl.py:14 in fetch``: the innermost user frame of a timed-out exec, if known."""
    stack = _where_cancelled(error)
    if not stack:
        return None
    frame = stack[-1]
    return f"{short_path(frame.filename)}:{frame.lineno} in {frame.name}"
