"""Statistics that decide between two methods run on the same seeds (paired designs).

Two methods run on the same seeds (same data draw, same split, same initialisation stream) give paired scores;
their per-seed differences ``a - b`` remove the between-seed variance that both share.

Percentile bootstrap (:func:`paired_difference`, the earlier shift study's interval)
    Resample the differences with replacement, take the mean of each resample, and read the 2.5% and 97.5%
    quantiles (``numpy.quantile``, linear interpolation) of those means. With ``n`` pairs there are ``n**n``
    equally likely ordered resamples; when that is at most :data:`EXACT_LIMIT` (``n <= 6``) every one is
    enumerated (exact bootstrap interval, 5 seeds: 3,125 resamples), otherwise :data:`RESAMPLES` (10,000) are
    drawn with ``numpy.random.default_rng(seed)``. Its verdict is ``"better"`` / ``"worse"`` / ``"no difference
    shown"``. With few pairs it is too narrow: it ignores the uncertainty of the spread and covers about 84% at
    5 normal pairs (``tests/core/test_paired_inference.py`` measures it), so it is not used below
    :data:`PERCENTILE_MIN_PAIRS` pairs in new analyses; it is kept so earlier reports recompute unchanged.

Calibrated tools for small ``n`` (the powered study's statistics)
    - :func:`paired_t_interval`: Student t interval of the mean difference (``scipy.stats.t``).
    - :func:`studentized_interval`: bootstrap-t interval (resampled t statistics, same enumeration rule).
    - :func:`sign_flip_test`: exact permutation p-value of the mean difference under sign flips (all ``2**n``
      flips up to :data:`SIGN_FLIP_EXACT_MAX` pairs, else Monte Carlo with its resolution stated).
    - :func:`holm`: Holm's step-down adjustment across a family of p-values.
    - :func:`minimum_detectable_difference` / :func:`seeds_needed` / :func:`paired_t_power`: power of the
      two-sided paired t-test from the noncentral t distribution (``scipy.stats.nct``).
    - :func:`two_way_bootstrap`: interval of an accuracy difference resampling seeds and test items together.
    - :func:`mcnemar_exact`: exact McNemar test of two classifiers' per-item correctness on one seed.
    - :func:`endpoint_verdict`: ``"supported"``, ``"contradicted"`` or ``"not detected (MDE x points)"``.

SciPy provides the distributions and the root finder; it is imported inside the functions that use it, so the
percentile bootstrap and the summaries import nothing beyond NumPy.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from . import guards

CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0
EXACT_LIMIT = 100_000  # enumerate all n**n resamples up to this many (n <= 6)
VERDICTS = ("better", "worse", "no difference shown")
PERCENTILE_MIN_PAIRS = 20  # below this many pairs, new analyses use t / bootstrap-t intervals instead
SIGN_FLIP_EXACT_MAX = 20  # enumerate all 2**n sign flips up to this many pairs (1,048,576 flips)
ALPHA = 0.05
POWER = 0.80
ENDPOINT_VERDICTS = ("supported", "contradicted", "not detected")


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


@functools.cache
def _all_resamples(n: int) -> np.ndarray:
    """Every ordered resample of ``n`` indices with replacement (``n**n`` rows), read-only."""
    index = np.array(list(itertools.product(range(n), repeat=n)), dtype=np.int64).reshape(-1, n)
    index.flags.writeable = False
    return index


def bootstrap_means(differences: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[np.ndarray, bool]:
    """Means of bootstrap resamples of ``differences`` and whether they are all ``n**n`` of them (exact)."""
    n = differences.size
    if n**n <= EXACT_LIMIT:
        return differences[_all_resamples(n)].mean(axis=1), True
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


# -- calibrated small-sample tools ---------------------------------------------------------------------------------


def _check_confidence(confidence: float) -> None:
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence!r}")


def _check_count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def differences_of(
    a: Mapping[Any, float] | Sequence[float] | np.ndarray,
    b: Mapping[Any, float] | Sequence[float] | np.ndarray | None = None,
    *,
    minimum: int = 2,
) -> tuple[list[Any], np.ndarray]:
    """``(keys, a - b)`` paired as :func:`pair_up` pairs them; with ``b=None``, ``a`` already holds the differences.

    A ValueError when fewer than ``minimum`` pairs remain.
    """
    if b is None:
        if isinstance(a, Mapping):
            keys = sorted(a, key=str)
            d = _values("differences", [a[k] for k in keys])
        else:
            d = _values("differences", a)
            keys = list(range(d.size))
    else:
        keys, va, vb = pair_up(a, b)  # type: ignore[arg-type]
        d = va - vb
    if d.size < minimum:
        raise ValueError(f"this needs at least {minimum} pairs, got {d.size}")
    return keys, d


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval; ``method`` names how the interval was made."""

    method: str
    n: int
    estimate: float
    low: float
    high: float
    confidence: float
    standard_error: float
    p_value: float | None = None
    details: dict[str, Any] | None = None

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the closed interval."""
        return self.low <= value <= self.high

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def paired_t_interval(
    a: Mapping[Any, float] | Sequence[float] | np.ndarray,
    b: Mapping[Any, float] | Sequence[float] | np.ndarray | None = None,
    *,
    confidence: float = CONFIDENCE,
) -> Interval:
    """Student t interval of the mean of ``a - b`` (``n - 1`` degrees of freedom) and the paired t-test's p-value.

    The p-value is two-sided for a mean difference of 0. Exact under normal differences; with identical
    differences the interval is the single point and the p-value 0 (or 1 when every difference is 0).
    """
    from scipy import stats as sps

    _check_confidence(confidence)
    _, d = differences_of(a, b)
    n = d.size
    mean = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(n))
    if se == 0:
        p = 1.0 if mean == 0 else 0.0
        return Interval("paired t", n, mean, mean, mean, confidence, 0.0, p, {"df": n - 1})
    q = float(sps.t.ppf(0.5 + confidence / 2, n - 1))
    p = float(2 * sps.t.sf(abs(mean) / se, n - 1))
    return Interval("paired t", n, mean, mean - q * se, mean + q * se, confidence, se, p, {"df": n - 1})


def studentized_interval(
    a: Mapping[Any, float] | Sequence[float] | np.ndarray,
    b: Mapping[Any, float] | Sequence[float] | np.ndarray | None = None,
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """Studentised (bootstrap-t) interval of the mean of ``a - b``.

    Each resample's ``t* = (mean* - mean) / se*`` (``se* = sd*(ddof=1) / sqrt(n)``); the interval is
    ``[mean - q_hi * se, mean - q_lo * se]`` with ``q_lo``, ``q_hi`` the lower and upper quantiles of ``t*``.
    Resamples are enumerated (all ``n**n``) or drawn exactly as for :func:`paired_difference`. Resamples that
    repeat one value have ``se* = 0`` and no ``t*``; they are dropped (``details["degenerate"]`` counts them).
    Needs at least 3 pairs.
    """
    _check_confidence(confidence)
    resamples = _check_count("resamples", resamples)
    _, d = differences_of(a, b, minimum=3)
    n = d.size
    mean = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(n))
    exact = n**n <= EXACT_LIMIT
    if exact:
        index = _all_resamples(n)
    else:
        index = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    if se == 0:
        details = {"resamples": int(index.shape[0]), "exact": exact, "seed": None if exact else seed, "degenerate": 0}
        return Interval("bootstrap-t", n, mean, mean, mean, confidence, 0.0, None, details)
    sample = d[index]
    se_star = sample.std(axis=1, ddof=1) / math.sqrt(n)
    ok = se_star > 0
    t_star = (sample.mean(axis=1)[ok] - mean) / se_star[ok]
    tail = (1 - confidence) / 2
    q_lo, q_hi = (float(q) for q in np.quantile(t_star, [tail, 1 - tail]))
    details = {
        "resamples": int(index.shape[0]),
        "exact": exact,
        "seed": None if exact else seed,
        "degenerate": int((~ok).sum()),
    }
    return Interval("bootstrap-t", n, mean, mean - q_hi * se, mean - q_lo * se, confidence, se, None, details)


@dataclass(frozen=True)
class SignFlipTest:
    """Permutation test of the mean paired difference under random sign flips.

    ``resolution`` is the smallest step between attainable p-values (``1 / flips`` exact, ``1 / (flips + 1)``
    Monte Carlo); ``smallest_p`` is the smallest p-value these differences could give at all (exact only).
    """

    n: int
    mean_difference: float
    p_value: float
    alternative: str
    exact: bool
    flips: int
    resolution: float
    smallest_p: float | None
    seed: int | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def _all_sign_flip_sums(d: np.ndarray) -> np.ndarray:
    sums = np.zeros(1, dtype=np.float64)
    for value in d:
        sums = np.concatenate([sums + value, sums - value])
    return sums


def sign_flip_test(
    a: Mapping[Any, float] | Sequence[float] | np.ndarray,
    b: Mapping[Any, float] | Sequence[float] | np.ndarray | None = None,
    *,
    alternative: Literal["two-sided", "greater", "less"] = "two-sided",
    exact_max: int = SIGN_FLIP_EXACT_MAX,
    resamples: int = 100_000,
    seed: int = SEED,
) -> SignFlipTest:
    """Exact sign-flip (paired permutation) p-value of the mean of ``a - b`` against 0.

    Under the null hypothesis each difference is symmetric about 0, so all ``2**n`` sign patterns are equally
    likely. The statistic is the sum of the differences (equivalently their mean); the two-sided p-value is the
    share of sign patterns whose ``|sum|`` reaches the observed one (ties within ``1e-9`` relative count as
    reaching). Up to ``exact_max`` pairs every pattern is enumerated; above, ``resamples`` random patterns are
    drawn with ``numpy.random.default_rng(seed)`` and ``p = (1 + hits) / (1 + resamples)`` (never 0, resolution
    ``1 / (1 + resamples)``). With 5 pairs the smallest two-sided p is ``2 / 32 = 0.0625``.
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    exact_max = _check_count("exact_max", exact_max, 0)
    resamples = _check_count("resamples", resamples)
    _, d = differences_of(a, b, minimum=1)
    n = d.size
    observed = float(d.sum())
    tol = 1e-9 * max(float(np.abs(d).sum()), np.finfo(np.float64).tiny)

    def share(sums: np.ndarray) -> np.ndarray:
        if alternative == "greater":
            return sums >= observed - tol
        if alternative == "less":
            return sums <= observed + tol
        return np.abs(sums) >= abs(observed) - tol

    if n <= exact_max:
        sums = _all_sign_flip_sums(d)
        p = float(share(sums).mean())
        extreme = {"greater": sums.max(), "less": sums.min(), "two-sided": np.abs(sums).max()}[alternative]
        if alternative == "less":
            smallest = float((sums <= extreme + tol).mean())
        elif alternative == "greater":
            smallest = float((sums >= extreme - tol).mean())
        else:
            smallest = float((np.abs(sums) >= extreme - tol).mean())
        return SignFlipTest(n, observed / n, p, alternative, True, int(sums.size), 1 / sums.size, smallest, None)
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, 10_000):
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(10_000, resamples - start), n))
        hits += int(share(signs @ d).sum())
    p = (1 + hits) / (1 + resamples)
    return SignFlipTest(n, observed / n, p, alternative, False, resamples, 1 / (1 + resamples), None, seed)


