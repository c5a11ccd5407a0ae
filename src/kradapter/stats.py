"""Statistics that decide between two methods: paired differences with a percentile bootstrap interval.

Two methods run on the same seeds (same data draw, same split, same initialisation stream) give paired scores;
their per-seed differences ``a - b`` remove the between-seed variance that both share. The 95% interval of the
mean difference is the percentile bootstrap: resample the differences with replacement, take the mean of each
resample, and read the 2.5% and 97.5% quantiles (``numpy.quantile``, linear interpolation) of those means.

- With ``n`` pairs there are ``n**n`` equally likely ordered resamples. When that is at most
  :data:`EXACT_LIMIT` (``n <= 6``), every one of them is enumerated: the interval is the exact bootstrap
  interval, with no Monte Carlo noise (5 seeds: 3,125 resamples).
- Otherwise :data:`RESAMPLES` (10,000) resamples are drawn with ``numpy.random.default_rng(seed)``, seed
  :data:`SEED` (0) unless given, so the interval is reproducible.

The verdict for ``a`` against ``b`` is ``"better"`` when the whole interval is above 0, ``"worse"`` when it is
below 0, and ``"no difference shown"`` when it contains 0 (touching counts as containing). With few seeds the
bootstrap interval is narrower than a t interval (it ignores the uncertainty of the spread), so "no difference
shown" is the honest reading of a borderline case, never "equal".
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import guards

CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0
EXACT_LIMIT = 100_000  # enumerate all n**n resamples up to this many (n <= 6)
VERDICTS = ("better", "worse", "no difference shown")


def _values(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty sequence of numbers, got {values!r}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {values!r}")
    return array


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value)."""
    array = _values("values", values)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def summary(values: Sequence[float] | np.ndarray) -> dict[str, float | int]:
    """``n``, ``mean``, ``std`` (sample), ``min`` and ``max`` of ``values``, JSON-able."""
    array = _values("values", values)
    mean, std = mean_std(array)
    return {"n": int(array.size), "mean": mean, "std": std, "min": float(array.min()), "max": float(array.max())}


def pair_up(
    a: Mapping[Any, float] | Sequence[float], b: Mapping[Any, float] | Sequence[float]
) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """``(keys, a, b)`` aligned: mappings are paired by key (e.g. seed), sequences by position.

    A ValueError names keys present in only one of the two, or the two lengths.
    """
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        raise ValueError("pair two mappings (by key) or two sequences (by position), not one of each")
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        only_a, only_b = set(a) - set(b), set(b) - set(a)
        if only_a or only_b:
            raise ValueError(f"unpaired keys: only in a {sorted(only_a, key=str)}, only in b {sorted(only_b, key=str)}")
        keys = sorted(a, key=str)
        return keys, _values("a", [a[k] for k in keys]), _values("b", [b[k] for k in keys])
    va, vb = _values("a", a), _values("b", b)  # type: ignore[arg-type]
    if va.size != vb.size:
        raise ValueError(f"a and b must have the same length to be paired, got {va.size} and {vb.size}")
    return list(range(va.size)), va, vb


def bootstrap_means(differences: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[np.ndarray, bool]:
    """Means of bootstrap resamples of ``differences`` and whether they are all ``n**n`` of them (exact)."""
    n = differences.size
    if n**n <= EXACT_LIMIT:
        index = np.array(list(itertools.product(range(n), repeat=n)), dtype=np.int64)
        return differences[index].mean(axis=1), True
    index = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    return differences[index].mean(axis=1), False


@dataclass(frozen=True)
class PairedComparison:
    """Mean of ``a - b`` over paired runs, its percentile bootstrap interval and the verdict for ``a``."""

    n: int
    mean_difference: float
    low: float
    high: float
    verdict: str
    confidence: float
    resamples: int
    exact: bool
    seed: int | None
    keys: list[Any]
    differences: list[float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (keys as strings)."""
        out = asdict(self)
        out["keys"] = [str(k) for k in self.keys]
        return out


def verdict(low: float, high: float) -> str:
    """``"better"`` if the interval is above 0, ``"worse"`` if below, else ``"no difference shown"``."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no difference shown"


def paired_difference(
    a: Mapping[Any, float] | Sequence[float],
    b: Mapping[Any, float] | Sequence[float],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> PairedComparison:
    """Method ``a`` against method ``b`` on paired runs (same seed, same split): ``a - b`` with its interval.

    ``a`` and ``b`` are scores keyed by seed (or aligned sequences); at least two pairs are needed.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence!r}")
    guards.positive_int("resamples", resamples)
    keys, va, vb = pair_up(a, b)
    if len(keys) < 2:
        raise ValueError(f"a paired comparison needs at least 2 pairs, got {len(keys)}")
    differences = va - vb
    means, exact = bootstrap_means(differences, resamples, seed)
    tail = (1 - confidence) / 2
    low, high = (float(q) for q in np.quantile(means, [tail, 1 - tail]))
    mean = float(differences.mean())
    if np.ptp(differences) == 0:  # every resample is the same: no interval from rounding noise
        low = high = mean
    return PairedComparison(
        n=len(keys),
        mean_difference=mean,
        low=low,
        high=high,
        verdict=verdict(low, high),
        confidence=confidence,
        resamples=int(means.size),
        exact=exact,
        seed=None if exact else seed,
        keys=keys,
        differences=[float(d) for d in differences],
    )


def paired_table(
    scores: Mapping[str, Mapping[Any, float]], reference: str, **options: Any
) -> dict[str, dict[str, Any]]:
    """``reference`` against every other method of ``scores`` (method -> seed -> score), JSON-able.

    Each entry is :meth:`PairedComparison.to_dict` of ``reference - other``; ``options`` go to
    :func:`paired_difference`.
    """
    if reference not in scores:
        raise ValueError(f"reference method {reference!r} has no scores; methods: {sorted(scores)}")
    return {
        name: paired_difference(scores[reference], other, **options).to_dict()
        for name, other in scores.items()
        if name != reference
    }
