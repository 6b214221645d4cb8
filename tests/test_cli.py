"""The ``jorb`` command: every command in-process (CliRunner), and the real console script in a
subprocess, on a finished run and on one a live process is executing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DONE, process
from typer.testing import CliRunner

import jorb
from jorb import control
from jorb.cli import app

JORB = str(Path(sys.executable).with_name("jorb"))
STUCK = 30.0


def clone(app: object, overall: object, ctx: dict) -> tuple[dict, str]:
    if ctx["n"] % 4 == 0:
        raise TimeoutError("timed out after 5s")
    return {**ctx, "path": f"/w/{ctx['n']}"}, "edit"


def edit(app: object, overall: object, ctx: dict) -> tuple[dict, str, list[jorb.Kick]]:
    if ctx["n"] == 5:
        raise ValueError("cannot parse [setup.py]")
    return (
        ctx,
        "done",
        [jorb.Kick("upload", {"file": f"{ctx['n']}.{i}"}) for i in range(ctx["n"] % 3)],
    )


def upload(app: object, overall: object, ctx: dict) -> tuple[dict, str]:
    return ctx, "done"


STATES = [
    jorb.State("new", exec=clone, retries=1),
    jorb.State("edit", exec=edit),
    jorb.State("upload", exec=upload, concurrency=4),
    DONE,
    jorb.State("failed", terminal=True),
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 jobs: 4 and 8 time out twice (failed), 5 fails in edit; 1, 2 (two), 7 kick uploads."""
    path = tmp_path_factory.mktemp("cli") / "run.json"
    run = jorb.Run.open(path)
    for n in range(1, 9):
        run.add_job({"n": n})
    process(STATES, run)
    return path


@pytest.fixture
def copy(finished: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run, for commands that change it."""
    path = tmp_path / "run.json"
    path.write_bytes(finished.read_bytes())
    return path


def cli(*args: object, input: str | None = None, code: int = 0) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], input=input, env={"COLUMNS": "120"})
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    if code == 0:
        assert result.stderr == "", result.stderr
    return result.stdout


def mistake(*args: object, code: int = 1) -> str:
    """Run a command that must fail: one line on stderr, nothing on stdout, no traceback."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jorb: error: "), result.stderr
    return lines[0].removeprefix("jorb: error: ")


def table(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}


# -- reading -----------------------------------------------------------------------------------


def test_status_counts_errors_timings_and_completeness(finished: Path) -> None:
    out = cli("status", finished)
    assert out.splitlines()[0] == f"{finished}: complete: all 12 jobs are in terminal states"
    rows = table(out)
    assert rows["state"] == [
        *("jobs", "delayed", "errors", "in", "jobs"),
        *("execs", "mean", "median", "p95"),
    ]
    assert rows["new"][:4] == ["0", "4", "2", "8"]  # 4 timeouts in 2 jobs; 6 on to edit, 2 gave up
    assert rows["edit"][:4] == ["0", "1", "1", "6"]
    assert rows["upload"][:2] == ["0", "4"]
    assert rows["done"] == ["9", "terminal"]
    assert rows["failed"] == ["3", "terminal"]
    assert "  new: 4 error(s) in 2 job(s)" in out.splitlines()
    assert re.search(r"^ +4× TimeoutError: timed out after 5s$", out, re.M)
    assert re.search(r"^ +1× ValueError: cannot parse \[setup.py\]$", out, re.M)


def test_status_of_a_run_never_executed_and_of_one_with_undeclared_states(tmp_path: Path) -> None:
    run = jorb.Run.open(tmp_path / "new.json")
    run.add_job({"n": 1})
    run.save()
    run.close()
    out = cli("status", tmp_path / "new.json")
    assert "1 jobs, never executed (no states recorded yet)" in out.splitlines()[0]
    assert table(out)["new"] == ["1"]
    # a state no longer declared (the file was edited) is marked
    path = tmp_path / "edited.json"
    path.write_text(
        json.dumps(
            {
                "format": "jorb-run",
                "version": 1,
                "states": [{"name": "new", "terminal": False}, {"name": "done", "terminal": True}],
                "jobs": [{"id": "1", "state": "old", "ctx": {}}],
            }
        )
    )
    assert table(cli("status", path))["old"] == ["1", "undeclared"]


