"""Mistakes are loud: what a user sees when something goes wrong, from the user's side.

Each test writes a script as a user would, runs it (or the ``jorb`` command) in a subprocess,
and checks what it printed, its exit status and the run file afterwards. The numbers in the
section headings are the findings of issue 16 ("The first hour").
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from scripts.harness import Proc

import jorb
from jorb.checkpoint import journal_path

#: Real seconds a script may take before the test gives up on it (a guard, not a wait).
LIMIT = 60


def write(tmp_path: Path, name: str, body: str) -> Path:
    script = tmp_path / name
    script.write_text(textwrap.dedent(body))
    return script


def python(
    tmp_path: Path, *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=LIMIT,
        env={**os.environ, **(env or {})},
    )


def jorb_cli(tmp_path: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return python(tmp_path, "-m", "jorb", *args)


def saved(tmp_path: Path, name: str = "runs/x.json") -> dict[str, Any]:
    """The run file as JSON, exactly as a user would read it."""
    doc: dict[str, Any] = json.loads((tmp_path / name).read_text())
    return doc


def states_of(doc: dict[str, Any]) -> dict[str, str]:
    return {job["id"]: job["state"] for job in doc["jobs"]}


def errors_in(doc: dict[str, Any], job_id: str) -> list[dict[str, Any]]:
    job = next(job for job in doc["jobs"] if job["id"] == job_id)
    return [error for records in job.get("errors", {}).values() for error in records]


HEAD = """\
import asyncio, sys
import jorb
"""

FOOT = """
run = jorb.Run.open("runs/x.json")
if not run.jobs:
    for n in range(1, 6):
        run.add_job({"n": n})
