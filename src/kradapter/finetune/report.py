"""Summary statistics, the console/markdown table and the Pareto plot of a comparison's results."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import registry
from ..analysis import updates_summary
from ..files import format_bytes
from ..plotting import pyplot, write_figure
from ..stats import mean_std
from ..store import Store

if TYPE_CHECKING:
    from .plan import Plan
    from .runner import Execution

RESULTS_FILE = "finetune_results.json"
PLOT_FILE = "finetune_pareto.png"
TABLE_FILE = "finetune_table.md"
FORMAT = 2


def document(store: Store, plan: Plan) -> dict[str, Any]:
    """The results document of every record in ``store`` (the sweep, the chosen rates, the runs, the summary)."""
    s = plan.settings
    tables: dict[str, dict[str, dict[str, Any]]] = {"sweep": {}, "run": {}}
    last = (store.meta.get("invocations") or [{}])[-1]
    failed = last.get("failed_units", [])  # failed in this invocation: no record, --resume tries them again
    for key, record in store.records.items():
        if str(key[0]) in tables:
            tables[str(key[0])].setdefault(str(key[1]), {})[str(key[2])] = record
    sweep, runs = tables["sweep"], tables["run"]
    tuning = {m: store.records[("chosen", m)] for m in s.methods if ("chosen", m) in store.records}
    chosen = {m: record["lr"] for m, record in tuning.items()}
    features = [r["head_feature_time_s"] for by_seed in runs.values() for r in by_seed.values()
                if isinstance(r, dict) and "head_feature_time_s" in r]  # fmt: skip
    environments = [i["environment"] for i in store.meta.get("invocations", []) if "environment" in i]
    methods = {}
    for name, method_plan in plan.methods.items():
        methods[name] = {
            "lr_grid": list(s.grid(name)),
            "knobs": method_plan.settings,
            "adapter_params": method_plan.count,
            "trainable_params": plan.trainable(name),
            "budget_ratio": method_plan.budget_ratio,
        }
    results = {
        "format": FORMAT,
        "settings": store.meta.get("settings"),
        "environment": environments[-1] if environments else None,
        "data": {
            "root": str(plan.corpus.root),
            "classes": list(plan.corpus.classes),
            "articles": len(plan.corpus.texts),
            "test_articles": len(plan.test),
            "pool_articles": len(plan.pool),
            "shots": s.shots,
            "val_shots": s.recipe.val_shots,
            "sweep_seed": s.sweep_seed,
            "val_texts": {str(seed): len(plan.validation(seed)) for seed in s.seeds},
        },
        "model": {
            "name": plan.model_name,
            "path": str(plan.model_dir),
            "head_modules": plan.head,
            "head_params": plan.head_params,
            "target_modules": list(plan.layers),
            "kradapter_budget": plan.budget,
        },
        "methods": methods,
        "sweep": sweep,
        "chosen_lr": chosen,
        "tuning": tuning,
        "runs": runs,
        "failed_units": failed,
        "head_feature_time_s": features[0] if features else None,
        "invocations": store.meta.get("invocations", []),
    }
    results["summary"] = summarize(results, s.methods, s.seeds)
    return results


def writer(store: Store, plan: Plan) -> Callable[[Execution], None]:
    """The report an execution of ``plan`` rebuilds after each unit: the results document, from the records."""

    def write(execution: Execution) -> None:
        store.write_json(RESULTS_FILE, document(store, plan), indent=1)

    return write


def summarize(results: dict[str, Any], methods: tuple[str, ...], seeds: tuple[int, ...]) -> dict[str, Any]:
    """Per method, over the requested seeds that finished: mean and std of test accuracy and macro-F1, and costs.

    A finished run without test metrics is an error naming it, never silently left out of a mean."""
    summary: dict[str, Any] = {}
    for method in methods:
        runs = [results["runs"].get(method, {}).get(str(seed)) for seed in seeds]
        runs = [r for r in runs if r is not None]
        broken = [r for r in runs if not isinstance(r, dict) or "test" not in r]
        if broken:
            raise RuntimeError(
                f"a finished {method} run has no test metrics ({broken[0]!r}); rerun it with --overwrite"
            )
        if not runs:
            continue
        acc = mean_std([r["test"]["accuracy"] for r in runs])
        f1 = mean_std([r["test"]["macro_f1"] for r in runs])
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
        summary[method] |= {k: v for k, v in updates_summary(runs).items() if k == "update_effective_rank_mean"}
    return summary


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    header = ["method", "setting", "trainable", "adapter/KR", "lr", "accuracy %", "macro-F1 %", "train s", "peak MB"]
    rows = [[*header, "saved"]]
    for method, s in summary.items():
        ratio = s["budget_ratio"]
        rows.append(
            [
                registry.label(method),
                registry.entry(method).describe(s["knobs"]),
                f"{s['trainable_params']:,}",
                f"{ratio:.3f}" if ratio is not None else "-",
                f"{s['lr']:g}",
                f"{100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f}",
                f"{100 * s['macro_f1_mean']:.1f} ± {100 * s['macro_f1_std']:.1f}",
                f"{s['train_time_s_mean']:.1f}",
                f"{s['peak_memory_mb_max']:.0f}",
                format_bytes(s["adapter_bytes"]),
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
    plt = pyplot()

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
            marker = "*" if m == registry.budget_method().name else "o"
            ax.errorbar(
                xs[i],
                acc[i],
                yerr=err[i],
                fmt=marker,
                ms=11 if marker == "*" else 7,
                capsize=3,
                color=colors(i),
                label=registry.label(m),
            )
            ax.annotate(registry.label(m), (xs[i], acc[i]), textcoords="offset points", xytext=(6, 5), fontsize=8)
        front = pareto_front(xs, acc)
        ax.plot([xs[i] for i in front], [acc[i] for i in front], "--", color="grey", lw=1, zorder=0)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy, % (mean ± std over seeds)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_figure(fig, path, dpi=120)


def write_reports(results: dict[str, Any], store: Store) -> str:
    """Write the plot and the markdown table into the run folder; returns the console table."""
    summary = results["summary"]
    if not summary:
        return "no finished runs"
    env, data = results["environment"], results["data"]
    title = (
        f"{results['model']['name']}, {len(data['classes'])} classes, {data['shots']}-shot, "
        f"{len(next(iter(summary.values()))['seeds'])} seeds; {env['cpu']}, {env['torch_threads']} threads"
        + (f", {env['gpu']}" if env["gpu"] else "")
    )
    with store.writing(PLOT_FILE) as path:
        plot(summary, path, title)
    store.write_text(TABLE_FILE, markdown_table(summary))
    return console_table(summary)
