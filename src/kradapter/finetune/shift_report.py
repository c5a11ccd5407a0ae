"""``kradapter shift``'s results: the document rebuilt from the store's records, the markdown table and the plots.

Every comparison is the anchor (:data:`kradapter.finetune.shift_settings.ANCHOR`) minus another method on the same
seeds, with a 95% paired bootstrap interval (:mod:`kradapter.stats`); with fewer than :data:`MIN_PAIRS` seeds the
interval is reported without a verdict. Learning rates are read from the ``chosen`` records the study wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import registry
from ..analysis import updates_summary
from ..plotting import FIGURE_DPI, plot_effective_rank, plot_spectra, pyplot, write_figure
from ..stats import paired_difference
from ..store import Store
from .shift_settings import ANCHOR, Cell, cell_id

if TYPE_CHECKING:
    from .shift import Study

RESULTS_FILE = "shift_results.json"
TABLE_FILE = "shift_table.md"
FORMAT = 1
MIN_PAIRS = 5  # fewer seeds give an interval (the bootstrap's min..max of a handful of values) but no verdict
NO_VERDICT = f"no verdict (n < {MIN_PAIRS})"


def run_scores(record: Mapping[str, Any], domains: list[str]) -> dict[str, float]:
    """A run's accuracies: ``id``, each domain, ``ood`` (mean over domains) and ``gap`` (``ood - id``)."""
    scores = {"id": float(record["test"]["accuracy"])}
    for d in domains:
        scores[d] = float(record[d]["accuracy"])
    scores["ood"] = float(np.mean([scores[d] for d in domains]))
    scores["gap"] = scores["ood"] - scores["id"]
    return scores


def _mean_std(values: list[float]) -> dict[str, float]:
    from ..stats import mean_std

    return dict(zip(("mean", "std"), mean_std(values), strict=True))


def _added_memory(runs: list[Mapping[str, Any]]) -> dict[str, float]:
    """The largest memory a run's training added over what the process held before it (a long study's process
    grows, so its whole-process peak is not comparable between methods run early and late)."""
    added = [r["peak_memory_mb"] - r["resident_before_mb"] for r in runs if "resident_before_mb" in r]
    return {"added_memory_mb_max": float(max(added))} if added else {}


def document(store: Store, study: Study) -> dict[str, Any]:
    """The results document, rebuilt from the store's records (finished units only)."""
    environments = [i["environment"] for i in store.meta.get("invocations", []) if "environment" in i]
    benchmarks = {b: _benchmark(study, b) for b in study.settings.benchmarks}
    for cell in study.cells:
        benchmarks[cell.benchmark]["cells"][cell.id] = _cell(store, study, cell)
    return {
        "format": FORMAT,
        "kind": "shift",
        "settings": store.meta.get("settings"),
        "axes": store.meta.get("axes"),
        "model": {"name": study.model_name, "path": str(study.model_dir)},
        "environment": environments[-1] if environments else None,
        "benchmarks": benchmarks,
        "invocations": store.meta.get("invocations", []),
    }


def _benchmark(study: Study, b: str) -> dict[str, Any]:
    """What a benchmark is: classes, pool, budget, target layers, evaluation sets (cells are added after)."""
    data = study.data[b]
    labels = data.corpus.labels
    return {
        "classes": list(data.corpus.classes),
        "pool": len(data.pool),
        "kradapter_budget": study.budgets[b],
        "target_modules": list(study.probes[b].layers),
        "head_params": study.probes[b].head_params,
        "evaluation_sets": {
            name: {
                "texts": len(idx),
                "per_class": np.bincount(labels[idx], minlength=len(data.corpus.classes)).tolist(),
            }
            for name, idx in data.evals.items()
        },
        "domains": data.domains,
        "cells": {},
    }