jorb.Processor(None, STATES, progress=False, **OPTIONS).exec(run)
print("returned normally")
"""


def workflow(tmp_path: Path, execs: str, states: str, options: str = "{}") -> Path:
    body = f"{HEAD}\n{textwrap.dedent(execs)}\nSTATES = {states}\nOPTIONS = {options}\n{FOOT}"
    return write(tmp_path, "script.py", body)


# -- 1. a bug looks like success ---------------------------------------------------------------


def test_a_misspelled_state_stops_the_run_naming_the_job_the_fix_and_the_line(
    tmp_path: Path,
) -> None:
    script = workflow(
        tmp_path,
        """
        async def fetch(app, overall, ctx):
            if ctx["n"] == 3:
                return ctx, "dnoe"
            return ctx, "done"
        """,
        '[jorb.State("new", exec=fetch, retries=3), jorb.State("done", terminal=True)]',
    )
    result = python(tmp_path, script)
    assert result.returncode == 1, result.stderr
    assert "returned normally" not in result.stdout
    assert "Traceback" not in result.stderr
    first = result.stderr.splitlines()[0]
    assert first == (
        "jorb: stopped at a bug in the script: job 3 in 'new': exec fetch (script.py:5) "
        "returned undeclared state 'dnoe'; did you mean 'done'?"
    )
    assert "python" in result.stderr and "script.py" in result.stderr  # how to resume
    doc = saved(tmp_path)
    assert states_of(doc)["3"] == "new"  # it stays where it was, nothing used up
    (error,) = errors_in(doc, "3")
    assert (
        error["type"] == "jorb.errors.ExecResultError"
        and "did you mean 'done'?" in error["message"]
    )
    assert not journal_path(tmp_path / "runs/x.json").exists()  # checkpointed: folded in
    # Fixed, it resumes: job 3 runs again and the run completes.
    script.write_text(script.read_text().replace('"dnoe"', '"done"'))
    again = python(tmp_path, script)
    assert again.returncode == 0 and "returned normally" in again.stdout, again.stderr
    assert set(states_of(saved(tmp_path)).values()) == {"done"}


def test_with_stop_on_bug_false_a_bug_is_recorded_once_never_retried(tmp_path: Path) -> None:
    script = workflow(
        tmp_path,
        """
        async def helper(ctx):
            return ctx

        async def fetch(app, overall, ctx):
            with open("attempts.log", "a") as log:
                log.write(f"{ctx['n']}\\n")
            return helper(ctx), "done"     # the forgotten await
        """,
        '[jorb.State("new", exec=fetch, retries=3, backoff=1), jorb.State("done", terminal=True)]',
        '{"stop_on_bug": False}',
    )
    result = python(tmp_path, script, "-W", "error::RuntimeWarning")
    assert result.returncode == 0 and "returned normally" in result.stdout, result.stderr
    assert "never awaited" not in result.stderr
    # Each job was tried once: a bug is not a network blip (retries=3 would be 4 attempts).
    assert sorted((tmp_path / "attempts.log").read_text().split()) == ["1", "2", "3", "4", "5"]
    doc = saved(tmp_path)
    assert set(states_of(doc).values()) == {"failed"}
    messages = {errors_in(doc, job["id"])[0]["message"] for job in doc["jobs"]}
    # One kind of error, named as what it is, without a memory address to split it.
    assert messages == {
        "exec fetch (script.py:8) returned a coroutine (helper) as its ctx: a forgotten `await`?"
    }
    status = jorb_cli(tmp_path, "status", "runs/x.json")
    assert "5× ExecResultError: exec fetch (script.py:8) returned a coroutine" in status.stdout


def test_a_recorded_traceback_starts_in_the_users_own_file(tmp_path: Path) -> None:
    script = workflow(
        tmp_path,
        """
        def parse(text):
            return int(text)

        def fetch(app, overall, ctx):     # a def exec: it runs in a worker thread
            return {"value": parse("x" * ctx["n"])}, "done"
        """,
        '[jorb.State("new", exec=fetch), jorb.State("done", terminal=True)]',
    )
    result = python(tmp_path, script)
    assert result.returncode == 0, result.stderr
    (error,) = errors_in(saved(tmp_path), "1")
    trace = error["traceback"]
    assert "/jorb/" not in trace and "concurrent/futures" not in trace and "asyncio" not in trace
    frames = re.findall(r'File "(.+)", line (\d+), in (\w+)', trace)
    assert [(Path(f).name, int(line), name) for f, line, name in frames] == [
        ("script.py", 9, "fetch"),
        ("script.py", 6, "parse"),
    ]
    assert trace.endswith("ValueError: invalid literal for int() with base 10: 'x'\n")


@pytest.mark.parametrize(
    ("execs", "state", "says"),
    [
        (
            "def fetch(ctx):\n    return ctx, 'done'\n",
            'jorb.State("new", exec=fetch)',
            "state 'new': exec fetch (script.py:4) takes (ctx) but is called as "
            "(app, overall, ctx)",
        ),
        (
            "def gather(app, overall, ctx):\n    return ctx, 'done'\n",
            'jorb.State("new", exec=gather, join=True)',
            "state 'new': exec gather (script.py:4) takes (app, overall, ctx) but is called as "
            "(app, overall, ctx, children) (a join state's exec also receives its children)",
        ),
    ],
    ids=["wrong-signature", "join-without-children"],
)
def test_an_exec_that_cannot_take_its_arguments_is_refused_at_declaration(
    tmp_path: Path, execs: str, state: str, says: str
) -> None:
    script = workflow(tmp_path, execs, f'[{state}, jorb.State("done", terminal=True)]')
    result = python(tmp_path, script)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"jorb.errors.StateError: {says}"
    assert not (tmp_path / "runs").exists()  # refused before the run was even opened


def test_the_end_of_exec_summary_counts_ends_errors_and_throughput(tmp_path: Path) -> None:
    script = workflow(
        tmp_path,
        """
        def fetch(app, overall, ctx):
            if ctx["n"] % 2:
                raise ConnectionError(f"host {ctx['n']} unreachable")
            return ctx, "done"
        """,
        '[jorb.State("new", exec=fetch, retries=1, backoff=0), jorb.State("done", terminal=True)]',
    )
    script.write_text(script.read_text().replace("progress=False, ", ""))  # the display is on
    result = python(tmp_path, script)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    start = lines.index("jorb: complete: all 5 jobs are in terminal states: done 2, failed 3")
    execs = r"jorb: 8 execs in 0:00:\d\d \(2 succeeded, 6 failed\), [\d.,]+/s on average"
    assert re.fullmatch(execs, lines[start + 1])
    assert lines[start + 2 :] == [
        "jorb: most common errors of this exec:",
        "        6× new: ConnectionError: host 1 unreachable",
    ]


# -- 2. the async path is first-class ----------------------------------------------------------

ASYNC_MAIN = """
import asyncio, contextlib, sys
import jorb

