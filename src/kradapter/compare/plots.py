"""Figures and the console table of a study's results (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .. import registry
from ..plotting import pyplot, write_figure
from .config import StudyConfig
from .results import columns


def _rows(results: dict[str, Any], config: StudyConfig) -> list[tuple[str, dict[str, Any]]]:
    """``(name, entry)`` of the configured matrices present in the results, in the configured order."""
    return [(n, results["results"][n]) for n in config.matrices.selected() if n in results["results"]]


def _columns(config: StudyConfig) -> list[str]:
    return columns(config.methods.names, config.methods.references)


def _plotted(config: StudyConfig) -> list[str]:
    """The columns drawn in the figures: every method, the rank-r reference and the optima, not the all-zero one."""
    entries = registry.METHODS
    return [c for c in _columns(config) if entries[c].is_adapter or entries[c].rank_of or entries[c].optimum_of]


def _value(entry: dict[str, Any], method: str, metric: str) -> float | None:
    record = entry.get("methods", {}).get(method)
    if not record or record.get("error"):
        return None
    value = record.get(metric)
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def _pyplot(config: StudyConfig):
    return pyplot(config.output.font_size)


def _save(fig, path: Path, config: StudyConfig, rect: tuple[float, ...] = (0, 0, 1, 1)) -> None:
    fig.tight_layout(rect=rect)
    write_figure(fig, path, dpi=config.output.dpi, bbox_inches="tight")


def _bars(ax, rows, columns, metric, config, relative_to=None):
    """Grouped bars of ``metric`` per matrix (optionally in % of ``relative_to``); missing values marked."""
    width = 0.8 / len(columns)
    for i, method in enumerate(columns):
        heights, stds, labels = [], [], []
        for _, entry in rows:
            value = _value(entry, method, metric)
            base = _value(entry, relative_to, metric) if relative_to else 1.0
            std = entry.get("methods", {}).get(method, {}).get("std", {}).get(metric) or 0.0
            if value is None or not base:
                heights.append(0.0)
                stds.append(0.0)
                labels.append("n/a")
                continue
            scale = 100.0 / base if relative_to else 1.0
            heights.append(value * scale)
            stds.append(std * scale)
            labels.append(f"{value:.3g}")
        xs = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(rows))]
        color, style = _style(method, columns, config)
        error = stds if config.output.show_error_bars and any(stds) else None
        bars = ax.bar(xs, heights, width, label=registry.label(method), color=color, yerr=error, capsize=2, **style)
        for bar, text in zip(bars, labels, strict=True):
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                rotation=90,
                fontsize=max(config.output.font_size - 4, 6),
            )
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([_row_label(n, e) for n, e in rows], rotation=20, ha="right")
    ax.grid(True, axis="y", alpha=0.3)
    ax.margins(y=0.15)


def _style(method: str, columns: list[str], config: StudyConfig) -> tuple[str, dict[str, Any]]:
    """A column's colour; an optimum row takes its method's colour, hatched and lighter, so the pair reads as one."""
    colors = config.output.colors
    of = registry.METHODS[method].optimum_of
    if of in columns:
        return colors[columns.index(of) % len(colors)], {"hatch": "//", "alpha": 0.45, "edgecolor": "black"}
    return colors[columns.index(method) % len(colors)], {}


def _row_label(name: str, entry: dict[str, Any]) -> str:
    shape = entry.get("target", {}).get("shape")
    text = entry.get("label") or name
    return f"{text}\n{shape[0]}x{shape[1]}" if shape else text


def comparison_plot(results: dict[str, Any], config: StudyConfig, path: Path) -> None:
    """The published chart (nuclear error in % of LoRA's, absolute values on the bars) above the relative
    Frobenius error (1 = predicting zero), which the nuclear error alone would hide."""
    plt = _pyplot(config)
    rows = _rows(results, config)
    columns = _plotted(config)
    width = max(config.output.figure_size[0], 2.0 + 1.2 * len(rows))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, config.output.figure_size[1] * 1.5))
    if registry.RELATIVE_TO in columns:
        _bars(top, rows, columns, "nuclear_error", config, relative_to=registry.RELATIVE_TO)
        top.axhline(100, color="gray", linestyle="--", linewidth=1)
        top.set_ylabel("Nuclear error, % of LoRA's\n(bar labels: absolute)")
    else:
        _bars(top, rows, columns, "nuclear_error", config)
        top.set_ylabel("Nuclear error (mean |s_fit - s|)")
    top.set_title("Spectral error at an equal parameter budget (lower is better)")
    _bars(bottom, rows, columns, "relative_frobenius_error", config)
    bottom.axhline(1.0, color="black", linestyle=":", linewidth=1)
    bottom.set_ylabel("||W_fit - W||_F / ||W||_F\n(1 = predicting zero)")
    bottom.set_title("Relative Frobenius error (lower is better)")
    top.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path, config)


def spectra_plot(results: dict[str, Any], config: StudyConfig, path: Path) -> None:
    """Singular values of each target and of each method's fit, one panel per matrix (log scale)."""
    plt = _pyplot(config)
    rows = _rows(results, config)
    cols = min(4, max(len(rows), 1))
    nrows = math.ceil(len(rows) / cols) if rows else 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, (name, entry) in zip(axes.flat, rows, strict=False):
        target = entry.get("target", {}).get("singular_values")
        if target:
            ax.semilogy(_positive(target), color="black", linewidth=2, label="Target")
        for method in _plotted(config):
            record = entry.get("methods", {}).get(method, {})
            if record.get("singular_values") and not record.get("error"):
                color, style = _style(method, _plotted(config), config)
                line = "--" if style else "-"
                ax.semilogy(_positive(record["singular_values"]), line, color=color, label=registry.label(method))
        ax.set_title(_row_label(name, entry).replace("\n", " "), fontsize=config.output.font_size)
        ax.set_xlabel("index")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8) or 1, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("Singular values: target and fits")
    _save(fig, path, config, rect=(0, 0.05, 1, 1))


