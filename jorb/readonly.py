"""``overall`` as execs see it: read-only, all the way down.

An exec's change to ``overall`` would reach the run file only with the next snapshot (the
journal records jobs, not ``overall``), so a crash would lose it, and execs running at once
would see each other's half-made changes. So execs get :func:`read_only` of it, built once per
exec: the same values, as a dict (``json.dumps`` and orjson take it) whose every change raises
an :class:`~jorb.ExecResultError` naming what to do instead. Set ``run.overall[...]`` before
``exec``; keep what a job learns in its ``ctx``.
"""

from __future__ import annotations

from typing import Any, NoReturn

from .errors import ExecResultError

__all__ = ["ReadOnlyDict", "ReadOnlyList", "read_only"]

_WHY = (
    "overall is read-only inside an exec (a change there would not be saved with the run): "
    "keep what a job learns in its ctx, and set run.overall[...] before processor.exec(run)"
)


def read_only(value: Any) -> Any:
    """A deep, read-only copy of ``value`` (dicts and lists; other values as they are)."""
    if isinstance(value, dict):
        return ReadOnlyDict((key, read_only(item)) for key, item in value.items())
    if isinstance(value, list):
        return ReadOnlyList(read_only(item) for item in value)
    return value


def _refuse(*args: Any, **kwargs: Any) -> NoReturn:
    raise ExecResultError(_WHY)


class ReadOnlyDict(dict[str, Any]):
    """A dict that refuses changes (pickled, in a pool's worker too); ``copy.deepcopy`` or
    ``dict(...)`` of it is a plain dict."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _refuse
    update = pop = popitem = clear = setdefault = _refuse

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        import copy

        return {key: copy.deepcopy(item, memo) for key, item in self.items()}

    def __reduce__(self) -> tuple[Any, ...]:  # pickled (to a pool's worker): read-only there too
        return (ReadOnlyDict, (dict(self),))


class ReadOnlyList(list[Any]):
    """A list that refuses changes; ``copy.deepcopy`` or ``list(...)`` of it is a plain list."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = remove = pop = clear = sort = reverse = _refuse

    def __copy__(self) -> list[Any]:
        return list(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        import copy

        return [copy.deepcopy(item, memo) for item in self]

    def __reduce__(self) -> tuple[Any, ...]:
        return (ReadOnlyList, (list(self),))