class Session:                      # like aiohttp.ClientSession: made inside a running loop
    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.closed = False

@contextlib.asynccontextmanager
async def lifespan(config):           # (given the app passed to the Processor, as Starlette's)
    assert config == {"retries": 2}
    session = Session()
    try:
        yield session
    finally:
        session.closed = True
        print("session closed", flush=True)

async def fetch(session, overall, ctx):
    assert session.loop is asyncio.get_running_loop() and not session.closed
    print(f"started {ctx['n']}", flush=True)
    with open(overall["gate"], "rb", buffering=0) as gate:
        await asyncio.to_thread(gate.read, 1)   # the test lets it finish
    return ctx, "done"

async def main():
    run = jorb.Run.open("runs/x.json", overall={"gate": sys.argv[1]})
    if not run.jobs:
        for n in range(1, 9):
            run.add_job({"n": n})
    states = [jorb.State("new", exec=fetch, concurrency=2), jorb.State("done", terminal=True)]
    processor = jorb.Processor({"retries": 2}, states, progress=False, lifespan=lifespan)
    await processor.aexec(run)
    print("complete", flush=True)

asyncio.run(main())
"""


def test_ctrl_c_under_asyncio_run_and_aexec_is_graceful(
    tmp_path: Path, gate: tuple[Path, int]
) -> None:
    fifo, fd = gate
    script = write(tmp_path, "main.py", ASYNC_MAIN)
    proc = Proc(tmp_path, script, fifo)  # (read as it goes; a script that hangs fails the test)
    try:
        proc.wait_lines(2)
        assert sorted(proc.lines) == ["started 1", "started 2"]
        proc.signal(signal.SIGINT)
        proc.wait_for("jorb: stopping", stderr=True)
        assert proc.err_lines[0] == ""
        notice = proc.err_lines[1]
        assert notice.startswith("jorb: stopping: waiting up to 30s for 2 running exec(s)")
        os.write(fd, b"xx")  # the two running execs finish within their grace period
        code = proc.wait(LIMIT)
    finally:
        proc.stop()
    out, err = "\n".join(proc.lines), proc.stderr()
    assert code == 130
    assert "Traceback" not in err and "CancelledError" not in err and "KeyboardInterrupt" not in err
    assert err.splitlines()[-1].startswith("jorb: interrupted; progress is saved in runs/x.json.")
    assert "complete" not in out and out.splitlines()[-1] == "session closed"
    states = states_of(saved(tmp_path))
    assert [states[i] for i in ("1", "2")] == ["done", "done"]  # finished in the grace period
    assert set(states.values()) == {"done", "new"}
    # And it resumes where it stopped.
    os.write(fd, b"x" * 6)
    again = python(tmp_path, script, fifo)
    assert again.returncode == 0, again.stderr
    assert "started 1" not in again.stdout
    assert again.stdout.endswith("session closed\ncomplete\n")  # closed after the last exec
    assert set(states_of(saved(tmp_path)).values()) == {"done"}


def test_a_lifespan_that_fails_to_start_leaves_the_run_as_it_was(tmp_path: Path) -> None:
    script = write(
        tmp_path,
        "main.py",
        """
        import contextlib
        import jorb

        @contextlib.asynccontextmanager
        async def lifespan():
            raise ConnectionRefusedError("the API is down")
            yield

        run = jorb.Run.open("runs/x.json")
        run.add_job({})
        states = [jorb.State("new", exec=lambda app, overall, ctx: (ctx, "done")),
                  jorb.State("done", terminal=True)]
        jorb.Processor(None, states, progress=False, lifespan=lifespan).exec(run)
        """,
    )
    result = python(tmp_path, script)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "ConnectionRefusedError: the API is down"
    assert states_of(saved(tmp_path)) == {"1": "new"}  # saved, nothing ran
    assert not journal_path(tmp_path / "runs/x.json").exists()  # and cleanly: no journal left


# -- 3. a crashed run file is easy to mend -------------------------------------------------------

CRASHING = """
import os, signal, sys
import jorb

def split(app, overall, ctx):
    return ctx, "gather", [jorb.Kick("work", {"n": n}) for n in (5, 6, 7)]