@dataclass(frozen=True)
class HolmAdjustment:
    """Holm step-down adjusted p-values of a family, in the family's order, and which hypotheses are rejected."""

    names: list[Any]
    p_values: list[float]
    adjusted: list[float]
    reject: list[bool]
    alpha: float

    def by_name(self) -> dict[Any, dict[str, Any]]:
        """``name -> {"p", "adjusted", "reject"}``."""
        return {
            name: {"p": p, "adjusted": q, "reject": r}
            for name, p, q, r in zip(self.names, self.p_values, self.adjusted, self.reject, strict=True)
        }


def holm(p_values: Mapping[Any, float] | Sequence[float], *, alpha: float = ALPHA) -> HolmAdjustment:
    """Holm's (1979) step-down adjustment, controlling the family-wise error rate at ``alpha``.

    With the ``m`` p-values sorted ``p(1) <= ... <= p(m)``, the adjusted value of ``p(i)`` is
    ``max over j <= i of min(1, (m - j + 1) * p(j))``; a hypothesis is rejected when its adjusted value is
    ``<= alpha`` (the same set as the sequential rule: reject while ``p(i) <= alpha / (m - i + 1)``).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha!r}")
    if isinstance(p_values, Mapping):
        names = list(p_values)
        p = _values("p_values", [p_values[k] for k in names])
    else:
        p = _values("p_values", p_values)
        names = list(range(p.size))
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()!r}")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return HolmAdjustment(names, p.tolist(), adjusted.tolist(), (adjusted <= alpha).tolist(), alpha)


def paired_t_power(difference: float, sd: float, n: int, *, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` for a true mean difference ``difference``.

    ``n`` pairs whose differences have standard deviation ``sd``: the statistic follows a noncentral t with
    ``n - 1`` degrees of freedom and noncentrality ``difference * sqrt(n) / sd``; both rejection tails count.
    """
    from scipy import stats as sps

    n = _check_count("n", n, 2)
    if not (math.isfinite(sd) and sd > 0):
        raise ValueError(f"sd must be a positive number, got {sd!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha!r}")
    df = n - 1
    critical = float(sps.t.ppf(1 - alpha / 2, df))
    nc = abs(difference) * math.sqrt(n) / sd  # the power is symmetric in the sign of the difference
    near = float(sps.nct.sf(critical, df, nc))
    far = float(sps.nct.cdf(-critical, df, nc))  # below P(Z < -nc); scipy returns nan once it underflows
    return near + (far if math.isfinite(far) else 0.0)


