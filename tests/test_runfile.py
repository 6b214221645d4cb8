"""Reading a run file in pieces gives exactly the run a whole parse gives, or is not used."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import orjson
import pytest
from conftest import job_dict

import jorb
from jorb import checkpoint, runfile
from jorb.model import Step

T0 = 1_795_000_000.0


def _varied(path: Path) -> bytes:
    """A saved run with every kind of job a file holds, and text that looks like its layout."""
    run = jorb.Run(path, {"workdir": "/w", "note": '\n    },\n    {\n  "jobs": [\n'})
    run.declared = [{"name": "a", "terminal": False}, {"name": "done", "terminal": True}]
    run.paused = {"a"}
    run.changes = [{"id": "c1", "what": "redrove 1 job(s) 'a' -> 'done'", "applied": T0 + 9}]
    plain = run.add_job({"i": 0, "text": "ünïcode ✓ \\n    },\n    {"}, "done")
    plain.history = [Step("new", "a", T0, 0.5), Step("a", "done", T0 + 1, 0.25)]
    kid = run.add_job({"i": 1, "nested": {"deep": [{"x": [1, 2, {"y": None}]}]}}, "a")
    kid.parent, kid.priority, kid.not_before, kid.attempts, kid.throttled = "1", 3, T0 + 60, 2, 1
    kid.errors = {"a": [{"message": "boom", "type": "OSError", "time": T0, "attempt": 1}]}
    kid.history = [
        Step("done", "a", T0 + 9, 0.0, "c1"),  # a redrive
        {"from": "new", "to": "a"},  # written by hand: no time, no duration
        {"from": "a", "to": "a", "time": 5, "duration": 0, "note": "by hand"},
    ]
    for i in range(2, 40):
        job = run.add_job({"i": i}, "done")
        job.history = [Step("new", "done", T0 + i, 0.001 * i)]
    del run.jobs["7"]
    run.save()
    return path.read_bytes()


def _same(a: jorb.Run, b: jorb.Run) -> None:
    assert (a.overall, a.declared, a.paused, a.changes) == (
        b.overall,
        b.declared,
        b.paused,
        b.changes,
    )
    assert (a.seq, a.next_id, list(a.jobs)) == (b.seq, b.next_id, list(b.jobs))
    assert [job_dict(j) for j in a.jobs.values()] == [job_dict(j) for j in b.jobs.values()]


@pytest.mark.parametrize("piece", [1, 100, 1 << 16])
def test_pieces_read_exactly_what_a_whole_parse_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int
) -> None:
    path = tmp_path / "run.json"
    data = _varied(path)
    monkeypatch.setattr(runfile, "PIECE", piece)
    with path.open("rb") as file:
        read = runfile.read_pieces(file, path)
    assert read is not None, "a file jorb wrote is read in pieces"
    run, length, crc = read
    assert (length, crc) == (len(data), zlib.crc32(data))
    _same(run, checkpoint.decode_run(data, path))
    assert checkpoint.encode_run(run) == data  # and it writes back byte for byte
    assert run.jobs["2"].history[1] == {"from": "new", "to": "a"}  # as written by hand


@pytest.mark.parametrize(
    "layout",
    [
        lambda doc: json.dumps(doc, indent=4),
        lambda doc: json.dumps(doc),
        lambda doc: json.dumps({"jobs": doc.pop("jobs"), **doc}, indent=2),  # "jobs" first
    ],
    ids=["indent 4", "one line", "jobs first"],
)
def test_a_file_in_another_layout_is_read_whole_to_the_same_run(
    tmp_path: Path, layout: object
) -> None:
    path = tmp_path / "run.json"
    original = checkpoint.decode_run(_varied(path), path)
    assert callable(layout)
    path.write_text(layout(orjson.loads(path.read_bytes())))
    with path.open("rb") as file:
        assert runfile.read_pieces(file, path) is None
    _same(jorb.Run.load(path), original)


def test_a_cut_that_falls_inside_a_hand_edited_job_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Edited by hand: job 1's ctx closes an object at four spaces, like a job's end does.
    path = tmp_path / "run.json"
    path.write_text(
        '{\n  "format": "jorb-run",\n  "version": 1,\n  "jobs": [\n'
        '    {"id": "1", "state": "a", "ctx": {"x": {\n    },\n    "y": 1}},\n'
        '    {"id": "2", "state": "a", "ctx": {}}\n  ]\n}\n'
    )
    monkeypatch.setattr(runfile, "PIECE", 8)
    with path.open("rb") as file:
        assert runfile.read_pieces(file, path) is None
    run = jorb.Run.load(path)
    assert {i: j.ctx for i, j in run.jobs.items()} == {"1": {"x": {}, "y": 1}, "2": {}}