def work(app, overall, ctx):
    return ctx, "done"

def gather(app, overall, ctx, children):
    os.kill(os.getpid(), signal.SIGKILL)     # kill -9, once the children's moves are on disk

run = jorb.Run.open("runs/x.json")
if not run.jobs:
    run.add_job({"n": 1})
    for n in (2, 3, 4):
        run.add_job({"n": n}, state="parked")
states = [
    jorb.State("new", exec=split),
    jorb.State("work", exec=work),
    jorb.State("gather", exec=gather, join=True),
    jorb.State("done", terminal=True),
    jorb.State("parked", terminal=True),
]
jorb.Processor(None, states, progress=False).exec(run)
"""


def crash(tmp_path: Path) -> Path:
    """Run a script that is killed (-9) once job 1 has kicked jobs 5-7 and they are done:
    those four transitions are only in the journal; the file still has job 1 in new."""
    script = write(tmp_path, "crash.py", CRASHING)
    result = python(tmp_path, script)
    assert result.returncode == -signal.SIGKILL, result.stderr
    path = tmp_path / "runs/x.json"
    assert states_of(saved(tmp_path)) == {"1": "new", "2": "parked", "3": "parked"} | {
        "4": "parked"
    }  # stale
    assert journal_path(path).exists()
    return path


def test_fold_brings_a_crashed_run_file_up_to_date_without_the_script(tmp_path: Path) -> None:
    path = crash(tmp_path)
    folded = jorb_cli(tmp_path, "fold", "runs/x.json")
    assert folded.returncode == 0, folded.stderr
    assert folded.stdout == "folded 4 transition(s) from the journal into runs/x.json\n"
    assert not journal_path(path).exists()
    assert states_of(saved(tmp_path)) == {"1": "gather", "2": "parked", "3": "parked"} | {
        "4": "parked",
        "5": "done",
        "6": "done",
        "7": "done",
    }
    again = jorb_cli(tmp_path, "fold", "runs/x.json")
    assert again.stdout == "runs/x.json has no unsaved transitions: nothing to fold\n"


def test_a_file_edited_after_a_crash_names_fold_which_keeps_both_sides(tmp_path: Path) -> None:
    path = crash(tmp_path)
    doc = saved(tmp_path)
    for job in doc["jobs"]:
        if job["id"] == "3":
            job["state"] = "new"  # the journal has nothing of job 3: the edit is kept
        if job["id"] == "1":
            job["ctx"]["note"] = "mine"  # the journal moved job 1: its side is taken
    edited = json.dumps(doc, indent=2)
    path.write_text(edited)
    journal = journal_path(path).read_bytes()

    status = jorb_cli(tmp_path, "status", "runs/x.json")
    assert status.returncode == 1 and status.stdout == ""
    assert "`jorb fold runs/x.json`" in status.stderr and "Traceback" not in status.stderr
    assert path.read_text() == edited and journal_path(path).read_bytes() == journal

    folded = jorb_cli(tmp_path, "fold", "runs/x.json")
    assert folded.returncode == 0, folded.stderr
    assert folded.stdout.splitlines()[:3] == [
        "runs/x.json had been edited after the crash; kept both sides:",
        "  the journal: 4 transition(s) applied",
        "  your edit:   kept",
    ]
    # (An edited job whose last recorded transition disagrees keeps the edit: test_mend.py.)
    assert states_of(saved(tmp_path)) == {"1": "gather", "2": "parked", "3": "new"} | {
        "4": "parked",
        "5": "done",
        "6": "done",
        "7": "done",
    }
    assert not journal_path(path).exists()
    # Both sides, as they were, are kept beside the run: nothing was destroyed.
    (edited_aside,) = path.parent.glob("x.json.edited-*")
    (journal_aside,) = path.parent.glob("x.json.journal.folded-*")
    assert edited_aside.read_text() == edited and journal_aside.read_bytes() == journal
    assert f"mv runs/{edited_aside.name} runs/x.json" in folded.stdout


# -- 4. renaming a state from the command line -----------------------------------------------


def test_a_state_renamed_in_the_script_is_renamed_in_the_run_by_redrive(tmp_path: Path) -> None:
    script = workflow(
        tmp_path,
        """
        def work(app, overall, ctx):
            return ctx, "done"
        """,
        '[jorb.State("new", exec=work), jorb.State("done", terminal=True)]',
    )
    assert python(tmp_path, script).returncode == 0
    script.write_text(script.read_text().replace('"done"', '"finished"'))
    refused = python(tmp_path, script)
    assert refused.returncode == 1
    says = refused.stderr.splitlines()[-1]
    assert "jobs are in states the script does not declare: 'done' (jobs 1, 2, 3, 4, 5)" in says
    assert "`jorb redrive runs/x.json --from S --to T`" in says
    moved = jorb_cli(tmp_path, "redrive", "runs/x.json", "--from", "done", "--to", "finished")
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.startswith("moved 5 job(s) from 'done' to 'finished'; 'finished' is a")
    again = python(tmp_path, script)
    assert again.returncode == 0 and "returned normally" in again.stdout, again.stderr
    assert set(states_of(saved(tmp_path)).values()) == {"finished"}


# -- 5. an edit made while a process runs is not lost --------------------------------------------


def test_an_edit_made_under_a_running_process_is_kept_aside_with_a_warning(
    tmp_path: Path, gate: tuple[Path, int]
) -> None:
    fifo, fd = gate
    script = workflow(
        tmp_path,
        """
        def work(app, overall, ctx):
            print("running", flush=True)
            with open(sys.argv[1], "rb", buffering=0) as gate:
                gate.read(1)
            return ctx, "done"
        """,
        '[jorb.State("new", exec=work), jorb.State("done", terminal=True)]',
    )
    proc = Proc(tmp_path, script, fifo)
    try:
        proc.wait_lines(1)
        assert proc.lines == ["running"]  # the first checkpoint is written
        path = tmp_path / "runs/x.json"
        edited = path.read_text().replace('"n": 4', '"n": 4, "note": "mine"')
        path.write_text(edited)
        os.write(fd, b"x" * 5)
        code = proc.wait(LIMIT)
    finally:
        proc.stop()
    err = proc.stderr()
    assert code == 0, err
    (aside,) = path.parent.glob("x.json.edited-*")
    assert aside.read_text() == edited  # the edit is kept, not silently overwritten
    assert "runs/x.json was edited while this process runs it" in err
    assert str(aside.relative_to(tmp_path)) in err and "jorb redrive" in err
    assert set(states_of(saved(tmp_path)).values()) == {"done"}


# -- 6. sys.exit inside an exec ------------------------------------------------------------------


def test_sys_exit_inside_an_exec_says_which_job_and_exec(tmp_path: Path) -> None:
    script = workflow(
        tmp_path,
        """
        def check(app, overall, ctx):
            if ctx["n"] == 3:
                sys.exit(3)
            return ctx, "done"
        """,
        '[jorb.State("new", exec=check), jorb.State("done", terminal=True)]',
    )
    result = python(tmp_path, script)
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        "jorb: job 3's exec check (script.py:5) in state 'new' raised SystemExit(3); the run "
        "stopped and is saved in runs/x.json, with job 3 still in 'new'"
    )
    assert states_of(saved(tmp_path)) == {"1": "done", "2": "done", "3": "new"} | {
        "4": "new",
        "5": "new",
    }


# -- 7. library errors raised to a script read as one line --------------------------------------


@pytest.mark.parametrize(
    ("setup", "says"),
    [
        ("not json at all, just notes\n", "runs/x.json: not a jorb run file: a run file is a JSON"),
        ('{"format": "jorb-run", "jobs": [', "runs/x.json: not valid JSON at line 1"),
    ],
    ids=["text-file", "corrupt"],
)
def test_a_bad_run_file_raised_to_a_script_is_one_line_under_the_users_own(
    tmp_path: Path, setup: str, says: str
) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs/x.json").write_text(setup)
    script = write(tmp_path, "open.py", 'import jorb\n\nrun = jorb.Run.open("runs/x.json")\n')
    result = python(tmp_path, script)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[-1].startswith(f"jorb.errors.CorruptRunError: {says}")
    assert "invalid literal" not in result.stderr
    # The user's line, then one of jorb's (the one that says how to see the rest), the message.
    files = re.findall(r'File "(.+?)"', result.stderr)
    assert [Path(f).name for f in files] == ["open.py", "errors.py"]
    assert len(lines) <= 8, result.stderr
    full = python(tmp_path, script, env={"JORB_TRACEBACK": "1"})
    assert "checkpoint.py" in full.stderr  # everything, for whoever debugs jorb itself


def test_a_locked_run_raised_to_a_script_is_one_line(tmp_path: Path) -> None:
    holder = jorb.Run.open(tmp_path / "runs/x.json")
    try:
        script = write(tmp_path, "open.py", 'import jorb\n\nrun = jorb.Run.open("runs/x.json")\n')
        result = python(tmp_path, script)
    finally:
        holder.close()
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(
        f"jorb.errors.RunLockedError: runs/x.json is in use by process {os.getpid()}"
    )
    assert "checkpoint.py" not in result.stderr


# -- 8. messages that say more ----------------------------------------------------------------


def test_error_messages_name_the_key_the_status_and_the_line(tmp_path: Path) -> None:
    script = workflow(
        tmp_path,
        """
        async def fetch(app, overall, ctx):
            n = ctx["n"]
            if n == 1:
                ctx["seen"] = {"tags": {"a"}}
                return ctx, "done"
            if n == 2:
                return ctx, "done", [jorb.Kick("done", {"when": object()})]
            if n == 3:
                raise jorb.RateLimited(retry_after="0.2", status=429)
            if n == 4:
                await asyncio.sleep(3600)
            return ctx, "done"
        """,
        """[
            jorb.State("new", exec=fetch, timeout=0.5, rate_limit_retries=0),
            jorb.State("done", terminal=True),
        ]""",
        '{"stop_on_bug": False}',
    )
    result = python(tmp_path, script)
    assert result.returncode == 0, result.stderr
    doc = saved(tmp_path)
    message = {job["id"]: errors_in(doc, job["id"])[-1]["message"] for job in doc["jobs"][:4]}
    assert message["1"] == (
        "exec fetch (script.py:5) returned a ctx that is not JSON: ctx['seen']['tags'] is a "
        "set, which JSON cannot hold"
    )
    assert message["2"] == (
        "exec fetch (script.py:5) returned a kick (into 'done') whose ctx is not JSON: "
        "kicks[0].ctx['when'] is an object, which JSON cannot hold"
    )
    assert message["3"] == "rate limited (HTTP 429, retry after 0.2s)"
    limited = errors_in(doc, "3")[-1]
    assert (limited["status"], limited["retry_after"], limited["rate_limited"]) == (429, 0.2, True)
    assert message["4"] == "timed out after 0.5s, at script.py:15 in fetch"
    assert "await asyncio.sleep(3600)" in errors_in(doc, "4")[-1]["traceback"]


def test_a_def_exec_that_times_out_says_where_its_thread_was(
    tmp_path: Path, gate: tuple[Path, int]
) -> None:
    fifo, fd = gate
    script = workflow(
        tmp_path,
        """
        def wait_for_gate():
            with open(sys.argv[1], "rb", buffering=0) as gate:
                gate.read(1)

        def work(app, overall, ctx):
            if ctx["n"] == 2:
                wait_for_gate()
            return ctx, "done"
        """,
        # (concurrency=5: the others run while the abandoned thread is stuck)
        """[
            jorb.State("new", exec=work, timeout=0.5, concurrency=5),
            jorb.State("done", terminal=True),
        ]""",
    )
    try:
        result = python(tmp_path, script, fifo)
    finally:
        os.write(fd, b"x")  # let the abandoned thread end
    assert result.returncode == 0, result.stderr
    (error,) = errors_in(saved(tmp_path), "2")
    assert error["message"] == (
        "timed out after 0.5s (its thread was abandoned), at script.py:7 in wait_for_gate"
    )
    trace = error["traceback"]
    assert trace.startswith("The exec was here when it timed out:\n")
    assert [line.strip() for line in trace.splitlines()[1:5]] == [
        f'File "{script}", line 11, in work',
        "wait_for_gate()",
        f'File "{script}", line 7, in wait_for_gate',
        "gate.read(1)",
    ]


# -- 9. docs that work as written --------------------------------------------------------------


def test_submodules_work_after_a_plain_import_jorb_which_stays_light(tmp_path: Path) -> None:
    script = write(
        tmp_path,
        "plain.py",
        """
        import sys
        import jorb
        assert "rich" not in sys.modules and "typer" not in sys.modules
        async def main():
            return 42
        print(jorb.testing.run(main()), callable(jorb.progress.make_progress))
        """,
    )
    result = python(tmp_path, script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "42 True\n"


def test_python_dash_m_jorb_is_the_jorb_command(tmp_path: Path) -> None:
    result = jorb_cli(tmp_path, "--version")
    assert result.returncode == 0 and result.stdout == f"jorb {jorb.__version__}\n"


def test_the_mapreduce_hint_is_a_command_that_works_without_jorb_on_path(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "mapreduce.py"
    env = {"PATH": "/usr/bin:/bin"}  # a venv not activated: `jorb` is not on PATH
    result = python(tmp_path, example, "--run", "runs/mr.json", "--docs", "8", env=env)
    assert result.returncode == 0, result.stderr
    hint = result.stdout.splitlines()[-1].partition("inspect it: ")[2]
    assert hint.endswith(" show runs/mr.json 1") and "-m jorb" in hint
    shown = subprocess.run(
        hint, shell=True, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, **env}
    )
    assert shown.returncode == 0 and "children" in shown.stdout, shown.stderr


def test_exec_inside_a_running_loop_says_to_await_aexec(tmp_path: Path) -> None:
    script = write(
        tmp_path,
        "nb.py",
        """
        import asyncio
        import jorb
        states = [jorb.State("new", exec=lambda app, overall, ctx: (ctx, "done")),
                  jorb.State("done", terminal=True)]
        async def cell():                     # what a Jupyter cell runs in
            run = jorb.Run.open("runs/x.json")
            run.add_job({})
            jorb.Processor(None, states).exec(run)
        asyncio.run(cell())
        """,
    )
    result = python(tmp_path, script, "-W", "error::RuntimeWarning")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "jorb.errors.JorbError: processor.exec(run) was called inside a running event loop "
        "(Jupyter, or an async def): use `await processor.aexec(run)` there"
    )
    assert "never awaited" not in result.stderr


def test_overall_is_read_only_inside_an_exec_and_says_so(tmp_path: Path) -> None:
    script = workflow(
        tmp_path,
        """
        def count(app, overall, ctx):
            overall["seen"] = overall.get("seen", 0) + 1
            return ctx, "done"
        """,
        '[jorb.State("new", exec=count), jorb.State("done", terminal=True)]',
    )
    result = python(tmp_path, script)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        "jorb: stopped at a bug in the script: job 1 in 'new': overall is read-only inside an "
        "exec (a change there would not be saved with the run): keep what a job learns in its "
        "ctx, and set run.overall[...] before processor.exec(run) (raised at script.py:6 in "
        "count)"
    )
    assert saved(tmp_path)["overall"] == {}


def test_a_rate_limit_raised_in_a_pool_worker_keeps_its_status(tmp_path: Path) -> None:
    script = workflow(
        tmp_path,
        """
        def call(app, overall, ctx):
            raise jorb.RateLimited(retry_after=0.1, status=503)
        """,
        """[
            jorb.State("new", exec=call, rate_limit_retries=0, pool=jorb.ProcessPool(1)),
            jorb.State("done", terminal=True),
        ]""",
    )
    result = python(tmp_path, script)
    assert result.returncode == 0, result.stderr
    (error,) = errors_in(saved(tmp_path), "1")
    assert error["message"] == "rate limited (HTTP 503, retry after 0.1s)"
    assert (error["status"], error["retry_after"]) == (503, 0.1)


def test_overall_is_read_only_in_a_pool_worker_too(tmp_path: Path) -> None:
    script = workflow(
        tmp_path,
        """
        def count(app, overall, ctx):
            overall["seen"] = 1
            return ctx, "done"
        """,
        """[
            jorb.State("new", exec=count, pool=jorb.ProcessPool(1)),
            jorb.State("done", terminal=True),
        ]""",
    )
    result = python(tmp_path, script)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].startswith(
        "jorb: stopped at a bug in the script: job 1 in 'new': overall is read-only inside an exec"
    )
    assert saved(tmp_path)["overall"] == {}
