"""Small-sample paired inference: coverage by simulation, exact tests against brute force, power against simulation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from kradapter import stats


def test_paired_t_interval_matches_the_formula_and_covers_95_percent_at_five_pairs() -> None:
    rng = np.random.default_rng()
    a, b = rng.normal(0.7, 0.05, size=5), rng.normal(0.69, 0.05, size=5)
    r = stats.paired_t_interval(a, b)
    d = a - b
    half = sps.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    assert (r.low, r.high) == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-12)
    assert r.p_value == pytest.approx(sps.ttest_rel(a, b).pvalue, abs=1e-12)
    assert stats.paired_t_interval(d).low == r.low  # differences given directly
    reps, hits = 3000, 0
    for _ in range(reps):
        hits += stats.paired_t_interval(rng.normal(0.3, 1.7, size=5)).contains(0.3)
    assert 0.93 <= hits / reps <= 0.97  # nominal 95%; 3000 draws: standard error 0.004


def test_studentized_interval_covers_95_and_the_percentile_bootstrap_only_about_84_at_five_pairs() -> None:
    # The reason the percentile bootstrap is not used below 20 pairs: at 5 normal pairs it covers ~84-86%.
    rng = np.random.default_rng()
    reps, t_hits, p_hits = 1500, 0, 0
    for _ in range(reps):
        d = rng.normal(0.3, 1.7, size=5)
        t_hits += stats.studentized_interval(d).contains(0.3)
        pct = stats.paired_difference(d, np.zeros(5))
        p_hits += pct.low <= 0.3 <= pct.high
    assert 0.93 <= t_hits / reps <= 0.985  # bootstrap-t: nominal (slightly conservative at n = 5)
    assert 0.79 <= p_hits / reps <= 0.89  # percentile: far below 95% (standard error 0.009)


def test_studentized_interval_matches_an_independent_enumeration() -> None:
    rng = np.random.default_rng()
    d = rng.normal(size=4)
    r = stats.studentized_interval(d)
    mean, se = d.mean(), d.std(ddof=1) / 2
    ts = []
    for pick in itertools.product(range(4), repeat=4):
        x = d[list(pick)]
        s = x.std(ddof=1) / 2
        if s > 0:
            ts.append((x.mean() - mean) / s)
    lo, hi = np.quantile(ts, [0.025, 0.975])
    assert (r.low, r.high) == pytest.approx((mean - hi * se, mean - lo * se), abs=1e-12)
    assert r.details["degenerate"] == 4 and r.details["exact"] and r.details["resamples"] == 256
    big = stats.studentized_interval(rng.normal(size=8))  # 8**8 resamples: Monte Carlo, seeded
    assert not big.details["exact"] and big.details["resamples"] == stats.RESAMPLES
    assert stats.studentized_interval([0.25, 0.25, 0.25]).low == 0.25


def test_sign_flip_p_is_exact_against_brute_force_enumeration() -> None:
    rng = np.random.default_rng()
    for n in (1, 2, 3, 5, 8, 11):
        d = np.round(rng.normal(0.4, 1, size=n), 2)  # rounding makes ties between sign patterns likely
        d[0] = 0.0 if n > 3 else d[0]  # a zero difference as well
        obs = d.sum()
        sums = np.array([np.dot(s, d) for s in itertools.product((-1, 1), repeat=n)])
        tol = 1e-9
        for alternative, expect in (
            ("two-sided", np.mean(np.abs(sums) >= abs(obs) - tol)),
            ("greater", np.mean(sums >= obs - tol)),
            ("less", np.mean(sums <= obs + tol)),
        ):
            r = stats.sign_flip_test(d, alternative=alternative)
            assert r.exact and r.flips == 2**n and r.p_value == pytest.approx(expect, abs=1e-15)
    five = stats.sign_flip_test([0.02, 0.01, 0.03, 0.015, 0.04])  # all positive: the most extreme pattern
    assert five.p_value == five.smallest_p == pytest.approx(2 / 32)


def test_sign_flip_monte_carlo_agrees_with_exact_within_its_resolution() -> None:
    rng = np.random.default_rng()
    d = rng.normal(0.35, 1, size=21)
    exact = stats.sign_flip_test(d, exact_max=21)
    mc = stats.sign_flip_test(d, resamples=200_000)
    assert exact.exact and not mc.exact and mc.resolution == 1 / 200_001 and mc.seed == stats.SEED
    assert abs(mc.p_value - exact.p_value) < 4 * math.sqrt(exact.p_value * (1 - exact.p_value) / 200_000) + 1e-5
    assert stats.sign_flip_test(d, resamples=200_000).p_value == mc.p_value  # seeded


def test_holm_hand_worked_example() -> None:
    # Sorted p: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running max 0.06).
    r = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    assert r.adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert r.reject == [True, False, False, True]
    assert r.by_name()["c"] == {"p": 0.03, "adjusted": pytest.approx(0.06), "reject": False}
    assert stats.holm([0.9, 0.8]).adjusted == pytest.approx([1.0, 1.0])  # capped at 1


def _holm_reference(p: list[float], alpha: float) -> tuple[list[float], list[bool]]:
    """Holm by the textbook sequential rule and a double loop, independent of the library's vectorised form."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    reject = [False] * m
    for rank, i in enumerate(order):
        if p[i] <= alpha / (m - rank):
            reject[i] = True
        else:
            break
    adjusted = [0.0] * m
    for rank, i in enumerate(order):
        adjusted[i] = min(1.0, max((m - j) * p[order[j]] for j in range(rank + 1)))
    return adjusted, reject


