"""Run the matrix-approximation study: fit each method's weight update to each target, cell by cell.

A cell is (matrix, method, seed). Its update is the ``get_delta_weight`` of the PEFT layer that
``peft.get_peft_model`` injects into a one-layer model ``nn.Linear(cols, rows)`` — kradapter's KRAdapter and
SinLoRA tuners, PEFT's own LoRA, RandLoRA and LoKr — so every number is about the code users run. The
adapter's trainable parameters are fitted by the configured optimiser on the seed's objective,
``||dW - T||_F`` (or its square), and the metrics come from the final parameters. Each cell seeds the random
streams itself (adapter initialisation and RandLoRA's bases), so results do not depend on the order of cells.
Two references join every table: the truncated SVD at LoRA's rank (the optimum of rank ``r``) and zero.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ..methods import BUDGET_TOLERANCE, build_peft_config, count_trainable, kradapter_budget, make_peft_config
from .config import StudyConfig
from .fit import MethodPlan, fit_method
from .matrices import Target, load_target
from .metrics import effective_rank, fit_metrics, nuclear_error, singular_values
from .results import Results

REFERENCES = ("svd", "zero")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# The study's settings where PEFT's or the tuners' defaults differ from the seed's toy methods, whose updates
# all had scale 1: LoRA ``B A``, RandLoRA and Kronecker at scale 1, KRAdapter's product unscaled, SinLoRA
# ``sin(20 B A)``. "Scale 1" alphas equal to the rank are filled in by ``_peft_settings``.
STUDY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sinlora": {"frequency": 20.0, "amplitude": 1.0},
    "kradapter": {"scaling": 1.0},
    "randlora": {},
    "lora": {},
    "kronecker": {},
}
SCALE_ONE_ALPHA = {"lora": "lora_alpha", "randlora": "randlora_alpha", "kronecker": "alpha"}


def _peft_settings(method: str, settings: dict[str, Any], cols: int) -> dict[str, Any]:
    """PEFT config fields from the study's settings: alphas for scale 1 unless given, and SinLoRA's
    ``amplitude`` as its ``alpha`` (the tuner divides by ``r`` and ``sqrt(cols)``; the seed did not)."""
    settings = dict(settings)
    amplitude = settings.pop("amplitude", None)
    rank = settings.get("r", 8)
    if method == "sinlora" and amplitude is not None and "alpha" not in settings:
        settings["alpha"] = float(amplitude) * rank * math.sqrt(cols)
    if method in SCALE_ONE_ALPHA:
        settings.setdefault(SCALE_ONE_ALPHA[method], rank)
    return settings


def plan_method(method: str, shape: tuple[int, int], config: StudyConfig) -> MethodPlan:
    """The method's PEFT config on a ``shape`` matrix under the configured strategy, and its trainable count."""
    methods = config.methods
    settings = {**STUDY_DEFAULTS[method], **methods.settings.get(method, {})}
    if method == "kradapter":
        settings.setdefault("factorization", methods.kradapter_factorization)
    budget = kradapter_budget([shape], methods.kradapter_factorization)
    cols = shape[1]
    note = None
    if methods.strategy == "equal_budget":
        search = {k: v for k, v in settings.items() if k not in ("amplitude", "alpha", "lora_alpha", "randlora_alpha")}
        found, count = make_peft_config(method, ["layer"], [shape], budget, tolerance=math.inf, **search)
        rank = getattr(found, "r", None)
        if rank is not None:
            settings["r"] = rank
        for knob in ("decompose_both", "decompose_factor", "factorization"):
            if hasattr(found, knob) and method in ("kronecker", "kradapter"):
                settings[knob] = getattr(found, knob)
        gap = (count - budget) / budget
        if abs(gap) > BUDGET_TOLERANCE:
            note = f"closest count {count:,} is {gap:+.1%} off the budget {budget:,}: no setting of {method} fits"
    elif methods.strategy == "equal_rank" and method != "kradapter":
        settings.setdefault("r", methods.rank or lora_rank(shape, config))
    peft_settings = _peft_settings(method, settings, cols)
    build_peft_config(method, ["layer"], **peft_settings)  # invalid settings fail here, naming the method
    return MethodPlan(
        method,
        peft_settings,
        count_trainable(method, [shape], **peft_settings),
        budget if methods.strategy == "equal_budget" else None,
        note,
    )


def lora_rank(shape: tuple[int, int], config: StudyConfig) -> int:
    """LoRA's rank on this shape: the rank of the truncated-SVD reference."""
    methods = config.methods
    fixed = methods.settings.get("lora", {}).get("r")
    if fixed is not None and methods.strategy != "equal_budget":
        return int(fixed)
    if methods.strategy == "equal_rank" and methods.rank:
        return methods.rank
    budget = kradapter_budget([shape], methods.kradapter_factorization)
    extra = {"r": fixed} if fixed is not None else {}
    found, _ = make_peft_config("lora", ["layer"], [shape], budget, tolerance=math.inf, **extra)
    return int(found.r)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device {name!r}: CUDA is not available on this machine")
    return device


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_study(config: StudyConfig, resume: bool = False, progress: bool = True) -> Results:
    """Run every unfinished cell, writing the results file after each one; return the results."""
    device = resolve_device(config.runtime.device)
    dtype = DTYPES[config.runtime.dtype]
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    results = Results.open(config, resume)
    names = config.matrices.selected()
    columns = [*config.methods.names, *(REFERENCES if config.methods.references else ())]
    cells = [(seed, name, method) for seed in config.training.seeds for name in names for method in columns]
    todo = [c for c in cells if not results.finished(*c)]
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), unit="cell", disable=not progress, leave=True)
    log = bar.write if config.training.log_interval else None
    by_target: dict[tuple[int, str], list[str]] = {}
    for seed, name, method in todo:
        by_target.setdefault((seed, name), []).append(method)
    for (seed, name), methods in by_target.items():
        bar.set_description(f"{name} (seed {seed})")
        try:
            target = load_target(name, seed, config, dtype, device)
        except Exception as exc:  # a matrix that cannot be read: an error row, the study goes on
            results.matrix_error(name, seed, _error_text(exc))
            bar.write(f"matrix {name!r}: {_error_text(exc)}")
            bar.update(len(methods))
            continue
        start = time.perf_counter()
        s_target = singular_values(target.matrix)
        results.set_target(name, seed, target, s_target, time.perf_counter() - start)
        for method in methods:
            bar.set_postfix_str(method)
            try:
                record = _cell(method, target, s_target, config, seed, log)
            except Exception as exc:  # a method that fails on a shape: its error is the result
                record = {"error": _error_text(exc)}
                bar.write(f"{name} / {method} (seed {seed}): {record['error']}")
            results.add_run(name, method, seed, record)
            bar.update(1)
    bar.close()
    return results


def _cell(method: str, target: Target, s_target: torch.Tensor, config: StudyConfig, seed: int, log) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    matrix = target.matrix
    shape = (matrix.shape[0], matrix.shape[1])
    if method in REFERENCES:
        return reference_metrics(method, s_target, lora_rank(shape, config) if method == "svd" else 0)
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


def reference_metrics(method: str, s_target: torch.Tensor, rank: int) -> dict[str, Any]:
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
    if method == "svd":
        record["rank"] = rank
    return record