def _cell(store: Store, study: Study, cell: Cell) -> dict[str, Any]:
    """One cell: each method's size and chosen rate, every finished run, the summary and the paired intervals."""
    s = study.settings
    domains = study.data[cell.benchmark].domains
    prefix = (cell.benchmark, cell.id)
    methods: dict[str, Any] = {}
    runs: dict[str, dict[str, Any]] = {}
    for name, size in study.sizes[prefix].items():
        methods[name] = {"knobs": size.settings, "adapter_params": size.count, "budget_ratio": size.budget_ratio,
                         "describe": registry.METHODS[name].describe(size.settings)}  # fmt: skip
        chosen = store.records.get((cell.benchmark, s.anchor, "chosen", name))
        if chosen is not None:
            methods[name]["lr"] = chosen["lr"]
        for seed in s.seeds:
            record = store.records.get((*prefix, "run", name, seed))
            if record is not None:
                runs.setdefault(name, {})[str(seed)] = {**record, "scores": run_scores(record, domains)}
    reference_prefix = prefix if ANCHOR in cell.methods else (cell.benchmark, cell_id(cell.shots, 1))
    reference = {
        str(seed): run_scores(rec, domains)
        for seed in s.seeds
        if (rec := store.records.get((*reference_prefix, "run", ANCHOR, seed))) is not None
    }
    return {
        "shots": cell.shots,
        "budget": cell.budget,
        "budget_params": study.budgets[cell.benchmark] * cell.budget,
        "reference_cell": reference_prefix[1],
        "methods": methods,
        "runs": runs,
        "summary": {name: _summary(list(by_seed.values()), domains) for name, by_seed in runs.items()},
        "paired": _paired(runs, reference, domains),
    }


def _summary(done: list[Mapping[str, Any]], domains: list[str]) -> dict[str, Any]:
    """A method's finished runs in a cell: mean and std of every score, costs, and its learned updates."""
    metrics = ["id", *domains, "ood", "gap"]
    return {
        "seeds": [r["seed"] for r in done],
        **{m: _mean_std([r["scores"][m] for r in done]) for m in metrics},
        "train_time_s_mean": float(np.mean([r["train_time_s"] for r in done])),
        "peak_memory_mb_max": float(max(r["peak_memory_mb"] for r in done)),
        **_added_memory(done),
        "trainable_params": done[0]["trainable_params"],
        **updates_summary(done),
    }


def _paired(
    runs: dict[str, dict[str, Any]], reference: dict[str, dict[str, float]], domains: list[str]
) -> dict[str, Any]:
    """The anchor minus each other method, seed by seed on the seeds both finished, per metric."""
    paired: dict[str, Any] = {}
    for metric in ["id", "ood", "gap", *domains]:
        for name, by_seed in runs.items():
            common = [k for k in by_seed if k in reference]  # seeds both have finished (a run may be partial)
            if name == ANCHOR or len(common) < 2:
                continue
            pair = paired_difference(
                {k: reference[k][metric] for k in common}, {k: by_seed[k]["scores"][metric] for k in common}
            ).to_dict()
            if len(common) < MIN_PAIRS:
                pair["verdict"] = NO_VERDICT
            paired.setdefault(metric, {})[name] = pair
    return paired


# -- tables and plots ---------------------------------------------------------------------------------------------


def _pct(stat: Mapping[str, float]) -> str:
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _interval(entry: Mapping[str, Any]) -> str:
    return (
        f"{100 * entry['mean_difference']:+.1f} [{100 * entry['low']:+.1f}, {100 * entry['high']:+.1f}] "
        f"{entry['verdict']}"
    )


