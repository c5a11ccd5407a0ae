"""``kradapter finetune --study shift``: does a high-rank update generalise better under distribution shift?

Per benchmark (``sentiment``: movie reviews -> Amazon, tweets, NYT; ``topic``: BBC News -> 20 Newsgroups; see
:mod:`kradapter.finetune.shift_data`) each *cell* (shots per class, budget multiple) trains every method on a
k-shot draw of the source pool per seed and evaluates it on the held-out source test set (ID) and on every
shifted domain (OOD). Training, evaluation and method sizing are ``kradapter finetune``'s own: one
:class:`~kradapter.finetune.runner.Execution` per cell, all cells in one results store, keys
``(benchmark, cell, "run" | "sweep", method, seed | lr)``.

- Learning rates: each method's grid is swept once per benchmark, in the *anchor* cell (``anchor_shots`` shots,
  KRAdapter's budget, the first seed, validation articles from the pool), and the chosen rate is used in every
  other cell of that benchmark.
- Budgets are multiples of KRAdapter's trainable count. KRAdapter has no knob that scales its count (its two
  factorisations differ by 12%), so in a cell above 1x it is absent, and the others are compared with its 1x runs
  at the same shots (the same k-shot draws).
- Contenders (LoHa's relatives: SHiRA, HiRA, GraLoRA, C3A, ...) run in the anchor cell only.
- Evaluation sets are capped at ``eval_per_class`` texts per class (a fixed draw, the same for every run).
- Statistics: per cell, KRAdapter minus each other method on the same seeds (same draw, same initialisation
  stream), with a 95% bootstrap interval (:mod:`kradapter.stats`), on ID accuracy, mean OOD accuracy, each
  domain's accuracy and the gap ``OOD - ID``; "better" always means better for KRAdapter. With fewer than
  :data:`MIN_PAIRS` seeds the interval is reported without a verdict.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import registry
from ..store import RunSpec, Store
from .data import Corpus, check_shots, kshot_train, validation
from .protocol import Settings, SettingsError, parse_methods

if TYPE_CHECKING:
    from .plan import ModelProbe, Plan
    from .shift_data import ShiftBenchmark

RESULTS_FILE = "shift_results.json"
TABLE_FILE = "shift_table.md"
FORMAT = 1
REFERENCE = "kradapter"
MIN_PAIRS = 5  # fewer seeds give an interval (the bootstrap's min..max of a handful of values) but no verdict
NO_VERDICT = f"no verdict (n < {MIN_PAIRS})"
BENCHMARKS = ("sentiment", "topic")

# Two presets: ``reduced`` (the default; 17 minutes on 2 CPU cores) and ``full`` (the findings page's settings).
PRESETS: dict[str, dict[str, Any]] = {
    "reduced": {
        "benchmarks": BENCHMARKS,
        "methods": ("lora", "kradapter"),
        "contenders": (),
        "seeds": (0, 1, 2, 3, 4),
        "shots": (32,),
        "budgets": (1,),
        "eval_per_class": 200,
    },
    "full": {
        "benchmarks": BENCHMARKS,
        "methods": ("lora", "kradapter", "loha"),
        "contenders": ("shira", "hira", "gralora", "c3a"),
        "seeds": (0, 1, 2, 3, 4),
        "shots": (8, 32, 128),
        "budgets": (1, 4),
        "eval_per_class": 200,
    },
}


def _int(flag: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingsError(f"{flag} must be an integer >= {minimum}, got {value!r}")
    return value


def _ints(flag: str, values: Any, minimum: int) -> tuple[int, ...]:
    values = tuple(values)
    if not values:
        raise SettingsError(f"{flag} needs at least one value")
    for v in values:
        _int(flag, v, minimum)
    if len(set(values)) != len(values):
        raise SettingsError(f"{flag} has duplicates: {list(values)}")
    return values


@dataclass(frozen=True)
class StudySettings:
    """Everything the study depends on, checked on construction; ``base`` holds the recipe shared with
    ``kradapter finetune`` (its ``methods``, ``seeds`` and ``shots`` are ignored)."""

    base: Settings
    benchmarks: tuple[str, ...] = PRESETS["reduced"]["benchmarks"]
    methods: tuple[str, ...] = PRESETS["reduced"]["methods"]
    contenders: tuple[str, ...] = PRESETS["reduced"]["contenders"]
    seeds: tuple[int, ...] = PRESETS["reduced"]["seeds"]
    shots: tuple[int, ...] = PRESETS["reduced"]["shots"]
    anchor_shots: int | None = None  # default: the middle of ``shots``
    budgets: tuple[int, ...] = PRESETS["reduced"]["budgets"]
    eval_per_class: int = PRESETS["reduced"]["eval_per_class"]  # 0: every text of every evaluation set
    lr_grids: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown or not self.benchmarks:
            raise SettingsError(f"--benchmarks: unknown {unknown or 'none given'}; choose from {', '.join(BENCHMARKS)}")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise SettingsError(f"--benchmarks has duplicates: {list(self.benchmarks)}")
        methods = parse_methods(list(self.methods))
        contenders = parse_methods(list(self.contenders)) if self.contenders else ()
        for flag, names in (("--methods", methods), ("--contenders", contenders)):
            baselines = [m for m in names if not registry.METHODS[m].is_adapter]
            if baselines:
                raise SettingsError(f"{flag}: the shift study compares adapters; {baselines} are not")
        if REFERENCE not in methods:
            raise SettingsError(f"--methods must include {REFERENCE} (every comparison is against it)")
        if len(methods) < 2:
            raise SettingsError("--methods needs kradapter and at least one other adapter")
        both = sorted(set(methods) & set(contenders))
        if both:
            raise SettingsError(f"{both} given both in --methods and in --contenders")
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "contenders", contenders)
        seeds = _ints("--seeds", self.seeds, 0)
        if len(seeds) < 2:
            raise SettingsError(f"--seeds: paired intervals need at least 2 seeds, got {list(seeds)}")
        object.__setattr__(self, "seeds", seeds)
        shots = tuple(sorted(_ints("--shots", self.shots, 1)))
        object.__setattr__(self, "shots", shots)
        anchor = shots[len(shots) // 2] if self.anchor_shots is None else self.anchor_shots
        if anchor not in shots:
            raise SettingsError(f"--anchor-shots {anchor} is not one of --shots {list(shots)}")
        object.__setattr__(self, "anchor_shots", anchor)
        budgets = tuple(sorted(_ints("--budgets", self.budgets, 1)))
        if 1 not in budgets:
            raise SettingsError(f"--budgets must include 1 (KRAdapter's own count), got {list(budgets)}")
        object.__setattr__(self, "budgets", budgets)
        _int("--eval-per-class", self.eval_per_class, 0)
        for method in self.lr_grids:
            if method not in (*methods, *contenders):
                raise SettingsError(f"--lr-grid names {method!r}, which is not in --methods or --contenders")

    @property
    def anchor(self) -> str:
        return cell_id(self.anchor_shots or 0, 1)

    def grid(self, method: str) -> tuple[float, ...]:
        return self.lr_grids.get(method, registry.METHODS[method].lr_grid)

    def cells(self, benchmark: str) -> list[Cell]:
        """The benchmark's cells, the anchor first (its sweep fixes every other cell's learning rates)."""
        anchor = self.anchor_shots or 0
        out = [Cell(benchmark, anchor, 1, (*self.methods, *self.contenders))]
        out += [Cell(benchmark, k, 1, self.methods) for k in self.shots if k != anchor]
        scalable = tuple(m for m in self.methods if m != REFERENCE)
        out += [Cell(benchmark, anchor, x, scalable) for x in self.budgets if x != 1]
        return out

    def run_spec(self, inputs: Mapping[str, str]) -> RunSpec:
        b = self.base
        settings = {
            "anchor_shots": self.anchor_shots,
            "eval_per_class": self.eval_per_class,
            "val_shots": b.val_shots,
            "epochs": b.epochs,
            "batch_size": b.batch_size,
            "max_length": b.max_length,
            "targets": list(b.targets) if b.targets else None,
            "device": b.device,
        }
        axes: dict[str, list[Any]] = {
            "benchmarks": list(self.benchmarks),
            "methods": [*self.methods, *self.contenders],
            "seeds": list(self.seeds),
            "shots": list(self.shots),
            "budgets": list(self.budgets),
        }
        per_value = {"methods": {m: {"lr_grid": list(self.grid(m))} for m in (*self.methods, *self.contenders)}}
        return RunSpec("shift", settings, axes, dict(inputs), per_value)


@dataclass(frozen=True)
class Cell:
    benchmark: str
    shots: int
    budget: int
    methods: tuple[str, ...]

    @property
    def id(self) -> str:
        return cell_id(self.shots, self.budget)


def cell_id(shots: int, budget: int) -> str:
    return f"k{shots}_x{budget}"


# -- data ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkData:
    """A benchmark as one corpus: the source pool, then the ID test set, then each shifted domain."""

    corpus: Corpus
    pool: np.ndarray
    evals: dict[str, np.ndarray]  # "test" (ID) first, then the shifted domains

    @property
    def domains(self) -> list[str]:
        return [name for name in self.evals if name != "test"]


def benchmark_data(bench: ShiftBenchmark, per_class: int) -> BenchmarkData:
    """Concatenate the benchmark's sets (evaluation sets capped at ``per_class`` texts per class; 0: all)."""
    from .shift_data import cap_per_class

    parts = [("pool", bench.pool), ("test", bench.test), *bench.shifted.items()]
    texts: list[str] = []
    labels: list[np.ndarray] = []
    index: dict[str, np.ndarray] = {}
    for name, data in parts:
        if name != "pool" and per_class:
            data = cap_per_class(data, per_class, seed=0)
        index[name] = np.arange(len(texts), len(texts) + len(data))
        texts += data.texts
        labels.append(data.labels)
    corpus = Corpus(texts, np.concatenate(labels), bench.classes, Path(bench.name))
    return BenchmarkData(corpus, index.pop("pool"), index)


