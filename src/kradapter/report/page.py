"""The report page: Altair (Vega-Lite) charts and HTML tables in one self-contained file.

Every chart is an Altair spec; the Vega, Vega-Lite and vega-embed JavaScript comes from vl-convert-python's bundle
(``vl_convert.javascript_bundle``), inlined once, so the page makes no network request. Each chart's container
carries ``data-marks``: how many point (or rule) marks it must draw with its initial selections, which the browser
tests compare with what Vega rendered.
"""

from __future__ import annotations

import html
import json
from typing import Any, cast

from .data import ReportData

POINT_SIZE = 70
WIDTH = 560


def pareto_flags(points: list[tuple[float, float]], higher_is_better: bool) -> list[bool]:
    """Whether each (cost, score) point is on the Pareto front: no other point has a cost as low and a score as
    good, one of them strictly (PEFT's method_comparison rule)."""
    flags = []
    for i, (cost, score) in enumerate(points):
        dominated = False
        for j, (c, s) in enumerate(points):
            if i == j:
                continue
            better_score = s > score if higher_is_better else s < score
            as_good = s >= score if higher_is_better else s <= score
            if c <= cost and as_good and (c < cost or better_score):
                dominated = True
                break
        flags.append(not dominated)
    return flags


def _tooltip(*extra: Any) -> list[Any]:
    import altair as alt

    return [
        alt.Tooltip("method:N"),
        alt.Tooltip("settings:N"),
        alt.Tooltip("seed:N"),
        alt.Tooltip("group:N", title="where"),
        *extra,
    ]


def runs_chart(data: ReportData) -> tuple[Any, int]:
    """Every run's score; a drop-down switches the metric."""
    import altair as alt

    rows = [
        {
            "method": r["method"],
            "seed": r["seed"],
            "settings": r["settings"],
            "group": r["group"],
            "metric": m,
            "value": v,
        }
        for r in data.runs
        for m, v in r["metrics"].items()
        if v is not None
    ]
    metrics = [m for m in data.metrics if any(row["metric"] == m for row in rows)]
    metric = alt.param(name="metric", value=metrics[0], bind=alt.binding_select(options=metrics, name="metric "))
    chart = (
        alt.Chart(alt.Data(values=rows))
        .mark_point(filled=True, size=POINT_SIZE)
        .encode(
            x=alt.X("value:Q", title="value of the chosen metric", scale=alt.Scale(zero=False)),
            y=alt.Y("method:N", title=None),
            color=alt.Color("method:N"),
            shape=alt.Shape("group:N", title="where"),
            tooltip=_tooltip(alt.Tooltip("metric:N"), alt.Tooltip("value:Q", format=".4f")),
        )
        .add_params(metric)
        .transform_filter(alt.datum.metric == metric)
        .properties(width=WIDTH, title="Every run (hover for method, settings, seed, value)")
    )
    return chart, sum(1 for row in rows if row["metric"] == metrics[0])


