"""Run the matrix-approximation study: fit each method's weight update to each target, cell by cell.

A cell is (matrix, method, seed). Its update is the ``get_delta_weight`` of the PEFT layer that
``peft.get_peft_model`` injects into a one-layer model ``nn.Linear(cols, rows)`` — kradapter's KRAdapter and
SinLoRA tuners, PEFT's own LoRA, RandLoRA and LoKr — so every number is about the code users run. The
adapter's trainable parameters are fitted by the configured optimiser on the published objective,
``||dW - T||_F`` (or its square), and the metrics come from the final parameters. Each cell seeds the random
streams itself (adapter initialisation and RandLoRA's bases), so results do not depend on the order of cells.
References join every table: the truncated SVD at LoRA's rank (the optimum of rank ``r``), zero, and beside
KRAdapter and LoKr their own optimum at the same settings (:mod:`kradapter.compare.optima`).
Methods, their settings and their sizing come from :mod:`kradapter.registry`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import registry
from ..executor import DEFAULT_THREADS_PER_UNIT, Executor, SequentialExecutor, Unit
from ..registry import Plan
from ..store import Key, Store
from .config import StudyConfig
from .fit import fit_method, inject
from .matrices import Target, load_target
from .metrics import effective_rank, fit_metrics, nuclear_error, singular_values
from .results import columns as study_columns
from .results import jsonable, summary

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def plan_method(name: str, shape: tuple[int, int], config: StudyConfig) -> Plan:
    """The method's PEFT settings on a ``shape`` matrix under the configured strategy, and its trainable count."""
    method, methods = registry.get(name), config.methods
    settings = {**method.study, **methods.settings.get(name, {})}
    if "factorization" in method.count_knobs:  # KRAdapter's own size is the budget's
        settings.setdefault("factorization", methods.kradapter_factorization)
    budget = registry.kradapter_budget([shape], methods.kradapter_factorization)
    if methods.strategy == "equal_budget":
        knobs = {k: v for k, v in settings.items() if k in method.count_knobs}
        found = registry.plan(name, [shape], budget, strict=False, **knobs)
        settings.update(found.settings)
        note = found.note
    else:
        note = None
        if methods.strategy == "equal_rank" and method.rank_knob:
            ranked = next(r for r in registry.REFERENCES if registry.METHODS[r].rank_of)  # the truncated SVD
            settings.setdefault(method.rank_knob, methods.rank or reference_rank(ranked, shape, config))
    peft_settings = method.to_peft(settings, shape)
    if method.scale_one and method.rank_knob in peft_settings:
        peft_settings.setdefault(method.scale_one, peft_settings[method.rank_knob])
    method.config(["layer"], **peft_settings)  # invalid settings fail here, naming the method
    count = method.count([shape], **peft_settings)
    return Plan(name, peft_settings, count, budget if methods.strategy == "equal_budget" else None, note)


def reference_rank(reference: str, shape: tuple[int, int], config: StudyConfig) -> int:
    """The rank of a reference on this shape: its ``rank_of`` method's rank (LoRA's, for the truncated SVD), or 0."""
    of = registry.get(reference, kinds=("reference",)).rank_of
    if of is None:
        return 0
    method, methods = registry.get(of), config.methods
    knob = method.rank_knob or "r"
    fixed = methods.settings.get(of, {}).get(knob)
    if fixed is not None and methods.strategy != "equal_budget":
        return int(fixed)
    if methods.strategy == "equal_rank" and methods.rank:
        return methods.rank
    budget = registry.kradapter_budget([shape], methods.kradapter_factorization)
    extra = {knob: fixed} if fixed is not None else {}
    return int(registry.plan(of, [shape], budget, strict=False, **extra).settings[knob])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device {name!r}: CUDA is not available on this machine")
    return device


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def preflight(config: StudyConfig, device: torch.device, dtype: torch.dtype) -> dict[str, tuple[int, int]]:
    """Read every target once and plan every method on its shape, before any cell runs: a matrix that cannot be
    read or a setting PEFT refuses stops the study here, naming it. Returns each matrix's shape."""
    shapes = {}
    for name in config.matrices.selected():
        target = load_target(name, config.training.seeds[0], config, dtype, device)
        shapes[name] = (int(target.matrix.shape[0]), int(target.matrix.shape[1]))
        for method in config.methods.names:
            plan = plan_method(method, shapes[name], config)
            try:  # some settings only fail on the shape (a rank above the smaller side): build the layer once
                inject(plan, *shapes[name], config.training.seeds[0], device, dtype)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{name} / {method}: {_error_text(exc)}") from None
    return shapes