def test_holm_matches_reference_logic_on_random_families() -> None:
    rng = np.random.default_rng()
    for _ in range(300):
        m = int(rng.integers(1, 30))
        p = list(rng.uniform(0, 0.2, size=m) ** 2)
        if m > 3:
            p[1] = p[0]  # ties
        alpha = float(rng.choice([0.01, 0.05, 0.1]))
        adjusted, reject = _holm_reference(p, alpha)
        r = stats.holm(p, alpha=alpha)
        assert r.adjusted == pytest.approx(adjusted, abs=1e-15) and r.reject == reject


def test_mde_gives_80_percent_power_in_simulation() -> None:
    rng = np.random.default_rng()
    for sd, n in ((2.3, 5), (1.1, 12)):
        mde = stats.minimum_detectable_difference(sd, n)
        assert stats.paired_t_power(mde, sd, n) == pytest.approx(0.8, abs=1e-9)
        reps = 20_000
        d = rng.normal(mde, sd, size=(reps, n))
        rejected = sps.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05
        assert rejected.mean() == pytest.approx(0.8, abs=0.015)  # standard error 0.0028
        assert stats.paired_t_power(0.0, sd, n) == pytest.approx(0.05, abs=1e-12)  # size at no difference
    # Larger n, smaller MDE; the normal approximation (z_.975 + z_.8) * sd / sqrt(n) is a lower bound.
    mdes = [stats.minimum_detectable_difference(1.0, n) for n in (2, 3, 5, 10, 20, 100)]
    assert all(x > y for x, y in itertools.pairwise(mdes))
    assert mdes[-1] == pytest.approx((1.959964 + 0.841621) / 10, rel=0.02) and mdes[-1] > 0.28
    assert stats.minimum_detectable_difference(0.0, 5) == 0.0


def test_seeds_needed_is_the_smallest_n_reaching_the_target() -> None:
    for sd, target in ((2.0, 1.5), (3.7, 1.5), (0.9, 1.5), (5.0, 0.5)):
        n = stats.seeds_needed(sd, target)
        assert stats.minimum_detectable_difference(sd, n) <= target
        if n > 2:
            assert stats.minimum_detectable_difference(sd, n - 1) > target
    with pytest.raises(ValueError, match="max_n=10"):
        stats.seeds_needed(10.0, 0.1, max_n=10)


def test_mcnemar_matches_binomtest_and_the_exact_formula() -> None:
    rng = np.random.default_rng()
    for _ in range(20):
        items = int(rng.integers(5, 300))
        a, b = rng.random(items) < 0.7, rng.random(items) < 0.6
        r = stats.mcnemar_exact(a, b)
        n01, n10 = int(np.sum(a & ~b)), int(np.sum(~a & b))
        assert (r.a_only, r.b_only, r.items) == (n01, n10, items)
        assert r.difference == pytest.approx(a.mean() - b.mean())
        n = n01 + n10
        if n:
            assert r.p_value == pytest.approx(sps.binomtest(n01, n, 0.5).pvalue, abs=1e-12)
            tail = sum(math.comb(n, k) for k in range(min(n01, n10) + 1)) / 2**n
            assert r.p_value == pytest.approx(min(1.0, 2 * tail), abs=1e-12)
    assert stats.mcnemar_exact([1, 0, 1], [1, 0, 1]).p_value == 1.0


