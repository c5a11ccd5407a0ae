"""KRAdapter's and LoKr's optima against independent float64 optimisers, through the PEFT layers users inject."""

from __future__ import annotations

import itertools

import pytest
import torch
from peft import get_peft_model
from torch import nn

from kradapter import registry
from kradapter.compare import optima
from kradapter.compare.optima import binding_ranks, lokr_factors, nearest_kronecker, optimum
from kradapter.finetune.updates import layer_update
from kradapter.khatri_rao import delta_weight
from kradapter.shape import KhatriRaoShape

# Tall, wide, square, primes; with and without a cropped last block in each factorisation.
# Where the problem is non-convex (cropped KRAdapter rows, low-rank LoKr factors) both the solver and the float64
# reference are local methods from random starts: the solver's "best found" is held within 3% of the reference (a
# broken solver misses by far more), and exactly above the proven lower bound.
BEST_FOUND_TOLERANCE = 3e-2
SHAPES = [(12, 12), (20, 9), (9, 20), (13, 29), (29, 13), (31, 17), (16, 30), (7, 50)]


def _layer(method: str, rows: int, cols: int, **settings):  # type: ignore[no-untyped-def]
    base = nn.Module()
    base.layer = nn.utils.skip_init(nn.Linear, cols, rows, bias=False)
    model = get_peft_model(base, registry.get(method).config(["layer"], **settings))
    return model.base_model.model.layer


def _lbfgs(params: list[torch.Tensor], loss_of) -> None:  # type: ignore[no-untyped-def]
    """Minimise ``loss_of()`` over ``params`` with float64 L-BFGS to its tolerances."""
    opt = torch.optim.LBFGS(
        params, max_iter=1500, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )

    def closure():  # type: ignore[no-untyped-def]
        opt.zero_grad()
        loss = loss_of()
        loss.backward()
        return loss

    opt.step(closure)


def _long_run_kradapter(target: torch.Tensor, shape: KhatriRaoShape, restarts: int, generator) -> float:  # type: ignore[no-untyped-def]
    """Best ``||delta_weight(U, V) - T||_F`` found by float64 L-BFGS from random starts (independent of the solver)."""
    best = float("inf")
    for _ in range(restarts):
        u = torch.randn(*shape.u_shape, dtype=torch.float64, generator=generator).requires_grad_()
        v = torch.randn(*shape.v_shape, dtype=torch.float64, generator=generator).requires_grad_()
        _lbfgs([u, v], lambda u=u, v=v: ((delta_weight(u, v, shape) - target) ** 2).sum())
        with torch.no_grad():
            best = min(best, float(torch.linalg.vector_norm(delta_weight(u, v, shape) - target)))
    return best