def unit_threads(config: StudyConfig, threads_per_unit: int | None = None) -> int:
    """The torch threads each cell runs with: ``threads_per_unit``, else ``runtime.threads``, else 1.

    One default for every machine (not a guess from the cores or the load) because the thread count changes the
    last bits of a fit: a study gives the same numbers wherever and whenever it runs with the same count.
    """
    return threads_per_unit or config.runtime.threads or DEFAULT_THREADS_PER_UNIT


def cell_unit(method: str, target: Target, s_target: torch.Tensor, config: StudyConfig, seed: int) -> dict[str, Any]:
    """One cell's record: the unit of work an executor runs (in this process or in a Ray worker).

    Everything the record depends on is in the arguments (the target itself, its singular values, the config and
    the seed), so the cell computes the same record wherever it runs; the executor pins the threads.
    """
    log = tqdm.write if config.training.log_interval else None
    return jsonable(_cell(method, target, s_target, config, seed, log))


class _Cells:
    """The cells to run as executor units, made lazily in study order: each target is loaded (and its record
    written by the driver) just before its first cell is handed out, so a sequential run reads one target at a
    time and writes its records in the order it always did."""

    def __init__(self, todo: list[tuple[int, str, str]], config: StudyConfig, store: Store, device, dtype) -> None:
        self.todo, self.config, self.store, self.device, self.dtype = todo, config, store, device, dtype

    def __len__(self) -> int:
        return len(self.todo)

    def __iter__(self) -> Iterator[Unit]:
        by_target: dict[tuple[int, str], list[str]] = {}
        for seed, name, method in self.todo:
            by_target.setdefault((seed, name), []).append(method)
        for (seed, name), methods in by_target.items():
            target = load_target(name, seed, self.config, self.dtype, self.device)
            start = time.perf_counter()
            s_target = singular_values(target.matrix)
            if not self.store.done(("target", name, seed)):
                self.store.add(("target", name, seed), target_record(target, s_target, time.perf_counter() - start))
            for method in methods:
                yield Unit(("cell", name, method, seed), cell_unit, (method, target, s_target, self.config, seed))


