"""The command line over hostile or odd run files (issue 18, findings 3 and 5): every file
``Run.load`` accepts is shown without an "unexpected" error, and what a file holds reaches the
terminal as text: control characters escaped, no rich markup read in it."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

import jorb
from jorb.checkpoint import journal_path
from jorb.cli import app, safe

ESC = "\x1b"
HOSTILE = "[/bold]\x1b]0;pwned\x07\x1b[2J\u202etxt.exe\x9b31m"

#: A run file with one of everything the commands read.
BASE: dict[str, Any] = {
    "format": "jorb-run",
    "version": 1,
    "seq": 3,
    "next_id": 4,
    "overall": {},
    "states": [{"name": "a", "terminal": False}, {"name": "done", "terminal": True}],
    "paused": [],
    "changes": [{"id": "c1", "what": "redrove 1 job(s)", "time": 1.0, "applied": 1.0, "who": "me"}],
    "jobs": [
        {
            "id": "1",
            "state": "a",
            "ctx": {"x": 1},
            "errors": {
                "a": [
                    {
                        "message": "boom",
                        "type": "OSError",
                        "traceback": "Traceback\n  line\nOSError: boom",
                        "time": 2.0,
                        "attempt": 1,
                        "rate_limited": False,
                    }
                ]
            },
            "history": [{"from": "a", "to": "a", "time": 1.0, "duration": 0.5}],
            "not_before": 5.0,
            "attempts": 1,
        },
        {
            "id": "2",
            "state": "done",
            "ctx": {},
            "parent": "1",
            "history": [{"from": "a", "to": "done", "time": 1.0, "duration": 0.0, "redrive": "c1"}],
        },
    ],
}
COMMANDS = [["status"], ["jobs"], ["jobs", "--errors"], ["show", "1"], ["show", "2"], ["graph"]]
VALUES: list[Any] = [None, "", "[/bold]", -1, 1e308, -1e308, True, [], {}, [1], {"a": 1}, HOSTILE]


def _fields(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = []
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    )
    for key, value in items:
        found.append((*prefix, key))
        found += _fields(value, (*prefix, key))
    return found


def _run(path: Path, command: list[str]) -> str:
    result = CliRunner().invoke(app, [command[0], str(path), *command[1:]])
    assert not (result.exception and not isinstance(result.exception, SystemExit)), result
    return result.output


def test_no_file_load_accepts_makes_a_command_fail_unexpectedly(tmp_path: Path) -> None:
    """Every field of a run file set to odd values, one at a time: each file either does not
    load (a clear CorruptRunError) or every reading command shows it."""
    path = tmp_path / "run.json"
    rng = random.Random(5)
    shown = 0
    for field in _fields(BASE):
        for value in rng.sample(VALUES, 4):
            doc = copy.deepcopy(BASE)
            target = doc
            for key in field[:-1]:
                target = target[key]
            target[field[-1]] = value
            path.write_bytes(orjson.dumps(doc))
            try:
                jorb.Run.load(path)
            except jorb.RunFileError:
                continue
            shown += 1
            for command in COMMANDS:
                output = _run(path, command)
                assert "unexpected" not in output, (field, value, command, output)
                assert ESC not in output, (field, value, command, output)
    assert shown > 80


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        (("states", 0), "a", '"states" entry 0 is not'),
        (("states", 0), {"terminal": True}, '"states" entry 0 is not'),
        (("states", 1, "name"), 7, '"states" entry 1 is not'),
        (("states", 1, "terminal"), "yes", '"terminal" must be true or false'),
        (("changes", 0), "x", '"changes" entry 0: a change must be an object'),
        (("changes", 0), None, '"changes" entry 0: a change must be an object'),
        (("changes", 0, "id"), 5, '"changes" entry 0: a change\'s "id" must be a string'),
    ],
)
def test_items_inside_states_and_changes_are_checked_on_load(
    tmp_path: Path, field: tuple[Any, ...], value: Any, says: str
) -> None:
    doc = copy.deepcopy(BASE)
    target = doc
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    path = tmp_path / "run.json"
    path.write_bytes(orjson.dumps(doc))
    with pytest.raises(jorb.CorruptRunError) as refused:
        jorb.Run.load(path)
    assert says in str(refused.value)
    for command in (["status"], ["graph"], ["jobs"]):
        output = _run(path, command)
        assert "unexpected" not in output and says in output


def test_a_journal_record_with_an_error_that_is_no_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    with jorb.Run.open(path) as run:
        run.add_job({}, "a")
        run.save()
    header = b'{"journal":1,"seq":0,"length":%d,"crc":%d}\n' % (
        len(path.read_bytes()),
        __import__("zlib").crc32(path.read_bytes()),
    )
    record = {"seq": 1, "job": "1", "in": "a", "to": "a", "attempts": 1, "error": "boom"}
    journal_path(path).write_bytes(header + orjson.dumps(record) + b"\n")
    output = _run(path, ["status"])
    assert "unexpected" not in output
    assert "line 2, record seq 1, does not fit the run file" in output


def test_user_data_reaches_the_terminal_escaped_and_without_markup(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    doc["states"].append({"name": HOSTILE, "terminal": False})
    doc["jobs"][0]["state"] = HOSTILE
    doc["jobs"][0]["id"] = "[/bold]"
    doc["jobs"][1]["parent"] = "[/bold]"
    doc["jobs"][0]["ctx"] = {"note": HOSTILE}
    doc["jobs"][0]["errors"] = {HOSTILE: [{"message": HOSTILE, "traceback": HOSTILE + "\n"}]}
    doc["changes"][0]["who"] = HOSTILE
    path = tmp_path / "run.json"
    path.write_bytes(orjson.dumps(doc))
    for command in (["status"], ["jobs"], ["show", "[/bold]"], ["show", "2"], ["graph"]):
        output = _run(path, command)
        assert "unexpected" not in output, (command, output)
        assert ESC not in output and "\x9b" not in output and "\u202e" not in output, command
        assert "\\x1b" in output or "\\u001b" in output, (command, output)
    assert "[/bold]" in _run(path, ["jobs"])
    error = _run(path, ["show", "no\x1b[2Jsuch"])
    assert ESC not in error and "no\\x1b[2Jsuch" in error


def test_show_prints_the_ctx_as_indented_json_with_its_controls_escaped(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    doc["jobs"][0]["ctx"] = {"repo": "acme/x", "files": ["a.py"], "note": "line\nbreak\u202e"}
    path = tmp_path / "run.json"
    path.write_bytes(orjson.dumps(doc))

    output = _run(path, ["show", "1"])

    assert '  "repo": "acme/x",\n' in output  # one key per line, as the run file has it
    assert "\\u000a" not in output  # the indent's line breaks are not escaped
    assert '"note": "line\\nbreak\\u202e"' in output  # a line break inside a value is JSON's
    assert "\u202e" not in output


def test_safe_escapes_controls_and_keeps_what_is_printable() -> None:
    assert safe("plain ünïcode 日本 [b]") == "plain ünïcode 日本 [b]"
    assert safe("a\x1b[31mb\x07\x7f\x85\u202e") == "a\\x1b[31mb\\x07\\x7f\\x85\\u202e"
    assert safe("two\nlines\tand\x1b", lines=True) == "two\nlines\tand\\x1b"
    assert safe("two\nlines") == "two\\x0alines"
