"""Summary statistics, the console/markdown table and the Pareto plot of a comparison's results."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

PLOT_FILE = "finetune_pareto.png"
TABLE_FILE = "finetune_table.md"
LABELS = {"head": "head only", "full": "full fine-tuning", "kronecker": "kronecker (LoKr)"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single seed)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarize(results: dict[str, Any], methods: tuple[str, ...], seeds: tuple[int, ...]) -> dict[str, Any]:
    """Per method, over the requested seeds that finished: mean and std of test accuracy and macro-F1, and costs."""
    summary: dict[str, Any] = {}
    for method in methods:
        runs = [results["runs"].get(method, {}).get(str(seed)) for seed in seeds]
        runs = [r for r in runs if r]
        if not runs:
            continue
        acc = _mean_std([r["test"]["accuracy"] for r in runs])
        f1 = _mean_std([r["test"]["macro_f1"] for r in runs])
        info = results["methods"][method]
        summary[method] = {
            "seeds": [r["seed"] for r in runs],
            "lr": runs[0]["lr"],
            "accuracy_mean": acc[0],
            "accuracy_std": acc[1],
            "macro_f1_mean": f1[0],
            "macro_f1_std": f1[1],
            "train_time_s_mean": float(np.mean([r["train_time_s"] for r in runs])),
            "peak_memory_mb_max": float(max(r["peak_memory_mb"] for r in runs)),
            "memory_kind": runs[0]["memory_kind"],
            "trainable_params": runs[0]["trainable_params"],
            "adapter_params": info["adapter_params"],
            "budget_ratio": info["budget_ratio"],
            "adapter_bytes": int(np.mean([r["adapter_bytes"] for r in runs if "adapter_bytes" in r] or [0])),
            "knobs": info["knobs"],
        }
    return summary


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _setting(method: str, knobs: dict[str, Any]) -> str:
    if method == "kronecker":
        return f"r={knobs.get('r')}, factor={knobs.get('decompose_factor')}, both={knobs.get('decompose_both')}"
    if method == "kradapter":
        return f"{knobs.get('factorization')}, scale {knobs.get('scaling')}"
    return f"r={knobs['r']}" if "r" in knobs else ""


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    header = ["method", "setting", "trainable", "adapter/KR", "lr", "accuracy %", "macro-F1 %", "train s", "peak MB"]
    rows = [[*header, "saved"]]
    for method, s in summary.items():
        ratio = s["budget_ratio"]
        rows.append(
            [
                LABELS.get(method, method),
                _setting(method, s["knobs"]),
                f"{s['trainable_params']:,}",
                f"{ratio:.3f}" if ratio is not None else "-",
                f"{s['lr']:g}",
                f"{100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f}",
                f"{100 * s['macro_f1_mean']:.1f} ± {100 * s['macro_f1_std']:.1f}",
                f"{s['train_time_s_mean']:.1f}",
                f"{s['peak_memory_mb_max']:.0f}",
                _size(s["adapter_bytes"]),
            ]
        )
    return rows


def console_table(summary: dict[str, Any]) -> str:
    rows = table_rows(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(summary: dict[str, Any]) -> str:
    rows = table_rows(summary)
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out) + "\n"


def pareto_front(xs: list[float], ys: list[float]) -> list[int]:
    """Indices of points no other point beats (lower or equal x and higher or equal y, one strictly), by x."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], -ys[i]))
    front, best = [], -np.inf
    for i in order:
        if ys[i] > best:
            front.append(i)
            best = ys[i]
    return front


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    """Accuracy (mean ± std over seeds) against trainable parameters and against train time, Pareto fronts dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    acc = [100 * summary[m]["accuracy_mean"] for m in methods]
    err = [100 * summary[m]["accuracy_std"] for m in methods]
    axes_x = {
        "trainable parameters (log scale)": [summary[m]["trainable_params"] for m in methods],
        "train time per run, s (log scale)": [summary[m]["train_time_s_mean"] for m in methods],
    }
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, (xlabel, xs) in zip(axes, axes_x.items(), strict=True):
        for i, m in enumerate(methods):
            marker = "*" if m == "kradapter" else "o"
            ax.errorbar(
                xs[i],
                acc[i],
                yerr=err[i],
                fmt=marker,
                ms=11 if marker == "*" else 7,
                capsize=3,
                color=colors(i),
                label=LABELS.get(m, m),
            )
            ax.annotate(LABELS.get(m, m), (xs[i], acc[i]), textcoords="offset points", xytext=(6, 5), fontsize=8)
        front = pareto_front(xs, acc)
        ax.plot([xs[i] for i in front], [acc[i] for i in front], "--", color="grey", lw=1, zorder=0)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy, % (mean ± std over seeds)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_reports(results: dict[str, Any], out: Path) -> str:
    """Write the plot and the markdown table next to the results; returns the console table."""
    summary = results["summary"]
    if not summary:
        return "no finished runs"
    env, data = results["environment"], results["data"]
    title = (
        f"{results['model']['name']}, {len(data['classes'])} classes, {data['shots']}-shot, "
        f"{len(next(iter(summary.values()))['seeds'])} seeds; {env['cpu']}, {env['torch_threads']} threads"
        + (f", {env['gpu']}" if env["gpu"] else "")
    )
    plot(summary, out / PLOT_FILE, title)
    tmp = out / (TABLE_FILE + ".tmp")
    tmp.write_text(markdown_table(summary))
    os.replace(tmp, out / TABLE_FILE)
    return console_table(summary)
