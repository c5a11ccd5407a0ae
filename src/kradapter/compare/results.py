"""The study's records in the results store, and the summary document derived from them.

Each finished unit is one record (:mod:`kradapter.store`): ``("target", MATRIX, SEED)`` holds the target's
spectrum, ``("cell", MATRIX, METHOD, SEED)`` one fitted cell (or ``{"error": ...}``, tried again on resume).
``experimental_results.json`` is rebuilt from them after every unit (``schema_version`` 2, ``docs/compare.md``)::

    {"schema_version": 2, "config": {...}, "environment": {...},
     "results": {MATRIX: {"label", "source", "error",
                          "target": {"shape", "frobenius_norm", "effective_rank", "singular_values", "std", "runs"},
                          "methods": {METHOD: {"params", "nuclear_error", "relative_frobenius_error",
                                               "frobenius_error", "effective_rank", "spectral_energy_ratio",
                                               "seconds", "iterations", "singular_values", "error", "notes",
                                               "settings", "budget", "budget_ratio", "rank", "seeds",
                                               "std": {...}, "runs": {SEED: {...}}}}}}}

Each metric is the mean over the finished seeds, its standard deviation (``ddof=1``; 0 for one seed) is under
``std``, and each seed's own record under ``runs``.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from .. import registry
from ..store import Store

SCHEMA_VERSION = 2
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


def summary(store: Store, config: dict[str, Any]) -> dict[str, Any]:
    """The results document of every record in ``store``, matrices and methods in the order first run."""
    axes = store.meta.get("axes", {})
    out: dict[str, Any] = {}
    for matrix in axes.get("matrices", []):
        targets = {str(k[2]): r for k, r in store.matching("target", matrix)}
        if not targets:
            continue
        first = next(iter(targets.values()))
        entry: dict[str, Any] = {"label": first["label"], "source": first["source"], "error": None}
        entry["target"] = {"runs": targets, **_aggregate(targets, TARGET_METRICS), "shape": first["shape"]}
        entry["methods"] = {}
        for method in [*axes.get("methods", []), *registry.REFERENCES]:
            runs = {str(k[3]): r for k, r in store.matching("cell", matrix, method)}
            if runs:
                entry["methods"][method] = {"runs": runs, **_aggregate(runs, METRICS)}
        out[matrix] = entry
    environments = [i["environment"] for i in store.meta.get("invocations", []) if "environment" in i]
    return {
        "schema_version": SCHEMA_VERSION,
        "config": config,
        "environment": environments[-1] if environments else None,
        "results": out,
    }


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
    for name in ("settings", "rank", "budget"):
        out[name] = next((r[name] for r in ok if name in r), None)
    return out
