"""The progress display seen for real: a script in a pseudo-terminal, and with stdout piped.

The script's second state waits, in each exec, for a byte on a FIFO the test holds open, so the
test decides when jobs finish: it reads the screen (a small terminal emulator below) until the
rows show the expected numbers, lets a few jobs through, and watches the counts move.
"""

from __future__ import annotations

import codecs
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

#: Real seconds before a wait is declared stuck (a guard, never a way to wait for something).
STUCK = 30.0

SCRIPT = """
import asyncio, logging, sys
import jorb

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
log = logging.getLogger("script")

async def fetch(app, overall, ctx):
    await asyncio.sleep(0)
    return ctx, "work"

def work(app, overall, ctx):
    with open(overall["gate"], "rb", buffering=0) as gate:
        gate.read(1)                     # one byte from the test lets one job through
    if ctx["n"] % 5 == 0:
        raise ValueError(f"job {ctx['n']} is bad")
    sys.stdout.write(f"printed {ctx['n']}\\n")  # one write: print() from two threads interleaves
    log.info("logged %s", ctx["n"])
    return ctx, "done"

states = [
    jorb.State("fetch", exec=fetch, concurrency=3),
    jorb.State("work", exec=work, concurrency=2),
    jorb.State("done", terminal=True),
    jorb.State("failed", terminal=True),
]
run = jorb.Run.open(sys.argv[1], overall={"gate": sys.argv[2]})
for n in range(1, 13):
    run.add_job({"n": n}, state="fetch")
jorb.Processor(None, states).exec(run)
"""

BAR = set("━╸╺")


class Screen:
    """Just enough of a terminal to replay rich's output: text, CR/LF, cursor up, erase line."""

    CONTROL = re.compile(r"\x1b\[([?0-9;]*)([A-Za-z])|\x1b[^\[]|[\r\n\b]|[^\x1b\r\n\b]+")

    def __init__(self) -> None:
        self.lines: list[list[str]] = [[]]
        self.row = self.col = 0
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode

    def feed(self, data: bytes) -> None:
        for match in self.CONTROL.finditer(self._decode(data)):
            token, params, command = match.group(), match.group(1), match.group(2)
            if command is not None:
                self._control(command, params)
            elif token == "\r":
                self.col = 0
            elif token == "\n":
                self.row += 1
            elif token == "\b":
                self.col = max(0, self.col - 1)
            elif not token.startswith("\x1b"):
                self._write(token)

    def _control(self, command: str, params: str) -> None:
        count = int(params) if params.isdigit() else 1
        if command == "A":
            self.row = max(0, self.row - count)
        elif command == "B":
            self.row += count
        elif command == "K":
            line = self._line()
            if params in ("", "0"):
                del line[self.col :]
            elif params == "2":
                line.clear()
        # colours (m), cursor show/hide (?25h/l) and the rest change nothing we read

    def _line(self) -> list[str]:
        while len(self.lines) <= self.row:
            self.lines.append([])
        return self.lines[self.row]

    def _write(self, text: str) -> None:
        line = self._line()
        if len(line) < self.col:
            line.extend(" " * (self.col - len(line)))
        line[self.col : self.col + len(text)] = list(text)
        self.col += len(text)

    def text(self) -> str:
        return "\n".join("".join(line).rstrip() for line in self.lines)


def table(screen: str) -> dict[str, list[str]]:
    """The last progress table on the screen: state -> the words of its row (bars left out)."""
    lines = screen.splitlines()
    starts = [i for i, line in enumerate(lines) if line.split()[:2] == ["state", "progress"]]
    found: dict[str, list[str]] = {}
    if not starts:
        return found
    for line in lines[starts[-1] + 1 :]:
        words = [w for w in line.split() if not set(w) <= BAR]
        if words:
            found[words[0]] = words[1:]
        if words[:1] == ["total"]:
            break
    return found


