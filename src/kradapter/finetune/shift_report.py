"""``kradapter shift``'s results: the document rebuilt from the store's records, the markdown tables and the plots.

What is computed (docs/protocol-generalisation.md is the pre-registration; it names these same steps):

- **Primary endpoints** (pre-registered): KRAdapter minus LoRA, mean OOD accuracy in points, at 1x KRAdapter's
  count, one per benchmark and shot count; a group of benchmarks (``shift_settings.GROUPS``, the six 20
  Newsgroups cross-domain tasks) is one endpoint, its per-seed score the mean of its tasks' scores. Per endpoint:
  the per-seed differences, their mean and SD, the paired t interval and p, the exact sign-flip p beside it (a
  disagreement at 5% is flagged), the bootstrap-t interval, the Holm-adjusted p over the primary family, the MDE
  at the achieved number of seeds (80% power, two-sided 5%), the seeds an MDE of :data:`MDE_TARGET` points
  needs, the verdict (``supported`` / ``contradicted`` / ``not detected (MDE x points)``), a two-way bootstrap
  interval over seeds and test items (from the runs' stored predictions and the evaluation sets' labels, which
  the document carries), and the whole family recomputed without the seeds whose runs the training flagged
  ``underfit`` or ``diverged`` (sensitivity).
- **Exploratory** (labelled so): every method and baseline per cell (ID, each domain, mean OOD, gap, fit flags,
  chosen rate and its trials); KRAdapter minus every other method with t intervals, sign-flip p and Holm within
  one family per metric; McNemar's exact test where a contrast has a single seed.
- **Mechanism** (exploratory): per run the learned update's effective rank (mean over layers), ``||dW||_F`` and
  intruder dimensions; least-squares regressions of OOD accuracy on each with benchmark x shots x method fixed
  effects (a variant ``METHOD@KNOB=VALUE`` under its method's), and a verdict on the rank and norm statements
  (Holm over the two).
- **Rank sweep** (exploratory, when variants ran: ``kradapter shift --preset ranks``): per variant its accuracies,
  effective rank and update norm; OOD accuracy on log effective rank with method-family fixed effects (the
  within-method slope) and its verdict.

The percentile bootstrap is never used below ``stats.PERCENTILE_MIN_PAIRS`` pairs. Accuracies of runs are
fractions (as the records hold them); every statistic is in percentage points.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import registry, stats
from ..analysis import updates_summary
from ..plotting import FIGURE_DPI, plot_effective_rank, plot_spectra, pyplot, write_figure
from ..store import Store
from .shift_settings import ANCHOR, MIN_SEEDS_FOR_VERDICT, cell_id

if TYPE_CHECKING:
    from .shift import Study

RESULTS_FILE = "shift_results.json"
TABLE_FILE = "shift_table.md"
MECHANISM_PLOT = "shift_mechanism.png"
RANK_SWEEP_PLOT = "shift_rank_sweep.png"
FORMAT = 2
MIN_PAIRS = 2  # a paired t interval needs two seeds
NO_VERDICT = f"not tested (n < {MIN_PAIRS})"
# Below this many seeds an exact two-sided sign-flip test cannot reach 5% (2 / 2^n > 0.05): intervals are shown,
# no verdict is given (the powered preset refuses fewer seeds).
MIN_PAIRS_FOR_VERDICT = MIN_SEEDS_FOR_VERDICT
FEW_PAIRS = "no verdict (n = {n} < " + str(MIN_SEEDS_FOR_VERDICT) + " seeds)"
PENDING = "pending ({seeds} of {planned} seeds in)"  # an endpoint whose design's runs are not all in yet
CONTRAST = (ANCHOR, registry.reference_adapter())  # the primary contrast: the first minus the second
PRIMARY_METRIC = "ood"
PRIMARY_BUDGET = 1
EXPECTED = "greater"  # the claimed direction of every KRAdapter-minus-other difference
MDE_TARGET = 1.5  # points: the pre-registered target of each primary endpoint's MDE
FLAGS = ("underfit", "diverged")  # a run's "fit" field (training protocol's rule) that marks it
BASELINES = ("majority", "linear_probe")  # reference rows, not registry methods
# The mechanism statements and the slope each claims: OOD accuracy rises with the update's effective rank, and
# falls with its Frobenius norm (a larger departure from the pre-trained weights). Intruders: reported, no verdict.
MECHANISM = {"effective_rank": "greater", "update_norm": "less"}
MECHANISM_X = ("effective_rank", "update_norm", "intruders")
POINTS = 100.0


def report_outputs(benchmarks: Iterable[str], groups: Iterable[str] = ()) -> list[str]:
    """The files :func:`write_reports` may write in a run folder (besides :data:`RESULTS_FILE`)."""
    plots = [f"shift_{b}_{p}.png" for b in benchmarks for p in ("kshot", "rank", "spectra")]
    return [TABLE_FILE, MECHANISM_PLOT, RANK_SWEEP_PLOT, *plots, *(f"shift_{g}_kshot.png" for g in groups)]


def run_scores(record: Mapping[str, Any], domains: list[str]) -> dict[str, float]:
    """A run's accuracies: ``id``, each domain, ``ood`` (mean over domains) and ``gap`` (``ood - id``)."""
    scores = {"id": float(record["test"]["accuracy"])}
    for d in domains:
        scores[d] = float(record[d]["accuracy"])
    scores["ood"] = float(np.mean([scores[d] for d in domains]))
    scores["gap"] = scores["ood"] - scores["id"]
    return scores


def fit_status(record: Mapping[str, Any]) -> str:
    """The training's own verdict on the run (``fit`` / ``underfit`` / ``diverged``); ``unknown`` when the record
    has none (baselines, records of an older version)."""
    return str(record.get("fit", "unknown"))


def _layer_mean(record: Mapping[str, Any], key: str) -> float | None:
    rows = [float(r[key]) for r in record.get("updates") or [] if key in r]
    return float(np.mean(rows)) if rows else None


def _slim(record: Mapping[str, Any], evals: Iterable[str], domains: list[str]) -> dict[str, Any]:
    """A run as the document carries it: everything but the per-item predictions, the loss curve and the
    per-layer spectra (all three stay in the store's records), plus its scores and mechanism metrics."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key in evals and isinstance(value, Mapping):
            out[key] = {k: v for k, v in value.items() if k != "predictions"}
        elif key not in ("loss_curve", "updates"):
            out[key] = value
    out["scores"] = run_scores(record, domains)
    out["fit"] = fit_status(record)
    if record.get("updates"):
        out["effective_rank"] = _layer_mean(record, "effective_rank")
        out["updates_summary"] = updates_summary([record])
    return out


# -- collecting the records ----------------------------------------------------------------------------------------


def document(store: Store, study: Study) -> dict[str, Any]:
    """The results document, rebuilt from the store's records (finished units only)."""
    from .shift_settings import GROUPS

    environments = [i["environment"] for i in store.meta.get("invocations", []) if "environment" in i]
    benchmarks, predictions = collect(store, study)
    return {
        "format": FORMAT,
        "kind": "shift",
        "settings": store.meta.get("settings"),
        "axes": store.meta.get("axes"),
        "model": {"name": study.model_name, "path": str(study.model_dir)},
        "environment": environments[-1] if environments else None,
        "invocations": store.meta.get("invocations", []),
        "benchmarks": benchmarks,
        **analyse(benchmarks, predictions, GROUPS),
    }


Predictions = dict[tuple[str, str, str, str, str], np.ndarray]  # (benchmark, cell, method, seed, set) -> items