def test_jobs_lists_and_filters(finished: Path) -> None:
    rows = table(cli("jobs", finished))
    assert list(rows) == ["id", *map(str, range(1, 13))]
    assert rows["4"][:3] == ["failed", "2", "new:"]
    assert rows["9"][:2] == ["done", "1"]  # kicked by job 1
    assert list(table(cli("jobs", finished, "--state", "failed"))) == ["id", "4", "5", "8"]
    errored = table(cli("jobs", finished, "--errors"))
    assert list(errored) == ["id", "4", "5", "8"]
    assert errored["5"][:4] == ["failed", "1", "edit:", "ValueError:"]
    assert cli("jobs", finished, "-s", "upload") == "no jobs match\n"
    assert cli("jobs", finished, "-s", "upload", "--json") == ""
    short = cli("jobs", finished, "-n", "2")
    assert list(table(short)) == ["id", "1", "2", "showing"]
    assert "showing 2 of 12 jobs; --limit 0 shows all" in short


def test_jobs_as_json_lines(finished: Path) -> None:
    lines = cli("jobs", finished, "--json", "-e").splitlines()
    jobs = [json.loads(line) for line in lines]
    assert [job["id"] for job in jobs] == ["4", "5", "8"]
    assert jobs[0]["errors"]["new"][1]["message"] == "timed out after 5s"
    assert jobs[0]["history"] == [
        {**jobs[0]["history"][0], "from": "new", "to": "failed"},
    ]


def test_show_a_job_with_ctx_history_errors_and_family(finished: Path) -> None:
    out = cli("show", finished, "2")
    assert table(out)["job"] == ["2"]
    assert table(out)["state"] == ["done"]
    assert table(out)["children"] == ["10,", "11"]
    assert '"path": "/w/2"' in out
    steps = [line.split()[2:] for line in out.splitlines() if re.match(r"\d{4}-\d\d-\d\d ", line)]
    assert [s[:2] for s in steps] == [["new", "edit"], ["edit", "done"]]
    kid = cli("show", finished, "10")
    assert table(kid)["parent"] == ["2", "(in", "done)"]
    failed = cli("show", finished, "5")
    assert "error in edit, attempt 1 at " in failed
    assert "ValueError: cannot parse [setup.py]" in failed
    assert "Traceback (most recent call last):" in failed
    assert "raise ValueError" in failed  # the exec's own line, from the traceback
    timeouts = cli("show", finished, "4")
    assert timeouts.count("error in new, attempt") == 2


def test_graph_as_mermaid_and_dot(finished: Path) -> None:
    mermaid = cli("graph", finished)
    assert mermaid.startswith("flowchart LR\n")
    assert '    s3(["done (9)"])' in mermaid
    assert "    s0 -->|6| s1" in mermaid  # new -> edit
    assert "    s0 -->|2| s4" in mermaid  # new -> failed after the retry
    assert "    s2 -->|4| s3" in mermaid  # upload -> done
    dot = cli("graph", finished, "--format", "dot")
    assert '    "edit" -> "done" [label="5"];' in dot
    assert '    "edit" -> "failed" [label="1", color=red];' in dot  # a give-up
    assert CliRunner().invoke(app, ["graph", str(finished), "-f", "png"]).exit_code == 2


# -- changing ----------------------------------------------------------------------------------