class Terminal:
    """A child process on a pseudo-terminal of a fixed size, and the screen it draws."""

    def __init__(self, argv: list[str], cwd: Path, columns: int = 120) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
        env.update(TERM="xterm-256color", COLUMNS=str(columns), LINES="50")
        env.pop("TTY_COMPATIBLE", None)
        self.process = subprocess.Popen(
            argv, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.master = master
        self.screen = Screen()

    def wait_for(self, what: str, check: Callable[[str], bool]) -> str:
        """Read the child's output until ``check(screen text)`` holds."""
        deadline = time.monotonic() + STUCK
        while not check(self.screen.text()):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"never saw {what}; the screen:\n{self.screen.text()}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready and not self._read():
                raise AssertionError(f"exited before {what}; the screen:\n{self.screen.text()}")
        return self.screen.text()

    def finish(self) -> str:
        """Read to the end of the child's output and return the final screen."""
        while self._read():
            pass
        assert self.process.wait(STUCK) == 0, self.screen.text()
        return self.screen.text()

    def _read(self) -> bool:
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.screen.feed(data)
        return bool(data)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


def test_bars_in_a_terminal_show_a_row_per_state_with_moving_counts(
    tmp_path: Path, gate: tuple[Path, int]
) -> None:
    fifo, fd = gate
    (tmp_path / "script.py").write_text(SCRIPT)
    argv = [sys.executable, "script.py", "run.json", str(fifo)]
    terminal = Terminal(argv, tmp_path)
    try:
        # Every job has gone through fetch; work runs two and holds ten back.
        rows = table(terminal.wait_for("all jobs waiting in work", _all_in_work))
        assert list(rows) == ["fetch", "work", "done", "failed", "cancelled", "total"]
        assert rows["fetch"][:5] == ["0", "0", "0", "0/3", "12"]
        assert rows["work"][:6] == ["12", "10", "0", "2/2", "0", "0"]
        assert rows["done"] == rows["failed"] == ["0", "terminal"]
        assert rows["total"][:5] == ["12", "10", "0", "2", "12"]

        os.write(fd, b"x" * 4)  # four jobs finish: each done or failed
        rows = table(terminal.wait_for("four jobs finished", lambda s: _finished(s) == 4))
        assert rows["work"][0] == "8"
        assert int(rows["work"][4]) + int(rows["work"][5]) == 4  # done + errors
        assert int(rows["done"][0]) == int(rows["work"][4])

        os.write(fd, b"x" * 8)
        screen = terminal.finish()
    finally:
        terminal.close()
    rows = table(screen)
    assert rows["work"][:6] == ["0", "0", "0", "0/2", "10", "2"]
    assert rows["done"] == ["10", "terminal"]
    assert rows["failed"] == ["2", "terminal"]
    # What the execs printed and logged sits above the table in whole lines, and the display
    # was redrawn in place: one table on the screen, not one per refresh.
    lines = screen.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("state ")]
    assert len(header) == 1, screen
    above = lines[: header[0]]
    wanted = {n for n in range(1, 13) if n % 5}
    assert {int(m[1]) for line in above if (m := re.fullmatch(r"printed (\d+)", line))} == wanted
    logged = {int(m[1]) for line in above if (m := re.fullmatch(r"INFO logged (\d+)", line))}
    assert logged == wanted
    # jorb's own records (the script's basicConfig shows them): each job given up on, above.
    gave_up = re.compile(
        r"WARNING job \d+ gave up in work after attempt 1 \(ValueError: job (\d+) is bad\); "
        r"moved to failed"
    )
    given_up = {int(m[1]) for m in map(gave_up.fullmatch, above) if m}
    assert given_up == {5, 10}
    assert lines[header[0] - 1].startswith("jorb 12/12 jobs finished (100%)")


def test_piped_stdout_gets_plain_status_lines(tmp_path: Path, gate: tuple[Path, int]) -> None:
    fifo, fd = gate
    (tmp_path / "script.py").write_text(SCRIPT)
    process = subprocess.Popen(
        [sys.executable, "script.py", "run.json", str(fifo)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        first = process.stderr.readline()  # written when the exec starts, before any job ran
        os.write(fd, b"x" * 12)
        out, err = process.communicate(timeout=STUCK)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert first == (
        "jorb [0:00:00] 0/12 finished | fetch 12 waiting 0 running 0 done"
        " | work 0 waiting 0 running 0 done | done 0 | failed 0 | cancelled 0\n"
    )
    *_, last, summary, rate, errors, common = err.splitlines()  # the last status line, summary
    assert summary == "jorb: complete: all 12 jobs are in terminal states: done 10, failed 2"
    execs = r"jorb: 24 execs in \d+:\d\d:\d\d \(22 succeeded, 2 failed\), [\d.,]+/s on average"
    assert re.fullmatch(execs, rate)
    assert errors == "jorb: most common errors of this exec:"
    assert re.fullmatch(r" +2× work: ValueError: job \d+ is bad", common), common
    assert re.fullmatch(
        r"jorb \[\d+:\d\d:\d\d\] 12/12 finished \| fetch 0 waiting 0 running 12 done"
        r" \| work 0 waiting 0 running 10 done 2 errors 2 gave up( [\d.]+/s)?"
        r" \| done 10 \| failed 2 \| cancelled 0",
        last,
    ), last
    assert "\x1b" not in err  # no escape codes in a log
    assert sorted(out.splitlines()) == sorted(f"printed {n}" for n in range(1, 13) if n % 5)
    assert "INFO logged 1" in err.splitlines()


def _all_in_work(screen: str) -> bool:
    rows = table(screen)
    return rows.get("fetch", [])[4:5] == ["12"] and rows.get("work", [])[:4] == [
        "12",
        "10",
        "0",
        "2/2",
    ]


def _finished(screen: str) -> int:
    rows = table(screen)
    try:
        return int(rows["done"][0]) + int(rows["failed"][0])
    except (KeyError, IndexError, ValueError):
        return -1


def test_ctrl_c_notice_shows_above_the_bars_without_tearing_them(
    tmp_path: Path, gate: tuple[Path, int]
) -> None:
    fifo, fd = gate
    (tmp_path / "script.py").write_text(SCRIPT)
    terminal = Terminal([sys.executable, "script.py", "run.json", str(fifo)], tmp_path)
    try:
        terminal.wait_for("all jobs waiting in work", _all_in_work)
        os.killpg(terminal.process.pid, signal.SIGINT)
        terminal.wait_for("the stopping notice", lambda screen: "jorb: stopping" in screen)
        os.write(fd, b"xx")  # the two running execs finish within the grace period
        while terminal._read():
            pass
        assert terminal.process.wait(STUCK) == 130
    finally:
        terminal.close()
    lines = terminal.screen.text().splitlines()
    # The table stays drawn, once; the exec's summary follows it, then how to resume.
    summary = next(i for i, line in enumerate(lines) if line.startswith("jorb: stopped: "))
    assert [line for line in lines if line.startswith("state ")] == [lines[summary - 7]], "\n".join(
        lines
    )
    assert any(line.startswith("jorb: stopping: waiting up to 30s for 2 running") for line in lines)
    assert lines[-1].startswith("jorb: interrupted; progress is saved in run.json.")