def pareto_chart(data: ReportData) -> tuple[Any, int]:
    """Score against each cost; a drop-down picks the cost; the front is drawn as a line through its runs."""
    import altair as alt

    rows = []
    for cost in data.costs:
        runs = [r for r in data.runs if r["costs"].get(cost) is not None and r["metrics"].get(data.primary) is not None]
        for group in sorted({r["group"] for r in runs}):
            members = [r for r in runs if r["group"] == group]
            flags = pareto_flags(
                [(float(r["costs"][cost]), float(r["metrics"][data.primary])) for r in members], data.higher_is_better
            )
            rows += [
                {
                    "method": r["method"],
                    "seed": r["seed"],
                    "settings": r["settings"],
                    "group": group,
                    "cost": cost,
                    "x": float(r["costs"][cost]),
                    "value": float(r["metrics"][data.primary]),
                    "front": flag,
                }
                for r, flag in zip(members, flags, strict=True)
            ]
    costs = [c for c in data.costs if any(row["cost"] == c for row in rows)]
    if not costs:
        return None, 0
    chosen = alt.param(name="cost", value=costs[0], bind=alt.binding_select(options=costs, name="cost axis "))
    base = alt.Chart(alt.Data(values=rows)).transform_filter(alt.datum.cost == chosen)
    points = base.mark_point(filled=True, size=POINT_SIZE).encode(
        x=alt.X("x:Q", title="cost (the chosen axis)", scale=alt.Scale(zero=False)),
        y=alt.Y("value:Q", title=data.primary, scale=alt.Scale(zero=False)),
        color=alt.Color("method:N"),
        shape=alt.Shape("front:N", title="on the Pareto front"),
        tooltip=_tooltip(
            alt.Tooltip("cost:N"), alt.Tooltip("x:Q", title="cost value"), alt.Tooltip("value:Q", format=".4f")
        ),
    )
    front = (
        base.transform_filter(alt.datum.front)
        .mark_line(color="black", strokeDash=[4, 3], point=False)
        .encode(x="x:Q", y="value:Q", detail="group:N", order="x:Q")
    )
    chart = (
        (front + points)
        .add_params(chosen)
        .properties(width=WIDTH, title=f"Pareto front: {data.primary} against time, memory, parameters")
    )
    return chart, sum(1 for row in rows if row["cost"] == costs[0])


def forest_chart(data: ReportData) -> tuple[Any, int]:
    """Paired differences (KRAdapter minus each method): the mean and its 95% interval, primary endpoints first."""
    import altair as alt

    if not data.paired:
        return None, 0
    order = [p["row"] for p in data.paired]
    base = alt.Chart(alt.Data(values=data.paired)).encode(
        y=alt.Y("row:N", sort=order, title=None, axis=alt.Axis(labelLimit=420))
    )
    tooltip = [
        alt.Tooltip("group:N", title="where"),
        alt.Tooltip("endpoint:N"),
        alt.Tooltip("against:N"),
        alt.Tooltip("mean:Q", format=".4f", title="KRAdapter minus it"),
        alt.Tooltip("low:Q", format=".4f"),
        alt.Tooltip("high:Q", format=".4f"),
        alt.Tooltip("n:Q", title="paired seeds"),
        alt.Tooltip("verdict:N"),
    ]
    rules = base.mark_rule(strokeWidth=2).encode(
        x=alt.X("low:Q", title="difference, 95% interval"),
        x2="high:Q",
        color=alt.Color("outcome:N", title="verdict"),  # one legend entry per word, not per MDE
        tooltip=tooltip,
    )
    points = base.mark_point(filled=True, size=POINT_SIZE, color="black").encode(x="mean:Q", tooltip=tooltip)
    zero = alt.Chart(alt.Data(values=[{"origin": 0}])).mark_rule(strokeDash=[2, 2], color="gray").encode(x="origin:Q")
    chart = (zero + rules + points).properties(
        width=WIDTH, height=max(60, 22 * len(order)), title="Paired intervals: KRAdapter minus each method"
    )
    return chart, len(data.paired)


def layers_chart(data: ReportData) -> tuple[Any, int]:
    """Effective rank of each adapted layer's update (or each matrix's), per method."""
    import altair as alt

    rows = [row for row in data.layers if row.get("effective_rank") is not None]
    if not rows:
        return None, 0
    groups = sorted({row["group"] for row in rows})
    group = alt.param(name="layers_group", value=groups[0], bind=alt.binding_select(options=groups, name="where "))
    chart = (
        alt.Chart(alt.Data(values=rows))
        .mark_point(filled=True, size=POINT_SIZE)
        .encode(
            x=alt.X(
                "layer:N",
                sort=None,
                title="layer" if data.kind != "compare" else "matrix",
                axis=alt.Axis(labels=data.kind == "compare"),
            ),
            y=alt.Y("effective_rank:Q", title="effective rank"),
            color=alt.Color("method:N"),
            tooltip=[
                alt.Tooltip("method:N"),
                alt.Tooltip("seed:N"),
                alt.Tooltip("layer:N"),
                alt.Tooltip("effective_rank:Q", format=".2f"),
            ],
        )
        .add_params(group)
        .transform_filter(alt.datum.group == group)
        .properties(width=WIDTH, title="Effective rank of the learned update, per layer")
    )
    return chart, sum(1 for row in rows if row["group"] == groups[0])


