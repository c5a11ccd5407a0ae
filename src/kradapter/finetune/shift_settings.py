"""``kradapter shift``'s settings: benchmarks, presets, methods and cells, checked on construction.

The study itself is :mod:`kradapter.finetune.shift` (the protocol is described there), its data
:mod:`kradapter.finetune.shift_data`, its results document and tables :mod:`kradapter.finetune.shift_report`.
Only the standard library and the registry are imported here, so a bad flag answers at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import registry
from ..guards import positive_int
from ..store import RunSpec
from .protocol import LearningRates, Recipe, SettingsError, parse_methods

ANCHOR = registry.anchor()  # every comparison is against it
BENCHMARKS = ("sentiment", "topic")

# Two presets: ``reduced`` (the default; 17 minutes on 2 CPU cores) and ``full`` (the findings page's settings); their
# method lists are the registry's tags.
REDUCED: dict[str, Any] = {
    "benchmarks": BENCHMARKS,
    "methods": registry.tagged("shift-reduced"),
    "contenders": (),
    "seeds": (0, 1, 2, 3, 4),
    "shots": (32,),
    "budgets": (1,),
    "eval_per_class": 200,
}
FULL: dict[str, Any] = REDUCED | {
    "methods": registry.tagged("shift-full"),
    "contenders": registry.tagged("shift-contender"),
    "shots": (8, 32, 128),
    "budgets": (1, 4),
}
PRESETS: dict[str, dict[str, Any]] = dict(reduced=REDUCED, full=FULL)  # preset names (one is not the method full)


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


@dataclass(frozen=True)
class StudySettings(LearningRates):
    """Everything the study depends on, checked on construction; ``recipe`` is the one shared with
    ``kradapter finetune``."""

    recipe: Recipe = field(default_factory=Recipe)
    benchmarks: tuple[str, ...] = REDUCED["benchmarks"]
    methods: tuple[str, ...] = REDUCED["methods"]
    contenders: tuple[str, ...] = REDUCED["contenders"]
    seeds: tuple[int, ...] = REDUCED["seeds"]
    shots: tuple[int, ...] = REDUCED["shots"]
    anchor_shots: int | None = None  # default: the middle of ``shots``
    budgets: tuple[int, ...] = REDUCED["budgets"]
    eval_per_class: int = REDUCED["eval_per_class"]  # 0: every text of every evaluation set
    lr_grids: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown or not self.benchmarks:
            raise SettingsError(f"--benchmarks: unknown {unknown or 'none given'}; choose from {', '.join(BENCHMARKS)}")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise SettingsError(f"--benchmarks has duplicates: {list(self.benchmarks)}")
        self._check_methods()
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
            raise SettingsError(f"--budgets must include 1 ({registry.label(ANCHOR)}'s own count), got {list(budgets)}")
        object.__setattr__(self, "budgets", budgets)
        _int("--eval-per-class", self.eval_per_class, 0)
        for method in self.lr_grids:
            if method not in self.every_method:
                raise SettingsError(f"--lr-grid names {method!r}, which is not in --methods or --contenders")
        self.recipe.check_validation(self.every_method, self)

    def _check_methods(self) -> None:
        """Adapters only; the anchor among ``--methods`` (the rule: it is required, never added behind the user's
        back), with at least one other; no method both in ``--methods`` and ``--contenders``."""
        methods = parse_methods(list(self.methods))
        contenders = parse_methods(list(self.contenders)) if self.contenders else ()
        for flag, names in (("--methods", methods), ("--contenders", contenders)):
            baselines = [m for m in names if m not in registry.ADAPTERS]
            if baselines:
                raise SettingsError(f"{flag}: the shift study compares adapters; {baselines} are not")
        if ANCHOR not in methods:
            raise SettingsError(
                f"--methods {' '.join(methods)} must include {ANCHOR}: every comparison of the study is against it; "
                f"add it (--methods {' '.join(methods)} {ANCHOR})"
            )
        if len(methods) < 2:
            raise SettingsError(f"--methods needs {ANCHOR} and at least one other adapter")
        both = sorted(set(methods) & set(contenders))
        if both:
            raise SettingsError(f"{both} given both in --methods and in --contenders")
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "contenders", contenders)

    @property
    def every_method(self) -> tuple[str, ...]:
        return (*self.methods, *self.contenders)

    @property
    def anchor(self) -> str:
        return cell_id(self.anchor_shots or 0, 1)

    def cells(self, benchmark: str) -> list[Cell]:
        """The benchmark's cells, the anchor first (its sweep fixes every other cell's learning rates)."""
        anchor = self.anchor_shots or 0
        out = [Cell(benchmark, anchor, 1, self.every_method)]
        out += [Cell(benchmark, k, 1, self.methods) for k in self.shots if k != anchor]
        scalable = tuple(m for m in self.methods if m != ANCHOR)
        out += [Cell(benchmark, anchor, x, scalable) for x in self.budgets if x != 1]
        return out

    def run_spec(self, inputs: Mapping[str, str]) -> RunSpec:
        settings = {"anchor_shots": self.anchor_shots, "eval_per_class": self.eval_per_class,
                    **self.recipe.spec_settings()}  # fmt: skip
        axes: dict[str, list[Any]] = {
            "benchmarks": list(self.benchmarks),
            "methods": list(self.every_method),
            "seeds": list(self.seeds),
            "shots": list(self.shots),
            "budgets": list(self.budgets),
        }
        return self.spec("shift", settings, axes, dict(inputs))


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
