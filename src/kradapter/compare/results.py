"""The study's records in the results store, and the summary document derived from them.

Each finished unit is one record (:mod:`kradapter.store`): ``("target", MATRIX, SEED)`` holds the target's
spectrum, ``("cell", MATRIX, METHOD, SEED)`` one fitted cell (or ``{"error": ...}``, tried again on resume).
``experimental_results.json`` is rebuilt from them after every unit (``schema_version`` 3, ``docs/compare.md``)::

    {"schema_version": 3, "config": {...}, "environment": {...},
     "results": {MATRIX: {"label", "source", "error",
                          "target": {"shape", "frobenius_norm", "effective_rank", "singular_values", "std", "runs"},
                          "methods": {METHOD: {"params", "nuclear_error", "relative_frobenius_error",
                                               "frobenius_error", "effective_rank", "spectral_energy_ratio",
                                               "seconds", "iterations", "singular_values", "error", "notes",
                                               "settings", "budget", "budget_ratio", "rank", "seeds",
                                               "gap_to_optimum", "relative_gap_to_optimum", "optimum",
                                               "std": {...}, "runs": {SEED: {...}}}}}}}

Version 3 added the optimum rows (``kradapter_optimum``, ``kronecker_optimum``: also ``exact``, ``converged``,
``solver``, ``lower_bound_frobenius_error``) and each fitted method's gap to its optimum, derived here from the
two records of a seed: ``gap_to_optimum`` (``||dW - T||_F`` above the optimum's) and
``relative_gap_to_optimum`` (that gap over the optimum's error).

Each metric is the mean over the finished seeds, its standard deviation (``ddof=1``; 0 for one seed) is under
``std``, and each seed's own record under ``runs``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from .. import registry
from ..store import Store

SCHEMA_VERSION = 3
METRICS = (
    "params",
    "nuclear_error",
    "relative_frobenius_error",
    "frobenius_error",
    "effective_rank",
    "spectral_energy_ratio",
    "seconds",
    "iterations",
    "budget_ratio",
    "gap_to_optimum",
    "relative_gap_to_optimum",
    "lower_bound_frobenius_error",
)
TARGET_METRICS = ("frobenius_norm", "effective_rank", "svd_seconds")


def _round(value: float) -> float:
    return float(f"{value:.7g}") if math.isfinite(value) else value


def jsonable(value: Any) -> Any:
    """Tensors as lists and floats to 7 significant digits: what a record stores."""
    if hasattr(value, "detach"):
        return [_round(v) for v in value.detach().double().cpu().tolist()]
    if isinstance(value, float):
        return _round(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def columns(names: list[str] | tuple[str, ...], references: bool = True) -> list[str]:
    """The study's columns: the methods, then the references (an optimum row only beside its method)."""
    refs = [r for r in registry.REFERENCES if registry.METHODS[r].optimum_of in (None, *names)] if references else []
    return [*names, *refs]


def optimum_row(method: str) -> str | None:
    """The reference holding ``method``'s optimum, if there is one."""
    return next((r for r in registry.REFERENCES if registry.METHODS[r].optimum_of == method), None)


def with_gaps(runs: dict[str, dict[str, Any]], optima: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each seed's run with its gap to the same seed's optimum (absolute and relative ``||dW - T||_F``)."""
    out = {}
    for seed, run in runs.items():
        best = optima.get(seed)
        fit, opt = run.get("frobenius_error"), (best or {}).get("frobenius_error")
        if run.get("error") or not isinstance(fit, int | float) or not isinstance(opt, int | float):
            out[seed] = run
            continue
        gap = fit - opt
        out[seed] = {
            **run,
            "gap_to_optimum": _round(gap),
            "relative_gap_to_optimum": _round(gap / opt) if opt else math.nan,
        }
    return out


def summary(store: Store, config: dict[str, Any], cache: dict[Any, Any] | None = None) -> dict[str, Any]:
    """The results document of every record in ``store``, matrices and methods in the order first run.

    ``cache`` (a dict the caller keeps across calls) holds each row as made from the records it was made from, so
    a study that rebuilds the document after every cell recomputes only the rows whose records changed.
    """
    cache = {} if cache is None else cache
    axes = store.meta.get("axes", {})
    out: dict[str, Any] = {}
    for matrix in axes.get("matrices", []):
        targets = {str(k[2]): r for k, r in store.matching("target", matrix)}
        if not targets:
            continue
        first = next(iter(targets.values()))
        entry: dict[str, Any] = {"label": first["label"], "source": first["source"], "error": None}
        entry["target"] = _remember(cache, ("target", matrix), list(targets.values()), _target_row, targets)
        entry["methods"] = {}
        for method in [*axes.get("methods", []), *registry.REFERENCES]:
            runs = {str(k[3]): r for k, r in store.matching("cell", matrix, method)}
            if not runs:
                continue
            row = optimum_row(method)
            optima = {str(k[3]): r for k, r in store.matching("cell", matrix, row)} if row else {}
            sources = [*runs.values(), *optima.values()]
            entry["methods"][method] = _remember(cache, ("cell", matrix, method), sources, _method_row, runs, optima)
        out[matrix] = entry
    environments = [i["environment"] for i in store.meta.get("invocations", []) if "environment" in i]
    return {
        "schema_version": SCHEMA_VERSION,
        "config": config,
        "environment": environments[-1] if environments else None,
        "results": out,
    }


def _target_row(targets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"runs": targets, **_aggregate(targets, TARGET_METRICS), "shape": next(iter(targets.values()))["shape"]}


def _method_row(runs: dict[str, dict[str, Any]], optima: dict[str, dict[str, Any]]) -> dict[str, Any]:
    runs = with_gaps(runs, optima) if optima else runs
    return {"runs": runs, **_aggregate(runs, METRICS)}


def _remember(cache: dict[Any, Any], key: Any, sources: list[Any], make: Callable[..., Any], *args: Any) -> Any:
    """``make(*args)``, or the value cached under ``key`` when it was made from the same records (the same objects:
    a stored record is never changed, a new one is a new object)."""
    made_from, value = cache.get(key, ((), None))
    if len(made_from) != len(sources) or any(a is not b for a, b in zip(made_from, sources, strict=True)):
        value = make(*args)
        cache[key] = (sources, value)
    return value


def _aggregate(runs: dict[str, dict[str, Any]], metrics: tuple[str, ...]) -> dict[str, Any]:
    """Means over the seeds that finished, their std, the singular values' mean, and the errors of the others."""
    ok = [r for r in runs.values() if not r.get("error")]
    errors = sorted({r["error"] for r in runs.values() if r.get("error")})
    out: dict[str, Any] = {"seeds": len(ok), "error": None if ok else (errors[0] if errors else None), "std": {}}
    out["notes"] = [f"failed on some seeds: {e}" for e in errors] if ok else []
    for metric in metrics:
        values = [r[metric] for r in ok if isinstance(r.get(metric), int | float)]
        if values:
            out[metric] = _round(statistics.fmean(values))
            out["std"][metric] = _round(statistics.stdev(values)) if len(values) > 1 else 0.0
        else:
            out[metric] = None
    spectra = [r["singular_values"] for r in ok if r.get("singular_values")]
    out["singular_values"] = [_round(statistics.fmean(col)) for col in zip(*spectra, strict=True)] if spectra else None
    out["notes"] += sorted({r["note"] for r in ok if r.get("note")})
    if any(r.get("converged") is False for r in ok):
        out["notes"].append("the alternating method did not settle within its step limit on some seeds")
    for name in ("settings", "rank", "budget", "exact", "solver"):
        out[name] = next((r[name] for r in ok if name in r), None)
    return out
