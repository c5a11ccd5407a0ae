"""Metrics against independent float64 references on fresh random matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kradapter.compare.metrics import effective_rank, fit_metrics, nuclear_error, singular_values


def reference_effective_rank(m: np.ndarray) -> float:
    s = np.linalg.svd(m, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("shape", [(13, 29), (40, 40), (97, 3)])
def test_metrics_match_numpy(shape, generator: torch.Generator) -> None:
    target = torch.randn(shape, generator=generator, dtype=torch.float64)
    fit = target + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    m = fit_metrics(fit, target, singular_values(target))
    t, f = target.numpy(), fit.numpy()
    s_t, s_f = np.linalg.svd(t, compute_uv=False), np.linalg.svd(f, compute_uv=False)
    assert m["relative_frobenius_error"] == pytest.approx(np.linalg.norm(f - t) / np.linalg.norm(t), rel=1e-9)
    assert m["nuclear_error"] == pytest.approx(np.abs(s_f - s_t).mean(), rel=1e-9)
    assert m["effective_rank"] == pytest.approx(reference_effective_rank(f), rel=1e-9)
    assert m["spectral_energy_ratio"] == pytest.approx((f**2).sum() / (t**2).sum(), rel=1e-9)


def test_float32_errors_at_llm_sizes_match_float64(generator: torch.Generator) -> None:
    """Frobenius errors of float32 matrices with tens of millions of entries (a 4096x11008 layer has 45M) are
    accumulated in float64: torch's float32 CPU norm drifts low with size (0.35% at 45M entries)."""
    target = torch.randn(2500, 8000, generator=generator)
    fit = 0.5 * target + torch.randn(2500, 8000, generator=generator)
    s = torch.ones(2500)  # spectra are not under test here
    m = fit_metrics(fit, target, s, s)
    error = float(torch.linalg.vector_norm(fit.double() - target.double()))
    assert m["frobenius_error"] == pytest.approx(error, rel=1e-6)
    assert m["relative_frobenius_error"] == pytest.approx(error / float(target.double().norm()), rel=1e-6)


def test_effective_rank_extremes(generator: torch.Generator) -> None:
    assert effective_rank(singular_values(torch.eye(17))) == pytest.approx(17, rel=1e-5)
    u, v = torch.randn(30, 1, generator=generator), torch.randn(1, 20, generator=generator)
    assert effective_rank(singular_values(u @ v)) == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(torch.zeros(5)) == 0.0


def test_zero_fit_and_unrelated_fit(generator: torch.Generator) -> None:
    """Zero scores relative error 1; an unrelated random matrix has a small nuclear error but error ~ sqrt(2)."""
    target = torch.randn(300, 200, generator=generator)
    s = singular_values(target)
    zero = fit_metrics(torch.zeros_like(target), target, s, torch.zeros_like(s))
    assert zero["relative_frobenius_error"] == pytest.approx(1.0) and zero["spectral_energy_ratio"] == 0
    assert zero["nuclear_error"] == pytest.approx(float(s.mean()), rel=1e-6)
    other = fit_metrics(torch.randn(300, 200, generator=generator), target, s)
    assert other["nuclear_error"] < 0.05 * float(s.mean())
    assert other["relative_frobenius_error"] == pytest.approx(math.sqrt(2), rel=0.02)
    assert nuclear_error(s, s) == 0.0


@pytest.mark.parametrize(("shape", "rank"), [((130, 72), 72), ((72, 130), 5), ((389, 97), 11), ((1, 17), 1)])
def test_singular_values_match_float64_svd(shape, rank, generator: torch.Generator) -> None:
    """Full-rank and low-rank float32 matrices, tall and wide: within 1e-6 of the largest value, descending."""
    rows, cols = shape
    m = torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)
    s = singular_values(m)
    want = np.linalg.svd(m.double().numpy(), compute_uv=False)
    assert s.dtype == torch.float32 and s.shape == (min(shape),)
    assert np.abs(s.double().numpy() - want).max() <= 1e-6 * want[0]
    assert bool((s[:-1] >= s[1:]).all())
