"""Paired differences and their bootstrap interval: a hand-computed example, exact enumeration, and properties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kradapter import stats


def test_hand_computed_three_seeds() -> None:
    # Differences 0.01, 0.02, 0.06. The 27 ordered resamples have these means (multiplicity in brackets), sorted:
    # 0.01 [1], 0.04/3 [3], 0.05/3 [3], 0.02 [1], 0.08/3 [3], 0.03 [6], 0.10/3 [3], 0.13/3 [3], 0.14/3 [3], 0.06 [1].
    # Linear quantiles over 27 values: 2.5% sits at position 0.65 between 0.01 and 0.04/3,
    # 97.5% at position 25.35 between 0.14/3 and 0.06.
    low = 0.01 + 0.65 * (0.04 / 3 - 0.01)  # = 0.0365 / 3
    high = 0.14 / 3 + 0.35 * (0.06 - 0.14 / 3)  # = 0.154 / 3
    a = {"seed 2": 0.90, "seed 0": 0.81, "seed 1": 0.72}
    b = {"seed 0": 0.80, "seed 1": 0.70, "seed 2": 0.84}  # paired by key, not by position
    result = stats.paired_difference(a, b)
    assert result.exact and result.resamples == 27 and result.n == 3
    assert result.mean_difference == pytest.approx(0.03)
    assert result.low == pytest.approx(low, abs=1e-12) and result.high == pytest.approx(high, abs=1e-12)
    assert result.verdict == "better"
    flipped = stats.paired_difference(b, a)
    assert (flipped.low, flipped.high) == pytest.approx((-high, -low), abs=1e-12)
    assert flipped.verdict == "worse"
    # Differences -0.01, 0.02, 0.04: the lowest means are -0.01 [1] and 0 [3], the highest 0.10/3 [3] and 0.04 [1].
    mixed = stats.paired_difference([0.5, 0.52, 0.54], [0.51, 0.5, 0.5])
    assert mixed.low == pytest.approx(-0.01 + 0.65 * 0.01, abs=1e-12)
    assert mixed.high == pytest.approx(0.10 / 3 + 0.35 * (0.04 - 0.10 / 3), abs=1e-12)
    assert mixed.verdict == "no difference shown"


def test_exact_bootstrap_matches_an_independent_enumeration() -> None:
    rng = np.random.default_rng()
    a, b = rng.normal(0.8, 0.05, size=5), rng.normal(0.79, 0.05, size=5)
    result = stats.paired_difference(a, b)
    d = a - b
    means = np.array([np.mean([d[i] for i in pick]) for pick in itertools.product(range(5), repeat=5)])
    assert result.exact and result.resamples == 3125
    assert (result.low, result.high) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])), abs=1e-12)
    assert result.differences == pytest.approx(list(d))


def test_monte_carlo_is_seeded_and_close_to_exact() -> None:
    rng = np.random.default_rng()
    d = rng.normal(0.01, 0.02, size=7)  # 7**7 resamples: too many to enumerate in the library
    zeros = np.zeros(7)
    result = stats.paired_difference(d, zeros)
    assert not result.exact and result.resamples == stats.RESAMPLES and result.seed == stats.SEED
    again = stats.paired_difference(d, zeros)
    assert (again.low, again.high) == (result.low, result.high)
    # Another seed draws other resamples, but its bounds can still coincide (rarely): 7 values have only 1,716
    # distinct resample means, so two seeds' 2.5% and 97.5% quantiles can land on the same ones. Compare the draws.
    assert stats.paired_difference(d, zeros, seed=1).seed == 1
    mine, _ = stats.bootstrap_means(d, seed=stats.SEED)
    theirs, _ = stats.bootstrap_means(d, seed=1)
    assert not np.array_equal(mine, theirs)
    # Exact interval by enumerating all 823,543 resamples here.
    index = np.indices((7,) * 7).reshape(7, -1).T
    exact = np.quantile(d[index].mean(axis=1), [0.025, 0.975])
    assert result.low == pytest.approx(exact[0], abs=0.1 * d.std()) and result.high == pytest.approx(
        exact[1], abs=0.1 * d.std()
    )


def test_properties() -> None:
    rng = np.random.default_rng()
    for n in (2, 4, 6, 9):
        a, b = rng.uniform(0.5, 1, size=n), rng.uniform(0.5, 1, size=n)
        r = stats.paired_difference(a, b)
        d = a - b
        assert d.min() - 1e-12 <= r.low <= r.high <= d.max() + 1e-12
        shifted = stats.paired_difference(a + 0.25, b)  # same resamples, every mean moves by 0.25
        assert (shifted.low, shifted.high) == pytest.approx((r.low + 0.25, r.high + 0.25), abs=1e-9)
        assert shifted.mean_difference == pytest.approx(r.mean_difference + 0.25)
        swapped = stats.paired_difference(b, a)
        assert (swapped.low, swapped.high) == pytest.approx((-r.high, -r.low), abs=1e-12)
        assert {r.verdict, swapped.verdict} in ({"better", "worse"}, {"no difference shown"})
        wide = stats.paired_difference(a, b, confidence=0.99)
        assert wide.low <= r.low + 1e-12 and wide.high >= r.high - 1e-12
    constant = stats.paired_difference([0.75, 0.5, 0.25], [0.625, 0.375, 0.125])  # exact binary fractions
    assert constant.low == constant.high == 0.125 and constant.verdict == "better"
    same = stats.paired_difference([0.9, 0.8], [0.9, 0.8])
    assert same.low == same.high == 0 and same.verdict == "no difference shown"
    assert stats.verdict(0.0, 0.3) == "no difference shown" and stats.verdict(-0.2, -1e-9) == "worse"


def test_result_is_json_able() -> None:
    import json

    result = stats.paired_difference({0: 0.9, 1: 0.7, 2: 0.8}, {0: 0.85, 1: 0.75, 2: 0.8})
    back = json.loads(json.dumps(result.to_dict()))
    assert back["keys"] == ["0", "1", "2"] and back["verdict"] in stats.VERDICTS
    assert back["differences"] == pytest.approx([0.05, -0.05, 0.0])


def test_mean_std_and_summary() -> None:
    rng = np.random.default_rng()
    x = rng.normal(size=11)
    mean, std = stats.mean_std(x)
    assert mean == pytest.approx(sum(x) / 11)
    assert std == pytest.approx((sum((v - mean) ** 2 for v in x) / 10) ** 0.5)
    assert stats.mean_std([3.0]) == (3.0, 0.0)
    s = stats.summary(list(x))
    assert s["n"] == 11 and s["min"] == x.min() and s["max"] == x.max() and s["std"] == pytest.approx(std)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match=r"only in a \[3\]"):
        stats.paired_difference({1: 0.5, 3: 0.4}, {1: 0.5})
    with pytest.raises(ValueError, match=r"same length.*3 and 2"):
        stats.paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2 pairs, got 1"):
        stats.paired_difference([1.0], [0.5])
    with pytest.raises(ValueError, match="finite"):
        stats.paired_difference([1.0, float("nan")], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"confidence.*1\.5"):
        stats.paired_difference([1.0, 2.0], [0.5, 0.5], confidence=1.5)
    with pytest.raises(ValueError, match=r"resamples.*0"):
        stats.paired_difference([1.0, 2.0], [0.5, 0.5], resamples=0)
    with pytest.raises(ValueError, match="not one of each"):
        stats.paired_difference({0: 1.0}, [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        stats.mean_std([])


def test_paired_table_compares_the_reference_with_every_other_method() -> None:
    rng = np.random.default_rng()
    scores = {m: {seed: float(rng.uniform(0.7, 0.9)) for seed in range(5)} for m in ("kradapter", "lora", "loha")}
    table = stats.paired_table(scores, "kradapter")
    assert set(table) == {"lora", "loha"}
    for name, row in table.items():
        direct = stats.paired_difference(scores["kradapter"], scores[name])
        assert (row["low"], row["high"], row["verdict"]) == (direct.low, direct.high, direct.verdict)
    with pytest.raises(ValueError, match="'sinlora'"):
        stats.paired_table(scores, "sinlora")