def minimum_detectable_difference(sd: float, n: int, *, power: float = POWER, alpha: float = ALPHA) -> float:
    """Smallest true mean difference the two-sided paired t-test detects with probability ``power``.

    From ``n`` pairs with difference standard deviation ``sd`` (the observed one, taken as the true one), solved
    on the noncentral t power (:func:`paired_t_power`) with ``scipy.optimize.brentq``. Same units as ``sd``;
    0 when ``sd`` is 0.
    """
    from scipy import optimize

    n = _check_count("n", n, 2)
    if not (math.isfinite(sd) and sd >= 0):
        raise ValueError(f"sd must be a non-negative number, got {sd!r}")
    if not alpha < power < 1:
        raise ValueError(f"power must be between alpha ({alpha}) and 1, got {power!r}")
    if sd == 0:
        return 0.0
    upper = sd / math.sqrt(n)
    while paired_t_power(upper, sd, n, alpha=alpha) < power:
        upper *= 2
    return float(optimize.brentq(lambda x: paired_t_power(x, sd, n, alpha=alpha) - power, 0.0, upper, xtol=1e-12))


def seeds_needed(sd: float, target: float, *, power: float = POWER, alpha: float = ALPHA, max_n: int = 100_000) -> int:
    """Smallest number of pairs whose :func:`minimum_detectable_difference` is at most ``target``.

    A ValueError when even ``max_n`` pairs do not reach it.
    """
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target must be a positive number, got {target!r}")
    if minimum_detectable_difference(sd, 2, power=power, alpha=alpha) <= target:
        return 2
    if minimum_detectable_difference(sd, max_n, power=power, alpha=alpha) > target:
        raise ValueError(f"target {target!r} needs more than max_n={max_n} pairs at sd {sd!r}")
    low, high = 2, max_n  # mde(low) > target >= mde(high)
    while high - low > 1:
        mid = (low + high) // 2
        if minimum_detectable_difference(sd, mid, power=power, alpha=alpha) <= target:
            high = mid
        else:
            low = mid
    return high


