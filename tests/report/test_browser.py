"""The report in a real browser (headless Chromium through Playwright): it loads with no network request and no
console error, each chart draws as many marks as the results hold, and hovering a point shows its tooltip.

Needs the ``playwright`` package and Debian's ``chromium`` (``/usr/bin/chromium``, or ``KRADAPTER_CHROMIUM``);
skipped, naming what is missing, without them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from kradapter.report import build_report

CHROMIUM = os.environ.get("KRADAPTER_CHROMIUM", "/usr/bin/chromium")
MARKS = "#{id} g.mark-{kind}.role-mark {element}"  # Vega's SVG: one element per drawn item of a mark


def _browser_or_skip() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install playwright)")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set KRADAPTER_CHROMIUM)")
    return sync_playwright


def expected_marks(kind: str, results: dict[str, Any]) -> dict[str, int]:
    """Point marks each chart must draw, counted from the results file itself."""
    if kind == "compare":
        runs = [
            run
            for entry in results["results"].values()
            for result in entry["methods"].values()
            for run in (result.get("runs") or {}).values()
        ]
        paired = sum(
            sum(1 for m, r in entry["methods"].items() if m != "kradapter" and len(r.get("runs") or {}) >= 2)
            for entry in results["results"].values()
        )
        return {"runs": len(runs), "pareto": len(runs), "forest": paired}
    if kind == "finetune":
        n = sum(len(by_seed) for by_seed in results["runs"].values())
        others = sum(1 for m, by_seed in results["runs"].items() if m != "kradapter" and len(by_seed) >= 2)
        return {"runs": n, "pareto": n, "forest": 2 * others}  # accuracy and macro F1
    cells = [cell for bench in results["benchmarks"].values() for cell in bench["cells"].values()]
    n = sum(len(by_seed) for cell in cells for by_seed in cell["runs"].values())
    if "primary" in results:  # the current document: tested primary endpoints and exploratory contrasts
        entries = results["primary"]["endpoints"] + [e for f in results["exploratory"]["contrasts"].values() for e in f]
        runs = [r for c in cells for by_seed in c["runs"].values() for r in by_seed.values()]
        timed = sum(1 for r in runs if r.get("train_time_s") is not None)  # the Pareto front's x
        return {"runs": n, "pareto": timed, "forest": sum(1 for e in entries if "t" in e)}
    paired = sum(len(by_other) for cell in cells for by_other in cell["paired"].values())
    return {"runs": n, "pareto": n, "forest": paired}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["compare", "finetune", "shift", "shift_v2"])
def test_report_in_chromium(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    sync_playwright = _browser_or_skip()
    folder: Path = request.getfixturevalue(f"{kind}_dir")
    name = {"compare": "experimental", "finetune": "finetune"}.get(kind, "shift") + "_results.json"
    results = json.loads((folder / name).read_text())
    page_path = build_report(folder, tmp_path / "report.html")
    want = expected_marks(kind, results)

    requests: list[str] = []
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})

            def route(r: Any) -> None:
                requests.append(r.request.url)
                if r.request.url.startswith("file://"):
                    r.continue_()
                else:
                    r.abort()

            page.route("**/*", route)
            page.on(
                "console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None
            )
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(page_path.as_uri())
            page.wait_for_function("window.reportReady !== undefined")
            page.evaluate("window.reportReady")

            charts = page.eval_on_selector_all("div.chart", "els => els.map(e => [e.id, +e.dataset.marks])")
            assert charts, "no chart on the page"
            for chart_id, marks in charts:
                key = chart_id.removeprefix("chart-")
                drawn = page.eval_on_selector_all(
                    MARKS.format(id=chart_id, kind="symbol", element="path"), "e => e.length"
                )
                assert drawn == marks > 0, (chart_id, drawn, marks)
                if key in want:
                    assert marks == want[key], (chart_id, marks, want[key])
                if key == "forest":  # one interval rule per point, plus the zero line
                    rules = page.eval_on_selector_all(
                        MARKS.format(id=chart_id, kind="rule", element="line"), "e => e.length"
                    )
                    assert rules == marks + 1
            assert {c[0] for c in charts} >= {"chart-runs", "chart-pareto", "chart-layers", "chart-spectra"}

            point = page.query_selector(MARKS.format(id="chart-runs", kind="symbol", element="path"))
            assert point is not None
            box = point.bounding_box()
            assert box is not None
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            tooltip = page.wait_for_selector("#vg-tooltip-element.visible", timeout=5000)
            text = tooltip.inner_text()
            for field in ("method", "settings", "seed", "value"):
                assert field in text, text
        finally:
            browser.close()
    assert requests == [page_path.as_uri()], requests
    assert problems == [], problems
