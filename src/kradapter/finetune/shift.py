"""``kradapter shift``: does a high-rank update generalise better under distribution shift?

Per benchmark (``sentiment``: movie reviews -> Amazon, tweets, NYT; ``topic``: BBC News -> 20 Newsgroups; see
:mod:`kradapter.finetune.shift_data`) each *cell* (shots per class, budget multiple) trains every method on a
k-shot draw of the source pool per seed and evaluates it on the held-out source test set (ID) and on every
shifted domain (OOD). Training, evaluation and method sizing are ``kradapter finetune``'s own: one
:class:`~kradapter.finetune.runner.Execution` of every cell's plan, all cells in one results store, keys
``(benchmark, cell, "run" | "sweep", method, seed | lr)`` and ``(benchmark, cell, "chosen", method)``; the units
run on the executor given (sequential, or Ray: :mod:`kradapter.executor`).

- Learning rates: chosen in every cell, per method, by :mod:`kradapter.finetune.runner`'s tuning rule (the grid
  plus adaptive trials, the same number for every method) on the cell's first seed, scored on that seed's own
  validation draw (``--val-shots`` texts per class from the pool outside the k-shot set, all of a class's spare
  texts when it has fewer: the records say how many). Every seed's run selects its checkpoint on its own draw.
- Budgets are multiples of KRAdapter's trainable count. KRAdapter has no knob that scales its count (its two
  factorisations differ by 12%), so in a cell above 1x it is absent, and the others are compared with its 1x runs
  at the same shots (the same k-shot draws).
- Contenders (LoHa's relatives: SHiRA, HiRA, GraLoRA, C3A, ...) run in the anchor cell only.
- Evaluation sets are capped at ``eval_per_class`` texts per class (a fixed draw, the same for every run).
- Statistics: per cell, KRAdapter minus each other method on the same seeds (same draw, same initialisation
  stream), with a 95% bootstrap interval (:mod:`kradapter.stats`), on ID accuracy, mean OOD accuracy, each
  domain's accuracy and the gap ``OOD - ID``; "better" always means better for KRAdapter. With fewer than
  :data:`MIN_PAIRS` seeds the interval is reported without a verdict.

Settings and presets: :mod:`kradapter.finetune.shift_settings`; data: :mod:`kradapter.finetune.shift_data`;
the results document, tables and plots: :mod:`kradapter.finetune.shift_report`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import registry
from ..store import Store
from .data import check_shots, kshot_train
from .protocol import Settings, SettingsError, fit_steps
from .shift_data import BenchmarkData
from .shift_settings import Cell, StudySettings

if TYPE_CHECKING:
    from ..executor import Executor
    from .plan import ModelProbe, Plan
    from .runner import Execution


def check_data(settings: StudySettings, data: Mapping[str, BenchmarkData]) -> None:
    """A SettingsError naming the benchmark, class and numbers when a pool cannot supply the largest shots and at
    least one validation text per class (a class with fewer spare texts than ``--val-shots`` gives them all)."""
    for b in settings.benchmarks:
        if b not in data:
            raise SettingsError(f"no data for benchmark {b!r}")
        try:
            check_shots(data[b].corpus, data[b].pool, max(settings.shots), min(settings.recipe.val_shots, 1))
        except ValueError as exc:
            raise SettingsError(f"benchmark {b}: {exc}") from None


class Study:
    """The study's plans (one per cell), built before any training, and their execution into one store."""

    def __init__(
        self, settings: StudySettings, model_dir: Path, model_name: str, data: Mapping[str, BenchmarkData],
        trust_remote_code: bool = False,
    ) -> None:  # fmt: skip
        from .plan import probe_model

        self.settings = settings
        self.model_dir = model_dir
        self.model_name = model_name
        self.trust_remote_code = trust_remote_code
        self.data = dict(data)
        self.probes: dict[str, ModelProbe] = {}
        self.budgets: dict[str, int] = {}
        self.cells = [cell for b in settings.benchmarks for cell in settings.cells(b)]
        check_data(settings, self.data)
        for b in settings.benchmarks:
            classes = len(self.data[b].corpus.classes)
            self.probes[b] = probe_model(
                model_dir, classes, settings.recipe.targets, trust_remote_code, settings.recipe.head_input
            )
            self.budgets[b] = registry.kradapter_budget(list(self.probes[b].layers.values()))
        self.sizes = {(c.benchmark, c.id): self._size(c) for c in self.cells}  # every method fits, or stop here

    def _size(self, cell: Cell) -> dict[str, registry.Plan]:
        from .plan import size_methods

        try:
            return size_methods(cell.methods, self.probes[cell.benchmark], self.budgets[cell.benchmark] * cell.budget)
        except SettingsError as exc:
            raise SettingsError(f"{cell.benchmark} {cell.id}: {exc}") from None

    def chosen(self, store: Store, benchmark: str, method: str, cell: str | None = None) -> float:
        """The rate ``method``'s tuning chose in ``cell`` of ``benchmark`` (default: the anchor cell)."""
        return float(store.records[(benchmark, cell or self.settings.anchor, "chosen", method)]["lr"])

    def plan(self, cell: Cell, store: Store | None = None) -> Plan:
        """The cell's plan: its methods tuned in the cell itself, each seed with its own validation draw."""
        from .plan import Plan, validation_sets

        s = self.settings
        grids = {m: s.grid(m) for m in cell.methods}
        data, probe = self.data[cell.benchmark], self.probes[cell.benchmark]
        recipe = s.recipe  # no --steps: each cell's own fit_steps (8 passes over its k-shot set, at least 50)
        if recipe.steps is None:
            recipe = replace(recipe, steps=fit_steps(cell.shots * len(data.corpus.classes), recipe.batch_size))
        base = Settings("", "", cell.methods, s.seeds, cell.shots, grids, recipe)
        labels = data.corpus.labels
        train_sets = {seed: kshot_train(labels, data.pool, cell.shots, seed) for seed in s.seeds}
        val_sets = validation_sets(labels, data.pool, train_sets, s.recipe.val_shots)
        return Plan(base, data.corpus, data.pool, data.evals["test"], train_sets, val_sets[base.sweep_seed],
                    self.model_dir, self.model_name, probe.head, probe.head_params, probe.layers,
                    self.budgets[cell.benchmark] * cell.budget, self.sizes[(cell.benchmark, cell.id)], evals=data.evals,
                    trust_remote_code=self.trust_remote_code, val_sets=val_sets,
                    baselines=cell.baselines)  # fmt: skip

    def plans(self) -> list[tuple[tuple[str, ...], Plan]]:
        return [((cell.benchmark, cell.id), self.plan(cell)) for cell in self.cells]

    def priority(self) -> list[Cell]:
        """The cells in the order their units are started: fewest shots first (the cheapest cells, and every
        benchmark's at one shot count together, which a grouped endpoint needs), then budget, then the study's
        benchmark order. Only the schedule: each unit's result does not depend on it."""
        return sorted(self.cells, key=lambda c: (c.shots, c.budget))  # stable: benchmarks stay in order

    def units(self) -> int:
        """Trainings and evaluations of the whole study (every trial of every cell's tuning, every run)."""
        from .runner import plan_units

        return sum(plan_units(plan) for _, plan in self.plans())

    def run(
        self, store: Store, report: Callable[[Execution], Any], rank: int = 0, world_size: int = 1,
        progress: bool = True, executor: Executor | None = None,
    ) -> list[tuple[tuple[Any, ...], str]]:  # fmt: skip
        """Every cell's units in one execution; ``report`` is the command's. Returns the failed units ``(key,
        reason)``. The cells run in :meth:`priority` order, so a study run in chunks completes endpoints as it goes."""
        from .runner import Execution

        ordered = [((c.benchmark, c.id), self.plan(c)) for c in self.priority()]
        execution = Execution(ordered, store, report, rank, world_size, progress, executor=executor,
                              desc="shift", first=self.settings.methods)  # fmt: skip
        self.execution = execution
        return execution.run()
