"""jorb: a concentrated (single-machine) workflow engine for big batch jobs.

Declare States, open a Run, add Jobs, and ``jorb.Processor(app, states).exec(run)``: every job is
driven through the states with per-state concurrency and rate limits, and every transition is
checkpointed so the script can be killed and rerun at any moment.
"""

from __future__ import annotations

from .errors import (
    CheckpointError,
    CorruptRunError,
    ExecResultError,
    JorbError,
    JournalConflictError,
    NoRetry,
    RateLimited,
    RunFileError,
    RunLockedError,
    StateError,
    TimedOut,
    WorkerLost,
)
from .model import Child, Job, Kick, Next, Run, Step
from .pool import ProcessPool
from .processor import Processor
from .states import Rate, State
from .status import StateStatus, Status, StatusListener

__all__ = [
    "CheckpointError",
    "Child",
    "CorruptRunError",
    "ExecResultError",
    "Job",
    "JorbError",
    "JournalConflictError",
    "Kick",
    "Next",
    "NoRetry",
    "ProcessPool",
    "Processor",
    "Rate",
    "RateLimited",
    "Run",
    "RunFileError",
    "RunLockedError",
    "State",
    "StateError",
    "StateStatus",
    "Status",
    "StatusListener",
    "Step",
    "TimedOut",
    "WorkerLost",
]
__version__ = "0.1.0"

#: Submodules imported on first use, so ``jorb.testing.run(...)`` works after a plain
#: ``import jorb`` while ``import jorb`` itself stays light (``progress`` imports rich).
_SUBMODULES = ("control", "mend", "progress", "report", "testing")


def __getattr__(name: str) -> object:
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