def test_redrive_moves_jobs_keeping_history_and_errors(copy: Path) -> None:
    before = jorb.Run.load(copy).jobs["4"]
    out = cli("redrive", copy, "--from", "failed", "--to", "new")
    assert out == "moved 3 job(s) from 'failed' to 'new'\n"
    after = jorb.Run.load(copy)
    assert [job.id for job in after.jobs.values() if job.state == "new"] == ["4", "5", "8"]
    job = after.jobs["4"]
    assert job.errors == before.errors
    assert job.history[:-1] == before.history
    assert (job.steps()[-1]["from"], job.steps()[-1]["to"]) == ("failed", "new")
    assert "redrive" in cli("show", copy, "4")
    assert cli("redrive", copy, "--from", "new", "--to", "failed", "-j", "5") == (
        "moved 1 job(s) from 'new' to 'failed'\n"
    )
    assert jorb.Run.load(copy).jobs["5"].state == "failed"
    assert table(cli("status", copy))["new"][0] == "2"


def test_redrive_says_which_jobs_it_left_running_and_which_settling(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a live process answered (a running run's jobs are busy while their exec runs, and
    # for a moment after it, while its record is written): each said for what it is.
    answer = {"moved": 1, "skipped": ["2", "3"], "settling": ["3"]}
    monkeypatch.setattr(control, "redrive", lambda *args, **kwargs: answer)
    assert cli("redrive", copy, "--from", "failed", "--to", "new") == (
        "moved 1 job(s) from 'failed' to 'new'; 1 running right now were left (2); 1 left: "
        "settling right now (its last move is being written), redrive again (3)\n"
    )


def test_a_redrive_that_changes_nothing_records_nothing(copy: Path) -> None:
    changes = jorb.Run.load(copy).changes
    # No job in the state: answered, and not added to the run's log of changes.
    assert cli("redrive", copy, "--from", "upload", "--to", "new") == (
        "moved 0 job(s) from 'upload' to 'new'\n"
    )
    # A terminal state to itself would only write a history entry on every job in it.
    assert mistake("redrive", copy, "--from", "failed", "--to", "failed") == (
        "'failed' is terminal: redriving it to itself changes nothing"
    )
    # An empty list of job ids (from Python) names no job: it moves none, not all of them.
    assert control.redrive(copy, "failed", "new", []) == {"moved": 0, "skipped": []}
    after = jorb.Run.load(copy)
    assert after.changes == changes
    assert all(job.steps()[-1]["from"] != "failed" for job in after.jobs.values() if job.history)
    assert [job.state for job in after.jobs.values()].count("failed") == 3


def test_add_from_ctx_file_and_stdin(copy: Path, tmp_path: Path) -> None:
    assert cli("add", copy, "--ctx", '{"n": 20}') == "added 1 job(s) in 'new': 13\n"
    assert cli("add", copy, "-c", '{"n": 21}', "-c", '{"n": 22}', "-s", "upload") == (
        "added 2 job(s) in 'upload': 14, 15\n"
    )
    lines = tmp_path / "jobs.jsonl"
    lines.write_text('{"n": 23}\n\n{"n": 24}\n')
    assert cli("add", copy, "--file", lines) == "added 2 job(s) in 'new': 16, 17\n"
    assert cli("add", copy, "-f", "-", input='{"n": 25}\n') == "added 1 job(s) in 'new': 18\n"
    run = jorb.Run.load(copy)
    assert [(job.state, job.ctx) for job in list(run.jobs.values())[12:]] == [
        ("new", {"n": 20}),
        ("upload", {"n": 21}),
        ("upload", {"n": 22}),
        ("new", {"n": 23}),
        ("new", {"n": 24}),
        ("new", {"n": 25}),
    ]


def test_pause_and_resume(copy: Path) -> None:
    assert cli("pause", copy, "edit").startswith("paused 'edit': no new execs start in it")
    assert jorb.Run.load(copy).paused == {"edit"}
    assert table(cli("status", copy))["edit"][:5] == ["0", "PAUSED", "1", "1", "6"]
    assert cli("resume", copy, "edit") == "resumed 'edit'\n"
    assert jorb.Run.load(copy).paused == set()


# -- mistakes ------------------------------------------------------------------------------------


def test_mistakes_give_one_line_and_a_non_zero_exit(copy: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    for command in (
        ["status"],
        ["jobs"],
        ["show", "1"],
        ["graph"],
        ["redrive", "--from", "a", "--to", "b"],
        ["add", "--ctx", "{}"],
        ["pause", "new"],
        ["resume", "new"],
    ):
        assert mistake(command[0], missing, *command[1:]) == f"{missing}: no such run file"
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "jorb-run", "version": 1, "jobs": [')
    assert mistake("status", corrupt).startswith(f"{corrupt}: not valid JSON at line 1")
    corrupt.write_text('{"format": "jorb-run", "version": 1, "jobs": [{"id": "1", "ctx": {}}]}')
    assert mistake("jobs", corrupt) == f'{corrupt}: jobs[0] (job 1): job has no "state"'
    assert mistake("status", tmp_path) == f"{tmp_path}: is a directory, not a run file"
    damaged = json.loads(copy.read_text())
    damaged["jobs"][0]["history"] = [1]  # the wrong type one level down
    corrupt.write_text(json.dumps(damaged))
    for command in (["status"], ["graph"], ["show", "1"]):
        said = mistake(command[0], corrupt, *command[1:])  # model.py refusing it would be better
        assert "(job 1)" in said or said.startswith("unexpected AttributeError: "), said
    assert mistake("show", copy, "99") == f"no job '99' in {copy} (ids run 1 to 12)"
    assert mistake("jobs", copy, "-s", "nope").startswith(f"no state 'nope' in {copy} (states: ")
    assert mistake("redrive", copy, "--from", "nope", "--to", "new").startswith("no state 'nope'")
    # (--to a state the file has not seen is a rename, not a mistake: see test_mistakes.py)
    assert mistake("redrive", copy, "--from", "failed", "--to", "new", "-j", "99").startswith(
        "no job 99"
    )
    assert mistake("pause", copy, "done") == "state 'done' is terminal: it starts no execs to pause"
    assert mistake("add", copy, "-s", "nope", "--ctx", "{}").startswith("no state 'nope'")
    assert mistake("add", copy, "--ctx", '{"n": 1', code=2).startswith("--ctx: not valid JSON")
    assert mistake("add", copy, "--ctx", "[1]", code=2) == (
        "--ctx: a ctx must be a JSON object {...}, not list"
    )
    assert mistake("add", copy, code=2).startswith("give --ctx JSON")
    assert mistake("add", copy, "-f", tmp_path / "none.jsonl") == (
        f"{tmp_path / 'none.jsonl'}: No such file or directory"
    )
    assert jorb.Run.load(copy).to_document()["changes"] == []  # nothing was applied


def test_help_reads_well() -> None:
    out = cli("--help")
    for command in ("status", "jobs", "show", "graph", "redrive", "add", "pause", "resume"):
        assert re.search(rf"^│ {command} +[A-Z]", out, re.M), command
        help_ = cli(command, "--help")
        assert f"Usage: jorb {command} [OPTIONS] " in help_
        assert "RUNFILE" in help_
    assert "--from" in cli("redrive", "--help") and "--to" in cli("redrive", "--help")
    assert cli("--version") == f"jorb {jorb.__version__}\n"
    assert "Usage: jorb [OPTIONS] COMMAND" in CliRunner().invoke(app, []).stdout


# -- the real console script, on a run a process is executing -------------------------------------

LIVE = """
import sys
import jorb

def a(app, overall, ctx):
    return ctx, "b"

def b(app, overall, ctx):
    print(f"in b {ctx['n']}", flush=True)
    with open(overall["gate"], "rb", buffering=0) as gate:
        gate.read(1)                    # one byte from the test lets one job through
    return ctx, "done"

states = [
    jorb.State("a", exec=a),
    jorb.State("b", exec=b, concurrency=2),
    jorb.State("done", terminal=True),
]
run = jorb.Run.open(sys.argv[1], overall={"gate": sys.argv[2]})
for n in (1, 2):
    run.add_job({"n": n}, state="a")
jorb.Processor(None, states, progress=False, poll_interval=0.05).exec(run)
"""


def jorb_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [JORB, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=STUCK,
        env={**os.environ, "COLUMNS": "120"},
    )


def test_console_script_reads_and_steers_a_run_in_progress(
    tmp_path: Path, gate: tuple[Path, int]
) -> None:
    fifo, fd = gate
    (tmp_path / "live.py").write_text(LIVE)
    path = tmp_path / "run.json"
    script = subprocess.Popen(
        [sys.executable, "live.py", path.name, str(fifo)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert script.stdout is not None
        # Both jobs are in b's execs: their a -> b transitions are on disk (in the journal).
        assert sorted(script.stdout.readline() for _ in range(2)) == ["in b 1\n", "in b 2\n"]
        status = jorb_cli("status", path)
        assert status.returncode == 0, status.stderr
        assert status.stdout.splitlines()[0] == (
            f"{path}: not complete: 0 of 2 jobs are in terminal states"
            " · a process is running it now"
        )
        assert table(status.stdout)["b"][0] == "2"
        assert list(table(jorb_cli("jobs", path, "-s", "b").stdout)) == ["id", "1", "2"]

        # Changes are handed to the process, which applies them through its journal.
        added = jorb_cli("add", path, "-s", "b", "--ctx", '{"n": 3}')
        assert added.stdout == "added 1 job(s) in 'b': 3\n", added.stderr
        assert "handing the change to it" in added.stderr
        assert jorb_cli("pause", path, "a").returncode == 0
        assert table(jorb_cli("status", path).stdout)["a"][:2] == ["0", "PAUSED"]
        assert jorb_cli("resume", path, "a").returncode == 0
        # 1 and 2 hold b's two slots, so 3 waits: it moves, the running two are left alone.
        moved = jorb_cli("redrive", path, "--from", "b", "--to", "done")
        assert moved.stdout == (
            "moved 1 job(s) from 'b' to 'done'; 2 running right now were left (1, 2)\n"
        ), moved.stderr

        wrong = jorb_cli("show", path, "99")
        assert (wrong.returncode, wrong.stdout) == (1, "")
        assert wrong.stderr == f"jorb: error: no job '99' in {path} (ids run 1 to 3)\n"

        os.write(fd, b"xx")
        _, err = script.communicate(timeout=STUCK)
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()
    assert script.returncode == 0, err
    final = jorb_cli("status", path)
    assert final.stdout.splitlines()[0] == f"{path}: complete: all 3 jobs are in terminal states"
    assert table(final.stdout)["done"] == ["3", "terminal"]
    assert "redrove 1 job(s) 'b' -> 'done'" in final.stdout
    assert "redrive" in jorb_cli("show", path, "3").stdout


def test_console_script_mistakes_have_no_traceback(tmp_path: Path) -> None:
    missing = jorb_cli("status", tmp_path / "missing.json")
    assert missing.returncode == 1
    assert missing.stderr == f"jorb: error: {tmp_path / 'missing.json'}: no such run file\n"
    (tmp_path / "bad.json").write_text("not json")
    bad = jorb_cli("graph", tmp_path / "bad.json")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith(f"jorb: error: {tmp_path / 'bad.json'}: not a jorb run file")
    assert "Traceback" not in missing.stderr + bad.stderr
    usage = jorb_cli("status")
    assert usage.returncode == 2 and "Missing argument 'RUNFILE'" in usage.stderr


def test_ctrl_c_while_waiting_for_a_process_says_where_the_change_waits(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(path: Path, state: str) -> dict[str, object]:
        raise KeyboardInterrupt

    monkeypatch.setattr(jorb.control, "pause", interrupted)
    message = mistake("pause", copy, "edit", code=130)
    assert message == (
        f"interrupted while waiting; the change stays queued in {copy}.inbox and is applied "
        f"when the process running the run next looks there (`jorb withdraw {copy}` takes it "
        "back)"
    )


def test_status_shows_delayed_jobs(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    run = jorb.Run.open(path)
    run.add_job({}, delay=3600)  # an hour from now
    run.add_job({})
    run.save()
    run.close()
    out = cli("status", path)
    header, row = out.splitlines()[2:4]
    assert header.split()[:3] == ["state", "jobs", "delayed"]
    assert row.split()[:3] == ["new", "2", "1"]


def test_piped_output_is_not_cut_at_80_columns(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    run = jorb.Run.open(path)
    long_name = "a_state_with_a_rather_long_name_" * 2
    job = run.add_job({}, state=long_name)
    job.errors[long_name] = [
        {
            "message": "x" * 70 + " the end",
            "type": "ValueError",
            "traceback": "",
            "time": 0.0,
            "attempt": 1,
            "rate_limited": False,
        }
    ]
    run.save()
    run.close()
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run([JORB, "status", str(path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout
    assert long_name in done.stdout and "the end" in done.stdout


@pytest.mark.parametrize("command", [["jobs", "--json", "-n", "0"], ["status"], ["show", "1"]])
def test_output_piped_into_head_ends_quietly(tmp_path: Path, command: list[str]) -> None:
    # `jorb jobs ... | head -1`: the reader leaves after one line. That is not an error: no
    # "Broken pipe" message, exit status 0 (it once said "jorb: error: Broken pipe", rc 1).
    path = tmp_path / "big.json"
    run = jorb.Run(path, {})
    for i in range(3000):  # far more output than a pipe holds
        run.add_job({"repo": f"acme/service-{i:06d}", "note": "x" * 40}, "done")
    run.save()
    proc = subprocess.Popen(
        [JORB, command[0], str(path), *command[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()
    proc.stdout.close()  # what head does after its line
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0, err
    assert err == b""


# -- JSON and shell completion -------------------------------------------------------------------


def test_status_show_and_graph_as_json(finished: Path) -> None:
    status = json.loads(cli("status", finished, "--json"))
    assert (status["complete"], status["jobs"], status["executing"]) == (True, 12, False)
    rows = {row["name"]: row for row in status["states"]}
    assert (rows["done"]["jobs"], rows["failed"]["jobs"]) == (9, 3)
    assert rows["new"]["timing"]["count"] == 8
    assert status["errors"][0]["state"] == "new"
    assert status["errors"][0]["common"][0]["jobs"]  # example job ids

    shown = json.loads(cli("show", finished, "2", "--json"))
    assert (shown["id"], shown["state"], shown["parent"]) == ("2", "done", None)
    assert [kid["state"] for kid in shown["children"]] == ["done", "done"]
    assert [(s["from"], s["to"], s["redrive"]) for s in shown["history"]] == [
        ("new", "edit", False),
        ("edit", "done", False),
    ]

    graph = json.loads(cli("graph", finished, "--json"))
    kicks = [e for e in graph["edges"] if e["kind"] == "kick"]
    assert kicks == [{"from": "edit", "to": "upload", "count": 4, "kind": "kick"}]
    assert [n["name"] for n in graph["nodes"] if n["error_state"]] == ["failed"]


def test_graph_as_svg_needs_no_other_program(finished: Path) -> None:
    import xml.etree.ElementTree as ET

    svg = ET.fromstring(cli("graph", finished, "--format", "svg"))
    ns = "{http://www.w3.org/2000/svg}"
    states = [g.get("data-state") for g in svg.iter(f"{ns}g") if "node" in (g.get("class") or "")]
    assert states == ["new", "edit", "upload", "done", "failed", "cancelled"]
    kinds = sorted(
        g.get("class", "").split()[1] for g in svg.iter(f"{ns}g") if "edge" in g.get("class", "")
    )
    assert "kick" in kinds and "gave_up" in kinds
    texts = {t.text for t in svg.iter(f"{ns}text")}
    assert "kick 4" in texts


def test_shell_completion_is_offered() -> None:
    assert "--install-completion" in cli("--help")
