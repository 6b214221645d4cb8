"""The HTML report, opened in a real headless browser (Debian's chromium, through Playwright).

The page must open offline (any request leaving the file fails the test), log no error, and
draw the graph and every chart; its screenshot is kept in ``test-artifacts/report.png``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from report_browser import ROOT, chromium, example_report, open_report
from typer.testing import CliRunner

import jorb
from jorb import report, report_html
from jorb.cli import app

ARTIFACTS = Path(os.environ.get("JORB_ARTIFACTS", ROOT / "test-artifacts"))

MIGRATE_STATES = [
    "new",
    "edit",
    "lint",
    "commit",
    "push",
    "open_pr",
    "wait_ci",
    "done",
    "unchanged",
    "lint_ok",
    "lint_failed",
    "clone_failed",
    "push_failed",
    "ci_failed",
    "failed",
    "cancelled",
]


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``./dev.sh example``'s run and its report, written by ``jorb report``."""
    return example_report(tmp_path_factory.mktemp("report"))


def test_the_report_of_a_real_run_draws_in_a_browser_offline_without_errors(
    example: Path, tmp_path: Path
) -> None:
    if chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium in CI: ./dev.sh test installs it (apt-get install chromium)")
        pytest.skip("no chromium here: apt-get install chromium (./dev.sh test does, as root)")
    page = open_report(example, tmp_path / "report.png")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "report.png", ARTIFACTS / "report.png")
    assert page.errors == []
    assert page.nodes == MIGRATE_STATES  # every state, in declaration order
    run = jorb.Run.load(example.parent / "runs" / "migrate.json")
    g = report.graph(run)
    assert page.edges == len(g.edges) + len(g.kicks) + len(g.redrives) > 10
    assert set(page.charts) == {"chart-throughput", "chart-errors", "chart-durations"}
    lanes = [name for name, terminal, _ in g.nodes if terminal is False]
    assert page.charts["chart-throughput"] == len(lanes)  # a line per state that ran execs
    assert page.charts["chart-durations"] == len(lanes)
    assert page.charts["chart-errors"] == 2  # new and push fail now and then
    assert all(marks > 0 for marks in page.marks.values()), page.marks
    png = (tmp_path / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 50_000


def test_the_report_is_one_file_with_everything_in_it(example: Path) -> None:
    page = example.read_text()
    assert "<script src" not in page and "<link" not in page  # nothing fetched
    assert page.count("<script>") == 2  # plotly.js, then the charts
    run = jorb.Run.load(example.parent / "runs" / "migrate.json")
    for summary in report.errors(run):
        for group in summary.common:
            assert ", ".join(group.jobs) in page  # example job ids of each error group


def test_user_text_in_the_report_is_escaped(tmp_path: Path) -> None:
    run = jorb.Run(tmp_path / "run.json")
    run.declared = [
        {"name": "<b>x</b>", "terminal": False},
        {"name": "done</script>", "terminal": True},
    ]
    job = run.add_job({}, "done</script>")
    job.history = [("<b>x</b>", "done</script>", 1_800_000_000.0, 1.5)]
    job.errors = {"<b>x</b>": [{"message": "<img src=x>", "type": "E", "time": 1_799_999_999.0}]}
    page = report_html.render(run)
    assert "<b>x</b>" not in page and "<img src=x>" not in page
    assert "done</script>" not in page
    assert "&lt;img src=x&gt;" in page


def test_jorb_report_writes_the_file_beside_the_run_by_default(
    example: Path, tmp_path: Path
) -> None:
    run = tmp_path / "m.json"
    shutil.copy(example.parent / "runs" / "migrate.json", run)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {tmp_path / 'm.html'} (")
    assert "<svg" in (tmp_path / "m.html").read_text()


def test_a_run_that_never_executed_still_has_a_report(tmp_path: Path) -> None:
    run = jorb.Run(tmp_path / "run.json")
    run.add_job({})
    page = report_html.render(run)
    assert "never executed" in page
    assert page.count("nothing to show yet") == 3  # no chart without a transition
    assert "no errors recorded" in page
    assert 'data-state="new"' in page  # the graph still shows where the job is


def test_the_graphs_labels_cover_no_state_and_no_other_label(example: Path) -> None:
    import xml.etree.ElementTree as ET

    from jorb import svg

    run = jorb.Run.load(example.parent / "runs" / "migrate.json")
    drawing = ET.fromstring(svg.draw(report.graph(run)))
    ns = "{http://www.w3.org/2000/svg}"

    def box(rect: ET.Element) -> tuple[float, float, float, float]:
        x, y = float(rect.get("x", 0)), float(rect.get("y", 0))
        return x, y, x + float(rect.get("width", 0)), y + float(rect.get("height", 0))

    nodes = [box(r) for g in drawing.iter(f"{ns}g") if "node" in g.get("class", "") for r in g]
    nodes = [b for b in nodes if b[2] > b[0]]  # (the rects; titles and texts have no width)
    labels = [box(r) for r in drawing.findall(f"{ns}rect")]  # the labels sit at the top level
    states = len(MIGRATE_STATES)
    assert len(nodes) == states
    assert len(labels) == len(drawing.findall(f"{ns}g[@class]")) - states

    def overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    for i, label in enumerate(labels):
        assert not any(overlap(label, node) for node in nodes)
        assert not any(overlap(label, other) for other in labels[i + 1 :])