def _score_matrix(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name} must be a (seeds, items) array of per-item scores, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite")
    return array


def _two_way_means(differences: np.ndarray, seed_index: np.ndarray, item_index: np.ndarray) -> np.ndarray:
    """Mean of ``differences[seeds][:, items]`` for each row of the two index arrays (seed and item draws)."""
    seeds, items = differences.shape
    out = np.empty(seed_index.shape[0])
    for start in range(0, seed_index.shape[0], 500):
        rows = slice(start, start + 500)
        s_idx, i_idx = seed_index[rows], item_index[rows]
        r = s_idx.shape[0]
        seed_counts = np.zeros((r, seeds))
        item_counts = np.zeros((r, items))
        np.add.at(seed_counts, (np.arange(r)[:, None], s_idx), 1.0)
        np.add.at(item_counts, (np.arange(r)[:, None], i_idx), 1.0)
        out[rows] = ((seed_counts @ differences) * item_counts).sum(axis=1) / (s_idx.shape[1] * i_idx.shape[1])
    return out


def two_way_bootstrap(
    a: Any,
    b: Any,
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """Interval of the accuracy difference ``a - b`` that includes test-item sampling as well as seed variation.

    ``a`` and ``b`` are ``(seeds, items)`` arrays of per-item scores (1 correct, 0 wrong) of two methods,
    paired by seed (same draw) and by item (same test text). Each resample draws seeds with replacement and,
    independently, items with replacement (a crossed, "pigeonhole" bootstrap, Owen 2007), and takes the mean
    difference over the resampled grid. The standard error is the resamples' standard deviation; the interval is
    ``estimate +- t * se`` with the t quantile on ``seeds - 1`` degrees of freedom (``items - 1`` with one
    seed), because with few seeds the seed component's spread is itself uncertain. The percentile interval is
    in ``details`` for reference only (it is too narrow below :data:`PERCENTILE_MIN_PAIRS` seeds).
    """
    from scipy import stats as sps

    _check_confidence(confidence)
    resamples = _check_count("resamples", resamples, 2)
    va, vb = _score_matrix("a", a), _score_matrix("b", b)
    if va.shape != vb.shape:
        raise ValueError(f"a and b must have the same (seeds, items) shape, got {va.shape} and {vb.shape}")
    differences = va - vb
    seeds, items = differences.shape
    if seeds * items < 2:
        raise ValueError(f"a two-way bootstrap needs at least 2 scores, got shape {differences.shape}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):
        r = min(1000, resamples - start)
        means[start : start + r] = _two_way_means(
            differences, rng.integers(0, seeds, size=(r, seeds)), rng.integers(0, items, size=(r, items))
        )
    estimate = float(differences.mean())
    se = float(means.std(ddof=1))
    df = seeds - 1 if seeds > 1 else items - 1
    q = float(sps.t.ppf(0.5 + confidence / 2, df))
    tail = (1 - confidence) / 2
    p_low, p_high = (float(x) for x in np.quantile(means, [tail, 1 - tail]))
    details = {
        "seeds": seeds,
        "items": items,
        "df": df,
        "resamples": resamples,
        "seed": seed,
        "percentile_low": p_low,
        "percentile_high": p_high,
    }
    return Interval(
        "two-way bootstrap", seeds, estimate, estimate - q * se, estimate + q * se, confidence, se, None, details
    )


@dataclass(frozen=True)
class McNemarTest:
    """Exact McNemar test: ``a_only`` items only ``a`` got right, ``b_only`` only ``b``; two-sided p-value."""

    items: int
    a_only: int
    b_only: int
    difference: float
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def mcnemar_exact(correct_a: Any, correct_b: Any) -> McNemarTest:
    """McNemar's exact test of two classifiers on the same items (one seed): a binomial test on discordant pairs.

    Under the null hypothesis an item that one method gets right and the other wrong is equally likely to favour
    either, so ``a_only ~ Binomial(a_only + b_only, 1/2)``; the p-value is ``scipy.stats.binomtest``'s two-sided
    one (1 when no item is discordant). ``difference`` is the accuracy of ``a`` minus that of ``b``.
    """
    from scipy import stats as sps

    ca, cb = np.asarray(correct_a), np.asarray(correct_b)
    if ca.ndim != 1 or ca.shape != cb.shape or ca.size == 0:
        raise ValueError(f"correct_a and correct_b must be equal-length 1-D arrays, got {ca.shape} and {cb.shape}")
    for name, c in (("correct_a", ca), ("correct_b", cb)):
        if not np.all(np.isin(c, (0, 1))):
            raise ValueError(f"{name} must hold 0/1 (or booleans) per item")
    ca, cb = ca.astype(bool), cb.astype(bool)
    a_only, b_only = int(np.sum(ca & ~cb)), int(np.sum(~ca & cb))
    discordant = a_only + b_only
    p = float(sps.binomtest(a_only, discordant, 0.5).pvalue) if discordant else 1.0
    return McNemarTest(int(ca.size), a_only, b_only, (a_only - b_only) / ca.size, p)


def endpoint_verdict(
    adjusted_p: float,
    estimate: float,
    expected: Literal["greater", "less"],
    mde_points: float,
    *,
    alpha: float = ALPHA,
) -> str:
    """The verdict on a claim: ``"supported"``, ``"contradicted"`` or ``"not detected (MDE x points)"``.

    ``adjusted_p`` is the Holm-adjusted p-value of the endpoint's two-sided test, ``estimate`` its mean
    difference and ``expected`` the claimed direction. Significant in the claimed direction: supported;
    significant against it: contradicted; otherwise not detected, with the minimum detectable difference (in
    points) that says how large an effect the design could have missed.
    """
    if expected not in ("greater", "less"):
        raise ValueError(f"expected must be 'greater' or 'less', got {expected!r}")
    if not 0 <= adjusted_p <= 1:
        raise ValueError(f"adjusted_p must lie in [0, 1], got {adjusted_p!r}")
    if not (math.isfinite(mde_points) and mde_points >= 0):
        raise ValueError(f"mde_points must be a non-negative number, got {mde_points!r}")
    if adjusted_p <= alpha and estimate != 0:
        agrees = estimate > 0 if expected == "greater" else estimate < 0
        return "supported" if agrees else "contradicted"
    return f"not detected (MDE {mde_points:.1f} points)"
