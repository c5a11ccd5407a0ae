"""The Khatri-Rao maths against independent float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kradapter.khatri_rao as kr
from kradapter.khatri_rao import (
    KhatriRaoShape,
    delta_weight,
    init_factors,
    khatri_rao_linear,
)

from .conftest import ODD_SHAPES

BIG_SHAPES = [(4096, 14336), (14336, 4096), (11008, 4096), (1000, 768), (768, 1024), (4096, 4096)]


def reference_delta(u: np.ndarray, v: np.ndarray, out_features: int, in_features: int) -> np.ndarray:
    """Row i of the update is kron(V[i], U[i]), cropped to max(d, k), with the m side along the smaller dimension."""
    big = max(out_features, in_features)
    rows = np.stack([np.kron(v[i], u[i])[:big] for i in range(u.shape[0])])
    return rows.T if out_features > in_features else rows


@pytest.mark.parametrize("shape", ODD_SHAPES + BIG_SHAPES)
@pytest.mark.parametrize("factorization", ["sqrt_min", "sqrt_max"])
def test_shape_rule(shape, factorization):
    d, k = shape
    s = KhatriRaoShape(d, k, factorization)
    m, big = min(d, k), max(d, k)
    assert s.r == math.isqrt(m if factorization == "sqrt_min" else big)
    assert s.r * s.r2 >= big and s.r * (s.r2 - 1) < big  # r2 is the smallest that covers max(d, k)
    assert s.r2 >= s.r or factorization == "sqrt_max"
    assert s.num_params == m * (s.r + s.r2)


def test_published_parameter_counts():
    assert KhatriRaoShape(768, 768).num_params == 43_008
    assert KhatriRaoShape(4096, 4096).num_params == 524_288  # = LoRA rank 64 on 4096x4096
    assert KhatriRaoShape(768, 1024, "sqrt_max").num_params == 2 * 768 * 32  # the published budget 2*m*sqrt(M)


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("factorization", ["sqrt_min", "sqrt_max"])
def test_delta_matches_kron_reference(shape, factorization, generator):
    s = KhatriRaoShape(*shape, factorization)
    u = torch.randn(s.u_shape, generator=generator, dtype=torch.float64)
    v = torch.randn(s.v_shape, generator=generator, dtype=torch.float64)
    got = delta_weight(u, v, s)
    assert got.shape == shape
    np.testing.assert_allclose(got.numpy(), reference_delta(u.numpy(), v.numpy(), *shape), rtol=1e-12, atol=0)


def test_update_is_zero_at_init_and_full_rank_when_trained(generator):
    s = KhatriRaoShape(48, 60)
    u, v = torch.empty(s.u_shape), torch.empty(s.v_shape)
    init_factors(u, v)
    assert torch.count_nonzero(delta_weight(u, v, s)) == 0
    assert torch.count_nonzero(v) == v.numel()
    init_factors(u, v, zero_update=False)
    # A Khatri-Rao update reaches full rank with m*(r+r2) parameters, where LoRA of that budget has rank ~8.
    assert torch.linalg.matrix_rank(delta_weight(u, v, s).double()) == 48


@pytest.mark.parametrize("shape", [(13, 29), (29, 13), (72, 130), (130, 72), (97, 389), (1, 7), (7, 1)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_forward_matches_dense_float64(shape, with_weight, generator):
    d, k = shape
    s = KhatriRaoShape(d, k)
    u = torch.randn(s.u_shape, generator=generator)
    v = torch.randn(s.v_shape, generator=generator)
    w = torch.randn(d, k, generator=generator) if with_weight else None
    b = torch.randn(d, generator=generator) if with_weight else None
    x = torch.randn(3, 5, k, generator=generator)
    got = khatri_rao_linear(x, u, v, s, 1.7, w, b)
    dw = torch.from_numpy(reference_delta(u.double().numpy(), v.double().numpy(), d, k))
    want = x.double() @ (1.7 * dw).T
    if with_weight:
        want = want + x.double() @ w.double().T + b.double()
    scale = want.abs().max().item() + 1
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("blockwise", [True, False])
@pytest.mark.parametrize("shape", [(5, 5), (6, 11), (11, 6), (2, 1), (1, 3), (9, 4)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_gradcheck_float64(shape, with_weight, blockwise, generator, monkeypatch):
    """x, U, V (and W, b) through both ways of writing the update: blockwise in place and padded."""
    for name in ("BLOCKWISE_MIN_NUMEL", "BLOCKWISE_MIN_NUMEL_TRANSPOSED"):
        monkeypatch.setattr(kr, name, 0 if blockwise else 1 << 62)
    d, k = shape
    s = KhatriRaoShape(d, k)
    opts = {"dtype": torch.float64, "requires_grad": True}
    u = torch.randn(s.u_shape, generator=generator, **opts)
    v = torch.randn(s.v_shape, generator=generator, **opts)
    x = torch.randn(2, 3, k, generator=generator, **opts)
    w = torch.randn(d, k, generator=generator, **opts) if with_weight else None
    b = torch.randn(d, generator=generator, **opts) if with_weight else None
    inputs = (x, u, v) if not with_weight else (x, u, v, w, b)

    def fn(*args):
        return khatri_rao_linear(*args[:3], s, 0.9, *args[3:])

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradcheck(lambda b, c: delta_weight(b, c, s), (u, v))


@pytest.mark.parametrize("shape", [(130, 72), (72, 130)])
def test_backward_keeps_no_weight_sized_tensor(shape, generator):
    """Only x, U, V (and the caller's own frozen weight) are saved between forward and backward."""
    d, k = shape
    s = KhatriRaoShape(d, k)
    u = torch.randn(s.u_shape, generator=generator, requires_grad=True)
    v = torch.randn(s.v_shape, generator=generator, requires_grad=True)
    w = torch.randn(d, k, generator=generator)
    x = torch.randn(4, k, generator=generator, requires_grad=True)
    allowed = {t.data_ptr() for t in (x, u, v, w)}
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        naive = x @ (w + 2.0 * delta_weight(u, v, s)).T
    assert any(t.numel() == d * k and t.data_ptr() not in allowed for t in saved), "the hook must see plain dW"
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = khatri_rao_linear(x, u, v, s, 2.0, w)
    assert saved and all(t.data_ptr() in allowed for t in saved)
    (y.sum() + naive.sum()).backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()


def test_bad_factors_and_shapes_are_named():
    s = KhatriRaoShape(10, 20)
    with pytest.raises(ValueError, match="U\\(10, 3\\)"):
        delta_weight(torch.zeros(10, 4), torch.zeros(s.v_shape), s)
    with pytest.raises(ValueError, match="20"):
        khatri_rao_linear(torch.zeros(2, 19), torch.zeros(s.u_shape), torch.zeros(s.v_shape), s, 1.0)
    with pytest.raises(ValueError, match="sqrt_mean"):
        KhatriRaoShape(10, 20, "sqrt_mean")  # type: ignore[arg-type]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=repr(bad)):
            KhatriRaoShape(bad, 20)  # type: ignore[arg-type]