def markdown(results: Mapping[str, Any]) -> str:
    """Per benchmark and cell: accuracies (mean ± std over seeds, %), update ranks and the paired intervals."""
    lines: list[str] = []
    anchor = registry.label(ANCHOR)
    for b, bench in results["benchmarks"].items():
        domains = bench["domains"]
        for cid, cell in bench["cells"].items():
            if not cell["summary"]:
                continue
            lines += [f"### {b}, {cell['shots']} shots per class, {cell['budget']}x {anchor}'s count", ""]
            head = ["method", "setting", "trainable", "lr", "ID %", *[f"{d} %" for d in domains], "OOD %",
                    "OOD - ID", "eff. rank", "train s", "peak MB", "added MB"]  # fmt: skip
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for name, row in cell["summary"].items():
                info = cell["methods"][name]
                rank = row.get("update_effective_rank_mean")
                lines.append(
                    "| " + " | ".join([
                        registry.label(name), info["describe"], f"{row['trainable_params']:,}",
                        f"{info.get('lr', float('nan')):g}", _pct(row["id"]), *[_pct(row[d]) for d in domains],
                        _pct(row["ood"]), _pct(row["gap"]), f"{rank:.1f}" if rank is not None else "-",
                        f"{row['train_time_s_mean']:.1f}", f"{row['peak_memory_mb_max']:.0f}",
                        f"{row['added_memory_mb_max']:.0f}" if "added_memory_mb_max" in row else "-",
                    ]) + " |"
                )  # fmt: skip
            if cell["paired"]:
                ref = cell["reference_cell"]
                note = "" if ref == cid else f" ({anchor}'s runs of {ref})"
                lines += ["", f"{anchor}{note} minus each method, points, 95% paired bootstrap interval:", ""]
                metrics = [m for m in ("id", "ood", "gap", *domains) if m in cell["paired"]]
                lines += ["| against | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
                others = sorted({o for m in metrics for o in cell["paired"][m]})
                for other in others:
                    row = [_interval(cell["paired"][m][other]) if other in cell["paired"][m] else "-" for m in metrics]
                    lines.append(f"| {registry.label(other)} | " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines)


def plot_kshot(results: Mapping[str, Any], benchmark: str, path: Path) -> Path | None:
    """ID and mean OOD accuracy against shots per class (1x budget), mean ± std over seeds, one line per method."""
    plt = pyplot()

    cells = [c for c in results["benchmarks"][benchmark]["cells"].values() if c["budget"] == 1 and c["summary"]]
    if len({c["shots"] for c in cells}) < 2:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=False)
    methods = sorted({m for c in cells for m in c["summary"] if sum(m in d["summary"] for d in cells) > 1})
    for ax, metric, title in zip(axes, ("id", "ood"), ("in-distribution", "out-of-distribution (mean)"), strict=True):
        for m in methods:
            points = sorted((c["shots"], c["summary"][m][metric]) for c in cells if m in c["summary"])
            means, stds = [100 * p[1]["mean"] for p in points], [100 * p[1]["std"] for p in points]
            ax.errorbar([p[0] for p in points], means, yerr=stds, marker="o", capsize=3, label=registry.label(m))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training texts per class")
        ax.set_title(f"{benchmark}: {title}")
        ax.set_ylabel("accuracy %")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return write_figure(fig, path, dpi=FIGURE_DPI)


def write_reports(results: Mapping[str, Any], store: Store) -> str:
    """The markdown table, the k-shot curves, and the learned updates' effective ranks and spectra (anchor cell,
    first seed) of every benchmark; returns the table."""
    table = markdown(results)
    store.write_text(TABLE_FILE, table + "\n")
    anchor = cell_id(results["settings"]["anchor_shots"], 1)
    for b, bench in results["benchmarks"].items():
        path = store.path(f"shift_{b}_kshot.png")
        if plot_kshot(results, b, path) is not None:
            store.written(path.name)
        runs = bench["cells"].get(anchor, {}).get("runs", {})
        first = {registry.label(m): next(iter(r.values()))["updates"] for m, r in runs.items()
                 if r and "updates" in next(iter(r.values()))}  # fmt: skip
        if first:
            store.written(f"shift_{b}_rank.png")
            store.written(f"shift_{b}_spectra.png")
            plot_effective_rank(first, store.path(f"shift_{b}_rank.png"), f"{b}: effective rank of dW per layer")
            plot_spectra(first, store.path(f"shift_{b}_spectra.png"))
    return table