def collect(store: Store, study: Study) -> tuple[dict[str, Any], Predictions]:
    """Per benchmark its description (with every evaluation set's labels) and cells (each method's size, chosen
    rate with its trials, and every finished run, slimmed); the runs' per-item predictions beside it."""
    benchmarks: dict[str, Any] = {}
    predictions: Predictions = {}
    for b in study.settings.benchmarks:
        benchmarks[b] = _benchmark(study, b)
    for cell in study.cells:
        b, cid = cell.benchmark, cell.id
        bench = benchmarks[b]
        evals, domains = list(bench["evaluation_sets"]), bench["domains"]
        entry: dict[str, Any] = {"shots": cell.shots, "budget": cell.budget,
                                 "budget_params": study.budgets[b] * cell.budget, "methods": {}, "chosen": {},
                                 "runs": {}}  # fmt: skip
        seeds = getattr(study.settings, "seeds", None)
        if seeds is not None:  # the design: what the cell will hold when the run is complete
            entry["planned"] = {"methods": list(cell.methods), "seeds": [int(s) for s in seeds]}
        for name, size in study.sizes.get((b, cid), {}).items():
            entry["methods"][name] = {"knobs": size.settings, "adapter_params": size.count,
                                      "budget_ratio": size.budget_ratio,
                                      "describe": registry.entry(name).describe(size.settings)}  # fmt: skip
        for key, record in store.matching(b, cid, "chosen"):
            entry["chosen"][str(key[3])] = dict(record)
        for key, record in store.matching(b, cid, "run"):
            if not isinstance(record, Mapping) or record.get("error") or "test" not in record:
                continue
            method, seed = str(key[3]), str(key[4])
            entry["runs"].setdefault(method, {})[seed] = _slim(record, evals, domains)
            for name in evals:
                items = record.get(name, {}).get("predictions")
                if items is not None:
                    predictions[(b, cid, method, seed, name)] = np.asarray(items, dtype=np.int64)
        entry["runs"] = {m: dict(sorted(r.items(), key=lambda kv: int(kv[0]))) for m, r in entry["runs"].items()}
        entry["reference_cell"] = _reference_cell(entry, cid)
        bench["cells"][cid] = entry
    return benchmarks, predictions


def _benchmark(study: Study, b: str) -> dict[str, Any]:
    """What a benchmark is: classes, pool, budget, target layers, evaluation sets with their labels."""
    data = study.data[b]
    labels = data.corpus.labels
    probe = study.probes.get(b)
    return {
        "classes": list(data.corpus.classes),
        "pool": len(data.pool),
        "kradapter_budget": study.budgets[b],
        "target_modules": list(probe.layers) if probe is not None else [],
        "head_params": probe.head_params if probe is not None else None,
        "evaluation_sets": {
            name: {
                "texts": len(idx),
                "per_class": np.bincount(labels[idx], minlength=len(data.corpus.classes)).tolist(),
                "labels": labels[idx].astype(int).tolist(),
            }
            for name, idx in data.evals.items()
        },
        "domains": list(data.domains),
        "cells": {},
    }


# -- units of analysis: a benchmark's cell, or a group's cell (its members' scores averaged per seed) -----------


@dataclass
class Unit:
    """One table of the study: a benchmark's cell, or a group of benchmarks' cells averaged per seed."""

    name: str  # a benchmark or a group
    cell: str
    shots: int
    budget: int
    members: tuple[str, ...]  # the benchmarks it averages (one for a benchmark)
    domains: list[str]
    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # method -> seed -> metric -> acc
    flags: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # method -> seed -> flagged members
    reference_cell: str = ""  # where KRAdapter's runs come from (its 1x cell above 1x)
    planned: dict[str, list[Any]] | None = None  # the cell's design (methods, seeds); None: not recorded

    def complete(self, seeds: Iterable[int]) -> bool:
        """Whether ``seeds`` (a contrast's paired seeds) are all the design's: no run of it is still to come."""
        return self.planned is None or set(self.planned["seeds"]) <= set(seeds)

    @property
    def metrics(self) -> list[str]:
        return ["id", *self.domains, "ood", "gap"]

    @property
    def grouped(self) -> bool:
        return len(self.members) > 1


def _reference_cell(cell: Mapping[str, Any], cid: str) -> str:
    """Where KRAdapter's runs for a cell come from: the cell itself, else its 1x cell at the same shots (the same
    k-shot draws; KRAdapter has no knob that scales its count)."""
    return cid if ANCHOR in cell["runs"] else cell_id(cell["shots"], 1)


def units(benchmarks: Mapping[str, Any], groups: Mapping[str, Sequence[str]]) -> list[Unit]:
    """Every benchmark's cells, then every group's cells (the cells all its present members share)."""
    out: list[Unit] = []
    for b, bench in benchmarks.items():
        for cid, cell in bench["cells"].items():
            unit = Unit(b, cid, cell["shots"], cell["budget"], (b,), list(bench["domains"]))
            unit.planned = cell.get("planned")
            unit.reference_cell = _reference_cell(cell, cid)
            for method, runs in cell["runs"].items():
                unit.scores[method] = {s: dict(r["scores"]) for s, r in runs.items()}
                unit.flags[method] = {s: [b] if r["fit"] in FLAGS else [] for s, r in runs.items()}
            reference = bench["cells"].get(unit.reference_cell, {}).get("runs", {}).get(ANCHOR, {})
            if unit.reference_cell != cid and reference:
                unit.scores[ANCHOR] = {s: dict(r["scores"]) for s, r in reference.items()}
                unit.flags[ANCHOR] = {s: [b] if r["fit"] in FLAGS else [] for s, r in reference.items()}
            out.append(unit)
    for group, members in groups.items():
        present = [m for m in members if m in benchmarks]
        if len(present) < 2 or len(present) != len(members):
            continue  # a group is only scored with all of its members (``analyse`` passes complete groups only)
        by_cell = [{u.cell: u for u in out if u.name == m} for m in present]
        for cid in [c for c in by_cell[0] if all(c in other for other in by_cell[1:])]:
            parts = [cells[cid] for cells in by_cell]
            domains = parts[0].domains if all(p.domains == parts[0].domains for p in parts) else []
            unit = Unit(group, cid, parts[0].shots, parts[0].budget, tuple(present), list(domains))
            unit.reference_cell = parts[0].reference_cell
            if all(p.planned is not None for p in parts):  # what every member will have
                plans = [p.planned for p in parts if p.planned is not None]
                unit.planned = {key: [x for x in plans[0][key] if all(x in q[key] for q in plans[1:])]
                                for key in ("methods", "seeds")}  # fmt: skip
            for method in set.intersection(*(set(p.scores) for p in parts)):
                seeds = set.intersection(*(set(p.scores[method]) for p in parts))
                for seed in sorted(seeds, key=int):
                    unit.scores.setdefault(method, {})[seed] = {
                        m: float(np.mean([p.scores[method][seed][m] for p in parts])) for m in unit.metrics
                    }
                    unit.flags.setdefault(method, {})[seed] = [f for p in parts for f in p.flags[method][seed]]
            out.append(unit)
    return out


# -- paired statistics ----------------------------------------------------------------------------------------------


@functools.cache
def _unit_mde(n: int) -> float:
    return stats.minimum_detectable_difference(1.0, n)


def mde(sd: float, n: int) -> float:
    """:func:`kradapter.stats.minimum_detectable_difference` at 80% power and 5%, through its scaling: the paired
    t-test's power depends on ``difference / sd`` only, so the MDE is ``sd`` times the MDE at ``sd = 1`` (one root
    per ``n``, cached)."""
    return sd * _unit_mde(n)


