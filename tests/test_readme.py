"""Every code block and command in README.md, run as written.

The README is read block by block:

- ``sh`` blocks: each line is a command, run with bash in a copy of the repository's layout
  (``dev.sh``, ``pyproject.toml``, ``examples/``, and this checkout's ``.venv``), in order.
- ``python`` blocks that start with ``# name.py`` are whole programs: saved under that name and
  run (twice: the second run resumes). A ``print(...)  # expected`` line must print that.
- ``text`` blocks holding ``$ command`` lines: the command is run (with ``.venv/bin`` first on
  PATH, so ``jorb`` and ``python`` are this checkout's), and each line shown below it must be in
  its output, compared with numbers, spacing and directories set aside (``...`` skips lines).
- every other ``python`` block is run as written too; one that cannot be (a fragment using
  names it does not define) must be marked in ``FRAGMENTS`` (by a line it holds) with what it
  lacks, and must still compile. A ``json`` block must parse once its ``...`` are set aside.

Nothing may be skipped silently: ``SKIPPED`` names the commands not run, and why; ``NEEDS``
those run only where an optional extra is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

#: Real seconds a command may take (a guard against a hang, not a wait).
LIMIT = 300

#: Commands the README shows that this test does not run, with the reason.
SKIPPED = {
    "./dev.sh test": "it runs this very test suite",
    "dask scheduler --port 8786": "a Dask cluster's scheduler: it runs until stopped",
    "dask worker tcp://scheduler-host:8786 --nthreads 1": "a worker of that cluster",
    ".venv/bin/python examples/cpu_pool.py --fresh --dask tcp://scheduler-host:8786": (
        "needs that cluster"
    ),
}

#: Commands run only where a module they need is installed (an optional extra).
NEEDS = {
    ".venv/bin/python examples/cpu_pool.py --fresh --dask local": "distributed",
}

#: Python blocks that are fragments of a script (by a line they hold), and what they lack.
FRAGMENTS = {
    "app.git.clone": "the canonical shape: app, repos and upload stand for the user's own",
    "aiohttp.ClientSession()": "needs aiohttp, states and run",
    "class Printer:": "needs app, states and run",
    "from jorb.prometheus import Exporter": "needs app, states and run",
    "import jorb.dask": "needs `pip install 'jorb[dask]'` and make_app",
}


@dataclass(frozen=True)
class Block:
    lang: str
    line: int
    text: str

    @property
    def first(self) -> str:
        return self.text.splitlines()[0] if self.text else ""

    @property
    def fragment(self) -> str | None:
        """The FRAGMENTS marker this block holds, if any."""
        return next((marker for marker in FRAGMENTS if marker in self.text), None)


def blocks() -> list[Block]:
    found, lines = [], README.read_text().splitlines()
    n = 0
    while n < len(lines):
        opening = re.fullmatch(r"```(\w*)", lines[n])
        if opening is None:
            n += 1
            continue
        end = lines.index("```", n + 1)
        found.append(Block(opening.group(1), n + 1, "\n".join(lines[n + 1 : end]) + "\n"))
        n = end + 1
    return found


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's layout, with this checkout's .venv (a copy: runs/ lands here)."""
    root = tmp_path_factory.mktemp("readme")
    for name in ("dev.sh", "pyproject.toml"):
        shutil.copy2(ROOT / name, root / name)
    # Older than .venv's install: dev.sh must never reinstall into the shared .venv from here.
    os.utime(root / "pyproject.toml", (0, 0))
    shutil.copytree(ROOT / "examples", root / "examples")
    (root / ".venv").symlink_to(ROOT / ".venv")
    return root


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    venv = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("COLUMNS", None)
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=LIMIT, env=env
    )


def _normal(line: str) -> str:
    line = re.sub(r'"(?:/[^"/]+)+/([^"/]+)"', r'"\1"', line)  # "/home/you/x.py" -> "x.py"
    line = re.sub(r"\d[\d,.]*", "#", line)
    return " ".join(line.split())


