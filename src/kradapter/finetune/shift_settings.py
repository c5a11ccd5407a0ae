"""``kradapter shift``'s settings: benchmarks, presets, methods, cells and the tuning grids, checked on construction.

The study itself is :mod:`kradapter.finetune.shift` (the protocol is described there and in ``docs/shift.md``), its
data :mod:`kradapter.finetune.shift_data` and :mod:`kradapter.finetune.shift_tasks`, its results document and
tables :mod:`kradapter.finetune.shift_report`. Only the standard library and the registry are imported here, so a
bad flag answers at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import registry
from ..guards import positive_int
from ..records import REFERENCE_ROWS
from ..store import RunSpec
from .protocol import EXTRA_TRIALS, VAL_CHECKPOINTS, LearningRates, Recipe, SettingsError, fit_steps, parse_methods

ANCHOR = registry.anchor()  # every comparison is against it
# The six 20 Newsgroups cross-domain tasks of Dai et al. (KDD 2007), as benchmarks (shift_tasks.BENCHMARKS; a test
# holds the two equal, so that this module need not load the data code).
NEWSGROUP_TASKS = ("ng_comp_rec", "ng_comp_sci", "ng_comp_talk", "ng_rec_sci", "ng_rec_talk", "ng_sci_talk")
BENCHMARKS = ("sentiment", "topic", *NEWSGROUP_TASKS)
GROUPS: dict[str, tuple[str, ...]] = {"newsgroups": NEWSGROUP_TASKS}  # a name on --benchmarks for its members
# Reference rows run in every cell, every seed (not methods, not flags): finetune.baselines' MAJORITY and PROBE.
BASELINES = REFERENCE_ROWS

VAL_SHOTS = 100  # validation texts per class of each tuning trial and each seed's checkpoint selection
MIN_GRID_RATES = 5  # the tuning rule: at least 5 log-spaced rates, then extended while the best sits on an edge
GRID_RATIO_SPREAD = 1.2  # largest / smallest step ratio of a "log-spaced" grid (1e-3, 3e-3, 1e-2, ... passes)
MIN_SEEDS = 2  # a paired interval needs two pairs
# The smallest seed count at which an exact two-sided sign-flip test can reach 5% (2 / 2^n <= 0.05): the powered
# preset's primary verdicts are refused below it.
MIN_SEEDS_FOR_VERDICT = 6

# Presets. Each method list is the registry's tags; every value can be overridden by its flag. The estimates are
# StudySettings.estimate() with the unit times measured in docs/shift.md (steps and evaluations at 1 CPU thread).
REDUCED: dict[str, Any] = {  # the default: end to end in <= 20 minutes on 2 CPU cores (docs/shift.md)
    "benchmarks": ("sentiment",),
    "methods": registry.tagged("shift-reduced"),
    "contenders": (),
    "seeds": (0, 1),
    "shots": (8,),
    "budgets": (1,),
    "eval_per_class": 50,
    "steps": None,  # per cell: protocol.fit_steps (8 passes over the k-shot set, at least 50 steps)
    "val_shots": VAL_SHOTS,
}
POWERED: dict[str, Any] = {  # the pre-registered study (docs/protocol-generalisation.md)
    "benchmarks": ("sentiment", "topic", *NEWSGROUP_TASKS),
    "methods": registry.tagged("shift-primary"),  # the primary endpoints: KRAdapter - LoRA at 1x
    "contenders": tuple(
        m
        for m in (*registry.tagged("shift-full"), *registry.tagged("shift-contender"))
        if m not in registry.tagged("shift-primary")
    ),
    "seeds": tuple(range(20)),  # the planning table's seeds for every primary endpoint, capped at 20
    "shots": (8, 32, 128),
    "budgets": (1,),
    "eval_per_class": 500,
    "steps": None,
    "val_shots": VAL_SHOTS,
}
FULL: dict[str, Any] = POWERED | {
    "methods": registry.tagged("shift-full"),
    "contenders": registry.tagged("shift-contender"),
    "budgets": (1, 4),
}
# The mechanism's rank sweep (exploratory): one cell, sentiment at the powered study's anchor shots, KRAdapter (the
# anchor: sqrt_min, its own count) beside each method's fixed sizes from the registry (``sweep``: LoRA r = 1 .. 256,
# LoHa at three ranks, KRAdapter's other factorisation), tuned per variant as any method is.
RANKS: dict[str, Any] = POWERED | {
    "benchmarks": ("sentiment",),
    "methods": (ANCHOR, *registry.sweep_variants()),
    "contenders": (),
    "seeds": tuple(range(5)),
    "shots": (POWERED["shots"][len(POWERED["shots"]) // 2],),
}
# preset names (one of them is not the method of the same name)
PRESETS: dict[str, dict[str, Any]] = dict(reduced=REDUCED, powered=POWERED, full=FULL, ranks=RANKS)
DEFAULT_PRESET = "reduced"
VERDICT_PRESETS = ("powered",)  # presets whose results carry the primary verdicts (MIN_SEEDS_FOR_VERDICT applies)


def expand_benchmarks(names: Any) -> tuple[str, ...]:
    """``--benchmarks`` with each group (``newsgroups``) replaced by its members, in order; a SettingsError naming
    the unknown names, or a benchmark given twice."""
    names = tuple(names)
    unknown = [n for n in names if n not in BENCHMARKS and n not in GROUPS]
    if unknown or not names:
        groups = "; ".join(f"{g} = {len(m)} tasks" for g, m in GROUPS.items())
        choices = f"{', '.join(BENCHMARKS)} or a group ({groups})"
        raise SettingsError(f"--benchmarks: unknown {unknown or 'none given'}; choose from {choices}")
    out = [b for n in names for b in GROUPS.get(n, (n,))]
    twice = sorted({b for b in out if out.count(b) > 1})
    if twice:
        raise SettingsError(f"--benchmarks names {', '.join(twice)} twice (directly or through a group)")
    return tuple(out)


def _int(flag: str, value: Any, minimum: int) -> int:
    return positive_int(flag, value, minimum=minimum, error=SettingsError)


def _ints(flag: str, values: Any, minimum: int) -> tuple[int, ...]:
    values = tuple(values)
    if not values:
        raise SettingsError(f"{flag} needs at least one value")
    for v in values:
        _int(flag, v, minimum)
    if len(set(values)) != len(values):
        raise SettingsError(f"{flag} has duplicates: {list(values)}")
    return values


def is_log_spaced(grid: tuple[float, ...], spread: float = GRID_RATIO_SPREAD) -> bool:
    """Whether the ascending ``grid`` steps by a near-constant ratio (largest / smallest step ratio <= ``spread``)."""
    ratios = [b / a for a, b in itertools.pairwise(grid)]
    return all(r > 1 for r in ratios) and max(ratios) <= spread * min(ratios)


@dataclass(frozen=True)
class StudySettings(LearningRates):
    """Everything the study depends on, checked on construction; ``recipe`` is the one shared with
    ``kradapter finetune`` (its ``val_shots`` is the shift study's validation texts per class)."""

    recipe: Recipe = field(default_factory=lambda: Recipe(val_shots=VAL_SHOTS))
    benchmarks: tuple[str, ...] = REDUCED["benchmarks"]
    methods: tuple[str, ...] = REDUCED["methods"]
    contenders: tuple[str, ...] = REDUCED["contenders"]
    seeds: tuple[int, ...] = REDUCED["seeds"]
    shots: tuple[int, ...] = REDUCED["shots"]
    anchor_shots: int | None = None  # default: the middle of ``shots``
    budgets: tuple[int, ...] = REDUCED["budgets"]
    eval_per_class: int = REDUCED["eval_per_class"]  # 0: every text of every evaluation set
    lr_grids: dict[str, tuple[float, ...]] = field(default_factory=dict)
    preset: str = DEFAULT_PRESET  # the preset the defaults came from (recorded; powered checks its seed count)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise SettingsError(f"--preset: unknown {self.preset!r}; choose from {', '.join(PRESETS)}")
        object.__setattr__(self, "benchmarks", expand_benchmarks(self.benchmarks))
        self._check_methods()
        seeds = _ints("--seeds", self.seeds, 0)
        if len(seeds) < MIN_SEEDS:
            raise SettingsError(f"--seeds: paired intervals need at least {MIN_SEEDS} seeds, got {list(seeds)}")
        if self.preset in VERDICT_PRESETS and len(seeds) < MIN_SEEDS_FOR_VERDICT:
            raise SettingsError(
                f"--seeds: the {self.preset} preset's verdicts need at least {MIN_SEEDS_FOR_VERDICT} seeds (below "
                f"that an exact sign-flip test cannot reach p < 0.05), got {len(seeds)}"
            )
        object.__setattr__(self, "seeds", seeds)
        shots = tuple(sorted(_ints("--shots", self.shots, 1)))
        object.__setattr__(self, "shots", shots)
        anchor = shots[len(shots) // 2] if self.anchor_shots is None else self.anchor_shots
        if anchor not in shots:
            raise SettingsError(f"--anchor-shots {anchor} is not one of --shots {list(shots)}")
        object.__setattr__(self, "anchor_shots", anchor)
        budgets = tuple(sorted(_ints("--budgets", self.budgets, 1)))
        if 1 not in budgets:
            raise SettingsError(f"--budgets must include 1 ({registry.label(ANCHOR)}'s own count), got {list(budgets)}")
        object.__setattr__(self, "budgets", budgets)
        _int("--eval-per-class", self.eval_per_class, 0)
        for method in self.lr_grids:
            if method not in self.every_method:
                raise SettingsError(f"--lr-grid names {method!r}, which is not in --methods or --contenders")
        self.recipe.check_validation(self.every_method, self)
        self._check_grids()

    def _check_methods(self) -> None:
        """Adapters and the head-only / full fine-tuning baselines; the anchor among ``--methods`` (the rule: it is
        required, never added behind the user's back), with at least one other; no method in both lists."""
        methods = parse_methods(list(self.methods))
        contenders = parse_methods(list(self.contenders)) if self.contenders else ()
        if ANCHOR not in methods:
            raise SettingsError(
                f"--methods {' '.join(methods)} must include {ANCHOR}: every comparison of the study is against it; "
                f"add it (--methods {' '.join(methods)} {ANCHOR})"
            )
        if len(methods) < 2:
            raise SettingsError(f"--methods needs {ANCHOR} and at least one other method")
        both = sorted(set(methods) & set(contenders))
        if both:
            raise SettingsError(f"{both} given both in --methods and in --contenders")
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "contenders", contenders)

    def _check_grids(self) -> None:
        """The tuning rule needs, for every method, a log-spaced grid of at least MIN_GRID_RATES rates, all of one
        length (every method gets the same number of trials); or one fixed rate for every method (no tuning)."""
        grids = {m: tuple(sorted(self.grid(m))) for m in self.every_method}
        fixed = [m for m, g in grids.items() if len(g) == 1]
        tuned = [m for m, g in grids.items() if len(g) > 1]
        if fixed and tuned:
            raise SettingsError(
                f"--lr-grid gives {', '.join(fixed)} one rate while {', '.join(tuned)} are tuned: every method gets "
                "the same number of trials; give every method one rate, or none"
            )
        for m in tuned:
            g = grids[m]
            if len(g) < MIN_GRID_RATES:
                raise SettingsError(
                    f"--lr-grid {m}: {len(g)} rates; the study's tuning rule needs at least {MIN_GRID_RATES} "
                    "log-spaced rates (it extends the grid while the best rate is an edge)"
                )
            if not is_log_spaced(g):
                raise SettingsError(f"--lr-grid {m}: rates {list(g)} are not log-spaced (a constant ratio)")
        lengths = {len(grids[m]) for m in tuned}
        if len(lengths) > 1:
            sizes = ", ".join(f"{m} {len(grids[m])}" for m in tuned)
            raise SettingsError(f"--lr-grid: grids of different lengths ({sizes}); every method gets the same trials")
        object.__setattr__(self, "lr_grids", {m: grids[m] for m in self.lr_grids})

    @property
    def every_method(self) -> tuple[str, ...]:
        return (*self.methods, *self.contenders)

    @property
    def anchor(self) -> str:
        return cell_id(self.anchor_shots or 0, 1)

    @property
    def tuned(self) -> bool:
        """Whether learning rates are tuned (else every method has one fixed rate)."""
        return any(len(self.grid(m)) > 1 for m in self.every_method)

    def trials(self, method: str) -> int:
        """Tuning trials of ``method`` in each cell: its grid plus EXTRA_TRIALS (0 with one fixed rate)."""
        n = len(self.grid(method))
        return n + EXTRA_TRIALS if n > 1 else 0

    def cells(self, benchmark: str) -> list[Cell]:
        """The benchmark's cells, the anchor first. Every method is tuned in every cell. Contenders and the
        methods tagged ``shift-anchor-cell`` (full fine-tuning: its cost) run in the anchor cell only; above 1x
        only adapters other than the anchor run (KRAdapter has no knob that scales its count)."""
        anchor = self.anchor_shots or 0
        only_anchor = set(registry.tagged("shift-anchor-cell"))
        everywhere = tuple(m for m in self.methods if m not in only_anchor)
        out = [Cell(benchmark, anchor, 1, self.every_method)]
        out += [Cell(benchmark, k, 1, everywhere) for k in self.shots if k != anchor]
        scalable = tuple(m for m in everywhere if m != ANCHOR and m in registry.ADAPTERS)
        out += [Cell(benchmark, anchor, x, scalable) for x in self.budgets if x != 1]
        return out

    def workload(self, steps: int | None = None) -> dict[str, dict[str, int]]:
        """What the study runs per benchmark, counted from the settings: ``trainings`` (tuning trials and seed
        runs), optimiser ``steps`` over them (``steps`` per training; default the recipe's, else each cell's
        :func:`~kradapter.finetune.protocol.fit_steps`),
        ``val_texts`` (texts scored by validation: VAL_CHECKPOINTS scorings per training), ``eval_texts`` (texts
        scored by the seed runs, and embedded once per seed for the linear probe, at most ``eval_per_class`` per
        class of each evaluation set) and ``baseline_runs``."""
        fixed = steps if steps is not None else self.recipe.steps
        out = {}
        for b in self.benchmarks:
            _, classes, sets = BENCHMARK_SHAPES[b]
            val_texts = self.recipe.val_shots * classes
            eval_texts = self.eval_per_class * classes * sets
            counts = dict.fromkeys(("trainings", "steps", "val_texts", "eval_texts", "baseline_runs"), 0)
            for cell in self.cells(b):
                steps = fixed or fit_steps(cell.shots * classes, self.recipe.batch_size)
                for m in cell.methods:
                    runs = self.trials(m) + len(self.seeds)
                    counts["trainings"] += runs
                    counts["steps"] += runs * steps
                    counts["val_texts"] += runs * VAL_CHECKPOINTS * val_texts
                    counts["eval_texts"] += len(self.seeds) * eval_texts
                counts["baseline_runs"] += len(BASELINES) * len(self.seeds)
                counts["eval_texts"] += len(self.seeds) * (eval_texts + val_texts)  # the probe's embeddings
            out[b] = counts
        return out

    def estimate(self, steps: int | None = None) -> float:
        """Estimated wall seconds of the whole study in one process on 2 CPU cores, from :meth:`workload` and
        the unit times measured on MiniLM (UNIT_SECONDS, docs/shift.md); ``eval_per_class`` 0 is not estimated
        (a ValueError)."""
        if not self.eval_per_class:
            raise ValueError("the estimate needs --eval-per-class > 0 (evaluation set sizes)")
        total = 0.0
        for b, counts in self.workload(steps).items():
            unit = UNIT_SECONDS[BENCHMARK_SHAPES[b][0]]
            total += counts["trainings"] * unit["setup"] + counts["steps"] * unit["step"]
            total += (counts["val_texts"] + counts["eval_texts"]) * unit["eval_text"]
        return total

    def run_spec(self, inputs: Mapping[str, str]) -> RunSpec:
        settings = {"anchor_shots": self.anchor_shots, "eval_per_class": self.eval_per_class, "preset": self.preset,
                    "tuning": {"min_grid_rates": MIN_GRID_RATES, "extra_trials": EXTRA_TRIALS},
                    "baselines": list(BASELINES), **self.recipe.spec_settings()}  # fmt: skip
        axes: dict[str, list[Any]] = {
            "benchmarks": list(self.benchmarks),
            "methods": list(self.every_method),
            "seeds": list(self.seeds),
            "shots": list(self.shots),
            "budgets": list(self.budgets),
        }
        return self.spec("shift", settings, axes, dict(inputs))


# For the estimate: each benchmark's texts ("short": sentences; "long": documents filling --max-length 128), classes,
# and evaluation sets (the ID test and each shifted domain); tests hold them equal to the loaded data.
BENCHMARK_SHAPES: dict[str, tuple[str, int, int]] = {
    "sentiment": ("short", 2, 4),
    "topic": ("long", 3, 2),
    **{task: ("long", 2, 2) for task in NEWSGROUP_TASKS},
}
# Unit wall times on 2 CPU cores, one process, all-MiniLM-L6-v2, batch 8, max length 128 (docs/shift.md, "Run
# time"): "step" seconds per optimiser step, the median over LoRA and KRAdapter runs of the earlier published study
# (docs/data/shift_results.json, train_time_s / steps: sentiment 0.20 / 0.27, topic 0.63 / 0.65); "eval_text"
# seconds per text scored, the 1-thread measurement's ratio of a scored text to a step (0.052 for both lengths)
# times "step"; "setup" seconds per training (loading and wrapping the model, measured 0.3-0.6 s of CPU).
UNIT_SECONDS: dict[str, dict[str, float]] = {
    "short": {"setup": 1.0, "step": 0.24, "eval_text": 0.0124},
    "long": {"setup": 1.0, "step": 0.64, "eval_text": 0.0335},
}


@dataclass(frozen=True)
class Cell:
    benchmark: str
    shots: int
    budget: int
    methods: tuple[str, ...]
    baselines: tuple[str, ...] = BASELINES  # run in every cell, every seed

    @property
    def id(self) -> str:
        return cell_id(self.shots, self.budget)


def cell_id(shots: int, budget: int) -> str:
    return f"k{shots}_x{budget}"
