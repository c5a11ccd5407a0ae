"""The results file: a versioned JSON document, rewritten atomically after every cell.

Schema (``schema_version`` 1, documented in ``docs/compare.md``)::

    {"schema_version": 1, "config": {...}, "environment": {...},
     "results": {MATRIX: {"label", "source", "error",
                          "target": {"shape", "frobenius_norm", "effective_rank", "singular_values", "std", "runs"},
                          "methods": {METHOD: {"params", "nuclear_error", "relative_frobenius_error",
                                               "frobenius_error", "effective_rank", "spectral_energy_ratio",
                                               "seconds", "iterations", "singular_values", "error", "notes",
                                               "settings", "budget", "budget_ratio", "rank", "seeds",
                                               "std": {...}, "runs": {SEED: {...}}}}}}}

Each metric is the mean over the finished seeds, its standard deviation (``ddof=1``; 0 for one seed) is under
``std``, and each seed's own record under ``runs``. ``error`` is null, or the reason a matrix or a method failed
(a failed seed keeps ``{"error": ...}`` in ``runs``; ``--resume`` runs it again).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from ..records import environment, write_json_atomic
from .config import StudyConfig

SCHEMA_VERSION = 1
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
# Config keys that may change between a run and its --resume: what to run and how to present it.
RESUMABLE = {"matrices.types", "matrices.user", "methods.names", "training.seeds", "training.log_interval"}
RESUMABLE_SECTIONS = {"output", "runtime"}


def _round(value: float) -> float:
    return float(f"{value:.7g}") if math.isfinite(value) else value


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return [_round(v) for v in value.detach().double().cpu().tolist()]
    if isinstance(value, float):
        return _round(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, table in config.items() for key, value in table.items()}


def config_conflicts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two config dicts and that change results (so block a resume)."""
    a, b = _flatten(old), _flatten(_jsonable(new))
    keys = sorted(set(a) | set(b))
    return [
        k for k in keys if k not in RESUMABLE and k.split(".")[0] not in RESUMABLE_SECTIONS and a.get(k) != b.get(k)
    ]


class Results:
    """The study's results in memory and on disk."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def open(cls, config: StudyConfig, resume: bool) -> Results:
        """A fresh document, or with ``resume`` the existing one (its config must agree with ``config``)."""
        path = Path(config.output.directory) / config.output.results_file
        fresh = {
            "schema_version": SCHEMA_VERSION,
            "config": _jsonable(config.to_dict()),
            "environment": environment(),
            "results": {},
        }
        if not resume or not path.exists():
            results = cls(path, fresh)
            results.write()
            return results
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--resume: cannot read {path}: {exc}") from None
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"--resume: {path} has schema_version {data.get('schema_version')!r}, not {SCHEMA_VERSION}"
            )
        conflicts = config_conflicts(data.get("config", {}), config.to_dict())
        if conflicts:
            raise ValueError(
                f"--resume: {path} was made with a different configuration ({', '.join(conflicts)}); "
                "run without --resume, or into another --out"
            )
        data["config"], data["environment"] = fresh["config"], fresh["environment"]
        return cls(path, data)

    # -- cells ----------------------------------------------------------------------------------------------------
    def _matrix(self, name: str) -> dict[str, Any]:
        return self.data["results"].setdefault(
            name, {"label": name, "source": None, "error": None, "target": {"runs": {}}, "methods": {}}
        )

    def finished(self, seed: int, name: str, method: str) -> bool:
        run = self.data["results"].get(name, {}).get("methods", {}).get(method, {}).get("runs", {}).get(str(seed))
        return run is not None and not run.get("error")

    def matrix_error(self, name: str, seed: int, text: str) -> None:
        entry = self._matrix(name)
        entry["error"] = text
        self.write()

    def set_target(self, name: str, seed: int, target: Any, s_target: torch.Tensor, seconds: float) -> None:
        from .metrics import effective_rank

        entry = self._matrix(name)
        entry.update(label=target.label, source=target.source, error=None)
        norm = float(torch.linalg.vector_norm(s_target.double()))
        entry["target"]["runs"][str(seed)] = _jsonable(
            {
                "shape": list(target.matrix.shape),
                "frobenius_norm": norm,
                "effective_rank": effective_rank(s_target),
                "singular_values": s_target,
                "svd_seconds": seconds,
            }
        )
        entry["target"].update(_aggregate(entry["target"]["runs"], ("frobenius_norm", "effective_rank", "svd_seconds")))
        entry["target"]["shape"] = list(target.matrix.shape)
        self.write()

    def add_run(self, name: str, method: str, seed: int, record: dict[str, Any]) -> None:
        entry = self._matrix(name)["methods"].setdefault(method, {"runs": {}})
        entry["runs"][str(seed)] = _jsonable(record)
        entry.update(_aggregate(entry["runs"], METRICS))
        self.write()

    def write(self) -> None:
        write_json_atomic(self.path, self.data)


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
    out["settings"] = next((r["settings"] for r in ok if "settings" in r), None)
    out["rank"] = next((r["rank"] for r in ok if "rank" in r), None)
    out["budget"] = next((r["budget"] for r in ok if "budget" in r), None)
    return out