def _shown_in(expected: str, output: str) -> None:
    """Each line of ``expected`` (but ``...``) is in ``output``, in order."""
    actual = [_normal(line) for line in output.splitlines()]
    at = 0
    for line in expected.splitlines():
        if line.strip() in ("...", "…") or not line.strip():
            continue
        cut = line.rstrip().endswith("…")  # a line cut to the terminal's width
        want = _normal(line.rstrip().removesuffix("…"))
        hits = [n for n in range(at, len(actual)) if actual[n] == want]
        if cut:
            hits = [n for n in range(at, len(actual)) if actual[n].startswith(want)]
        assert hits, f"not in the output (after line {at}): {line!r}\n{output}"
        at = hits[0] + 1


def _commands(block: Block) -> list[str]:
    """A sh block's commands, without comments."""
    commands = []
    for line in block.text.splitlines():
        command = re.sub(r"\s+#.*$", "", line).strip()
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def _sessions(block: Block) -> list[tuple[str, str]]:
    """A text block's ``$ command`` lines, each with the output shown under it."""
    sessions: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            sessions.append((re.sub(r"\s+#.*$", "", line[2:]).strip(), []))
        elif sessions:
            sessions[-1][1].append(line)
    return [(command, "\n".join(shown)) for command, shown in sessions]


def test_every_block_is_understood() -> None:
    """A block of a kind this test does not run, or a stale entry in its lists, fails here."""
    found = blocks()
    assert {block.lang for block in found} <= {"sh", "python", "text", "json"}
    python = [block.text for block in found if block.lang == "python"]
    for marker in FRAGMENTS:  # each marks exactly one block
        assert sum(marker in text for text in python) == 1, marker
    commands = {c for block in found if block.lang == "sh" for c in _commands(block)}
    assert set(SKIPPED) | set(NEEDS) <= commands


def test_the_readme_runs_as_written(sandbox: Path) -> None:
    """In order, as a reader would: the sh commands, the programs, the sessions."""
    for block in blocks():
        where = f"README.md line {block.line}"
        if block.lang == "sh":
            for command in _commands(block):
                if command in SKIPPED:
                    continue
                if command in NEEDS and importlib.util.find_spec(NEEDS[command]) is None:
                    continue  # (an optional extra this environment lacks)
                result = shell(command, sandbox)
                assert result.returncode == 0, f"{where}: {command}\n{result.stderr}"
        elif block.lang == "python" and re.fullmatch(r"# [\w-]+\.py", block.first):
            name = block.first[2:]
            (sandbox / name).write_text(block.text)
            if name in _session_scripts():
                continue  # a session below runs it, and shows what it prints
            for _ in range(2):  # the second run resumes the same run
                result = shell(f"python {name}", sandbox)
                assert result.returncode == 0, f"{where}: {name}\n{result.stderr}"
                _check_printed(block, result.stdout, where)
        elif block.lang == "python":
            (sandbox / "fragment.py").write_text(block.text)
            result = shell("python fragment.py", sandbox)
            if block.fragment is not None:
                compile(block.text, where, "exec")  # a fragment: it must at least parse
                assert result.returncode != 0, f"{where} runs as written: not a fragment"
            else:
                assert result.returncode == 0, f"{where} does not run as written\n{result.stderr}"
        elif block.lang == "text":
            for command, shown in _sessions(block):
                result = shell(command, sandbox)
                _shown_in(shown, result.stdout + result.stderr)
        elif block.lang == "json":
            json.loads(re.sub(r",?\s*\.\.\.", "", block.text))


def _session_scripts() -> set[str]:
    return {
        command.split()[1]
        for block in blocks()
        if block.lang == "text"
        for command, _ in _sessions(block)
        if command.startswith("python ")
    }


def _check_printed(block: Block, stdout: str, where: str) -> None:
    for line in block.text.splitlines():
        said = re.fullmatch(r"print\(.*\)\s+# (.+)", line)
        if said:
            assert said.group(1) in stdout.splitlines(), f"{where}: {line}\n{stdout}"


def test_a_wrong_readme_would_fail_this_test(sandbox: Path) -> None:
    """The comparison is not a formality: a changed message is caught."""
    with pytest.raises(AssertionError):
        _shown_in("jorb: stopped at a bug in the script: job 1", "jorb: stopped at a bug: job 1")
    _shown_in(
        textwrap.dedent("""\
            ...
              File "/home/you/flaky.py", line 10, in fetch
        """),
        '  File "/tmp/x/flaky.py", line 12, in fetch\n',
    )