@pytest.mark.slow  # long float64 reference optimisations: 5-25 s each on 2 cores
@pytest.mark.parametrize("factorization", ["sqrt_min", "sqrt_max"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{d}x{k}" for d, k in SHAPES])
def test_kradapter_optimum_matches_a_long_run_optimiser(shape, factorization, generator) -> None:  # type: ignore[no-untyped-def]
    rows, cols = shape
    target = torch.randn(rows, cols, dtype=torch.float64, generator=generator)
    scaling = float(torch.empty(()).uniform_(0.3, 3.0, generator=generator))
    layer = _layer("kradapter", rows, cols, factorization=factorization, scaling=scaling)
    layer.double()
    found = optimum(layer, target)
    kr_shape = layer.kradapter_shape["default"]
    # The update is the layer's own, with the optimum's factors written into it (scaling and orientation included).
    u, v = layer.kradapter_u["default"], layer.kradapter_v["default"]
    assert torch.allclose(found.update, scaling * delta_weight(u, v, kr_shape).detach(), atol=1e-12)
    assert torch.allclose(found.update, layer_update(layer, "default").detach(), atol=1e-12)
    error = float(torch.linalg.vector_norm(found.update - target))
    reference = _long_run_kradapter(target, kr_shape, restarts=2, generator=generator)
    assert found.converged
    assert found.lower_bound <= min(error, reference) * (1 + 1e-9) + 1e-12
    assert found.exact == (kr_shape.blocks[1] == 0)
    if found.exact:  # Eckart-Young per row: the optimum; no optimiser does better, and the bound meets it
        assert error <= reference * (1 + 1e-9) + 1e-12
        assert found.lower_bound >= error * (1 - 1e-4)
    else:  # cropped entries: a stationary point of a problem with local minima, from several starts
        assert error <= reference * (1 + BEST_FOUND_TOLERANCE) + 1e-10
        # stationary: one more exact alternating step moves nothing
        from kradapter.compare.optima import _als, kradapter_rows

        rows_, mask_ = kradapter_rows(target, kr_shape)
        u_ = layer.kradapter_u["default"].detach().double() * scaling
        _, _, errors, _, _ = _als(rows_, mask_, u_, 0.0, 1)
        assert float(errors.sum()) ** 0.5 == pytest.approx(error, rel=1e-9)


def test_kradapter_rows_are_eckart_young_per_row(generator) -> None:  # type: ignore[no-untyped-def]
    """No crop (r * r2 == M): each row's error is that row's dropped singular values, by a dense float64 SVD."""
    rows, cols = 9, 36  # sqrt_max: r = 6, r2 = 6
    target = torch.randn(rows, cols, dtype=torch.float64, generator=generator)
    layer = _layer("kradapter", rows, cols, factorization="sqrt_max")
    layer.double()
    found = optimum(layer, target)
    expected = 0.0
    for i in range(rows):
        s = torch.linalg.svdvals(target[i].reshape(6, 6))  # row i = kron(V[i], U[i]): V along the slow axis
        expected += float((s[1:] ** 2).sum())
    assert float(torch.linalg.vector_norm(found.update - target)) == pytest.approx(expected**0.5, rel=1e-9)


@pytest.mark.parametrize("shape", [(13, 29), (29, 13), (31, 31), (7, 50)])
def test_top_part_is_the_truncated_svd(shape, generator) -> None:  # type: ignore[no-untyped-def]
    """LoKr's inner truncation (the partial eigensolver on the CPU: top pairs for a low rank, bottom ones removed
    for a high one) is the float64 SVD's best rank-r approximation, and its kept energy is that of the top values."""
    m = torch.randn(*shape, dtype=torch.float64, generator=generator)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    n = min(shape)
    for rank in (1, 2, n // 2, n // 2 + 1, n - 1, n, None):
        kept, part = optima._top_part(m, rank)
        k = n if rank is None else min(rank, n)
        assert kept == pytest.approx(float((s[:k] ** 2).sum()), rel=1e-12)
        torch.testing.assert_close(part, (u[:, :k] * s[:k]) @ vh[:k], rtol=0, atol=1e-12 * float(s[0]))


@pytest.mark.parametrize("wanted", [range(0, 3), range(4, 10), range(0, 10)])
def test_partial_eigh_is_the_full_eigh_part(wanted, generator) -> None:  # type: ignore[no-untyped-def]
    """The wanted ascending eigenpairs of a symmetric matrix, as a whole ``eigh`` gives them (vectors up to sign)."""
    a = torch.randn(10, 17, dtype=torch.float64, generator=generator)
    gram = a @ a.T
    values, vectors = torch.linalg.eigh(gram)
    part_values, part_vectors = optima._eigh_part(gram, wanted)
    torch.testing.assert_close(part_values, values[wanted.start : wanted.stop], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((part_vectors * vectors[:, wanted.start : wanted.stop]).sum(0).abs(),
                               torch.ones(len(wanted), dtype=torch.float64), rtol=0, atol=1e-10)  # fmt: skip


@pytest.mark.parametrize("shape,factorization", [((29, 13), "sqrt_max"), ((7, 50), "sqrt_max"), ((13, 29), "sqrt_min")])
def test_kradapter_rows_layout_and_mask(shape, factorization, generator) -> None:  # type: ignore[no-untyped-def]
    """The rows hold the target in ``K``'s layout with zeros where cropped, and the mask (one block, broadcast to
    every row) is 1 exactly on the observed entries: a row times the mask is the row."""
    kr_shape = KhatriRaoShape(*shape, factorization)
    target = torch.randn(*shape, dtype=torch.float64, generator=generator)
    rows, mask = optima.kradapter_rows(target, kr_shape)
    k = target if not kr_shape.transposed else target.T
    flat = rows.reshape(kr_shape.m, -1)
    torch.testing.assert_close(flat[:, : kr_shape.M], k, rtol=0, atol=0)
    assert not flat[:, kr_shape.M :].any()
    if mask is None:
        assert kr_shape.r * kr_shape.r2 == kr_shape.M
        return
    assert mask.shape == rows.shape
    observed = torch.zeros(kr_shape.r2 * kr_shape.r, dtype=torch.float64)
    observed[: kr_shape.M] = 1
    torch.testing.assert_close(mask, observed.view(1, kr_shape.r2, kr_shape.r).expand_as(mask), rtol=0, atol=0)


def test_power_iteration_errors_are_the_residuals(generator) -> None:  # type: ignore[no-untyped-def]
    """Without a mask the per-row errors come from ``||R||^2 - (v'v)(u'u)`` (no full-size residual): they equal the
    residuals written out, at every step count."""
    rows = torch.randn(6, 9, 5, dtype=torch.float64, generator=generator)
    start = torch.randn(6, 5, dtype=torch.float64, generator=generator)
    for steps in (1, 2, 7):
        u, v, errors, _, _ = optima._als(rows, None, start, 0.0, steps, check=False)
        residual = rows - v.unsqueeze(2) * u.unsqueeze(1)
        torch.testing.assert_close(errors, (residual * residual).sum((1, 2)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape,factorization", [((29, 13), "sqrt_max"), ((13, 29), "sqrt_min"), ((7, 50), "sqrt_max")])
def test_gram_form_steps_are_the_masked_alternating_steps(shape, factorization, generator) -> None:  # type: ignore[no-untyped-def]
    """The cropped solver's warm-up runs alternating least squares on ``r x r`` Gram matrices, several starts at
    once: each step must be the masked half steps on the ``r2 x r`` rows themselves, start by start."""
    from kradapter.compare.optima import _als, _als_gram, kradapter_rows

    kr_shape = KhatriRaoShape(*shape, factorization)  # type: ignore[arg-type]
    assert kr_shape.blocks[1], "a cropped shape"
    rows, mask = kradapter_rows(torch.randn(*shape, dtype=torch.float64, generator=generator), kr_shape)
    assert mask is not None
    full, tail = rows[:, :-1], int(mask[0, -1].sum())
    starts = torch.randn(rows.shape[0], kr_shape.r, 3, dtype=torch.float64, generator=generator)
    stepped = _als_gram(full.mT @ full, rows[:, -1, :tail], starts, 7)
    for k in range(3):
        reference, *_ = _als(rows, mask, starts[..., k], 0.0, 7, check=False)
        assert torch.allclose(stepped[..., k], reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("r,tail", [(9, 6), (5, 5), (13, 1)])
def test_profile_gradient_and_hessian_are_autograds(r, tail, generator) -> None:  # type: ignore[no-untyped-def]
    """Newton's steps use a hand-built gradient and Hessian of the profile ``g(u)``; autograd differentiates the
    plain formula ``u'Gu / u'u + (c'x)^2 / x'x`` independently."""
    from kradapter.compare.optima import _profile, _profile_value

    n = 4
    a = torch.randn(n, r + 3, r, dtype=torch.float64, generator=generator)
    gram = a.mT @ a
    last = torch.randn(n, tail, dtype=torch.float64, generator=generator)
    u = torch.randn(n, r, dtype=torch.float64, generator=generator)
    value, grad, hess = _profile(gram, last, u)
    assert torch.allclose(_profile_value(gram, last, u.unsqueeze(2)).squeeze(1), value, rtol=1e-12)
    for i in range(n):

        def g(z: torch.Tensor, i: int = i) -> torch.Tensor:
            x = z[:tail]
            return z @ gram[i] @ z / (z @ z) + (last[i] @ x) ** 2 / (x @ x)

        assert float(g(u[i])) == pytest.approx(float(value[i]), rel=1e-12)
        assert torch.allclose(grad[i], torch.autograd.functional.jacobian(g, u[i]), rtol=1e-9, atol=1e-12)
        assert torch.allclose(hess[i], torch.autograd.functional.hessian(g, u[i]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("r", [1, 7, 30])
def test_secular_top_eigenvector_is_the_rank_one_updates_top(r, generator) -> None:  # type: ignore[no-untyped-def]
    """EM's step: the top eigenvector of ``G + f f'`` from ``G``'s eigenpairs by the secular equation, against a
    float64 ``eigh`` of the updated matrix; with ``f`` orthogonal to ``G``'s top eigenvector and weak (no root
    above ``G``'s top eigenvalue) and ``f = 0``, it is ``G``'s top eigenvector."""
    from kradapter.compare.optima import _secular_top

    n = 6
    a = torch.randn(n, r + 2, r, dtype=torch.float64, generator=generator)
    gram = a.mT @ a
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(-1), vectors.flip(-1)
    f = (
        torch.randn(n, r, dtype=torch.float64, generator=generator)
        * torch.logspace(-3, 1, n, dtype=torch.float64)[:, None]
    )
    if r > 1:
        weak = vectors[1, :, 1] * 1e-3 * float(values[1, 0] - values[1, 1]) ** 0.5  # orthogonal to the top one
        f[1] = weak
    f[2] = 0
    u = (vectors @ _secular_top(values, (vectors.mT @ f.unsqueeze(2)).squeeze(2)).unsqueeze(2)).squeeze(2)
    reference = torch.linalg.eigh(gram + f.unsqueeze(2) * f.unsqueeze(1)).eigenvectors[..., -1]
    assert torch.allclose(torch.linalg.vector_norm(u, dim=1), torch.ones(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose((u * reference).sum(1).abs(), torch.ones(n, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("r,tail", [(9, 6), (13, 1), (30, 27)])
def test_em_rises_and_settles_at_a_stationary_point(r, tail, generator) -> None:  # type: ignore[no-untyped-def]
    """Expectation-maximisation never lowers the profile ``g`` (step by step), and where it settles the profile's
    gradient (autograd-checked in the test above) vanishes: a stationary point of the cropped problem."""
    from kradapter.compare import optima

    n = 8
    a = torch.randn(n, r + 3, r, dtype=torch.float64, generator=generator)
    gram = a.mT @ a
    last = torch.randn(n, tail, dtype=torch.float64, generator=generator)
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(-1), vectors.flip(-1)
    trail = []
    for steps in (1, 2, 3, 5, 8):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(optima, "EM_STEPS", steps)
            u, value, _, _ = optima._em(values, vectors, last, 0.0)
        assert torch.allclose(optima._profile_value(gram, last, u.unsqueeze(2)).squeeze(1), value, rtol=1e-12)
        trail.append(value)
    for before, after in itertools.pairwise(trail):
        assert (after >= before * (1 - 1e-13)).all()
    u, value, settled, _ = optima._em(values, vectors, last, 1e-14)
    # EM's rate is about the cropped share of a row's information (and slower where the top eigenvalues crowd):
    # a row it leaves unsettled is Newton's to finish (_masked_factors). Those it settles must be stationary.
    assert settled.any()
    _, grad, _ = optima._profile(gram, last, u)
    assert (torch.linalg.vector_norm(grad[settled], dim=1) <= 1e-5 * value[settled]).all()


def test_cropped_rows_reach_the_supremum_no_stationary_point_attains() -> None:
    """A row whose cropped block's observed entries lie where the other blocks have nothing: ``u = e3`` fits the
    full blocks' top direction (error 1.25) and ``u = e0`` the partial block (error 4); ``u = (a, 0, 0, 1)`` with
    ``a -> 0`` fits both (``v``'s last entry ``1 / a``), tending to error 0.25, the one left in block 2."""
    from kradapter.compare.optima import kradapter_factors

    rows = torch.tensor([[[0.0, 0.0, 0.0, 2.0], [0.5, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    mask = torch.ones_like(rows)
    mask[0, 2, 2:] = 0
    u, v, _, _, bound = kradapter_factors(rows, mask)
    error = float(((rows - v.unsqueeze(2) * u.unsqueeze(1) * mask) ** 2).sum())
    assert error == pytest.approx(0.25, rel=1e-6)
    assert bound <= error
    assert torch.isfinite(u).all() and torch.isfinite(v).all()


def test_cropped_solver_does_not_depend_on_the_row_chunks(monkeypatch, generator) -> None:  # type: ignore[no-untyped-def]
    """Rows are independent: solving them in chunks of one or two rows gives what one chunk gives."""
    from kradapter.compare import optima

    kr_shape = KhatriRaoShape(23, 41, "sqrt_max")
    rows, mask = optima.kradapter_rows(torch.randn(23, 41, dtype=torch.float64, generator=generator), kr_shape)
    whole = optima.kradapter_factors(rows, mask)
    monkeypatch.setattr(optima, "CHUNK", 2 * kr_shape.r * kr_shape.r * (optima.STARTS + 1))  # two rows per chunk
    chunked = optima.kradapter_factors(rows, mask)
    fits = [v.unsqueeze(2) * u.unsqueeze(1) for u, v, *_ in (whole, chunked)]  # u and v only up to sign and scale
    errors = [((rows - fit * mask) ** 2).sum((1, 2)) for fit in fits]
    # Each row's objective settles to 1e-13 relative; the argument of a smooth maximum only to about its square root
    # divided by the curvature there: on 3 of 300 seeds a row with a flat maximum differs by 4e-6.
    assert torch.allclose(errors[0], errors[1], rtol=1e-11, atol=0)
    assert torch.allclose(fits[0], fits[1], rtol=1e-4, atol=1e-4)
    assert whole[3] and chunked[3]
    assert whole[4] == pytest.approx(chunked[4], rel=1e-9)


@pytest.fixture
def two_threads():  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("shape", "factorization"), [((37, 61), "sqrt_min"), ((61, 37), "sqrt_max"), ((36, 60), "sqrt_min")]
)
def test_row_chunks_side_by_side_give_what_one_after_another_gives(
    shape, factorization, generator, monkeypatch, two_threads
):  # type: ignore[no-untyped-def]
    """At two torch threads the row chunks run in two Python threads (one torch thread each, restored after): each
    row's optimum is the one a sequential run finds, and the lower bound the same (cropped and exact rows)."""
    from kradapter.compare import optima

    kr_shape = KhatriRaoShape(*shape, factorization)
    rows, mask = optima.kradapter_rows(torch.randn(*shape, dtype=torch.float64, generator=generator), kr_shape)
    per_row = kr_shape.r * kr_shape.r * (1 if mask is None else optima.STARTS + 1)
    monkeypatch.setattr(optima, "CHUNK", 5 * per_row)  # several chunks
    spans = optima._spans(rows.shape[0], per_row, optima._workers(rows.device))
    assert len(spans) % 2 == 0 and spans[0].start == 0 and spans[-1].stop == rows.shape[0]
    assert all(a.stop == b.start for a, b in itertools.pairwise(spans))
    together = optima.kradapter_factors(rows, mask)
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(optima, "_workers", lambda device: 1)
    alone = optima.kradapter_factors(rows, mask)
    observed = torch.ones_like(rows) if mask is None else mask
    errors = [((rows - v.unsqueeze(2) * u.unsqueeze(1) * observed) ** 2).sum((1, 2)) for u, v, *_ in (together, alone)]
    assert torch.allclose(errors[0], errors[1], rtol=1e-11, atol=1e-13)
    assert together[3] and alone[3]
    assert together[4] == pytest.approx(alone[4], rel=1e-9)


def test_side_by_side_pieces_keep_order_and_restore_the_threads_when_one_fails(two_threads) -> None:  # type: ignore[no-untyped-def]
    """Results come back in the items' order, each piece runs at one torch thread, and a piece's exception reaches
    the caller with the torch thread count restored."""
    from kradapter.compare import optima

    seen: list[int] = []

    def piece(i: int) -> int:
        seen.append(torch.get_num_threads())
        return i * i

    assert optima._parallel(piece, list(range(7)), 2) == [i * i for i in range(7)]
    assert seen == [1] * 7 and torch.get_num_threads() == 2

    def failing(i: int) -> int:
        if i == 3:
            raise ValueError("piece 3")
        return i

    with pytest.raises(ValueError, match="piece 3"):
        optima._parallel(failing, list(range(5)), 2)
    assert torch.get_num_threads() == 2


def test_lokr_starts_side_by_side_give_what_one_after_another_gives(generator, monkeypatch, two_threads):  # type: ignore[no-untyped-def]
    """LoKr's races from its starts are independent runs: in two Python threads they end where one after another
    does, and the polished best is the same."""
    from kradapter.compare import optima

    target = torch.randn(24, 35, dtype=torch.float64, generator=generator)
    together = nearest_kronecker(target, (4, 5), (6, 7), (None, 2))
    monkeypatch.setattr(optima, "_workers", lambda device: 1)
    alone = nearest_kronecker(target, (4, 5), (6, 7), (None, 2))
    errors = [float(torch.linalg.vector_norm(torch.kron(a, b) - target)) for a, b, *_ in (together, alone)]
    assert errors[0] == pytest.approx(errors[1], rel=1e-9)
    assert together[3] and alone[3]
    assert torch.get_num_threads() == 2


SPARSE = [((40, 24), "sqrt_min"), ((40, 24), "sqrt_max"), ((13, 29), "sqrt_min"), ((29, 13), "sqrt_max")]


@pytest.mark.parametrize("slow", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["bounds", "vs-lbfgs"])
@pytest.mark.parametrize("kind", ["dropout", "zero rows", "one column"])
@pytest.mark.parametrize("shape,factorization", SPARSE, ids=[f"{d}x{k}-{f}" for (d, k), f in SPARSE])
def test_kradapter_optimum_of_sparse_and_degenerate_targets(slow, kind, shape, factorization, generator) -> None:  # type: ignore[no-untyped-def]
    """Rows whose Gram matrices are rank-deficient or zero (the study's sparse noise keeps 10% of entries) once
    gave NaN updates: every start beyond a row's rank collapsed to the zero vector. The optimum must be finite, no
    worse than the zero update, above its lower bound, and (slow tier) within the best-found tolerance of float64
    L-BFGS."""
    rows, cols = shape
    target = torch.randn(rows, cols, dtype=torch.float64, generator=generator)
    if kind == "dropout":
        target *= torch.rand(rows, cols, generator=generator, dtype=torch.float64) >= 0.9
    elif kind == "zero rows":
        target[::2] = 0
    else:
        target[:, 1:] = 0
    layer = _layer("kradapter", rows, cols, factorization=factorization)
    layer.double()
    found = optimum(layer, target)
    assert torch.isfinite(found.update).all()
    assert torch.allclose(found.update, layer_update(layer, "default").detach(), atol=1e-12)
    error = float(torch.linalg.vector_norm(found.update - target))
    assert error <= float(torch.linalg.vector_norm(target)) * (1 + 1e-12)
    assert found.lower_bound <= error * (1 + 1e-9) + 1e-12
    if slow:
        reference = _long_run_kradapter(target, layer.kradapter_shape["default"], restarts=2, generator=generator)
        assert error <= reference * (1 + BEST_FOUND_TOLERANCE) + 1e-10


def _lokr_settings(rows: int, cols: int, factor: int, r: int, both: bool = False) -> dict:  # type: ignore[type-arg]
    return {"r": r, "alpha": r, "decompose_factor": factor, "decompose_both": both}


def _kron(params: list[torch.Tensor], ranks) -> torch.Tensor:  # type: ignore[no-untyped-def]
    it = iter(params)
    mats = [next(it) if rank is None else next(it) @ next(it) for rank in ranks]
    return torch.kron(mats[0], mats[1])


def _long_run_kronecker(target, first, second, ranks, restarts, generator) -> float:  # type: ignore[no-untyped-def]
    """Best ``||kron(A, B) - T||_F`` by float64 L-BFGS over (possibly factored) A and B from random starts."""
    best = float("inf")
    for _ in range(restarts):
        shapes = []
        for (a, b), rank in zip((first, second), ranks, strict=True):
            shapes += [(a, b)] if rank is None else [(a, rank), (rank, b)]
        params = [torch.randn(*sh, dtype=torch.float64, generator=generator).requires_grad_() for sh in shapes]
        _lbfgs(params, lambda params=params: ((_kron(params, ranks) - target) ** 2).sum())
        with torch.no_grad():
            best = min(best, float(torch.linalg.vector_norm(_kron(params, ranks) - target)))
    return best


KRON = [((3, 4), (5, 2)), ((2, 7), (3, 3)), ((5, 1), (2, 13)), ((4, 4), (4, 4)), ((1, 6), (7, 1))]


@pytest.mark.parametrize("first,second", KRON, ids=[f"{a}x{b}" for a, b in KRON])
def test_nearest_kronecker_full_factors(first, second, generator) -> None:  # type: ignore[no-untyped-def]
    target = torch.randn(first[0] * second[0], first[1] * second[1], dtype=torch.float64, generator=generator)
    a, b, steps, converged, bound = nearest_kronecker(target, first, second)
    error = float(torch.linalg.vector_norm(torch.kron(a, b) - target))
    reference = _long_run_kronecker(target, first, second, (None, None), 3, generator)
    assert steps == 0 and converged
    assert error <= reference * (1 + 1e-9) + 1e-12
    assert error == pytest.approx(bound**0.5, rel=1e-9)


@pytest.mark.parametrize("first,second", KRON, ids=[f"{a}x{b}" for a, b in KRON])
def test_nearest_kronecker_with_rank_limits_that_cannot_bind_is_the_closed_form(first, second, generator) -> None:  # type: ignore[no-untyped-def]
    """A rank limit at least the factor's smaller side leaves the factor full: the closed form, not a search."""
    target = torch.randn(first[0] * second[0], first[1] * second[1], dtype=torch.float64, generator=generator)
    ranks = (min(first) + 1, min(second))
    assert binding_ranks(first, second, ranks) == (None, None)
    assert binding_ranks(first, second, (min(first) - 1 or None, None)) == (min(first) - 1 or None, None)
    a, b, steps, converged, bound = nearest_kronecker(target, first, second, ranks)
    closed = nearest_kronecker(target, first, second)
    assert steps == 0 and converged
    assert torch.equal(torch.kron(a, b), torch.kron(closed[0], closed[1])) and bound == closed[4]


@pytest.mark.slow  # long float64 reference optimisations: 5-25 s each on 2 cores
@pytest.mark.parametrize("ranks", [(None, 1), (None, 2), (1, 2), (2, 1)])
def test_nearest_kronecker_low_rank_factors(ranks, generator) -> None:  # type: ignore[no-untyped-def]
    first, second = (4, 5), (6, 7)
    target = torch.randn(24, 35, dtype=torch.float64, generator=generator)
    a, b, _, converged, bound = nearest_kronecker(target, first, second, ranks)
    for mat, rank in zip((a, b), ranks, strict=True):
        if rank is not None:
            assert int(torch.linalg.matrix_rank(mat)) <= rank
    error = float(torch.linalg.vector_norm(torch.kron(a, b) - target))
    reference = _long_run_kronecker(target, first, second, ranks, 4, generator)
    assert converged
    # the best found by exact alternating half steps: low-rank factors make the problem non-convex, so it is held
    # to the long-run optimiser's best within BEST_FOUND_TOLERANCE, and to the full-factor bound exactly
    assert error <= reference * (1 + BEST_FOUND_TOLERANCE) + 1e-10
    assert bound**0.5 <= min(error, reference) * (1 + 1e-12)
    assert _half_steps_gain(target, a, b, ranks) <= 1e-10 * error**2


def _truncated(matrix: torch.Tensor, rank: int | None) -> torch.Tensor:
    if rank is None:
        return matrix
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _half_steps_gain(target, a, b, ranks, steps: int = 3) -> float:  # type: ignore[no-untyped-def]
    """How much exact alternating half steps (each factor's best rank-limited partner, by SVD) still lower the
    squared error from ``kron(a, b)``: zero at a stationary point."""
    (p, q), (s, t) = a.shape, b.shape
    rows = target.reshape(p, s, q, t).permute(0, 2, 1, 3).reshape(p * q, s * t)
    start = float(((torch.kron(a, b) - target) ** 2).sum())
    for _ in range(steps):
        b = _truncated((a.reshape(-1) @ rows).reshape(s, t) / (a * a).sum(), ranks[1])
        a = _truncated((rows @ b.reshape(-1)).reshape(p, q) / (b * b).sum(), ranks[0])
    return start - float(((torch.kron(a, b) - target) ** 2).sum())


@pytest.mark.parametrize(
    "first,second,ranks", [((8, 8), (40, 56), (None, 17)), ((8, 8), (40, 56), (3, 30)), ((12, 7), (5, 9), (2, None))]
)
def test_low_rank_kronecker_is_stationary_at_study_like_shapes(first, second, ranks, generator) -> None:  # type: ignore[no-untyped-def]
    """A small full ``w1`` and a large low-rank ``w2`` (the registry's LoKr at large shapes, where plain alternating
    half steps crawl): the solver stops at a point those half steps cannot improve, above the full-factor bound."""
    target = torch.randn(first[0] * second[0], first[1] * second[1], dtype=torch.float64, generator=generator)
    a, b, steps, converged, bound = nearest_kronecker(target, first, second, ranks)
    assert converged and steps > 0
    for mat, rank in zip((a, b), ranks, strict=True):
        if rank is not None:
            assert int(torch.linalg.matrix_rank(mat)) <= rank
    error2 = float(((torch.kron(a, b) - target) ** 2).sum())
    assert bound <= error2
    assert _half_steps_gain(target, a, b, ranks) <= 1e-12 * error2  # measured: at most 4.2e-16 in 460 draws


def test_low_rank_kronecker_polish_goes_on_from_the_race_on_a_flat_minimum() -> None:
    """A target (generator seed 100, 1 of 400 draws of this shape) with a flat minimum: the race stops with a largest
    gradient entry of 3e-9, where an L-BFGS started afresh takes unit-curvature steps too short to change the loss
    in float64 (at tolerance 1e-13 it stopped at once, at 1e-15 after 6 steps), 1.8e-10 of the error short of
    stationary. The polish goes on with the race's curvature memory instead, to where half steps gain nothing."""
    target = torch.randn(60, 63, dtype=torch.float64, generator=torch.Generator().manual_seed(100))
    a, b, _, converged, _ = nearest_kronecker(target, (12, 7), (5, 9), (2, None), tol=1e-15)
    assert converged
    error2 = float(((torch.kron(a, b) - target) ** 2).sum())
    assert _half_steps_gain(target, a, b, (2, None)) <= 1e-12 * error2


def test_large_lokr_targets_search_from_the_top_start_only(generator, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Above ``LOKR_LARGE`` entries one start (the top singular vector) is searched straight to a stationary point
    (no race: nothing to pick) no worse than exact alternating from that start; at or below it every start races."""
    first, second, ranks = (4, 4), (24, 40), (None, 7)
    target = torch.randn(first[0] * second[0], first[1] * second[1], dtype=torch.float64, generator=generator)
    raced: list[int] = []
    real = optima._parallel

    def counted(fn, items, workers):  # type: ignore[no-untyped-def]
        raced.append(len(items))
        return real(fn, items, workers)

    monkeypatch.setattr(optima, "_parallel", counted)
    monkeypatch.setattr(optima, "LOKR_LARGE", target.numel())
    nearest_kronecker(target, first, second, ranks)
    monkeypatch.setattr(optima, "LOKR_LARGE", target.numel() - 1)
    a, b, _, converged, bound = nearest_kronecker(target, first, second, ranks)
    assert raced == [optima.LOKR_STARTS]  # the one-start search is not a race
    error2 = float(((torch.kron(a, b) - target) ** 2).sum())
    assert converged and bound <= error2
    assert _half_steps_gain(target, a, b, ranks) <= 1e-10 * error2
    assert error2 <= _alternating(target, first, second, ranks, 0) * (1 + 1e-3)


def _alternating(target, first, second, ranks, start: int = 0, steps: int = 3000):  # type: ignore[no-untyped-def]
    """Exact alternating half steps from the rearranged target's ``start``-th singular pair, until the error
    settles (the solver this one replaced started from the top pair), written out independently."""
    (p, q), (s, t) = first, second
    rows = target.reshape(p, s, q, t).permute(0, 2, 1, 3).reshape(p * q, s * t)
    u, _, _ = torch.linalg.svd(rows, full_matrices=False)
    a, previous = _truncated(u[:, start].reshape(p, q), ranks[0]), float("inf")
    for _ in range(steps):
        b = _truncated((a.reshape(-1) @ rows).reshape(s, t) / (a * a).sum(), ranks[1])
        a = _truncated((rows @ b.reshape(-1)).reshape(p, q) / (b * b).sum(), ranks[0])
        error = float(((torch.kron(a, b) - target) ** 2).sum())
        if previous - error <= 1e-14 * error:
            break
        previous = error
    return error


def test_low_rank_kronecker_escapes_the_top_starts_basin(generator) -> None:  # type: ignore[no-untyped-def]
    """The low-rank problem has local minima (on a 1024x2752 Gaussian target the top start's basin is 2.7e-5 above
    the best): over fresh targets the solver is never clearly worse than the best of exact alternating half steps
    from the top 4 singular vectors, and as good on all but at most two of 12. (Measured over 712 such targets: 7
    missed that best, by at most 4.3e-4, so a miss is about 1 in 100; three in 12 is then about 1 in 5,000.)"""
    outcomes = []
    for first, second, ranks in [((4, 4), (24, 40), (None, 7)), ((3, 5), (20, 12), (None, 4))] * 6:
        target = torch.randn(first[0] * second[0], first[1] * second[1], dtype=torch.float64, generator=generator)
        a, b, _, converged, _ = nearest_kronecker(target, first, second, ranks)
        error = float(((torch.kron(a, b) - target) ** 2).sum())
        reference = min(_alternating(target, first, second, ranks, start) for start in range(4))
        outcomes.append(error / reference - 1)
        assert converged
    assert max(outcomes) <= 1e-3
    assert sum(o > 1e-9 for o in outcomes) <= 2, outcomes


@pytest.mark.slow  # long float64 reference optimisations: 5-25 s each on 2 cores
@pytest.mark.parametrize(
    "rows,cols,factor,r,both",
    [
        (24, 35, 4, 8, False),
        (24, 35, 4, 1, False),
        (30, 12, 3, 1, True),
        (35, 24, -1, 2, False),
        (29, 13, -1, 3, False),
    ],
)
def test_lokr_optimum_through_peft(rows, cols, factor, r, both, generator) -> None:  # type: ignore[no-untyped-def]
    """Written into PEFT's LoKr layer (full or low-rank factors, its scale), its merge adds the optimum."""
    target = torch.randn(rows, cols, dtype=torch.float64, generator=generator)
    settings = _lokr_settings(rows, cols, factor, r, both)
    settings["alpha"] = float(torch.empty(()).uniform_(0.5, 4.0, generator=generator))
    layer = _layer("kronecker", rows, cols, **settings)
    layer.double()
    found = optimum(layer, target)
    assert torch.allclose(found.update, layer_update(layer, "default").detach(), atol=1e-12)
    error = float(torch.linalg.vector_norm(found.update - target))
    (first, second), ranks = lokr_factors(layer)
    reference = _long_run_kronecker(target, first, second, ranks, 3, generator)
    assert found.exact == (binding_ranks(first, second, ranks) == (None, None))
    assert error <= reference * (1 + (1e-9 if found.exact else BEST_FOUND_TOLERANCE)) + 1e-10
    assert found.lower_bound <= min(error, reference) * (1 + 1e-12)


def test_optimum_refuses_other_layers() -> None:
    layer = _layer("lora", 8, 6, r=2)
    with pytest.raises(TypeError, match="no optimum solver"):
        optimum(layer, torch.zeros(8, 6))