def seeds_for(sd: float, target: float = MDE_TARGET, max_n: int = 100_000) -> int | None:
    """:func:`kradapter.stats.seeds_needed` through the same scaling: the fewest pairs whose MDE is at most
    ``target``; None beyond ``max_n``."""
    if sd == 0 or mde(sd, 2) <= target:
        return 2
    if mde(sd, max_n) > target:
        return None
    high = 4
    while mde(sd, high) > target:  # double first: the bisection then visits few (cached) n
        high = min(2 * high, max_n)
    low = max(2, high // 2)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if mde(sd, mid) <= target else (mid, high)
    return high


def paired_entry(differences: Mapping[str, float], primary: bool = False) -> dict[str, Any]:
    """The tests of one paired contrast (points, keyed by seed) before the family's Holm adjustment; a primary
    endpoint also gets the bootstrap-t interval and the seeds its MDE target needs."""
    seeds = sorted(differences, key=int)
    d = np.array([differences[s] for s in seeds], dtype=np.float64)
    entry: dict[str, Any] = {"n": int(d.size), "seeds": [int(s) for s in seeds], "differences": d.tolist()}
    if d.size == 0:
        return entry | {"verdict": NO_VERDICT}
    entry["mean"] = float(d.mean())
    if d.size < MIN_PAIRS:
        return entry | {"verdict": NO_VERDICT}
    sd = float(d.std(ddof=1))
    t = stats.paired_t_interval(d)
    flip = stats.sign_flip_test(d)
    entry |= {
        "sd": sd,
        "t": {"low": t.low, "high": t.high, "p": t.p_value, "df": int(d.size - 1), "se": t.standard_error},
        "sign_flip": {"p": flip.p_value, "exact": flip.exact, "flips": flip.flips, "smallest_p": flip.smallest_p},
        "tests_disagree": bool((t.p_value or 0.0) <= stats.ALPHA) != bool(flip.p_value <= stats.ALPHA),
        "mde": mde(sd, int(d.size)),
    }
    if not primary:
        return entry
    if d.size >= 3:
        st = stats.studentized_interval(d)
        entry["studentized"] = {"low": st.low, "high": st.high, "resamples": (st.details or {}).get("resamples")}
    entry["seeds_for_target_mde"] = seeds_for(sd)
    return entry


def holm_family(entries: Sequence[dict[str, Any]], expected: str = EXPECTED) -> dict[str, Any]:
    """Holm-adjust the tested entries of one family in place and give each its verdict; the family's summary.

    An entry marked ``pending`` (its design's runs are not all in) gets no adjusted p or verdict and enters the
    adjustment at p = 1 when its design will test it (at least two seeds): its true p can only be smaller, and
    Holm's rejections only grow as p-values fall, so a verdict given now stands when it arrives."""
    tested = [e for e in entries if "t" in e and "pending" not in e]
    waiting = [e for e in entries if "pending" in e and e["pending"]["planned"] >= MIN_PAIRS]
    if tested:
        adjusted = stats.holm([e["t"]["p"] for e in tested] + [1.0] * len(waiting))
        for e, q in zip(tested, adjusted.adjusted, strict=False):
            e["holm_p"] = q
            e["verdict"] = stats.endpoint_verdict(q, e["mean"], expected, e["mde"])  # type: ignore[arg-type]
            if e["n"] < MIN_PAIRS_FOR_VERDICT:  # the t-test alone would decide on a handful of seeds
                e["verdict"] = FEW_PAIRS.format(n=e["n"])
    return {"size": len(tested) + len(waiting), "tested": len(tested), "pending": len(waiting), "alpha": stats.ALPHA,
            "method": "holm"}  # fmt: skip


def _differences(unit: Unit, other: str, metric: str, exclude_flagged: bool = False) -> dict[str, float]:
    a, b = unit.scores.get(ANCHOR, {}), unit.scores.get(other, {})
    out = {}
    for seed in sorted(set(a) & set(b), key=int):
        if exclude_flagged and (unit.flags[ANCHOR][seed] or unit.flags[other][seed]):
            continue
        out[seed] = POINTS * (a[seed][metric] - b[seed][metric])
    return out


def _item_scores(
    unit: Unit, method: str, seed: str, metric: str, benchmarks: Mapping[str, Any], predictions: Predictions
) -> np.ndarray | None:
    """Per test item, the run's correctness weighted so that the items' mean is the run's score on ``metric``
    (``id``, ``ood`` or a domain) in points; None when a prediction is missing."""
    cell = unit.reference_cell if method == ANCHOR else unit.cell
    parts: list[tuple[float, np.ndarray]] = []
    for b in unit.members:
        sets = ["test"] if metric == "id" else benchmarks[b]["domains"] if metric == "ood" else [metric]
        for name in sets:
            items = predictions.get((b, cell, method, seed, name))
            labels = np.asarray(benchmarks[b]["evaluation_sets"][name]["labels"])
            if items is None or items.shape != labels.shape:
                return None
            parts.append((1.0 / (len(unit.members) * len(sets)), (items == labels).astype(np.float64)))
    total = sum(p[1].size for p in parts)
    return np.concatenate([POINTS * share * total / c.size * c for share, c in parts])


_TWO_WAY: dict[bytes, stats.Interval] = {}  # item scores' digest -> interval
_TWO_WAY_KEPT = 256


def _two_way_bootstrap(a: np.ndarray, b: np.ndarray) -> stats.Interval:
    """:func:`kradapter.stats.two_way_bootstrap` (seeded, so a function of its inputs), remembered by a digest of
    them: a running study rebuilds its document after every unit, and an endpoint whose runs did not change would
    otherwise be resampled 10,000 times again (0.85 s each at 20 seeds here)."""
    digest = hashlib.sha256()
    for scores in (a, b):
        digest.update(repr((scores.shape, scores.dtype.str)).encode())
        digest.update(np.ascontiguousarray(scores).tobytes())
    key = digest.digest()
    if key not in _TWO_WAY:
        if len(_TWO_WAY) >= _TWO_WAY_KEPT:
            del _TWO_WAY[next(iter(_TWO_WAY))]  # the oldest
        _TWO_WAY[key] = stats.two_way_bootstrap(a, b)
    return _TWO_WAY[key]


def two_way(
    unit: Unit, other: str, metric: str, seeds: Sequence[int], benchmarks: Mapping[str, Any], predictions: Predictions
) -> dict[str, Any] | None:
    """The two-way (seeds x items) bootstrap interval of KRAdapter minus ``other`` on the given seeds, or None."""
    rows: list[list[np.ndarray]] = [[], []]
    for seed in seeds:
        for row, method in zip(rows, (ANCHOR, other), strict=True):
            scores = _item_scores(unit, method, str(seed), metric, benchmarks, predictions)
            if scores is None:
                return None
            row.append(scores)
    if not seeds:
        return None
    interval = _two_way_bootstrap(np.stack(rows[0]), np.stack(rows[1]))
    details = dict(interval.details or {})
    if len(seeds) < stats.PERCENTILE_MIN_PAIRS:  # too narrow with few seeds: not reported
        details.pop("percentile_low", None)
        details.pop("percentile_high", None)
    return {"estimate": interval.estimate, "low": interval.low, "high": interval.high, "se": interval.standard_error,
            **details}  # fmt: skip


def _mcnemar(
    unit: Unit, other: str, seed: str, benchmarks: Mapping[str, Any], predictions: Predictions
) -> dict[str, Any] | None:
    """McNemar's exact test on one seed: ID items, and the OOD domains' items pooled (unweighted)."""
    out: dict[str, Any] = {}
    for metric in ("id", "ood"):
        pair = []
        for method in (ANCHOR, other):
            cell = unit.reference_cell if method == ANCHOR else unit.cell
            correct = []
            for b in unit.members:
                sets = ["test"] if metric == "id" else benchmarks[b]["domains"]
                for name in sets:
                    items = predictions.get((b, cell, method, seed, name))
                    labels = np.asarray(benchmarks[b]["evaluation_sets"][name]["labels"])
                    if items is None or items.shape != labels.shape:
                        return None
                    correct.append(items == labels)
            pair.append(np.concatenate(correct))
        out[metric] = stats.mcnemar_exact(pair[0], pair[1]).to_dict()
    return out


# -- the analyses ---------------------------------------------------------------------------------------------------


def analyse(
    benchmarks: Mapping[str, Any], predictions: Predictions, groups: Mapping[str, Sequence[str]]
) -> dict[str, Any]:
    """The primary endpoints, the exploratory tables and contrasts, and the mechanism analysis."""
    complete = {g: tuple(m) for g, m in groups.items() if len(m) > 1 and all(b in benchmarks for b in m)}
    all_units = units(benchmarks, complete)
    grouped = {m for members in complete.values() for m in members}  # scored as their group, not one by one
    return {
        "groups": {
            g: {"members": list(m), "scored": g in complete, "missing": [b for b in m if b not in benchmarks]}
            for g, m in groups.items()
        },
        "protocol": {
            "contrast": list(CONTRAST),
            "metric": PRIMARY_METRIC,
            "budget": PRIMARY_BUDGET,
            "expected": EXPECTED,
            "alpha": stats.ALPHA,
            "power": stats.POWER,
            "mde_target_points": MDE_TARGET,
            "unit": "points",
            "flags": list(FLAGS),
            "mechanism": dict(MECHANISM),
        },
        "primary": primary(all_units, grouped, benchmarks, predictions),
        "tables": {f"{u.name}/{u.cell}": table(u, benchmarks) for u in all_units},
        "exploratory": exploratory(all_units, grouped, benchmarks, predictions),
        "mechanism": mechanism(benchmarks),
        "rank_sweep": rank_sweep(benchmarks),
    }


def _is_primary(unit: Unit, grouped: set[str]) -> bool:
    return unit.budget == PRIMARY_BUDGET and (unit.grouped or unit.name not in grouped)


def primary(
    all_units: Sequence[Unit], grouped: set[str], benchmarks: Mapping[str, Any], predictions: Predictions
) -> dict[str, Any]:
    """The pre-registered family: KRAdapter - LoRA, mean OOD, 1x, per benchmark (or group) and shot count; Holm
    over the family; then the family again without flagged runs (sensitivity)."""
    a, b = CONTRAST
    endpoints: list[dict[str, Any]] = []
    sensitivity: list[dict[str, Any]] = []
    for unit in all_units:
        planned = unit.planned["methods"] if unit.planned is not None else unit.scores
        if not _is_primary(unit, grouped) or a not in planned or b not in planned:
            continue
        head: dict[str, Any] = {"name": f"{unit.name}/{unit.cell}", "benchmark": unit.name, "cell": unit.cell,
                                "shots": unit.shots, "members": list(unit.members)}  # fmt: skip
        entry = head | paired_entry(_differences(unit, b, PRIMARY_METRIC), primary=True)
        entry["flagged"] = {s: unit.flags[a].get(s, []) + unit.flags[b].get(s, []) for s in map(str, entry["seeds"])}
        entry["flagged"] = {s: f for s, f in entry["flagged"].items() if f}
        if entry["seeds"]:
            entry["two_way"] = two_way(unit, b, PRIMARY_METRIC, entry["seeds"], benchmarks, predictions)
        clean = head | paired_entry(_differences(unit, b, PRIMARY_METRIC, exclude_flagged=True), primary=True)
        clean["excluded_seeds"] = sorted(int(s) for s in entry["flagged"])
        if not unit.complete(entry["seeds"]) and unit.planned is not None:  # an interim look: no verdict yet
            pending = {"seeds": entry["n"], "planned": len(unit.planned["seeds"])}
            for e in (entry, clean):
                e["pending"] = pending
                e["verdict"] = PENDING.format(**pending)
        endpoints.append(entry)
        sensitivity.append(clean)
    family = holm_family(endpoints)
    holm_family(sensitivity)
    return {"family": family, "endpoints": endpoints, "sensitivity": sensitivity}


def _summary(unit: Unit, method: str, benchmarks: Mapping[str, Any]) -> dict[str, Any]:
    """A method's finished runs in a unit: mean and SD of every score (fractions), fit flags, and (for a
    benchmark's cell) its rate, size, costs and learned-update summary."""
    seeds = unit.scores[method]
    out: dict[str, Any] = {"seeds": [int(s) for s in seeds], "n": len(seeds)}
    for m in unit.metrics:
        mean, sd = stats.mean_std([v[m] for v in seeds.values()])
        out[m] = {"mean": mean, "std": sd}
    flagged = {s: f for s, f in unit.flags[method].items() if f}
    out["flagged_seeds"] = sorted(int(s) for s in flagged)
    if not unit.grouped:
        cell_name = unit.reference_cell if method == ANCHOR else unit.cell
        cell = benchmarks[unit.name]["cells"][cell_name]
        runs = list(cell["runs"][method].values())
        counts: dict[str, int] = {}
        for r in runs:
            counts[r["fit"]] = counts.get(r["fit"], 0) + 1
        out["fit"] = counts
        out["kind"] = "baseline" if method in BASELINES else "method"
        if cell_name != unit.cell:
            out["from_cell"] = cell_name
        chosen = cell["chosen"].get(method)
        if chosen is not None:
            out["lr"] = chosen.get("lr")
            out["on_edge"] = bool(chosen.get("on_edge", False))
            out["trials"] = len(chosen.get("trials", []))
        if any("C" in r for r in runs):
            out["C"] = [r.get("C") for r in runs]
        for key in ("trainable_params",):
            if key in runs[0]:
                out[key] = runs[0][key]
        times = [r["train_time_s"] for r in runs if "train_time_s" in r]
        if times:
            out["train_time_s_mean"] = float(np.mean(times))
        losses = [r["final_train_loss"] for r in runs if r.get("final_train_loss") is not None]
        if losses:
            out["final_train_loss"] = dict(zip(("mean", "std"), stats.mean_std(losses), strict=True))
        for key in ("effective_rank", "update_norm", "intruders"):
            values = [float(r[key]) for r in runs if r.get(key) is not None]
            if values:
                out[key] = dict(zip(("mean", "std"), stats.mean_std(values), strict=True))
    return out


def _method_order(methods: Iterable[str]) -> list[str]:
    """The anchor, LoRA, the other registry methods in registry order (each method's variants after it, by size),
    then the baselines."""
    names = set(methods)
    first = [m for m in CONTRAST if m in names]
    known = sorted((m for m in names - set(first) if m in registry.METHODS or registry.is_variant(m)),
                   key=registry.order_key)  # fmt: skip
    return first + known + sorted(names - set(first) - set(known))


def table(unit: Unit, benchmarks: Mapping[str, Any]) -> dict[str, Any]:
    """One unit's exploratory table: every method and baseline that ran in it."""
    return {
        "benchmark": unit.name, "cell": unit.cell, "shots": unit.shots, "budget": unit.budget,
        "members": list(unit.members), "domains": unit.domains, "reference_cell": unit.reference_cell,
        "rows": {m: _summary(unit, m, benchmarks) for m in _method_order(unit.scores)},
    }  # fmt: skip


def exploratory(
    all_units: Sequence[Unit], grouped: set[str], benchmarks: Mapping[str, Any], predictions: Predictions
) -> dict[str, Any]:
    """KRAdapter minus every other method (and baseline) in every unit, per metric; one Holm family per metric
    (the primary endpoints excluded); McNemar where a contrast has one seed."""
    families: dict[str, list[dict[str, Any]]] = {}
    single: list[dict[str, Any]] = []
    for unit in all_units:
        if ANCHOR not in unit.scores:
            continue
        for other in _method_order(unit.scores):
            if other == ANCHOR:
                continue
            for metric in unit.metrics:
                if metric == PRIMARY_METRIC and other == CONTRAST[1] and _is_primary(unit, grouped):
                    continue
                entry = {"unit": f"{unit.name}/{unit.cell}", "against": other, "metric": metric,
                         **paired_entry(_differences(unit, other, metric))}  # fmt: skip
                if entry["n"] == 0:
                    continue
                families.setdefault(metric, []).append(entry)
                if entry["n"] == 1 and metric == "id":  # one test per single-seed contrast: ID and pooled OOD
                    test = _mcnemar(unit, other, str(entry["seeds"][0]), benchmarks, predictions)
                    if test is not None:
                        single.append({"unit": entry["unit"], "against": other, "seed": entry["seeds"][0], **test})
    summaries = {metric: holm_family(entries) for metric, entries in families.items()}
    return {"label": "exploratory", "families": summaries, "contrasts": families, "mcnemar": single}


# -- mechanism ------------------------------------------------------------------------------------------------------


def mechanism_rows(benchmarks: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per run whose learned update was measured: OOD and ID accuracy (points) and the metrics."""
    rows = []
    for b, bench in benchmarks.items():
        for cid, cell in bench["cells"].items():
            for method, runs in cell["runs"].items():
                for seed, r in runs.items():
                    values = {k: r.get(k) for k in MECHANISM_X}
                    if all(v is None for v in values.values()):
                        continue
                    rows.append({"benchmark": b, "cell": cid, "shots": cell["shots"], "method": method,
                                 "seed": int(seed), "ood": POINTS * r["scores"]["ood"],
                                 "id": POINTS * r["scores"]["id"], "fit": r["fit"], **values})  # fmt: skip
    return rows


def fixed_effects_slope(y: Sequence[float], x: Sequence[float], groups: Sequence[Any]) -> dict[str, Any]:
    """Least-squares slope of ``y`` on ``x`` with one intercept per group (the within estimator), its standard
    error, 95% t interval and two-sided p on ``n - groups - 1`` degrees of freedom, and the slope per
    within-group SD of ``x`` with the MDE (80% power) of that standardised slope."""
    from scipy import stats as sps

    yv, xv = np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)
    keys = [str(g) for g in groups]
    labels = sorted(set(keys))
    index = np.array([labels.index(k) for k in keys])
    n, g = yv.size, len(labels)
    out: dict[str, Any] = {"n": int(n), "groups": g, "df": int(n - g - 1)}
    if n - g - 1 < 1:
        return out | {"estimable": False, "why": f"{n} runs in {g} groups leave no residual degree of freedom"}
    yc = yv - (np.bincount(index, yv) / np.bincount(index))[index]
    xc = xv - (np.bincount(index, xv) / np.bincount(index))[index]
    sxx = float(xc @ xc)
    if sxx <= 1e-12 * max(1.0, float(xv @ xv)):
        return out | {"estimable": False, "why": "x does not vary within any group"}
    slope = float(xc @ yc) / sxx
    residuals = yc - slope * xc
    df = n - g - 1
    se = math.sqrt(float(residuals @ residuals) / df / sxx)
    q = float(sps.t.ppf(0.975, df))
    p = float(2 * sps.t.sf(abs(slope) / se, df)) if se > 0 else (0.0 if slope else 1.0)
    x_sd = math.sqrt(sxx / df)  # the spread of x within groups
    per_sd_se = se * x_sd
    detectable = mde(per_sd_se * math.sqrt(df + 1), df + 1)
    return out | {
        "estimable": True, "slope": slope, "se": se, "low": slope - q * se, "high": slope + q * se, "p": p,
        "x_within_sd": x_sd, "slope_per_sd": slope * x_sd, "mde_per_sd": detectable,
    }  # fmt: skip


def fixed_effect(row: Mapping[str, Any]) -> tuple[str, int, str]:
    """A run's fixed-effect group: its benchmark, shot count and method family (a variant's method:
    :func:`kradapter.registry.family`). Runs of one method at the same shots share the k-shot draws, so what varies
    inside a group is the seed and the method's own configuration (its 1x and 4x sizes, or the variants of a rank
    sweep), never the comparison across unlike methods."""
    return (row["benchmark"], int(row["shots"]), registry.family(row["method"]))


def mechanism(benchmarks: Mapping[str, Any]) -> dict[str, Any]:
    """OOD accuracy regressed on each update metric with benchmark x shots x method fixed effects, pooled over
    every cell and per benchmark; verdicts on the rank and norm statements with Holm over the two (exploratory)."""
    rows = mechanism_rows(benchmarks)
    regressions: dict[str, Any] = {}
    for x in MECHANISM_X:
        usable = [r for r in rows if r[x] is not None]

        def fit(rs: list[dict[str, Any]], x: str = x) -> dict[str, Any]:
            groups = [fixed_effect(r) for r in rs]
            return fixed_effects_slope([r["ood"] for r in rs], [float(r[x]) for r in rs], groups)

        regressions[x] = {
            "pooled": fit(usable),
            "by_seed": seed_slopes(usable, lambda r, x=x: float(r[x]), MECHANISM.get(x)),  # type: ignore[misc, arg-type]
            "by_benchmark": {
                b: fit([r for r in usable if r["benchmark"] == b])
                for b in benchmarks
                if any(r["benchmark"] == b for r in usable)
            },
        }
    tested = {x: regressions[x]["pooled"] for x in MECHANISM if regressions[x]["pooled"].get("estimable")}
    verdicts: dict[str, Any] = {}
    if tested:
        adjusted = stats.holm({x: r["p"] for x, r in tested.items()})
        for x, r in tested.items():
            q = adjusted.by_name()[x]["adjusted"]
            verdicts[x] = {"expected": MECHANISM[x], "holm_p": q,
                           "verdict": stats.endpoint_verdict(q, r["slope"], MECHANISM[x],  # type: ignore[arg-type]
                                                             r["mde_per_sd"])}  # fmt: skip
    return {"label": "exploratory", "fixed_effects": "benchmark x shots x method family", "y": "ood (points)",
            "rows": rows, "regressions": regressions, "verdicts": verdicts}  # fmt: skip


def rank_sweep(benchmarks: Mapping[str, Any]) -> dict[str, Any] | None:
    """The rank sweep (exploratory), when variants (``METHOD@KNOB=VALUE``) ran: per method and variant of the cells
    holding one, its size, mean ID / OOD accuracy (fractions, mean and SD over seeds), mean effective rank and
    ``||dW||_F``; and OOD accuracy (points) regressed on the log of the effective rank with one intercept per
    benchmark x shots x method family (:func:`fixed_effect`: a method's variants share theirs, so the slope is
    within-method), the verdict on the rank statement, and the same fit without flagged runs. None without variants."""
    cells = [(b, cid) for b, bench in benchmarks.items() for cid, cell in bench["cells"].items()
             if any(registry.is_variant(m) for m in cell["runs"])]  # fmt: skip
    if not cells:
        return None
    summaries = []
    for b, cid in cells:
        cell = benchmarks[b]["cells"][cid]
        for method in _method_order(cell["runs"]):
            runs = list(cell["runs"][method].values())
            if all(r.get("effective_rank") is None for r in runs):  # baselines: no learned update measured
                continue
            size = cell["methods"].get(method, {})
            row: dict[str, Any] = {"benchmark": b, "cell": cid, "method": method, "family": registry.family(method),
                                   "knobs": size.get("knobs"), "adapter_params": size.get("adapter_params"),
                                   "n": len(runs), "flagged": sum(r["fit"] in FLAGS for r in runs)}  # fmt: skip
            for key in ("id", "ood"):
                row[key] = dict(zip(("mean", "std"), stats.mean_std([r["scores"][key] for r in runs]), strict=True))
            for key in ("effective_rank", "update_norm"):
                values = [float(r[key]) for r in runs if r.get(key) is not None]
                if values:
                    row[key] = dict(zip(("mean", "std"), stats.mean_std(values), strict=True))
            summaries.append(row)
    rows = [r for r in mechanism_rows({b: benchmarks[b] for b, _ in cells})
            if (r["benchmark"], r["cell"]) in cells and r["effective_rank"] and r["effective_rank"] > 0]  # fmt: skip

    def fit(rs: list[dict[str, Any]]) -> dict[str, Any]:
        x = [math.log(float(r["effective_rank"])) for r in rs]
        return fixed_effects_slope([r["ood"] for r in rs], x, [fixed_effect(r) for r in rs])

    regression = fit(rows)
    by_seed = seed_slopes(rows)
    verdict = "-"
    if regression.get("estimable"):
        verdict = stats.endpoint_verdict(regression["p"], regression["slope"], MECHANISM["effective_rank"],  # type: ignore[arg-type]
                                         regression["mde_per_sd"])  # fmt: skip
    return {"label": "exploratory", "cells": [f"{b}/{cid}" for b, cid in cells], "x": "log effective rank",
            "y": "ood (points)", "fixed_effects": "benchmark x shots x method family",
            "expected": MECHANISM["effective_rank"], "variants": summaries, "regression": regression,
            "verdict": verdict, "without_flagged": fit([r for r in rows if r["fit"] not in FLAGS]),
            "by_seed": by_seed,
            "by_seed_without_flagged": seed_slopes([r for r in rows if r["fit"] not in FLAGS])}  # fmt: skip


def log_rank(row: Mapping[str, Any]) -> float:
    return math.log(float(row["effective_rank"]))


def seed_slopes(
    rows: Sequence[Mapping[str, Any]],
    x: Callable[[Mapping[str, Any]], float] = log_rank,
    expected: Literal["greater", "less"] | None = "greater",
) -> dict[str, Any]:
    """The within-method slope of OOD accuracy (points) on ``x`` (log effective rank) fitted in each seed's draw alone
    (benchmark x shots x seed; one intercept per method family), then a t interval, exact sign-flip p and MDE
    over those slopes: every variant of one seed trains on the same texts, so the draws, not the runs, are the
    independent replicates (the pooled regression counts runs). No verdict below the study's minimum seeds."""
    draws: dict[tuple[str, int, int], list[Mapping[str, Any]]] = {}
    for r in rows:
        draws.setdefault((r["benchmark"], int(r["shots"]), int(r["seed"])), []).append(r)
    slopes = {}
    for key, rs in sorted(draws.items()):
        one = fixed_effects_slope([r["ood"] for r in rs], [x(r) for r in rs], [fixed_effect(r) for r in rs])
        if one.get("estimable"):
            slopes[key] = one["slope"]
    out: dict[str, Any] = {"draws": len(draws), "n": len(slopes),
                           "slopes": [{"benchmark": b, "shots": k, "seed": s, "slope": v}
                                      for (b, k, s), v in slopes.items()]}  # fmt: skip
    if len(slopes) < 2:
        return out | {"estimable": False, "why": f"{len(slopes)} draw(s) with a within-method slope (need 2)"}
    values = list(slopes.values())
    t = stats.paired_t_interval(values)
    sd = float(np.std(values, ddof=1))
    detectable = stats.minimum_detectable_difference(sd, len(values))
    if expected is None:  # no claimed direction to judge
        verdict = "-"
    elif len(values) < MIN_PAIRS_FOR_VERDICT:
        verdict = FEW_PAIRS.format(n=len(values))
    else:
        verdict = stats.endpoint_verdict(t.p_value or 0.0, t.estimate, expected, detectable)
    flip = stats.sign_flip_test(values).p_value
    return out | {"estimable": True, "slope": t.estimate, "sd": sd, "low": t.low, "high": t.high, "p": t.p_value,
                  "sign_flip_p": flip, "mde": detectable, "verdict": verdict}  # fmt: skip


