"""Intruder dimensions (Shuttleworth et al.) on constructed updates, against an independent numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kradapter import intruders
from tests.conftest import ODD_SHAPES


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q


def _spread(r: int, g: torch.Generator) -> torch.Tensor:
    """A unit vector with equal-magnitude entries: |cos| = 1/sqrt(r) with every coordinate axis."""
    h = torch.randint(0, 2, (r,), generator=g).double() * 2 - 1
    return h / h.norm()


def _base(m: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r = min(m, n)
    u0, v0 = _orthonormal(m, r, g), _orthonormal(n, r, g)
    s = 10 * 0.7 ** torch.arange(r, dtype=torch.float64)  # distinct, well-separated spectrum
    return u0 @ torch.diag(s) @ v0.T, u0, v0


def _reference(w0: np.ndarray, w: np.ndarray, k: int, epsilon: float, side: str) -> tuple[int, list[float]]:
    """Dense float64 numpy, written independently: loops over vectors, |cos| via dot products of unit vectors."""

    def vectors(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        keep = s > max(a.shape) * np.finfo(np.float64).eps * s[0]
        return s[keep], (u if side == "left" else vt.T)[:, keep]

    _, ref = vectors(w0)
    _, tuned = vectors(w)
    sims = []
    for j in range(min(k, tuned.shape[1])):
        sims.append(max(abs(float(np.dot(tuned[:, j], ref[:, i]))) for i in range(ref.shape[1])))
    return sum(x < epsilon for x in sims), sims


@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (61, 61), (29, 97), (97, 29)])
def test_a_large_new_direction_is_exactly_one_intruder(shape: tuple[int, int], generator: torch.Generator) -> None:
    m, n = shape
    w0, u0, v0 = _base(m, n, generator)
    r = min(m, n)
    u, v = u0 @ _spread(r, generator), v0 @ _spread(r, generator)  # inside both spans, aligned with no axis
    w = w0 + 30 * torch.outer(u, v)
    for side in ("left", "right"):
        result = intruders.intruder_dimensions(w0, w, side=side)
        assert result.count == 1 and result.intruders == [0]  # the new top singular vector
        assert result.max_similarity[0] < 0.3 and min(result.max_similarity[1:]) > 0.5
        assert result.k == 10 and len(result.max_similarity) == 10
    # A new direction outside a tall matrix's column space: cosine ~0 with every pre-trained left vector.
    if m > n:
        outside = torch.randn(m, generator=generator, dtype=torch.float64)
        outside -= u0 @ (u0.T @ outside)
        w_out = w0 + 30 * torch.outer(outside / outside.norm(), v)
        res = intruders.intruder_dimensions(w0, w_out)
        assert res.count == 1 and res.max_similarity[0] < 0.15  # the residual is W0 along v, ~ sigma_max / 30


def test_a_small_perturbation_gives_none(generator: torch.Generator) -> None:
    for m, n in ((37, 53), (53, 37), (64, 100)):
        w0, _, _ = _base(m, n, generator)
        noise = torch.randn(m, n, generator=generator, dtype=torch.float64)
        result = intruders.intruder_dimensions(w0, w0 + 1e-3 * noise / noise.norm())
        assert result.count == 0 and min(result.max_similarity) > 0.99
        assert intruders.intruder_dimensions(w0, w0).max_similarity == pytest.approx([1.0] * 10, abs=1e-9)
        update = intruders.update_intruder_dimensions(w0, 1e-3 * noise / noise.norm())
        assert update.count == 0


def test_sign_flips_of_singular_vectors_change_nothing(generator: torch.Generator) -> None:
    w0, _, _ = _base(41, 23, generator)
    w = w0 + 0.5 * torch.randn(41, 23, generator=generator, dtype=torch.float64)
    base = intruders.intruder_dimensions(w0, w, epsilon=0.9)
    for a, b in ((-w0, w), (w0, -w), (-w0, -w)):  # negation flips the signs of one side's vectors
        other = intruders.intruder_dimensions(a, b, epsilon=0.9)
        assert other.count == base.count and other.max_similarity == pytest.approx(base.max_similarity, abs=1e-10)
    u, _, _ = torch.linalg.svd(w, full_matrices=False)
    u0, _, _ = torch.linalg.svd(w0, full_matrices=False)
    signs = torch.randint(0, 2, (23,), generator=generator).double() * 2 - 1
    signs0 = torch.randint(0, 2, (23,), generator=generator).double() * 2 - 1
    plain = intruders.max_cosine_similarity(u, u0)
    flipped = intruders.max_cosine_similarity(u * signs, u0 * signs0)
    assert torch.allclose(plain, flipped, atol=1e-12)


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_matches_an_independent_reference_on_odd_shapes(shape: tuple[int, int], generator: torch.Generator) -> None:
    m, n = shape
    w0 = torch.randn(m, n, generator=generator, dtype=torch.float64)
    w = w0 + 0.8 * torch.randn(m, n, generator=generator, dtype=torch.float64)
    for side in ("left", "right"):
        for k, eps in ((10, 0.5), (3, 0.8), (200, 0.3)):
            result = intruders.intruder_dimensions(w0.float(), w.numpy(), k=k, epsilon=eps, side=side)
            count, sims = _reference(w0.float().double().numpy(), w.numpy(), k, eps, side)
            assert result.count == count and result.max_similarity == pytest.approx(sims, abs=1e-9)
            assert len(result.max_similarity) == min(k, m, n)
    if min(m, n) == 1:  # one singular vector on each side; it is +-the only direction on the short side
        assert intruders.intruder_dimensions(w0, w, side="left" if m == 1 else "right").count == 0


def test_the_pretrained_side_is_computed_once_per_content(
    monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    """The cache of pre-trained singular vectors gives the uncached numbers, and never those of another matrix:
    one of the same content in another tensor hits it; a changed entry, shape or side does not."""
    real_svd, calls = np.linalg.svd, []
    monkeypatch.setattr(np.linalg, "svd", lambda a, **kw: calls.append(a.shape) or real_svd(a, **kw))
    monkeypatch.setattr(intruders, "_references", type(intruders._references)())
    w0 = torch.randn(13, 29, generator=generator, dtype=torch.float64)
    tuned = [w0 + 0.6 * torch.randn(13, 29, generator=generator, dtype=torch.float64) for _ in range(3)]
    first = [intruders.intruder_dimensions(w0, w, k=13) for w in tuned]
    assert len(calls) == 1 + 3  # w0 once, then each fine-tuned weight
    monkeypatch.setattr(intruders, "_references", type(intruders._references)())
    assert [intruders.intruder_dimensions(w0.clone(), w, k=13) for w in tuned] == first  # uncached: the same
    for w in tuned:  # each against the independent reference too
        count, sims = _reference(w0.numpy(), w.numpy(), 13, intruders.EPSILON, "left")
        result = intruders.intruder_dimensions(w0.clone(), w, k=13)
        assert result.count == count and result.max_similarity == pytest.approx(sims, abs=1e-9)
    calls.clear()
    intruders.intruder_dimensions(w0.clone().t().contiguous().t(), tuned[0])  # same content, other strides: a hit
    assert len(calls) == 1
    changed = w0.clone()
    changed[5, 7] += 1e-9
    intruders.intruder_dimensions(changed, tuned[0])
    intruders.intruder_dimensions(w0, tuned[0], side="right")
    intruders.intruder_dimensions(w0.reshape(29, 13), tuned[0].reshape(29, 13))
    assert len(calls) == 1 + 2 * 3 and calls[1] == calls[3] == (13, 29) and calls[5] == (29, 13)  # three misses
    many = [torch.randn(3, 4, generator=generator, dtype=torch.float64) for _ in range(intruders.REFERENCE_CACHE + 1)]
    for w in many:
        intruders.intruder_dimensions(w, w)
    assert len(intruders._references) == intruders.REFERENCE_CACHE  # bounded: the oldest goes


def test_zero_and_rank_deficient_matrices() -> None:
    w0 = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))
    tuned = torch.zeros(4, 4)
    assert intruders.intruder_dimensions(w0, tuned).count == 0  # no candidate vectors at all
    new = torch.zeros(4, 4)
    new[3, 3] = 5.0  # the pre-trained null direction: not a reference, so its cosine is with e1..e3 only
    result = intruders.intruder_dimensions(w0, w0 + new, k=1)
    assert result.count == 1 and result.max_similarity == [0.0]


def test_bad_input_is_one_line_and_named() -> None:
    w = torch.ones(3, 4)
    cases = [
        (lambda: intruders.intruder_dimensions(w, torch.ones(4, 3)), r"\(3, 4\) and \(4, 3\)"),
        (lambda: intruders.intruder_dimensions(torch.ones(3), torch.ones(3)), "2-D"),
        (lambda: intruders.intruder_dimensions(w, w, k=0), "k must be a positive integer, got 0"),
        (lambda: intruders.intruder_dimensions(w, w, epsilon=1.5), "epsilon"),
        (lambda: intruders.intruder_dimensions(w, w, side="up"), "'up'"),  # type: ignore[arg-type]
        (lambda: intruders.intruder_dimensions(w, w * float("nan")), "finetuned must be finite"),
        (lambda: intruders.update_intruder_dimensions(w, torch.ones(2, 2)), "delta"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