def test_two_way_bootstrap_resamples_seeds_and_items() -> None:
    rng = np.random.default_rng()
    seeds, items = 4, 37
    d = rng.normal(size=(seeds, items))
    s_idx, i_idx = rng.integers(0, seeds, size=(9, seeds)), rng.integers(0, items, size=(9, items))
    fast = stats._two_way_means(d, s_idx, i_idx)
    slow = [d[np.ix_(s_idx[r], i_idx[r])].mean() for r in range(9)]
    assert fast == pytest.approx(slow, abs=1e-12)
    # Items that never differ within a seed: only the seed resampling varies -> the plain bootstrap's SE.
    per_seed = rng.normal(size=6)
    a = np.repeat(per_seed[:, None], 50, axis=1)
    r = stats.two_way_bootstrap(a, np.zeros_like(a), resamples=20_000)
    assert r.standard_error == pytest.approx(per_seed.std(ddof=0) / math.sqrt(6), rel=0.03)
    assert r.details["df"] == 5
    # One seed: only items vary -> SE of an item mean; 0/1 correctness as inputs.
    ca, cb = rng.random((1, 400)) < 0.7, rng.random((1, 400)) < 0.6
    r1 = stats.two_way_bootstrap(ca, cb, resamples=20_000)
    diff = ca.astype(float) - cb
    assert r1.estimate == pytest.approx(diff.mean())
    assert r1.standard_error == pytest.approx(diff.std(ddof=0) / math.sqrt(400), rel=0.03)
    # Both components: the SE is at least each one alone.
    both = rng.normal(size=(5, 1)) + rng.normal(size=(1, 80)) + 0.1 * rng.normal(size=(5, 80))
    rb = stats.two_way_bootstrap(both, np.zeros_like(both))
    rs = stats.two_way_bootstrap(both.mean(axis=1, keepdims=True).repeat(80, 1), np.zeros_like(both))
    assert rb.standard_error > rs.standard_error and rb.low < rb.estimate < rb.high
    same = stats.two_way_bootstrap(np.ones((3, 10)), np.zeros((3, 10)))
    assert same.low == same.high == 1.0


def test_endpoint_verdict_has_exactly_three_words() -> None:
    assert stats.endpoint_verdict(0.01, 0.02, "greater", 1.2) == "supported"
    assert stats.endpoint_verdict(0.01, -0.02, "greater", 1.2) == "contradicted"
    assert stats.endpoint_verdict(0.01, -0.02, "less", 1.2) == "supported"
    assert stats.endpoint_verdict(0.2, 0.02, "greater", 1.234) == "not detected (MDE 1.2 points)"
    assert stats.endpoint_verdict(0.05, 0.02, "greater", 1.0) == "supported"  # <= alpha rejects


def test_bad_input_is_one_line_and_named() -> None:
    cases = [
        (lambda: stats.paired_t_interval([1.0]), "at least 2 pairs, got 1"),
        (lambda: stats.paired_t_interval([1.0, 2.0], confidence=2), "confidence"),
        (lambda: stats.studentized_interval([1.0, 2.0]), "at least 3 pairs"),
        (lambda: stats.sign_flip_test([1.0, 2.0], alternative="up"), "'up'"),
        (lambda: stats.holm([0.2, 1.5]), r"\[0, 1\]"),
        (lambda: stats.holm([0.2], alpha=0), "alpha"),
        (lambda: stats.minimum_detectable_difference(1.0, 1), "n must be an integer >= 2, got 1"),
        (lambda: stats.minimum_detectable_difference(-1.0, 5), "sd"),
        (lambda: stats.seeds_needed(1.0, 0), "target"),
        (lambda: stats.mcnemar_exact([1, 2], [1, 0]), "correct_a"),
        (lambda: stats.mcnemar_exact([1, 0], [1]), "equal-length"),
        (lambda: stats.two_way_bootstrap(np.ones((2, 3)), np.ones((3, 2))), r"\(2, 3\) and \(3, 2\)"),
        (lambda: stats.endpoint_verdict(0.01, 0.1, "up", 1.0), "'up'"),  # type: ignore[arg-type]
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
