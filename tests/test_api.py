"""The public surface: exactly these names, all errors under JorbError, and a light import."""

from __future__ import annotations

import ast
import email.utils
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import jorb
import jorb.processor

#: Every name ``import jorb`` offers. Changing the public API means changing this set on purpose.
EXPORTS = {
    # the model
    "Run",
    "Job",
    "Kick",
    "Next",
    "Child",
    "Step",
    # declarations and the engine
    "State",
    "Rate",
    "Processor",
    "ProcessPool",
    # status snapshots for listeners
    "Status",
    "StateStatus",
    "StatusListener",
    # errors
    "JorbError",
    "StateError",
    "RunFileError",
    "CorruptRunError",
    "JournalConflictError",
    "RunLockedError",
    "CheckpointError",
    "ExecResultError",
    "TimedOut",
    "WorkerLost",
    "RateLimited",
    "NoRetry",
}

ERRORS = {
    "StateError",
    "RunFileError",
    "CorruptRunError",
    "JournalConflictError",
    "RunLockedError",
    "CheckpointError",
    "ExecResultError",
    "TimedOut",
    "WorkerLost",
    "RateLimited",
    "NoRetry",
}


def test_exports_are_exactly_the_public_api() -> None:
    assert set(jorb.__all__) == EXPORTS
    assert len(jorb.__all__) == len(EXPORTS)  # no name listed twice
    for name in jorb.__all__:
        assert getattr(jorb, name) is not None, name


def test_star_import_gives_the_public_api_and_nothing_private() -> None:
    namespace: dict[str, object] = {}
    exec("from jorb import *", namespace)
    assert set(namespace) - {"__builtins__"} == EXPORTS


def test_every_error_jorb_raises_is_a_jorb_error() -> None:
    for name in ERRORS:
        error = getattr(jorb, name)
        assert issubclass(error, jorb.JorbError), name
    assert issubclass(jorb.CorruptRunError, jorb.RunFileError)
    assert issubclass(jorb.JournalConflictError, jorb.RunFileError)
    assert issubclass(jorb.JorbError, Exception)


def test_rate_limited_carries_the_wait_the_service_asked_for() -> None:
    assert jorb.RateLimited(retry_after=2.5).retry_after == 2.5
    assert jorb.RateLimited().retry_after is None
    # A Retry-After header's text is taken as it comes: seconds, or an HTTP date (seconds from
    # now); text that is neither says nothing. Any other value is refused at once.
    assert jorb.RateLimited(retry_after="2").retry_after == 2.0
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= (jorb.RateLimited(retry_after=in_a_minute).retry_after or 0) <= 60
    assert jorb.RateLimited(retry_after="Wed, 21 Oct 2015 07:28:00 GMT").retry_after == 0.0
    assert jorb.RateLimited(retry_after="soon").retry_after is None
    with pytest.raises(TypeError, match=r"takes seconds, not \[2\]"):
        jorb.RateLimited(retry_after=[2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be >= 0 s, not -1"):
        jorb.RateLimited(retry_after=-1)


def test_importing_jorb_does_not_import_rich_or_typer() -> None:
    heavy = ("rich", "typer", "dask", "distributed", "plotly", "prometheus_client")
    check = (
        "import jorb, jorb.testing, jorb.report, jorb.svg, sys; "
        f"heavy = sorted(m for m in {heavy!r} if m in sys.modules); "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _run_time_imports(module: str) -> set[str]:
    """The jorb modules ``jorb/<module>.py`` imports when it runs (not for type checking)."""
    tree = ast.parse((Path(jorb.__file__).parent / f"{module}.py").read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [a.name for a in node.names])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_the_engine_modules_import_only_what_the_processor_docstring_allows() -> None:
    doc = jorb.processor.__doc__
    assert doc is not None
    rules: dict[str, str] = {}
    for bullet in re.split(r"^- ", doc.split("\n\n", 2)[2], flags=re.MULTILINE):
        head, colon, allowed = " ".join(bullet.split()).rpartition("): ")
        for module in re.findall(r"(?:^|\), )``(\w+)``", head) if colon else ():
            rules[module] = allowed.rstrip(".")
    assert {"processor", "lanes", "waiting", "commit", "steering", "stops", "model"} <= set(rules)
    for module, allowed in rules.items():
        if module != "processor":
            names = set() if allowed == "none" else set(allowed.split(", "))
            assert _run_time_imports(module) <= names, (module, allowed)
    modules = [path.stem for path in Path(jorb.__file__).parent.glob("*.py")]
    assert [m for m in modules if "processor" in _run_time_imports(m)] == ["__init__"]
