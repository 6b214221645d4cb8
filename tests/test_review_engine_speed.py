"""Review of ea810ce..8a02ba9 (engine-speed): failing tests for what it changed in behaviour.

Each is marked xfail(strict=True) with its reason, so the suite stays green until it is fixed.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import orjson
import pytest

import jorb
from jorb import report

T0 = 1_800_000_000.0


def _saved(path: Path, ids: int, state: str = "a") -> bytes:
    run = jorb.Run(path, {})
    for i in range(ids):
        run.add_job({"i": i}, state)
    run.save()
    return path.read_bytes()


# -- Run.read_jobs: next_id -------------------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="read_jobs skips a piece whose ids are all shorter than str(next_id); with a "
    'hand-written negative next_id ("-1", two characters) every one-digit id is skipped, the '
    "counter is not moved past them, and the next add_job reuses id '1' (overwriting job 1)",
)
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


# -- Run.read_jobs: which problem a corrupt file is refused for --------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="read_jobs now checks every malformed job of a list before it looks for repeated "
    "ids, so a repeat at jobs[1] is reported as the malformed jobs[4] further on: no longer "
    "the file's first problem (what the whole-parse fallback is for)",
)
def test_the_first_problem_in_the_file_is_the_one_reported(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    doc = orjson.loads(_saved(path, 5))
    doc["jobs"][1]["id"] = "1"  # jobs[1] repeats jobs[0]'s id ...
    doc["jobs"][4]["state"] = 5  # ... and jobs[4], later in the file, is malformed
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    with pytest.raises(jorb.CorruptRunError, match="job id '1' appears twice"):
        jorb.Run.load(path)


# -- report.timings ---------------------------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="timings looks the source up with durations.get(source) before str(source): a "
    'hand-written entry whose "from" is a list or an object raises "unhashable type" (and '
    "`jorb status` exits with an unexpected TypeError)",
)
def test_timings_count_an_entry_whose_from_is_a_list_or_an_object_under_its_text(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.json"
    run = jorb.Run(path, {})
    job = run.add_job({}, "b")
    job.history = [
        {"from": ["a"], "to": "b", "time": T0, "duration": 1.0},
        {"from": {"x": 1}, "to": "b", "time": T0, "duration": 2.0},
    ]
    run.save()
    loaded = jorb.Run.load(path)  # it loads: the entries are kept as written
    timings = report.timings(loaded)
    assert timings["['a']"].total == 1.0 and timings["{'x': 1}"].total == 2.0
    assert report.graph(loaded).edges[("['a']", "b")] == 1


# -- loading and the cyclic garbage collector ---------------------------------------------------


class _Node:
    """Garbage only the cyclic collector frees (as a caught exception's traceback is)."""

    link: _Node | None = None


@pytest.mark.xfail(
    strict=True,
    reason="each load ends with gc.freeze(); gc.unfreeze(): every young object of the "
    "process, its cyclic garbage too, is moved to the oldest generation without counting "
    "toward a full collection, so a process that loads a run now and then (a dashboard, an "
    "exec checking the file) never frees its cyclic garbage again: it only grows",
)
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
