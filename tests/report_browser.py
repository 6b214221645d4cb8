"""Open an HTML report in a real headless browser: what it drew, what it logged, a screenshot.

Debian's chromium (``apt-get install chromium``; ``./dev.sh test`` installs it when it runs as
root), driven by Playwright's Python package; never a browser build of Playwright's own.

Run as a script, it makes the README's screenshot from ``./dev.sh example``'s run::

    .venv/bin/python tests/report_browser.py          # writes docs/report.png
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def chromium() -> str | None:
    """The system's chromium, if there is one."""
    return os.environ.get("JORB_CHROMIUM") or shutil.which("chromium")


@dataclass
class Page:
    """What the browser made of a report."""

    errors: list[str]
    """Console errors, uncaught exceptions, and requests that tried to leave the file."""
    nodes: list[str]
    """The graph's state names, as drawn."""
    edges: int
    """Edges drawn in the graph."""
    charts: dict[str, int]
    """Per chart (its element id), how many traces plotly drew."""
    marks: dict[str, int]
    """Per chart, how many points, lines and bars it drew."""


# What the page drew: plotly's SVG, the graph's nodes; read after every chart has plotted.
_READ = """() => {
  const charts = {}, marks = {};
  for (const div of document.querySelectorAll('.chart')) {
    charts[div.id] = div.querySelectorAll('.main-svg g.trace').length;
    marks[div.id] = div.querySelectorAll(
      '.main-svg g.trace path.js-line, .main-svg g.trace path.point, .main-svg g.points path'
    ).length;
  }
  const graph = document.querySelector('.graph svg');
  return {
    charts, marks,
    nodes: [...graph.querySelectorAll('g.node')].map(n => n.dataset.state),
    edges: graph.querySelectorAll('g.edge path').length,
  };
}"""


def open_report(html: Path, screenshot: Path, *, width: int = 1280) -> Page:
    """Load ``html`` offline (every request that is not the file itself fails and is counted
    as an error), wait until every chart has plotted, read what was drawn, save a screenshot."""
    from playwright.sync_api import sync_playwright

    executable = chromium()
    if executable is None:
        raise RuntimeError("no chromium: apt-get install chromium")
    errors: list[str] = []
    url = html.resolve().as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))

            def offline(route: object) -> None:
                request = route.request  # type: ignore[attr-defined]
                if request.url == url:
                    route.continue_()  # type: ignore[attr-defined]
                else:
                    errors.append(f"request left the file: {request.url}")
                    route.abort()  # type: ignore[attr-defined]

            page.route("**/*", offline)
            page.goto(url)
            page.wait_for_function(
                "[...document.querySelectorAll('.chart')]"
                ".every(d => d.querySelector('.main-svg g.trace'))",
                timeout=30_000,
            )
            drawn = page.evaluate(_READ)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return Page(errors, drawn["nodes"], drawn["edges"], drawn["charts"], drawn["marks"])


def example_report(directory: Path) -> Path:
    """Run ``examples/migrate.py`` (as ``./dev.sh example`` does) into ``directory`` and write
    its report there."""
    python = sys.executable
    subprocess.run(  # (in directory, so that the report names it runs/migrate.json)
        [python, str(ROOT / "examples" / "migrate.py"), "--run", "runs/migrate.json", "--fresh"],
        check=True,
        capture_output=True,
        cwd=directory,
    )
    jorb_command = Path(python).with_name("jorb")  # the console script beside this python
    subprocess.run(
        [str(jorb_command), "report", "runs/migrate.json", "-o", "migrate.html"],
        check=True,
        capture_output=True,
        cwd=directory,
    )
    return directory / "migrate.html"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        html = example_report(Path(tmp))
        page = open_report(html, ROOT / "docs" / "report.png")
    if page.errors:
        raise SystemExit(f"the report logged errors: {page.errors}")
    print(f"wrote {ROOT / 'docs' / 'report.png'}: {len(page.nodes)} states, charts {page.charts}")


if __name__ == "__main__":
    main()