def _positive(values: list[float]) -> list[float]:
    """Zeros cannot be drawn on a log axis: they are cut where the spectrum first drops to 0."""
    out = []
    for v in values:
        if v <= 0:
            break
        out.append(v)
    return out


def effective_rank_plot(results: dict[str, Any], config: StudyConfig, path: Path) -> None:
    """Effective rank of each fit beside the target's (black ticks)."""
    plt = _pyplot(config)
    rows = _rows(results, config)
    columns = _plotted(config)
    width = max(config.output.figure_size[0], 2.0 + 1.2 * len(rows))
    fig, ax = plt.subplots(figsize=(width, config.output.figure_size[1]))
    _bars(ax, rows, columns, "effective_rank", config)
    for j, (_, entry) in enumerate(rows):
        value = entry.get("target", {}).get("effective_rank")
        if value:
            ax.hlines(value, j - 0.45, j + 0.45, color="black", linewidth=2, label="Target" if j == 0 else None)
    ax.set_ylabel("Effective rank (Roy & Vetterli)")
    ax.set_title("Effective rank of the fitted updates")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path, config)


def plot_files(config: StudyConfig) -> list[str]:
    """The names of the three figures :func:`write_plots` draws."""
    return [config.output.plot_file, config.output.spectra_file, config.output.effective_rank_file]


def write_plots(results: dict[str, Any], config: StudyConfig) -> list[str]:
    """Draw the three figures into ``output.directory``; returns their file names."""
    out = Path(config.output.directory)
    names = plot_files(config)
    for draw, name in zip((comparison_plot, spectra_plot, effective_rank_plot), names, strict=True):
        draw(results, config, out / name)
    return names


def summary_table(results: dict[str, Any], config: StudyConfig) -> str:
    """Console table: per matrix and method, relative Frobenius error, nuclear error (and % of LoRA's), params."""
    columns = _columns(config)
    rows = _rows(results, config)
    head = f"{'matrix':<22}{'shape':>11}  " + "".join(f"{registry.label(c)[:16]:>17}" for c in columns)
    lines = [
        "Relative Frobenius error ||W_fit - W||_F / ||W||_F  |  nuclear error (% of LoRA's)  |  "
        "||W_fit - W||_F above the method's optimum's (% of it)",
        head,
        "-" * len(head),
    ]
    for name, entry in rows:
        shape = entry.get("target", {}).get("shape")
        row = (entry.get("label") or name)[:21]
        if entry.get("error"):
            lines.append(f"{row:<22}{'':>11}  error: {entry['error']}")
            continue
        line1 = f"{row:<22}{(f'{shape[0]}x{shape[1]}' if shape else ''):>11}  "
        line2 = f"{'':<22}{'':>11}  "
        line3 = f"{'':<22}{'':>11}  "
        lora = _value(entry, registry.RELATIVE_TO, "nuclear_error")
        for c in columns:
            record = entry.get("methods", {}).get(c, {})
            rel, nuc = _value(entry, c, "relative_frobenius_error"), _value(entry, c, "nuclear_error")
            if record.get("error"):
                line1 += f"{'ERROR':>17}"
                line2 += f"{'(see JSON)':>17}"
                continue
            line1 += f"{rel:>17.4f}" if rel is not None else f"{'-':>17}"
            gap = _value(entry, c, "relative_gap_to_optimum")
            line3 += f"{f'+{100 * gap:.2f}% of opt.':>17}" if gap is not None else f"{'':>17}"
            pct = f" ({100 * nuc / lora:.0f}%)" if nuc is not None and lora else ""
            line2 += f"{(f'{nuc:.3g}{pct}' if nuc is not None else '-'):>17}"
        lines += [line1, line2] + ([line3] if line3.strip() else [])
    lines.append("")
    lines.append("Trainable parameters (budget = KRAdapter's count at the matrix's shape):")
    for name, entry in rows:
        params = [f"{registry.label(c)} {int(p):,}" for c in config.methods.names if (p := _value(entry, c, "params"))]
        lines.append(f"  {(entry.get('label') or name)[:21]:<22}" + ", ".join(params))
        for c in config.methods.names:
            for note in entry.get("methods", {}).get(c, {}).get("notes") or []:
                lines.append(f"    note, {registry.label(c)}: {note}")
            error = entry.get("methods", {}).get(c, {}).get("error")
            if error:
                lines.append(f"    error, {registry.label(c)}: {error}")
    return "\n".join(lines)