# -- markdown -------------------------------------------------------------------------------------------------------


def _pct(stat: Mapping[str, float]) -> str:
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _num(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2g}" if value >= 0.001 else f"{value:.1e}"


def _interval(low: float | None, high: float | None) -> str:
    return f"[{_num(low, sign=True)}, {_num(high, sign=True)}]"


def _primary_rows(endpoints: Sequence[Mapping[str, Any]], full: bool) -> list[str]:
    head = ["endpoint", "n", "mean", "SD", "95% t interval", "t p", "sign-flip p", "bootstrap-t", "Holm p", "MDE",
            "seeds for MDE 1.5", "verdict"]  # fmt: skip
    if full:
        head[8:8] = ["seeds x items"]
        head += ["flagged seeds"]
    else:
        head += ["excluded seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in endpoints:
        name = f"{e['benchmark']}, {e['shots']} shots"
        if "t" not in e:
            verdict = head.index("verdict")
            cells = [name, str(e["n"]), _num(e.get("mean"), sign=True), *["-"] * (verdict - 3), e["verdict"]]
            lines.append("| " + " | ".join(cells + ["-"] * (len(head) - len(cells))) + " |")
            continue
        flip = _p(e["sign_flip"]["p"]) + (" (disagrees)" if e["tests_disagree"] else "")
        st = e.get("studentized")
        row = [name, str(e["n"]), _num(e["mean"], sign=True), _num(e["sd"]), _interval(e["t"]["low"], e["t"]["high"]),
               _p(e["t"]["p"]), flip, _interval(st["low"], st["high"]) if st else "-", _p(e.get("holm_p")),
               _num(e["mde"]), str(e["seeds_for_target_mde"] or "> 100,000"), f"**{e['verdict']}**"]  # fmt: skip
        if full:
            tw = e.get("two_way")
            row[8:8] = [_interval(tw["low"], tw["high"]) if tw else "-"]
            flagged = e.get("flagged", {})
            row.append(", ".join(f"{s} ({'+'.join(f)})" for s, f in flagged.items()) or "none")
        else:
            row.append(", ".join(map(str, e.get("excluded_seeds", []))) or "none")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _fit_mark(row: Mapping[str, Any], baseline: bool) -> str:
    counts = row.get("fit")
    if counts is None:  # a group's row: each seed is the mean of its tasks' runs
        flagged = row.get("flagged_seeds", [])
        if flagged:
            return f"⚠ {len(flagged)} seed(s) with a flagged task"
        return "-" if baseline else "fit"
    marks = [f"⚠ {counts[f]} {f}" for f in FLAGS if counts.get(f)]
    return ", ".join(marks) if marks else ("fit" if counts.get("fit") else "-")


def _rate(row: Mapping[str, Any]) -> str:
    if "lr" in row and row["lr"] is not None:
        return f"{row['lr']:g}" + (" (edge)" if row.get("on_edge") else "")
    if row.get("C"):
        values = sorted({c for c in row["C"] if c is not None})
        return "C " + ", ".join(f"{c:g}" for c in values)
    return "-"


def markdown(results: Mapping[str, Any]) -> str:
    """The primary endpoints first, then per unit every method and baseline (exploratory), the exploratory
    contrasts and the mechanism."""
    lines: list[str] = []
    a, b = (registry.label(m) for m in CONTRAST)
    prim = results["primary"]
    lines += [f"## Primary endpoints (pre-registered): {a} minus {b}, mean OOD accuracy, 1x count, points", ""]
    if prim["endpoints"]:
        family = prim["family"]
        lines += [f"Holm over the family's {family['size']} endpoints; verdicts from the Holm-adjusted paired "
                  "t-test, with the MDE at the achieved seeds (80% power, two-sided 5%).", ""]  # fmt: skip
        if family.get("pending"):
            lines[-2] += (f" **Interim: {family['pending']} of them pending** (their runs are not all in): each "
                          "enters the adjustment at p = 1 and gets no verdict, so every verdict given now stands "
                          "when they arrive (a \"not detected\" may still become a verdict).")  # fmt: skip
        lines += _primary_rows(prim["endpoints"], full=True)
        lines += ["", "Sensitivity: the same family without seeds where either method's run was flagged "
                  f"({' / '.join(FLAGS)}):", ""]  # fmt: skip
        lines += _primary_rows(prim["sensitivity"], full=False)
    else:
        lines.append(f"No cell at 1x holds both {a} and {b}.")
    lines += ["", "## Every method and baseline per cell (exploratory)", ""]
    lines.append("Accuracy %, mean ± SD over seeds; ⚠ marks runs the training flagged; (edge): the chosen rate is "
                 "an edge of the tried rates.")  # fmt: skip
    for tab in results["tables"].values():
        domains = tab["domains"]
        members = f" (mean of {', '.join(tab['members'])})" if len(tab["members"]) > 1 else ""
        lines += ["", f"### {tab['benchmark']}{members}, {tab['shots']} shots per class, {tab['budget']}x "
                  f"{registry.label(CONTRAST[0])}'s count", ""]  # fmt: skip
        head = ["method", "n", "ID %", *[f"{d} %" for d in domains], "OOD %", "OOD - ID", "fit", "rate",
                "eff. rank", "norm dW", "intruders"]  # fmt: skip
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, row in tab["rows"].items():
            label = registry.label(name) + (" (baseline)" if name in BASELINES else "")
            if "from_cell" in row:
                label += f" (runs of {row['from_cell']})"
            cells = [label, str(row["n"]), _pct(row["id"]), *[_pct(row[d]) for d in domains], _pct(row["ood"]),
                     _pct(row["gap"]), _fit_mark(row, name in BASELINES), _rate(row)]  # fmt: skip
            for k in ("effective_rank", "update_norm", "intruders"):
                cells.append(f"{row[k]['mean']:.1f}" if k in row else "-")
            lines.append("| " + " | ".join(cells) + " |")
    lines += _exploratory_lines(results["exploratory"])
    lines += _mechanism_lines(results["mechanism"])
    if results.get("rank_sweep"):
        lines += _rank_sweep_lines(results["rank_sweep"])
    return "\n".join(lines)


def _exploratory_lines(expl: Mapping[str, Any]) -> list[str]:
    anchor = registry.label(ANCHOR)
    lines = ["", f"## {anchor} minus every other method (exploratory)", ""]
    lines.append("Points; paired t interval; Holm within each metric's family (its size in the heading).")
    for metric, entries in expl["contrasts"].items():
        lines += ["", f"### {metric} (family of {expl['families'][metric]['size']})", ""]
        head = ["cell", "against", "n", "mean", "95% t interval", "t p", "sign-flip p", "Holm p", "verdict"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in entries:
            if "t" not in e:
                row = [e["unit"], registry.label(e["against"]), str(e["n"]), _num(e.get("mean"), sign=True),
                       "-", "-", "-", "-", e["verdict"]]  # fmt: skip
            else:
                flip = _p(e["sign_flip"]["p"]) + (" (disagrees)" if e["tests_disagree"] else "")
                row = [e["unit"], registry.label(e["against"]), str(e["n"]), _num(e["mean"], sign=True),
                       _interval(e["t"]["low"], e["t"]["high"]), _p(e["t"]["p"]), flip, _p(e["holm_p"]),
                       e["verdict"]]  # fmt: skip
            lines.append("| " + " | ".join(row) + " |")
    if expl["mcnemar"]:
        lines += ["", "Single-seed contrasts, McNemar's exact test (exploratory):", "",
                  "| cell | against | seed | ID difference | ID p | OOD difference (pooled items) | OOD p |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for m in expl["mcnemar"]:
            lines.append(f"| {m['unit']} | {registry.label(m['against'])} | {m['seed']} | "
                         f"{POINTS * m['id']['difference']:+.2f} | {_p(m['id']['p_value'])} | "
                         f"{POINTS * m['ood']['difference']:+.2f} | {_p(m['ood']['p_value'])} |")  # fmt: skip
    return lines


def _mechanism_lines(mech: Mapping[str, Any]) -> list[str]:
    lines = ["", "## Mechanism (exploratory)", "",
             "OOD accuracy (points) regressed on each learned-update metric with one intercept per benchmark x shots x "
             "method family (least squares); slope per unit of the metric and per within-group SD of it.", "",
             "| metric | scope | n | groups | slope | 95% t interval | p | per SD | MDE per SD | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for x, reg in mech["regressions"].items():
        scopes = [("pooled", reg["pooled"]), *reg["by_benchmark"].items()]
        for scope, r in scopes:
            if not r.get("estimable"):
                lines.append(f"| {x} | {scope} | {r['n']} | {r['groups']} | - | - | - | - | - | {r.get('why', '-')} |")
                continue
            verdict = mech["verdicts"].get(x, {}).get("verdict", "-") if scope == "pooled" else "-"
            lines.append(f"| {x} | {scope} | {r['n']} | {r['groups']} | {r['slope']:+.3g} | "
                         f"[{r['low']:+.3g}, {r['high']:+.3g}] | {_p(r['p'])} | {r['slope_per_sd']:+.2f} | "
                         f"{r['mde_per_sd']:.2f} | {verdict} |")  # fmt: skip
    per_draw = {x: reg["by_seed"] for x, reg in mech["regressions"].items() if reg.get("by_seed", {}).get("estimable")}
    if per_draw:
        lines += ["", "The same slopes fitted in each seed's draw alone (where a method family has runs of more than "
                  "one size in a draw), then over the draws: t interval, exact sign-flip p, MDE in the metric's unit.",
                  "",
                  "| metric | draws | slope | SD | 95% t interval | t p | sign-flip p | MDE | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for x, r in per_draw.items():
            lines.append(f"| {x} | {r['n']} | {r['slope']:+.3g} | {r['sd']:.3g} | [{r['low']:+.3g}, {r['high']:+.3g}] "
                         f"| {_p(r['p'])} | {_p(r['sign_flip_p'])} | {r['mde']:.3g} | {r['verdict']} |")  # fmt: skip
    lines.append("")
    return lines


def _rank_sweep_lines(sweep: Mapping[str, Any]) -> list[str]:
    lines = ["## Rank sweep (exploratory)", "",
             "Each method at fixed sizes (variants METHOD@KNOB=VALUE) in " + ", ".join(sweep["cells"]) + "; accuracy "
             "%, mean ± SD over seeds; effective rank: mean over layers of the learned update's, then over seeds.", "",
             "| method | size | params | n | ID % | OOD % | eff. rank | norm dW | flagged |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in sweep["variants"]:
        knobs = ", ".join(f"{k}={v}" for k, v in (row["knobs"] or {}).items()) or "-"
        params = f"{row['adapter_params']:,}" if row["adapter_params"] is not None else "-"
        cells = [registry.label(row["method"]), knobs, params, str(row["n"]), _pct(row["id"]), _pct(row["ood"])]
        for k in ("effective_rank", "update_norm"):
            cells.append(f"{row[k]['mean']:.1f} ± {row[k]['std']:.1f}" if k in row else "-")
        cells.append(str(row["flagged"]) if row["flagged"] else "none")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "OOD accuracy (points) on the log of the effective rank, one intercept per benchmark x shots x "
              "method family (a method's variants share it: the slope is within-method); slope per unit of log rank "
              "(x e) and per within-family SD of it; the verdict on 'higher effective rank, better OOD' (one test).",
              "", "| runs | n | families | slope | 95% t interval | p | per SD | MDE per SD | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for scope, r, verdict in (("all", sweep["regression"], sweep["verdict"]),
                              ("without flagged", sweep["without_flagged"], "-")):  # fmt: skip
        if not r.get("estimable"):
            lines.append(f"| {scope} | {r['n']} | {r['groups']} | - | - | - | - | - | {r.get('why', '-')} |")
            continue
        lines.append(f"| {scope} | {r['n']} | {r['groups']} | {r['slope']:+.3g} | "
                     f"[{r['low']:+.3g}, {r['high']:+.3g}] | {_p(r['p'])} | {r['slope_per_sd']:+.2f} | "
                     f"{r['mde_per_sd']:.2f} | **{verdict}** |")  # fmt: skip
    lines += ["", "The same slope fitted in each seed's draw alone (every variant of a seed trains on the same texts, "
              "so the draws are the independent replicates), then over the draws: mean slope (points per unit of log "
              "rank), t interval, exact sign-flip p, MDE in the same unit.", "",
              "| runs | draws | slope | SD | 95% t interval | t p | sign-flip p | MDE | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for scope, r in (("all", sweep.get("by_seed")), ("without flagged", sweep.get("by_seed_without_flagged"))):
        if r is None:  # a document written before the per-draw fit
            continue
        if not r.get("estimable"):
            lines.append(f"| {scope} | {r['n']} | - | - | - | - | - | - | {r.get('why', '-')} |")
            continue
        lines.append(f"| {scope} | {r['n']} | {r['slope']:+.3g} | {r['sd']:.3g} | [{r['low']:+.3g}, {r['high']:+.3g}] "
                     f"| {_p(r['p'])} | {_p(r['sign_flip_p'])} | {r['mde']:.2f} | **{r['verdict']}** |")  # fmt: skip
    lines.append("")
    return lines


# -- plots ------------------------------------------------------------------------------------------------------------


def plot_kshot(results: Mapping[str, Any], benchmark: str, path: Path) -> Path | None:
    """ID and mean OOD accuracy against shots per class (1x budget), mean ± SD over seeds, one line per method
    and baseline."""
    cells = [t for t in results["tables"].values() if t["benchmark"] == benchmark and t["budget"] == 1]
    if len({c["shots"] for c in cells}) < 2:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=False)
    methods = _method_order({m for c in cells for m in c["rows"] if sum(m in d["rows"] for d in cells) > 1})
    for ax, metric, title in zip(axes, ("id", "ood"), ("in-distribution", "out-of-distribution (mean)"), strict=True):
        for m in methods:
            points = sorted((c["shots"], c["rows"][m][metric]) for c in cells if m in c["rows"])
            means, sds = [100 * p[1]["mean"] for p in points], [100 * p[1]["std"] for p in points]
            style = "--" if m in BASELINES else "-"
            ax.errorbar([p[0] for p in points], means, yerr=sds, marker="o", capsize=3, linestyle=style,
                        label=registry.label(m))  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training texts per class")
        ax.set_title(f"{benchmark}: {title}")
        ax.set_ylabel("accuracy %")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return write_figure(fig, path, dpi=FIGURE_DPI)


def plot_mechanism(results: Mapping[str, Any], path: Path) -> Path | None:
    """What the fixed-effects regressions fit: OOD accuracy against effective rank and update norm, both centred
    within benchmark x shots x method, with the pooled slope."""
    mech = results["mechanism"]
    panels = [x for x in ("effective_rank", "update_norm") if mech["regressions"][x]["pooled"].get("estimable")]
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, x in zip(axes[0], panels, strict=True):
        rows = [r for r in mech["rows"] if r[x] is not None]
        keys = [fixed_effect(r) for r in rows]
        xs, ys = np.array([float(r[x]) for r in rows]), np.array([r["ood"] for r in rows])
        for key in set(keys):
            mask = np.array([k == key for k in keys])
            xs[mask] -= xs[mask].mean()
            ys[mask] -= ys[mask].mean()
        for method in _method_order({r["method"] for r in rows}):
            mask = np.array([r["method"] == method for r in rows])
            ax.scatter(xs[mask], ys[mask], s=12, label=registry.label(method))
        slope = mech["regressions"][x]["pooled"]["slope"]
        grid = np.linspace(xs.min(), xs.max(), 2)
        ax.plot(grid, slope * grid, color="black", linewidth=1)
        ax.set_xlabel(f"{x.replace('_', ' ')} (centred within method x shots)")
        ax.set_ylabel("OOD accuracy, points (centred)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return write_figure(fig, path, dpi=FIGURE_DPI)


def plot_rank_sweep(results: Mapping[str, Any], path: Path) -> Path | None:
    """The rank sweep: each variant's mean OOD and ID accuracy (SD over seeds as bars) against the mean effective
    rank of its learned update (log axis), one line per method family per cell, each point named by its size
    (``r=64``; ``default``: the method's own); None without a sweep."""
    sweep = results.get("rank_sweep")
    rows = [r for r in (sweep or {}).get("variants", []) if r.get("effective_rank")]
    if not rows:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True, squeeze=False)
    lines = sorted({(r["benchmark"], r["cell"], r["family"]) for r in rows})
    several_cells = len({(b, cid) for b, cid, _ in lines}) > 1
    for ax, key in zip(axes[0], ("ood", "id"), strict=True):
        for b, cid, family in lines:
            group = sorted((r for r in rows if (r["benchmark"], r["cell"], r["family"]) == (b, cid, family)),
                           key=lambda r: r["effective_rank"]["mean"])  # fmt: skip
            xs = [r["effective_rank"]["mean"] for r in group]
            ys = [POINTS * r[key]["mean"] for r in group]
            name = registry.label(family) + (f" ({b} {cid})" if several_cells else "")
            ax.errorbar(xs, ys, yerr=[POINTS * r[key]["std"] for r in group], marker="o", markersize=4,
                        capsize=2, linewidth=1, label=name)  # fmt: skip
            for x, y, r in zip(xs, ys, group, strict=True):
                size = r["method"].split("@", 1)[1] if registry.is_variant(r["method"]) else "default"
                ax.annotate(size, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("effective rank of the learned update (mean over layers and seeds)")
        ax.set_ylabel(f"{key.upper()} accuracy, points (mean ± SD over seeds)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Rank sweep (exploratory): accuracy against the update's effective rank", fontsize=9)
    fig.tight_layout()
    return write_figure(fig, path, dpi=FIGURE_DPI)


def write_reports(results: Mapping[str, Any], store: Store) -> str:
    """The markdown tables, the k-shot curves, the mechanism and rank-sweep plots, and the learned updates'
    effective ranks and spectra (anchor cell, first seed, read from the store's records) of every benchmark;
    returns the tables."""
    table_text = markdown(results)
    store.write_text(TABLE_FILE, table_text + "\n")
    with store.writing(MECHANISM_PLOT) as path:  # each plot listed before it is drawn (none: unlisted again)
        plot_mechanism(results, path)
    with store.writing(RANK_SWEEP_PLOT) as path:
        plot_rank_sweep(results, path)
    settings = results.get("settings") or {}
    anchor = cell_id(settings["anchor_shots"], 1) if settings.get("anchor_shots") else None
    for b in [*results["benchmarks"], *(g for g, v in results["groups"].items() if v["scored"])]:
        with store.writing(f"shift_{b}_kshot.png") as path:
            plot_kshot(results, b, path)
        if anchor is None or b not in results["benchmarks"]:
            continue
        first: dict[str, Any] = {}
        for key, record in sorted(store.matching(b, anchor, "run"), key=lambda kv: int(kv[0][4])):
            label = registry.label(str(key[3]))
            if label not in first and isinstance(record, Mapping) and record.get("updates"):
                first[label] = record["updates"]
        if first:
            with store.writing(f"shift_{b}_rank.png") as path:
                plot_effective_rank(first, path, f"{b}: effective rank of dW per layer")
            with store.writing(f"shift_{b}_spectra.png") as path:
                plot_spectra(first, path)
    return table_text