def spectra_chart(data: ReportData) -> tuple[Any, int]:
    """Singular values of one layer's (or matrix's) update per method, chosen from a drop-down, log scale."""
    import altair as alt

    rows = [row for row in data.spectra if row["value"] is not None and row["value"] > 0]
    if not rows:
        return None, 0
    layers = list(dict.fromkeys(row["layer"] for row in rows))
    layer = alt.param(name="spectrum_layer", value=layers[0], bind=alt.binding_select(options=layers, name="layer "))
    chart = (
        alt.Chart(alt.Data(values=rows))
        .mark_line(point=alt.OverlayMarkDef(filled=True, size=20))
        .encode(
            x=alt.X("index:Q", title="singular value index"),
            y=alt.Y("value:Q", title="singular value", scale=alt.Scale(type="log")),
            color=alt.Color("method:N"),
            tooltip=[
                alt.Tooltip("method:N"),
                alt.Tooltip("layer:N"),
                alt.Tooltip("index:Q"),
                alt.Tooltip("value:Q", format=".4g"),
            ],
        )
        .add_params(layer)
        .transform_filter(alt.datum.layer == layer)
        .properties(width=WIDTH, title="Spectra side by side")
    )
    return chart, sum(1 for row in rows if row["layer"] == layers[0])


CHARTS = (
    ("runs", "Runs", runs_chart),
    ("pareto", "Pareto front", pareto_chart),
    ("forest", "Paired intervals", forest_chart),
    ("layers", "Per-layer effective rank", layers_chart),
    ("spectra", "Spectra", spectra_chart),
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.banner { background: #fff3cd; border: 1px solid #e0c060; padding: .6em 1em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; } th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .8em; }
.vega-bind { margin: .3em 0; }
"""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("-" if value is None else str(value))


def render(data: ReportData) -> str:
    """The whole page as one HTML string."""
    import altair as alt
    import vl_convert

    version = alt.SCHEMA_VERSION.rsplit(".", 1)[0]
    bundle = cast(Any, vl_convert).javascript_bundle(vl_version=version)  # its stub wants a snippet
    parts = [f"<h1>{html.escape(data.title)}</h1>", f"<p>Results folder: <code>{html.escape(data.folder)}</code></p>"]
    if data.running:
        parts.append(
            f'<p class="banner" id="running">This run is still going ({html.escape(data.running)}): the report shows '
            "the results written so far.</p>"
        )
    specs: dict[str, Any] = {}
    for key, title, build in CHARTS:
        chart, marks = build(data)
        if chart is None:
            continue
        specs[key] = chart.to_dict()
        parts.append(f'<h2>{title}</h2><div class="chart" id="chart-{key}" data-marks="{marks}"></div>')
    parts.append("<h2>Tables</h2>")
    for table in data.tables:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table["columns"])
        body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in table["rows"])
        parts.append(f"<h3>{html.escape(table['title'])}</h3><table><tr>{head}</tr>{body}</table>")
    parts.append("<h2>Settings and provenance</h2>")
    parts.append(f"<pre>{html.escape(json.dumps(data.provenance, indent=2, default=str))}</pre>")
    # The only page script: hand each Altair spec to vega-embed (SVG renderer), keep the views for inspection.
    embed = (
        "window.views = {}; window.reportReady = Promise.all(Object.entries("
        + json.dumps(specs).replace("</", "<\\/")
        + ").map(([k, s]) => vegaEmbed('#chart-' + k, s, {renderer: 'svg', actions: false})"
        ".then(r => { window.views[k] = r.view; })));"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(data.title) + "</title>"
        f"<style>{STYLE}</style><script>{bundle}</script></head><body>"
        + "\n".join(parts)
        + f"<script>{embed}</script></body></html>"
    )
