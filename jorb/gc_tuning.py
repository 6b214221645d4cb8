"""The cyclic garbage collector, tuned for an exec's lifetime.

Every transition allocates a few containers (a ctx copy, a record entry), so with Python's
default threshold the collector ran every ~200 transitions, each time walking every young
object, and its older generations (the run's jobs) every few thousand: 20-30% of an exec's CPU,
for no garbage (a transition makes no cycles). The processor calls :func:`tune` when an exec
starts and :func:`restore` when it ends. Imports nothing of jorb's.
"""

from __future__ import annotations

import gc

__all__ = ["GC_YOUNG", "restore", "tune"]


#: The cyclic collector's young-generation threshold while an exec runs (Python's default: 700).
GC_YOUNG = 50_000


def tune() -> tuple[int, int, int] | None:
    """Make young collections rarer for the exec's lifetime; returns what to restore.

    A young generation of 50,000 objects costs a few MB at most. Left alone if the collector
    is off or already tuned higher.
    """
    old = gc.get_threshold()
    if not gc.isenabled() or old[0] == 0 or old[0] >= GC_YOUNG:
        return None
    gc.set_threshold(GC_YOUNG, *old[1:])
    return old


def restore(old: tuple[int, int, int] | None) -> None:
    """Put back the threshold :func:`tune` returned (unless it was changed meanwhile)."""
    if old is not None and gc.get_threshold()[0] == GC_YOUNG:
        gc.set_threshold(*old)