def data_hash(data: BenchmarkData) -> str:
    """sha256 of the texts and labels of every set the study uses (what the numbers depend on)."""
    digest = hashlib.sha256()
    for name, idx in [("pool", data.pool), *data.evals.items()]:
        digest.update(name.encode())
        for i in idx:
            digest.update(f"{int(data.corpus.labels[i])}\t{data.corpus.texts[i]}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def check_data(settings: StudySettings, data: Mapping[str, BenchmarkData]) -> None:
    """A SettingsError naming the benchmark, class and numbers when a pool cannot supply the largest shots."""
    for b in settings.benchmarks:
        if b not in data:
            raise SettingsError(f"no data for benchmark {b!r}")
        try:
            check_shots(data[b].corpus, data[b].pool, max(settings.shots), settings.base.val_shots)
        except ValueError as exc:
            raise SettingsError(f"benchmark {b}: {exc}") from None


# -- execution ---------------------------------------------------------------------------------------------------


class Study:
    """The study's plans (one per cell), built before any training, and their execution into one store."""

    def __init__(
        self, settings: StudySettings, model_dir: Path, model_name: str, data: Mapping[str, BenchmarkData]
    ) -> None:
        from .plan import probe_model

        self.settings = settings
        self.model_dir = model_dir
        self.model_name = model_name
        self.data = dict(data)
        self.probes: dict[str, ModelProbe] = {}
        self.budgets: dict[str, int] = {}
        self.cells = [cell for b in settings.benchmarks for cell in settings.cells(b)]
        check_data(settings, self.data)
        for b in settings.benchmarks:
            corpus = self.data[b].corpus
            self.probes[b] = probe_model(model_dir, len(corpus.classes), settings.base.targets)
            self.budgets[b] = registry.kradapter_budget(list(self.probes[b].layers.values()))
        self.sizes = {(c.benchmark, c.id): self._size(c) for c in self.cells}  # every method fits, or stop here

    def _size(self, cell: Cell) -> dict[str, registry.Plan]:
        from .plan import size_methods

        try:
            return size_methods(cell.methods, self.probes[cell.benchmark], self.budgets[cell.benchmark] * cell.budget)
        except SettingsError as exc:
            raise SettingsError(f"{cell.benchmark} {cell.id}: {exc}") from None

    def plan(self, cell: Cell, store: Store) -> Plan:
        """The cell's plan; outside the anchor, each method's rate is the one its anchor sweep chose."""
        from .plan import Plan
        from .runner import choose

        s = self.settings
        if cell.id == s.anchor:
            grids = {m: s.grid(m) for m in cell.methods}
        else:
            prefix = (cell.benchmark, s.anchor)
            grids = {m: (choose(store, m, s.grid(m), prefix),) for m in cell.methods}
        base = replace(s.base, methods=cell.methods, seeds=s.seeds, shots=cell.shots, lr_grids=grids)
        data, probe = self.data[cell.benchmark], self.probes[cell.benchmark]
        labels = data.corpus.labels
        train_sets = {seed: kshot_train(labels, data.pool, cell.shots, seed) for seed in s.seeds}
        val = validation(labels, data.pool, train_sets[base.sweep_seed], base.val_shots, base.sweep_seed)
        return Plan(base, data.corpus, data.pool, data.evals["test"], train_sets, val, self.model_dir, self.model_name,
                    probe.head, probe.head_params, probe.layers, self.budgets[cell.benchmark] * cell.budget,
                    self.sizes[(cell.benchmark, cell.id)], evals=data.evals)  # fmt: skip

    def units(self) -> int:
        s = self.settings
        total = 0
        for cell in self.cells:
            sweeps = sum(len(s.grid(m)) for m in cell.methods) if cell.id == s.anchor else 0
            total += sweeps + len(cell.methods) * len(s.seeds)
        return total

    def run(self, store: Store, rank: int = 0, world_size: int = 1, progress: bool = True) -> None:
        from .runner import Execution

        def report() -> None:
            if rank == 0:
                store.write_json(RESULTS_FILE, document(store, self), indent=1)

        for i, cell in enumerate(self.cells, 1):
            desc = f"{cell.benchmark} {cell.id} ({i}/{len(self.cells)})"
            execution = Execution(self.plan(cell, store), store, rank, world_size, progress,
                                  prefix=(cell.benchmark, cell.id), report=report, desc=desc)  # fmt: skip
            execution.run()


# -- results ------------------------------------------------------------------------------------------------------


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
    from ..stats import paired_difference
    from .runner import choose, lr_key
    from .updates import updates_summary

    s = study.settings
    environments = [i["environment"] for i in store.meta.get("invocations", []) if "environment" in i]
    benchmarks: dict[str, Any] = {}
    for b in s.benchmarks:
        data = study.data[b]
        labels = data.corpus.labels
        benchmarks[b] = {
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
    for cell in study.cells:
        domains = study.data[cell.benchmark].domains
        prefix = (cell.benchmark, cell.id)
        methods: dict[str, Any] = {}
        runs: dict[str, dict[str, Any]] = {}
        for name, size in study.sizes[prefix].items():
            entry = {"knobs": size.settings, "adapter_params": size.count, "budget_ratio": size.budget_ratio,
                     "describe": registry.METHODS[name].describe(size.settings)}  # fmt: skip
            anchor_prefix = (cell.benchmark, s.anchor)
            if all(store.done((*anchor_prefix, "sweep", name, lr_key(lr))) for lr in s.grid(name)):
                entry["lr"] = choose(store, name, s.grid(name), anchor_prefix)
            methods[name] = entry
            for seed in s.seeds:
                record = store.records.get((*prefix, "run", name, seed))
                if record is not None:
                    runs.setdefault(name, {})[str(seed)] = {**record, "scores": run_scores(record, domains)}
        summary = {}
        for name, by_seed in runs.items():
            done = list(by_seed.values())
            metrics = ["id", *domains, "ood", "gap"]
            summary[name] = {
                "seeds": [r["seed"] for r in done],
                **{m: _mean_std([r["scores"][m] for r in done]) for m in metrics},
                "train_time_s_mean": float(np.mean([r["train_time_s"] for r in done])),
                "peak_memory_mb_max": float(max(r["peak_memory_mb"] for r in done)),
                **_added_memory(done),
                "trainable_params": done[0]["trainable_params"],
                **updates_summary(done),
            }
        reference_prefix = prefix if REFERENCE in cell.methods else (cell.benchmark, cell_id(cell.shots, 1))
        reference = {
            str(seed): run_scores(rec, domains)
            for seed in s.seeds
            if (rec := store.records.get((*reference_prefix, "run", REFERENCE, seed))) is not None
        }
        paired: dict[str, Any] = {}
        for metric in ["id", "ood", "gap", *domains]:
            for name, by_seed in runs.items():
                common = [k for k in by_seed if k in reference]  # seeds both have finished (a run may be partial)
                if name == REFERENCE or len(common) < 2:
                    continue
                pair = paired_difference(
                    {k: reference[k][metric] for k in common}, {k: by_seed[k]["scores"][metric] for k in common}
                ).to_dict()
                if len(common) < MIN_PAIRS:
                    pair["verdict"] = NO_VERDICT
                paired.setdefault(metric, {})[name] = pair
        benchmarks[cell.benchmark]["cells"][cell.id] = {
            "shots": cell.shots,
            "budget": cell.budget,
            "budget_params": study.budgets[cell.benchmark] * cell.budget,
            "reference_cell": reference_prefix[1],
            "methods": methods,
            "runs": runs,
            "summary": summary,
            "paired": paired,
        }
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
    for b, bench in results["benchmarks"].items():
        domains = bench["domains"]
        for cid, cell in bench["cells"].items():
            if not cell["summary"]:
                continue
            lines += [f"### {b}, {cell['shots']} shots per class, {cell['budget']}x KRAdapter's count", ""]
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
                note = "" if ref == cid else f" (KRAdapter's runs of {ref})"
                lines += ["", f"KRAdapter{note} minus each method, points, 95% paired bootstrap interval:", ""]
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..store import write_figure
    from .updates import FIGURE_DPI

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
    from .updates import plot_effective_rank, plot_spectra

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
