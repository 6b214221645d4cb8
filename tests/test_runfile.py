"""Reading a run file in pieces gives exactly the run a whole parse gives, or is not used."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref
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
    plain.history = [("new", "a", T0, 0.5), ("a", "done", T0 + 1, 0.25)]
    kid = run.add_job({"i": 1, "nested": {"deep": [{"x": [1, 2, {"y": None}]}]}}, "a")
    kid.parent, kid.priority, kid.not_before, kid.attempts, kid.throttled = "1", 3, T0 + 60, 2, 1
    kid.errors = {"a": [{"message": "boom", "type": "OSError", "time": T0, "attempt": 1}]}
    kid.history = [
        Step("done", "a", T0 + 9, 0.0, "c1"),  # a redrive, as a script may put a Step there
        {"from": "new", "to": "a"},  # written by hand: no time, no duration
        {"from": "a", "to": "a", "time": 5, "duration": 0, "note": "by hand"},
    ]
    for i in range(2, 40):
        job = run.add_job({"i": i}, "done")
        job.history = [("new", "done", T0 + i, 0.001 * i)]
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
    with path.open("rb") as file:  # with no journal to match, no checksum is taken
        unsummed = runfile.read_pieces(file, path, checksum=False)
    assert unsummed is not None and unsummed[1:] == (len(data), None)
    _same(unsummed[0], run)


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


@pytest.mark.parametrize("piece", [4096, 1 << 16])
def test_a_crlf_file_and_a_job_bigger_than_a_piece_load_like_a_whole_parse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int
) -> None:
    # A CRLF file never shows jorb's layout, and a job bigger than a piece has no cut in it:
    # both are read to the end before anything is parsed. (They once made the reader copy and
    # search everything read so far at every block: quadratic, 37 s for a 56 MB CRLF file.)
    monkeypatch.setattr(runfile, "PIECE", piece)
    path = tmp_path / "run.json"
    run = jorb.Run(path, {})
    for i in range(3000):
        run.add_job({"repo": f"acme/service-{i:06d}"}, "done")
    run.add_job({"blob": "x" * (3 * piece)}, "a")
    big = checkpoint.encode_run(run)
    for data in (big, big.replace(b"\n", b"\r\n")):
        path.write_bytes(data)
        _same(jorb.Run.load(path), checkpoint.decode_run(data, path))


def test_a_damaged_file_gets_the_error_a_whole_parse_gives(tmp_path: Path) -> None:
    # Two hand edits: job 2's "state" misspelt, and a trailing comma after the last job. The
    # pieces meet the first long before the second, but the user is told what a whole parse
    # says (the syntax error, with its line and column), not one problem at a time.
    path = tmp_path / "run.json"
    run = jorb.Run(path, {})
    for i in range(3000):  # ~200 KB: several pieces
        run.add_job({"i": i}, "a")
    data = checkpoint.encode_run(run)
    second = data.find(b'"state"', data.find(b'"state"') + 1)
    data = data[:second] + b'"sate"' + data[second + len(b'"state"') :]
    end = data.rfind(b"\n    }")
    data = data[: end + 6] + b"," + data[end + 6 :]
    path.write_bytes(data)
    assert len(data) > 2 * runfile.PIECE
    with pytest.raises(jorb.CorruptRunError) as whole:
        checkpoint.decode_run(data, path)
    assert "not valid JSON at line" in str(whole.value)
    with pytest.raises(jorb.CorruptRunError) as loaded:
        jorb.Run.load(path)
    assert str(loaded.value) == str(whole.value)


@pytest.mark.parametrize("ident", ["²", "①", "1" * 5000])
def test_any_hand_written_job_id_loads(tmp_path: Path, ident: str) -> None:
    # Any non-empty string is an id. "²".isdigit() is True but int("²") fails, as does a
    # number past Python's 4300-digit limit: neither may crash the load (it once did, with a
    # bare ValueError), and neither moves the id counter.
    path = tmp_path / "run.json"
    run = jorb.Run(path, {})
    run.add_job({}, "a")
    run.save()
    path.write_bytes(path.read_bytes().replace(b'"id": "1"', b'"id": ' + orjson.dumps(ident)))
    loaded = jorb.Run.load(path)
    assert list(loaded.jobs) == [ident] and loaded.next_id == 2


@pytest.mark.parametrize("piece", [100, 1 << 16])
def test_hand_written_ids_move_the_counter_and_a_repeat_is_refused_from_any_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int
) -> None:
    # The counter looks closely only at ids at least as long as itself ("41"): one edited in
    # ("99", as long) must move it, "0009" (longer, a smaller number) must not, nor "²".
    monkeypatch.setattr(runfile, "PIECE", piece)
    path = tmp_path / "run.json"
    data = _saved(path, 40)
    for edits, counter in [({b"3": b"99"}, 100), ({b"3": b"0009", b"5": "²".encode()}, 41)]:
        edited = data
        for old, new in edits.items():
            edited = edited.replace(b'"id": "%s"' % old, b'"id": "%s"' % new)
        path.write_bytes(edited)
        loaded = jorb.Run.load(path)
        assert loaded.next_id == counter
        assert loaded.add_job({}, "a").id == str(counter)
        assert {new.decode() for new in edits.values()} <= loaded.jobs.keys()
        assert len(loaded.jobs) == 41

    for first, second in [(b"2", b"38"), (b"37", b"38")]:  # pieces apart, and side by side
        path.write_bytes(data.replace(b'"id": "%s"' % second, b'"id": "%s"' % first))
        with pytest.raises(jorb.CorruptRunError, match=f"job id '{first.decode()}' appears twice"):
            jorb.Run.load(path)


@pytest.mark.parametrize("piece", [100, 1 << 16])
def test_a_piece_with_a_job_read_one_by_one_keeps_the_files_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int
) -> None:
    # A number as an id ("id": 20) is valid but unusual: its piece is read a job at a time,
    # between pieces whose jobs are added to the run together at the end.
    monkeypatch.setattr(runfile, "PIECE", piece)
    path = tmp_path / "run.json"
    data = _saved(path, 40).replace(b'"id": "20"', b'"id": 20')
    path.write_bytes(data)
    with path.open("rb") as file:
        read = runfile.read_pieces(file, path)
    assert read is not None
    assert list(read[0].jobs) == [str(i) for i in range(1, 41)]
    _same(read[0], checkpoint.decode_run(data, path))


def test_a_loaded_run_goes_to_the_collectors_oldest_generation_unwalked(tmp_path: Path) -> None:
    # Built with the collector paused, the jobs would all be "young": the first collection
    # after the load would walk every one. They are handed to the oldest generation instead,
    # and a process's own frozen objects stay frozen.
    path = tmp_path / "run.json"
    run = jorb.Run(path, {})
    for i in range(50):
        run.add_job({"i": i}, "a").history.append(("new", "a", T0, 0.5))
    run.save()
    gc.collect()
    loaded = jorb.Run.load(path)
    young = {id(obj) for obj in gc.get_objects(generation=0)}
    oldest = {id(obj) for obj in gc.get_objects(generation=2)}
    jobs = {id(job) for job in loaded.jobs.values()}
    assert len(jobs) == 50 and not young & jobs and jobs <= oldest

    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        jorb.Run.load(path)
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def _saved(path: Path, ids: int, state: str = "a") -> bytes:
    run = jorb.Run(path, {})
    for i in range(ids):
        run.add_job({"i": i}, state)
    run.save()
    return path.read_bytes()


def test_a_hand_written_negative_next_id_still_moves_past_every_numeric_id(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.json"
    doc = orjson.loads(_saved(path, 3))
    doc["next_id"] = -1
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    loaded = jorb.Run.load(path)
    assert loaded.next_id == 4  # as before: past "1", "2" and "3"
    fresh = [loaded.add_job({"new": k}, "a").id for k in range(3)]
    assert not set(fresh) & {"1", "2", "3"} and len(loaded.jobs) == 6


def test_the_first_problem_in_the_file_is_the_one_reported(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    doc = orjson.loads(_saved(path, 5))
    doc["jobs"][1]["id"] = "1"  # jobs[1] repeats jobs[0]'s id ...
    doc["jobs"][4]["state"] = 5  # ... and jobs[4], later in the file, is malformed
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    with pytest.raises(jorb.CorruptRunError, match="job id '1' appears twice"):
        jorb.Run.load(path)


class _Node:
    """Garbage only the cyclic collector frees (as a caught exception's traceback is)."""

    link: _Node | None = None


def test_loading_runs_over_and_over_does_not_keep_the_process_cyclic_garbage(
    tmp_path: Path,
) -> None:
    # The collector's young generations are what frees a process's cyclic garbage as it
    # goes; garbage moved to the oldest waits for a full collection, which objects moved
    # there by gc.unfreeze() never bring nearer (they do not count toward one).
    path = tmp_path / "run.json"
    _saved(path, 20)
    gc.collect()
    refs = []
    for _ in range(3):
        node = _Node()
        node.link = node
        refs.append(weakref.ref(node))
        del node
        jorb.Run.load(path)
    gc.collect(1)  # the young generations, as the collector runs them on its own
    alive = sum(ref() is not None for ref in refs)
    gc.collect()
    assert alive == 0, f"{alive} of {len(refs)} garbage cycles left for a full collection"


# -- writing: a run is encoded and written a chunk of jobs at a time ---------------------------


@pytest.mark.parametrize("chunk", [1, 2, 3, 38, 39, 1000])
def test_a_run_written_in_chunks_is_byte_for_byte_the_whole_encoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    path = tmp_path / "run.json"
    _varied(path)  # 39 jobs: chunks of 1, 2, 3, all but one, all, and more than all
    assert len(jorb.Run.load(path).jobs) == 39
    run = jorb.Run.load(path)
    whole = orjson.dumps(
        run.to_document(),
        default=jorb.model.json_default,
        option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE,
    )
    monkeypatch.setattr(checkpoint, "ENCODE_CHUNK", chunk)
    pieces = list(checkpoint.encode_pieces(run))
    assert b"".join(pieces) == whole
    # Each chunk of jobs is a piece of its own (after the text before it): never the whole.
    assert len(pieces) == 2 * -(-len(run.jobs) // chunk) + 1
    empty = jorb.Run(tmp_path / "empty.json", {"x": 1})
    assert b"".join(checkpoint.encode_pieces(empty)) == orjson.dumps(
        empty.to_document(), option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE
    )


def test_a_job_that_cannot_be_written_midway_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.json"
    before = _varied(path)
    run = jorb.Run.open(path)
    run.jobs["30"].ctx["when"] = {1, 2}  # a set: not JSON, in a late chunk
    monkeypatch.setattr(checkpoint, "ENCODE_CHUNK", 2)
    monkeypatch.setattr(checkpoint, "_SMALL", 1)  # every piece its own write
    written: list[int] = []
    real_write = checkpoint.os.write

    def write(fd: int, data: bytes) -> int:
        written.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(checkpoint.os, "write", write)
    with pytest.raises(jorb.CheckpointError, match=r"cannot be written as JSON \(job 30: "):
        run.save()
    assert len(written) > 5, "the chunks before the bad job were written to the temp file"
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.json.lock"]
    run.close()


def test_encoding_a_run_never_has_the_collector_walk_its_documents(tmp_path: Path) -> None:
    # Each chunk's job documents (a dict per job, a list of history objects) are built with
    # the cyclic GC off and freed before it is back on: no collection ever walks them (which,
    # in an exec, also pushed full collections of the run). The history objects come from a
    # pool kept for the whole encoding (untracked dicts): growing it may set off one young
    # collection, which finds none of them.
    run = jorb.Run(tmp_path / "run.json")
    for i in range(5 * checkpoint.ENCODE_CHUNK):
        job = run.add_job({"i": i}, "done")
        job.history = [("new", "a", T0, 0.5), ("a", "done", T0 + 1, 0.25)]
    found: list[int] = []  # per collection: the documents and history objects it would walk

    def look(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            walked = gc.get_objects(info["generation"])
            found.append(sum(type(o) is dict and ("ctx" in o or "from" in o) for o in walked))

    thresholds = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # CPython's defaults, whatever the test runner set
    gc.collect()
    gc.callbacks.append(look)
    try:
        for _ in checkpoint.encode_pieces(run):
            pass
    finally:
        gc.callbacks.remove(look)
        gc.set_threshold(*thresholds)
    assert len(found) <= 1
    assert found == [0] * len(found)


_PEAK_OF_A_SAVE = """
import gc, sys
from pathlib import Path
import jorb

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

run = jorb.Run(Path(sys.argv[1]))
run.add_job({"blob": "x" * (64 << 20)}, "new")  # one job whose ctx is huge
for i in range(10):
    run.add_job({"i": i}, "new")
gc.collect()
before = rss("VmRSS:")
run.save()
print((rss("VmHWM:") - before) / Path(sys.argv[1]).stat().st_size)
"""


def test_writing_a_run_holds_its_bytes_in_memory_at_most_once(tmp_path: Path) -> None:
    # A run of fewer than ENCODE_CHUNK jobs (or one huge ctx) is a single chunk: encoded, then
    # joined with its "before" and "after" into a second copy. The whole orjson.dumps of the
    # previous version peaked at one copy of the file; "never whole in memory" should not
    # mean twice.
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_OF_A_SAVE, str(tmp_path / "run.json")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(proc.stdout) < 1.5, "the peak of a save, in copies of the file"