def run_study(
    config: StudyConfig, store: Store, progress: bool = True, executor: Executor | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Run every unfinished cell into ``store``, rebuilding the results document after each one.

    Cells run on ``executor`` (default: one after another in this process at :func:`unit_threads` threads) and
    come back in completion order; this process alone writes the store. Returns the document and the cells that
    failed (their errors are recorded; a resumed run tries them again).
    """
    device = resolve_device(config.runtime.device)
    dtype = DTYPES[config.runtime.dtype]
    if executor is None:
        executor = SequentialExecutor(unit_threads(config))
    threads = getattr(executor, "threads_per_unit", None) or unit_threads(config)
    torch.set_num_threads(threads)  # the driver's own work (targets, spectra) at the units' count
    preflight(config, device, dtype)
    config_dict = jsonable(config.to_dict())
    names = config.matrices.selected()
    columns = study_columns(config.methods.names, config.methods.references)
    cells = [(seed, name, method) for seed in config.training.seeds for name in names for method in columns]
    todo = [c for c in cells if not store.done(("cell", c[1], c[2], c[0]))]
    failed: list[str] = []
    rows: dict[Any, Any] = {}  # the document's rows, remade only when their records change

    def save() -> None:
        store.write_json(config.output.results_file, summary(store, config_dict, rows))

    def on_result(key: Key, record: Any, artifacts: dict[str, bytes]) -> None:
        store.add(key, record)
        save()

    def on_failure(key: Key, reason: str) -> None:
        _, name, method, seed = key
        store.add(key, {"error": reason})
        failed.append(f"{name} / {method} (seed {seed}): {reason}")
        if progress:
            tqdm.write(failed[-1])
        save()

    with executor:
        executor.run(
            _Cells(todo, config, store, device, dtype),
            on_result,
            on_failure,
            progress=progress,
            desc="cells",
            initial=len(cells) - len(todo),
            total=len(cells),
        )
    save()
    return summary(store, config_dict, rows), failed


def target_record(target: Target, s_target: torch.Tensor, seconds: float) -> dict[str, Any]:
    return jsonable(
        {
            "label": target.label,
            "source": target.source,
            "shape": list(target.matrix.shape),
            "frobenius_norm": float(torch.linalg.vector_norm(s_target.double())),
            "effective_rank": effective_rank(s_target),
            "singular_values": s_target,
            "svd_seconds": seconds,
        }
    )


def _cell(
    method: str, target: Target, s_target: torch.Tensor, config: StudyConfig, seed: int, log: Any
) -> dict[str, Any]:
    matrix = target.matrix
    shape = (matrix.shape[0], matrix.shape[1])
    entry = registry.get(method, kinds=("adapter", "reference"))
    if entry.optimum_of:
        return optimum_metrics(entry.optimum_of, target, s_target, config, seed)
    if not entry.is_adapter:
        return reference_metrics(s_target, reference_rank(method, shape, config))
    plan = plan_method(method, shape, config)
    fit = fit_method(plan, matrix, config, seed, log)
    record = fit_metrics(fit.update, matrix, s_target)
    record.update(params=fit.params, seconds=fit.seconds, iterations=fit.iterations)
    if plan.budget is not None:
        record.update(budget=plan.budget, budget_ratio=fit.params / plan.budget)
    if plan.note:
        record["note"] = plan.note
    record["settings"] = plan.settings
    return record


def reference_metrics(s_target: torch.Tensor, rank: int) -> dict[str, Any]:
    """Metrics of the truncated SVD at ``rank`` (or of zero, ``rank=0``) from the target's singular values alone.

    By Eckart-Young the rank-``r`` truncation has singular values ``s_1..s_r`` (then zeros) and residual
    ``sqrt(sum_{i>r} s_i^2)``; no fit matrix needs to be formed.
    """
    s = s_target.double()
    rank = min(rank, s.numel())
    s_fit = torch.cat([s[:rank], torch.zeros_like(s[rank:])])
    norm = float(torch.linalg.vector_norm(s))
    residual = float(torch.linalg.vector_norm(s[rank:]))
    record = {
        "frobenius_error": residual,
        "relative_frobenius_error": residual / norm if norm > 0 else math.nan,
        "nuclear_error": nuclear_error(s_fit, s),
        "effective_rank": effective_rank(s_fit),
        "spectral_energy_ratio": float((s_fit**2).sum() / (s**2).sum()) if norm > 0 else math.nan,
        "singular_values": s_fit,
        "params": 0,
        "seconds": 0.0,
    }
    if rank > 0:
        record["rank"] = rank
    return record


def optimum_metrics(
    method: str, target: Target, s_target: torch.Tensor, config: StudyConfig, seed: int
) -> dict[str, Any]:
    """Metrics of ``method``'s best update on the target, at the settings its fit uses, solved in its PEFT layer."""
    from .optima import optimum

    matrix = target.matrix
    plan = plan_method(method, (matrix.shape[0], matrix.shape[1]), config)
    model: Any = inject(plan, matrix.shape[0], matrix.shape[1], seed, matrix.device, matrix.dtype)
    found = optimum(model.base_model.model.layer, matrix)
    record = fit_metrics(found.update, matrix, s_target)
    norm = float(torch.linalg.vector_norm(matrix.double()))
    record.update(
        params=plan.count,
        seconds=found.seconds,
        iterations=found.iterations,
        exact=found.exact,
        converged=found.converged,
        solver=found.solver,
        lower_bound_frobenius_error=found.lower_bound,
        relative_lower_bound=found.lower_bound / norm if norm > 0 else math.nan,
        settings=plan.settings,
    )
    return record
