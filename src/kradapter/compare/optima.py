"""The best update a structured method can reach on a target: KRAdapter's and LoKr's optima beside the fits.

Each solver takes the PEFT layer users inject (:func:`kradapter.compare.fit.inject`), computes the factors that
minimise ``||dW - T||_F`` over the method's updates, writes them into that layer, and returns the update its
``merge()`` then adds: orientation, cropping and scaling are the layer's own, not a copy of them.

**KRAdapter.** In the ``K`` layout (``m x M``, :mod:`kradapter.khatri_rao`), row ``i`` of the update is
``kron(V[i], U[i])`` cropped to ``M`` entries: seen as an ``r2 x r`` matrix (``khatri_rao._padded``'s blocks),
it is the rank-1 matrix ``V[i] U[i]^T``. The error splits into one best-rank-1 problem per row.

- ``r * r2 == M`` (no crop): Eckart-Young, one top singular pair per row. Computed as the top eigenvector of
  each row's ``r x r`` Gram matrix (batched ``eigh``, float32), then refined in float64 by alternating least
  squares (power iteration on that row) until the objective moves less than ``tol`` (relative): exact to
  float64 rounding, and certified by the top eigenvalue (``lower_bound`` equals the error).
- ``r * r2 > M``: the last block's cropped entries are unobserved, so each row is a rank-1 fit with missing
  entries, which has no closed form and can have local optima. In each row's Gram eigenbasis (one float64
  ``eigh``), expectation-maximisation from the zero-filled row (each step the top eigenvector of a rank-one
  update, by the secular equation: ``r^2`` a row) and alternating least squares from the fully observed blocks'
  top singular vectors; Newton's method polishes each row's best to a stationary point, and each row keeps it or
  one supremum no stationary point attains (:func:`_limit`). Reported with a certified lower bound (the same rows'
  best rank-1 fit with the partial block dropped).

**LoKr.** ``dW = s * kron(w1, w2)``. With full factors the optimum is the nearest Kronecker product (Van Loan &
Pitsianis 1993): the top singular pair of the target rearranged so each ``(out_k x in_n)`` block is a row. With a
low-rank ``w2`` (or ``w1``, ``decompose_both``) no closed form is known, but for a given ``w1`` the best ``w2`` is a
truncated SVD, so the error is a smooth function of ``w1`` alone (the full factor): minimised by float64 L-BFGS
from the rearranged target's top 8 singular vectors, the best polished to a stationary point; on targets of more
than ``LOKR_LARGE`` entries from the top one only (at 4096x11008, ``w1`` 8x8 and ``w2`` 512x1376 of rank 456: 8
starts took 357 iterations, 69 s on one thread; one start 23-52 iterations; the exact alternating half steps they
replaced had not settled after 16 minutes). A rank limit that cannot bind (at least the factor's smaller side)
leaves the closed form. The best found, not proven optimal; its lower bound is the full-factor optimum (the
low-rank updates are a subset of those).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from threadpoolctl import threadpool_limits

from .. import khatri_rao
from ..shape import KhatriRaoShape

TOL = 1e-13  # relative change of the squared error at which an iterative solver stops
MAX_ITERATIONS = 5000
T = TypeVar("T")
R = TypeVar("R")
# A low-rank LoKr factor is searched from the rearranged target's top LOKR_STARTS singular vectors, each run to a
# relative change of RACE_TOL; the best is polished (below). (Short races of 5-20 steps pick the wrong basin
# on 2-11% of small Gaussian targets; 4 full races miss the best of exact alternating from 4 starts on 3 of 120,
# 8 on 7 of 712, by at most 4.3e-4 relative.)
LOKR_STARTS = 8
# On a rearranged target of more than LOKR_LARGE entries one start (the top singular vector) is searched, straight
# to the polish's stationary point (a race has nothing to pick): each
# evaluation there is a pass over tens of millions of entries and an ``eigh`` of a 512-1024 sided Gram matrix, and
# the 8 starts' minima differ by little (4096x11008, 4 targets: the first start within 7.5e-8 relative Frobenius
# error of the best of 8; 4096x4096: within 1.0e-5). Below it (every real-weight shape of the default study,
# 1024x2752) all 8 race.
LOKR_LARGE = 2**23
RACE_TOL = 1e-9
# The polish goes on with the winning race's L-BFGS memory (a search started afresh near a flat minimum takes
# unit-curvature steps too short to move the loss in float64, and stops there: 1.8e-10 of the error short of
# stationary on one 60x63 target in 400) until a gradient entry of POLISH_GRAD (of the relative squared error) or
# a step moving it less than ``tol * POLISH_CHANGE``.
POLISH_GRAD = 1e-12
POLISH_CHANGE = 1e-3


@dataclass
class Optimum:
    update: torch.Tensor  # what the layer's merge() adds with the optimum's factors written into it
    lower_bound: float  # a certified lower bound on ||dW - T||_F over the method's updates
    iterations: int  # iterative steps taken (0 for a closed form)
    converged: bool  # the objective moved less than ``tol`` (relative) in the last step
    exact: bool  # the optimum is proven (closed form); else the best found by a convergent local method
    solver: str  # how it was found, in words
    seconds: float


def optimum(layer: Any, target: torch.Tensor, tol: float = TOL, max_iterations: int = MAX_ITERATIONS) -> Optimum:
    """The optimum of ``layer``'s method on ``target`` (``(out, in)``), written into ``layer`` (adapter ``default``).

    ``layer`` is a KRAdapter or LoKr linear layer from ``get_peft_model``; anything else is a ``TypeError``.
    """
    from peft.tuners.lokr import LoKrLayer

    from ..tuners.kradapter.layer import KRAdapterLayer

    start = time.perf_counter()
    if isinstance(layer, KRAdapterLayer):
        found = _kradapter(layer, target, tol, max_iterations)
    elif isinstance(layer, LoKrLayer):
        found = _lokr(layer, target, tol, max_iterations)
    else:
        raise TypeError(f"no optimum solver for {type(layer).__name__}")
    found.seconds = time.perf_counter() - start
    return found


def _write(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _update(layer: Any) -> torch.Tensor:
    from ..analysis import layer_update

    with torch.no_grad():
        return layer_update(layer, "default").detach()


# -- KRAdapter -------------------------------------------------------------------------------------------------------


def kradapter_rows(target: torch.Tensor, shape: KhatriRaoShape) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The target's rows in ``K``'s layout as ``(m, r2, r)`` float64 blocks (cropped entries zero), and the mask of
    observed entries (``None`` when nothing is cropped; the same for every row: one block, broadcast), through
    :mod:`kradapter.khatri_rao`'s own layout."""
    blocks, view = khatri_rao._padded(shape, torch.float64, target.device)
    view.copy_(khatri_rao._k_view(target.detach(), shape))
    if not shape.blocks[1]:
        return blocks, None
    row = torch.zeros(shape.r2 * shape.r, dtype=torch.float64, device=target.device)
    row[: shape.M] = 1.0
    return blocks, row.view(1, shape.r2, shape.r).expand(shape.m, shape.r2, shape.r)


# The top eigenvalue of a row's float32 Gram matrix is off by up to ~sqrt(r2) float32 epsilons of the row's squared
# norm; the lower bound subtracts this fraction of the squared norm, so that it stays a bound.
EIGENVALUE_SLACK = 1e-5


ALS_WARMUP = 50  # alternating steps from each start before Newton (see _warm_up)
RIVAL = 1e-6  # a start this close to its row's best objective is polished too (see _masked_factors)
STARTS = 4  # alternating least squares with cropped entries starts from this many top singular vectors per row
# (of the fully observed blocks); expectation-maximisation starts from one more, the zero-filled row's top one.
EM_STEPS = 200  # at most; a row leaves EM once its objective settles (relative ``tol``)
SECULAR_STEPS = 30  # at most; Newton's method on the secular equation settles in 3-6
NEWTON_STEPS = 100  # at most; a row leaves the Newton iteration as soon as its objective settles
CHUNK = 2**25  # rows are solved in chunks of about this many Gram-matrix entries (bounded memory on large layers)


def _gram_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's right singular vectors, largest first (float32 ``eigh`` of its Gram matrix, returned as float64),
    and the squared singular values."""
    values, vectors = torch.linalg.eigh(gram.float())
    return vectors.flip(-1).double(), values.flip(-1).double().clamp_min(0)


def _secular_top(values: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Each row's top unit eigenvector of ``diag(values) + z z'`` (``values`` descending): the largest root ``mu``
    of the secular equation ``sum z_i^2 / (mu - values_i) = 1`` by Newton's method on its reciprocal form, which
    is concave and increasing there, so the iterates rise monotonically from ``values_0 + z_0^2`` (a lower bound)
    to the root; then ``z / (mu - values)``, normalised. ``O(r)`` a row. Where no root lies above ``values_0``
    (``z_0 = 0``), the top eigenvector is the first axis. In ``G``'s eigenbasis ``Q``, the top eigenvector of
    ``G + f f'`` is ``Q`` times this, with ``z = Q'f``."""
    tiny = torch.finfo(z.dtype).tiny
    z2 = z * z
    mu = values[:, :1] + z2[:, :1]
    for _ in range(SECULAR_STEPS):
        d = (mu - values).clamp_min(tiny)
        psi = (z2 / d).sum(1, keepdim=True)
        slope = (z2 / (d * d)).sum(1, keepdim=True)
        step = ((psi - 1) * psi / slope.clamp_min(tiny)).nan_to_num(0.0).clamp_min(0)  # 1/psi - 1 = 0
        mu = mu + step
        if not bool((step > 1e-15 * mu.abs()).any()):
            break
    d = mu - values
    y = torch.where(d > 0, z / d.clamp_min(tiny), torch.zeros_like(z))
    norm = torch.linalg.vector_norm(y, dim=1, keepdim=True)
    found = (norm > 0) & torch.isfinite(norm) & (d[:, :1] > 0)
    axis = torch.zeros_like(y)
    axis[:, 0] = 1
    return torch.where(found, y / norm.clamp_min(tiny), axis)


EM_SHRINK = 0.25  # EM's working tensors drop the settled rows once this share of them has settled (a copy each)


def _em(
    values: torch.Tensor, vectors: torch.Tensor, last: torch.Tensor, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Expectation-maximisation for the cropped rows: fill the cropped entries with the current fit
    (``v_last * u[tail:]``, ``v_last = c'x / x'x``) and take the completed row's top right singular vector, the top
    eigenvector of ``G + f f'`` (:func:`_secular_top` in ``G``'s eigenbasis ``values, vectors``). The first fill is
    zero. Each step cannot lower the objective, and with few entries cropped it converges fast (the rate is about
    the cropped share of the row's information). Until each row's :func:`_profile` value settles (relative
    ``tol``) or ``EM_STEPS``; returns ``u`` (unit rows), that value, whether each row settled, and the slowest
    row's steps. A step costs one ``r x r`` product a row: ``Q'f`` is ``Q'c`` (fixed) plus the fill's part."""
    n, r = vectors.shape[:2]
    tail = last.shape[1]
    tiny = torch.finfo(last.dtype).tiny
    out_u, out_value = last.new_zeros(n, r), last.new_zeros(n)
    settled = torch.zeros(n, dtype=torch.bool, device=last.device)
    index = torch.arange(n, device=last.device)  # the working tensors hold the unsettled rows
    qc = (vectors[:, :tail].mT @ last.unsqueeze(2)).squeeze(2)
    value = torch.full((n,), -math.inf, dtype=last.dtype, device=last.device)
    z, taken = qc, 0
    while True:
        w = _secular_top(values, z)
        u = (vectors @ w.unsqueeze(2)).squeeze(2)
        x, rest = u[:, :tail], u[:, tail:]
        cx, xx = (last * x).sum(1), (x * x).sum(1).clamp_min(tiny)
        new_value = (values * w * w).sum(1) + cx * cx / xx
        done = (new_value - value).abs() <= tol * new_value.abs()
        out_u[index], out_value[index] = u, new_value
        settled[index[done]] = True
        value = new_value
        if taken == EM_STEPS or bool(settled[index].all()):
            break
        taken += 1
        z = qc + (cx / xx).unsqueeze(1) * (vectors[:, tail:].mT @ rest.unsqueeze(2)).squeeze(2)
        if done.sum() > EM_SHRINK * index.numel():  # settled rows step on until then (EM cannot lower them)
            going = ~settled[index]
            index, z, value, values, vectors, qc, last = (
                t[going] for t in (index, z, value, values, vectors, qc, last)
            )
    return out_u, out_value, settled, taken


def _als(
    rows: torch.Tensor, mask: torch.Tensor | None, u: torch.Tensor, tol: float, max_iterations: int, check: bool = True
):
    """Alternating least squares for per-row rank-1 fits from ``u``: ``(u, v, per-row squared error, steps,
    converged)``. Without a mask this is power iteration. ``check=False`` runs all steps without measuring."""
    tiny = torch.finfo(rows.dtype).tiny
    total = max(float(torch.linalg.vector_norm(rows)) ** 2, tiny)
    previous, steps, converged = math.inf, 0, False
    norms = None
    v = rows.new_zeros(rows.shape[:2])
    errors = rows.new_zeros(rows.shape[0])
    for steps in range(1, max_iterations + 1):
        if mask is None:
            v = (rows @ u.unsqueeze(2)).squeeze(2) / (u * u).sum(1, keepdim=True).clamp_min(tiny)
            u = (rows.mT @ v.unsqueeze(2)).squeeze(2) / (v * v).sum(1, keepdim=True).clamp_min(tiny)
        else:
            v = (rows @ u.unsqueeze(2)).squeeze(2) / (mask @ (u * u).unsqueeze(2)).squeeze(2).clamp_min(tiny)
            u = (rows.mT @ v.unsqueeze(2)).squeeze(2) / (mask.mT @ (v * v).unsqueeze(2)).squeeze(2).clamp_min(tiny)
        if not check and steps < max_iterations:
            continue
        if mask is None:  # u = R'v / v'v, so ||R - v u'||^2 = ||R||^2 - (v'v)(u'u): no full-size temporaries
            if norms is None:
                norms = torch.linalg.vector_norm(rows, dim=(1, 2)) ** 2
            errors = norms - (v * v).sum(1) * (u * u).sum(1)
        else:
            residual = rows - v.unsqueeze(2) * u.unsqueeze(1) * mask
            errors = (residual * residual).sum((1, 2))
        error = float(errors.sum())
        if previous - error <= tol * total:
            converged = True
            break
        previous = error
    return u, v, errors, steps, converged


def _als_gram(gram: torch.Tensor, last: torch.Tensor, u: torch.Tensor, steps: int) -> torch.Tensor:
    """:func:`_als` with a cropped last block, in terms of the fully observed blocks' Gram matrix ``G`` and the last
    block's observed entries ``c``: the same exact half steps (``v = F u / u'u`` and ``c'x / x'x``, then ``u``
    from ``v``), for every start at once (``u``: ``(rows, r, starts)``), at ``r x r`` rather than ``r2 x r`` cost."""
    tiny = torch.finfo(u.dtype).tiny
    tail = last.shape[1]
    c = last.unsqueeze(2)
    for _ in range(steps):
        s = (u * u).sum(1, keepdim=True).clamp_min(tiny)
        gu = gram @ u
        x = u[:, :tail]
        w = (c * x).sum(1, keepdim=True) / (x * x).sum(1, keepdim=True).clamp_min(tiny)  # the last block's v
        numerator = gu / s
        numerator[:, :tail] += c * w
        denominator = ((u * gu).sum(1, keepdim=True) / (s * s)).expand_as(u).clone()
        denominator[:, :tail] += w * w
        # A start the row's data cannot see (u'Gu = 0 and c'x = 0: a zero or sparse row) fits nothing from any
        # direction; it stays where it is rather than collapsing to the zero vector.
        u = torch.where(denominator > tiny, numerator / denominator.clamp_min(tiny), u)
    return u


def _profile_value(gram: torch.Tensor, last: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """:func:`_profile`'s ``g`` alone, for every start at once (``u``: ``(rows, r, starts)``)."""
    tiny = torch.finfo(u.dtype).tiny
    x = u[:, : last.shape[1]]
    explained = (u * (gram @ u)).sum(1) / (u * u).sum(1).clamp_min(tiny)
    return explained + (last.unsqueeze(2) * x).sum(1) ** 2 / (x * x).sum(1).clamp_min(tiny)


def _warm_up(gram: torch.Tensor, last: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ALS_WARMUP`` alternating steps (:func:`_als_gram`) from each start, in float32: they carry a start into
    its own basin (EM would pull every start into one), and Newton polishes in float64. ``u``: ``(rows, r,
    starts)``, stepped together (one pass over a row's Gram matrix serves all its starts). Returns ``u`` and each
    start's objective, in float64."""
    stepped = _als_gram(gram.float(), last.float(), u.float(), ALS_WARMUP).to(gram.dtype)
    return stepped, _profile_value(gram, last, stepped)


def _profile(gram: torch.Tensor, last: torch.Tensor, u: torch.Tensor):
    """Per row, ``g(u) = u'Gu / u'u + (c'x)^2 / x'x`` (``x = u[:tail]``; the squared error is ``||R_obs||^2 - g``),
    its gradient and Hessian: the masked rank-1 problem with the best ``v`` for ``u`` substituted in. The Hessian
    is ``2G / u'u``, a diagonal and one rank-5 product (one batched pass over the ``r x r`` matrices)."""
    n, r = u.shape
    tail = last.shape[1]
    s = (u * u).sum(1, keepdim=True)
    gu = (gram @ u.unsqueeze(2)).squeeze(2)
    f1 = (u * gu).sum(1, keepdim=True) / s
    d1 = 2 * (gu - f1 * u) / s
    x = u[:, :tail]
    s2 = (x * x).sum(1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
    cx = (last * x).sum(1, keepdim=True)
    f2 = cx * cx / s2
    d2 = 2 * (cx * last - f2 * x) / s2
    grad = d1.clone()
    grad[:, :tail] += d2
    # -2(u d1' + d1 u') / s  +  2(c c' - x d2' - d2 x') / s2 on the tail block
    left = u.new_zeros(n, r, 5)
    right = u.new_zeros(n, r, 5)
    left[:, :, 0], right[:, :, 0] = u, -2 * d1 / s
    left[:, :, 1], right[:, :, 1] = d1, -2 * u / s
    left[:, :tail, 2], right[:, :tail, 2] = last, 2 * last / s2
    left[:, :tail, 3], right[:, :tail, 3] = x, -2 * d2 / s2
    left[:, :tail, 4], right[:, :tail, 4] = d2, -2 * x / s2
    h = torch.baddbmm(gram * (2 / s).unsqueeze(2), left, right.mT)
    diagonal = h.diagonal(dim1=1, dim2=2)
    diagonal -= 2 * f1 / s
    diagonal[:, :tail] -= 2 * f2 / s2
    return (f1 + f2).squeeze(1), grad, h


def _newton(
    gram: torch.Tensor, last: torch.Tensor, u: torch.Tensor, steps: int = NEWTON_STEPS
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Safeguarded Newton ascent of :func:`_profile` per row from ``u``: a row takes a step only if ``g`` rises,
    and leaves the iteration once ``g`` settles (relative change <= 1e-13). Quadratic convergence from the
    alternating method's point; returns ``u`` (unit rows), ``g`` there, and the steps of the slowest row."""
    u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
    value, grad, hess = _profile(gram, last, u)
    out_u, out_value = u.clone(), value.clone()
    damping = torch.full_like(value, 1e-6) * value.abs().clamp_min(1e-300)
    floor = 1e-16 * float(value.abs().max()) if value.numel() else 0.0
    eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    index = torch.arange(u.shape[0], device=u.device)  # the working tensors hold the unsettled rows only
    taken = 0
    while index.numel() and taken < steps:
        taken += 1
        # g is scale invariant (its Hessian is singular along u): -u u' fixes that direction. Levenberg-Marquardt
        # damping turns a step that would not rise into a shorter, gradient-like one.
        system = hess - u.unsqueeze(2) * u.unsqueeze(1) - damping[:, None, None] * eye
        step, info = torch.linalg.solve_ex(system, -grad.unsqueeze(2))
        candidate = u + step.squeeze(2)
        candidate = candidate / torch.linalg.vector_norm(candidate, dim=1, keepdim=True).clamp_min(1e-300)
        new_value, new_grad, new_hess = _profile(gram, last, candidate)
        better = (new_value >= value) & torch.isfinite(new_value) & (info == 0)
        settled = (new_value - value).abs() <= 1e-13 * value.abs() + floor
        keep = better.unsqueeze(1)
        u = torch.where(keep, candidate, u)
        value = torch.where(better, new_value, value)
        grad = torch.where(keep, new_grad, grad)
        hess = torch.where(keep.unsqueeze(2), new_hess, hess)
        damping = torch.where(better, damping / 10, damping * 10)
        out_u[index], out_value[index] = u, value
        if settled.any():
            going = ~settled
            index, u, value, grad, hess, damping = (t[going] for t in (index, u, value, grad, hess, damping))
            gram, last = gram[going], last[going]
    return out_u, out_value, taken


def _masked_factors(
    rows: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor, tol: float
):
    """The cropped case of :func:`kradapter_factors` on a chunk of rows: ``(u, EM + alternating + Newton steps)``.

    Candidates per row: EM from the zero-filled row (:func:`_em`), and alternating least squares from the fully
    observed blocks' top ``STARTS`` right singular vectors (:func:`_warm_up`; it keeps a start in its own basin
    where EM would pull every start into one). Newton polishes each row's best candidate (unless it is EM's point
    and EM settled) and any other within ``RIVAL`` of the best that is not the same point (``|cos| < 1 - RIVAL``);
    the others lie below the best after the warm-up. Each row keeps its best, or the supremum of :func:`_limit`."""
    tail = int(mask[0, -1].sum())
    last = rows[:, -1, :tail]
    count = min(STARTS, vectors.shape[-1])
    em_u, em_value, em_settled, em_steps = _em(values, vectors, last, tol)
    u, value = _warm_up(gram, last, vectors[..., :count])
    n = u.shape[0]
    u = torch.cat([u, em_u.unsqueeze(2)], 2)
    value = torch.cat([value, em_value.unsqueeze(1)], 1).nan_to_num(nan=-math.inf)  # argmax takes NaN as largest
    top = value.argmax(1)
    unit = u / torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
    cos = (unit * unit[torch.arange(n), :, top].unsqueeze(2)).sum(1).abs()
    best = value.gather(1, top.unsqueeze(1))
    polish = (value >= best - RIVAL * best.abs()) & (cos < 1 - RIVAL)
    polish[torch.arange(n), top] = True
    polish[:, count] &= ~em_settled  # EM's settled point is stationary to ``tol`` already
    row, start = polish.nonzero(as_tuple=True)
    polished, polished_value, newton = _newton(gram[row], last[row], u[row, :, start])
    found = torch.full_like(value, -math.inf)  # a candidate neither polished nor EM's settled point cannot win
    found[:, count] = torch.where(em_settled, value[:, count], -math.inf)
    found[row, start] = polished_value.nan_to_num(nan=-math.inf)
    value = found
    u[row, :, start] = polished
    chosen, winner = value.max(1)
    return _limit(gram, last, u[torch.arange(n), :, winner], chosen), max(em_steps, ALS_WARMUP) + newton


LIMIT_TAIL = 1e-7  # the tail's norm in a unit ``u`` that stands for the limit x -> 0 (see _limit)
LIMIT_MARGIN = 1e-9  # rows whose supremum lies this far (relative) below their value cannot gain from it


def _limit(gram: torch.Tensor, last: torch.Tensor, u: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``u``, or where it is higher, the supremum that no stationary point attains: as ``x = u[:tail] -> 0`` along
    ``c``, ``g`` tends to ``lambda_max(G_rest) + ||c||^2`` (``G_rest``: the Gram matrix on the other coordinates),
    the last block fitted exactly by a ``v`` that grows as ``1 / ||x||``. Rows with exact zeros (sparse targets)
    reach it; it is realised with ``||x|| = LIMIT_TAIL`` and kept only where ``g`` there beats ``value``. The
    supremum itself comes from eigenvalues alone: eigenvectors are computed only for the rows it could win."""
    tail = last.shape[1]
    norm = torch.linalg.vector_norm(last, dim=1, keepdim=True)
    rest = gram[:, tail:, tail:]
    supremum = torch.linalg.eigvalsh(rest)[:, -1] + norm.squeeze(1) ** 2
    rows = ((supremum >= value * (1 - LIMIT_MARGIN)) | ~torch.isfinite(value)).nonzero().squeeze(1)
    if not rows.numel():
        return u
    vectors = torch.linalg.eigh(rest[rows]).eigenvectors
    candidate = torch.cat([LIMIT_TAIL * last[rows] / norm[rows].clamp_min(torch.finfo(u.dtype).tiny),
                           vectors[..., -1]], 1)  # fmt: skip
    reached = _profile_value(gram[rows], last[rows], candidate.unsqueeze(2)).squeeze(1)
    better = (reached > value[rows]) & (norm[rows].squeeze(1) > 0) & torch.isfinite(reached)
    u = u.clone()
    u[rows] = torch.where(better.unsqueeze(1), candidate, u[rows])
    return u


def _workers(device: torch.device) -> int:
    """Python threads for independent pieces: the torch thread count on the CPU; one elsewhere (a GPU batches)."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


def _spans(count: int, per_row: int, workers: int) -> list[slice]:
    """Row chunks of sizes differing by at most one, a multiple of the workers in number (fewer only with fewer
    rows), each of at most ``CHUNK / workers`` entries (``per_row`` a row): those in flight hold about ``CHUNK``."""
    most = max(1, CHUNK // (workers * per_row))
    chunks = min(count, workers * -(-count // (most * workers)))
    size, longer = divmod(count, max(chunks, 1))
    ends = [i * size + min(i, longer) for i in range(chunks + 1)]
    return [slice(start, end) for start, end in itertools.pairwise(ends)]


def _parallel(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``fn`` over ``items`` in up to ``workers`` Python threads at one torch thread each, in order.

    The per-row solvers are batches of small matrices (a batched ``eigh`` is a loop of LAPACK calls on one core
    whatever the thread count), and LoKr's starts are independent runs: independent pieces side by side use the
    cores that intra-op threads leave idle. The results are each piece's own, as in a sequential loop."""
    workers = min(workers, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)


def kradapter_factors(
    rows: torch.Tensor, mask: torch.Tensor | None, tol: float = TOL, max_iterations: int = MAX_ITERATIONS
) -> tuple[torch.Tensor, torch.Tensor, int, bool, float]:
    """Per row, ``v`` (``r2``) and ``u`` (``r``) minimising ``||mask * (rows - v u^T)||_F``, summed over rows.

    Without a mask: the top singular pair of each row (float32 ``eigh`` of the Gram matrix), refined in float64 by
    power iteration. With a mask (cropped entries, all in the last block) the problem has local minima: the best
    of expectation-maximisation from the zero-filled row and of alternating least squares from the fully observed
    blocks' top ``STARTS`` right singular vectors (both from a float64 ``eigh`` of each row's Gram matrix), polished
    to a stationary point by Newton's method (:func:`_masked_factors`), then one exact alternating step whose gain
    is the stationarity test. Rows are independent: solved in chunks of bounded memory, side by side on the CPU
    (:func:`_parallel`). Returns ``u, v``, the steps, whether the result is stationary (relative squared error
    settled within ``tol``), and a lower bound on the squared error: the fully observed blocks' best rank-1 error
    (Eckart-Young; the partial block only adds a non-negative term).
    """
    full = rows if mask is None else rows[:, :-1]
    energy = float(torch.linalg.vector_norm(full)) ** 2  # no squared copy: a large layer's rows are ~400 MB
    workers = _workers(rows.device)
    spans = _spans(rows.shape[0], rows.shape[2] * rows.shape[2] * (1 if mask is None else STARTS + 1), workers)
    if mask is None:

        def top_vectors(span: slice) -> tuple[torch.Tensor, float]:
            vectors, values = _gram_eigh(full[span].mT @ full[span])
            return vectors[..., 0], float(values[:, 0].sum())

        starts, tops = zip(*_parallel(top_vectors, spans, workers), strict=True)
        bound = max(energy - sum(tops) - EIGENVALUE_SLACK * energy, 0.0)
        # Power iteration from the float32 vectors to the tolerance: v, and the test.
        u, v, _, steps, converged = _als(rows, None, torch.cat(starts), tol, max_iterations)
        return u, v, steps, converged, bound
    tail = int(mask[0, -1].sum())
    total = max(energy + float(torch.linalg.vector_norm(rows[:, -1])) ** 2, torch.finfo(rows.dtype).tiny)

    def cropped(span: slice) -> tuple[torch.Tensor, torch.Tensor, float, float, int]:
        part, last = full[span], rows[span, -1, :tail]
        gram = part.mT @ part
        values, vectors = torch.linalg.eigh(gram)
        values, vectors = values.flip(-1).clamp_min(0), vectors.flip(-1)
        u, taken = _masked_factors(rows[span], mask[span], gram, values, vectors, tol)
        # One more exact alternating step: its gain in the objective is the stationarity test; then the best v.
        stepped = _als_gram(gram, last, u.unsqueeze(2), 1).squeeze(2)
        gain = float(
            (_profile_value(gram, last, stepped.unsqueeze(2)) - _profile_value(gram, last, u.unsqueeze(2))).sum()
        )
        u = stepped
        tiny = torch.finfo(u.dtype).tiny
        x = u[:, :tail]
        v_full = (part @ u.unsqueeze(2)).squeeze(2) / (u * u).sum(1, keepdim=True).clamp_min(tiny)
        v_last = (last * x).sum(1, keepdim=True) / (x * x).sum(1, keepdim=True).clamp_min(tiny)
        return u, torch.cat([v_full, v_last], 1), float(values[:, 0].sum()), gain, taken + 1

    us, vs, tops, gains, steps = zip(*_parallel(cropped, spans, workers), strict=True)
    bound = max(energy - sum(tops) - EIGENVALUE_SLACK * energy, 0.0)
    return torch.cat(us), torch.cat(vs), max(steps), sum(gains) <= tol * total, bound


def _kradapter(layer: Any, target: torch.Tensor, tol: float, max_iterations: int) -> Optimum:
    shape: KhatriRaoShape = layer.kradapter_shape["default"]
    scaling = layer.kradapter_scaling["default"]
    if scaling == 0:
        raise ValueError("KRAdapter with scaling 0 has only the zero update")
    rows, mask = kradapter_rows(target, shape)
    u, v, steps, converged, bound = kradapter_factors(rows, mask, tol, max_iterations)
    _write(layer.kradapter_u["default"], u / scaling)
    _write(layer.kradapter_v["default"], v)
    exact = mask is None
    solver = (
        "per-row best rank-1 (Eckart-Young): float32 Gram eigh, float64 power-iteration refinement"
        if exact
        else "per-row rank-1 with the cropped entries unobserved: best of EM from the zero-filled row and alternating"
        " least squares from 4 starts, polished by Newton's method, and the supremum as the cropped block's observed"
        " part tends to zero"
    )
    return Optimum(_update(layer), math.sqrt(max(bound, 0.0)), steps, converged, exact, solver, 0.0)


# -- LoKr ------------------------------------------------------------------------------------------------------------


def _split(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``a (p x rank)``, ``b (rank x q)`` with ``a @ b == matrix`` (of rank <= ``rank``), balanced."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank].sqrt(), vh[:rank]
    a, b = u * s, s.unsqueeze(1) * vh
    if a.shape[1] < rank:  # fewer singular values than the rank: zero columns
        a = torch.cat([a, a.new_zeros(a.shape[0], rank - a.shape[1])], 1)
        b = torch.cat([b, b.new_zeros(rank - b.shape[0], b.shape[1])], 0)
    return a, b


def _top_part(m: torch.Tensor, rank: int | None) -> tuple[float, torch.Tensor]:
    """``||trunc(m)||_F^2`` and ``trunc(m)``, the best rank-``rank`` approximation of ``m``, through the smaller Gram
    matrix's ``eigh`` (the projection onto its top or, when fewer, its bottom eigenvectors)."""
    s, t = m.shape
    n = min(s, t)
    if rank is None or rank >= n:
        return float((m * m).sum()), m
    wide = s <= t
    gram = m @ m.T if wide else m.T @ m
    top = rank <= n - rank  # project onto the top eigenvectors, or remove the (fewer) bottom ones
    values, vectors = _eigh_part(gram, range(n - rank, n) if top else range(n - rank))
    if top:
        return float(values.sum()), vectors @ (vectors.T @ m) if wide else (m @ vectors) @ vectors.T
    kept = float(gram.diagonal().sum() - values.sum())
    return kept, m - (vectors @ (vectors.T @ m) if wide else (m @ vectors) @ vectors.T)


def _eigh_part(gram: torch.Tensor, wanted: range) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigenpairs ``wanted`` (ascending positions) of a symmetric matrix. On the CPU, LAPACK's ``syevr`` computes
    only those (scipy): less than half the time of a whole ``eigh`` for a sixth of the pairs at 512x512."""
    if gram.device.type == "cpu" and len(wanted) < gram.shape[0]:
        import scipy.linalg

        values, vectors = scipy.linalg.eigh(gram.numpy(), subset_by_index=[wanted.start, wanted.stop - 1], driver="evr")
        return torch.from_numpy(values), torch.from_numpy(vectors)
    values, vectors = torch.linalg.eigh(gram)
    return values[wanted.start : wanted.stop], vectors[:, wanted.start : wanted.stop]


class _KroneckerSearch:
    """Maximise ``f(A) = ||trunc(R^T vec(A))||^2 / ||A||^2`` (the inner factor's best rank-limited partner of ``A``
    removes exactly that much of ``||R||^2``) over the outer factor ``A`` (``rank <= ranks[0]``, as ``X Y^T``) by
    float64 L-BFGS with a strong-Wolfe line search from ``start``. ``run`` goes on until the loss (relative to
    ``||R||^2``) moves less than ``tol`` in a step or its gradient's largest entry falls to ``grad_tol``; a later
    ``run`` at a tighter tolerance continues with the curvature learnt so far (see POLISH_CHANGE)."""

    def __init__(
        self,
        rows: torch.Tensor,
        total: float,
        start: torch.Tensor,
        inner: tuple[int, int],
        ranks: tuple[int | None, int | None],
    ) -> None:
        self.rows, self.total, self.shape, self.inner, self.inner_rank = rows, total, start.shape, inner, ranks[1]
        outer_rank = ranks[0]
        if outer_rank is None or outer_rank >= min(start.shape):
            self.params = [start.clone()]
        else:
            u, s, vh = torch.linalg.svd(start, full_matrices=False)
            root = s[:outer_rank].sqrt()
            self.params = [u[:, :outer_rank] * root, vh[:outer_rank].T * root]
        self.search: torch.optim.LBFGS | None = None
        self.steps = 0

    def outer(self) -> torch.Tensor:
        params = self.params
        return params[0] if len(params) == 1 else params[0] @ params[1].T

    def _closure(self) -> torch.Tensor:
        params, total = self.params, self.total
        a = self.outer().reshape(-1)
        norm2 = float(a.dot(a))
        kept, part = _top_part((a @ self.rows).reshape(self.inner), self.inner_rank)
        # gradient of -f / ||R||^2 with respect to A, then to its factors
        grad = ((2 * kept / norm2**2) * a - (2 / norm2) * (self.rows @ part.reshape(-1))).reshape(self.shape) / total
        if len(params) == 1:
            params[0].grad = grad
        else:
            params[0].grad, params[1].grad = grad @ params[1], grad.T @ params[0]
        return torch.tensor(1.0 - kept / norm2 / total, dtype=torch.float64)

    def run(self, tol: float, max_iterations: int, grad_tol: float = 0.0) -> bool:
        """Search on; whether it stopped before ``max_iterations`` more iterations."""
        if self.search is None:
            self.search = torch.optim.LBFGS(self.params, history_size=20, line_search_fn="strong_wolfe")
        self.search.param_groups[0].update(
            tolerance_grad=grad_tol, tolerance_change=tol, max_iter=max_iterations, max_eval=2 * max_iterations
        )
        before = int(self.search.state[self.params[0]].get("n_iter", 0))
        self.search.step(self._closure)
        steps = int(self.search.state[self.params[0]]["n_iter"]) - before
        self.steps += steps
        return steps < max_iterations

    def result(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``A``, its best partner and the squared error."""
        a = self.outer()
        norm2 = float(a.reshape(-1).dot(a.reshape(-1)))
        kept, partner = _top_part((a.reshape(-1) @ self.rows).reshape(self.inner) / norm2, self.inner_rank)
        return a, partner, self.total - kept * norm2


def lokr_starts(entries: int) -> int:
    """How many of the rearranged target's top singular vectors start a low-rank LoKr search (see LOKR_LARGE)."""
    return LOKR_STARTS if entries <= LOKR_LARGE else 1


def binding_ranks(
    first: tuple[int, int], second: tuple[int, int], ranks: tuple[int | None, int | None]
) -> tuple[int | None, int | None]:
    """``ranks`` with each limit that cannot bind (at least the factor's smaller side) replaced by ``None``: such a
    factor is full in all but its parametrisation, and the closed form is its exact optimum."""
    return tuple(  # type: ignore[return-value]
        None if rank is None or rank >= min(shape) else rank for shape, rank in zip((first, second), ranks, strict=True)
    )


def nearest_kronecker(
    target: torch.Tensor,
    first: tuple[int, int],
    second: tuple[int, int],
    ranks: tuple[int | None, int | None] = (None, None),
    tol: float = TOL,
    max_iterations: int = MAX_ITERATIONS,
) -> tuple[torch.Tensor, torch.Tensor, int, bool, float]:
    """``A`` (``first``) and ``B`` (``second``) minimising ``||T - kron(A, B)||_F`` with ``rank(A) <= ranks[0]``,
    ``rank(B) <= ranks[1]`` (``None``: full), in float64.

    ``R``, the target rearranged so row ``(i, j)`` is block ``T_ij`` flattened, has ``kron(A, B)`` as
    ``vec(A) vec(B)^T``: without rank limits the optimum is ``R``'s top singular pair (Van Loan & Pitsianis). With
    them, for a given ``A`` the best ``B`` is the truncated SVD of ``R^T vec(A) / ||A||^2``, so the error is a
    function of ``A`` alone, minimised by L-BFGS (the rank-limited factor is the inner one; with both limited,
    ``A = X Y^T``). It has local minima: each of ``R``'s top ``LOKR_STARTS`` singular vectors starts a run to
    ``RACE_TOL``, and the best is polished (to ``POLISH_GRAD``). Returns ``A, B``, the iterations, convergence, and the
    squared error of the full-factor optimum (a lower bound).
    """
    (p, q), (s, t) = first, second
    if target.shape != (p * s, q * t):
        raise ValueError(f"a {tuple(target.shape)} target is not kron of {first} and {second} factors")
    ranks = binding_ranks(first, second, ranks)
    # One pass, converting as it permutes (a float64 copy, then a permuted one, cost 20x more at 4096x11008).
    rearranged = target.new_empty((p, q, s, t), dtype=torch.float64)
    rearranged.copy_(target.detach().reshape(p, s, q, t).permute(0, 2, 1, 3))
    rearranged = rearranged.reshape(p * q, s * t)
    total = float(torch.linalg.vector_norm(rearranged)) ** 2
    small = rearranged @ rearranged.T if p * q <= s * t else rearranged.T @ rearranged
    values, vectors = torch.linalg.eigh(small)
    sigma2 = float(values[-1].clamp_min(0))
    # The full-factor optimum, and each side's k-th singular vector (the outer factor's starts below).
    count = min(lokr_starts(rearranged.numel()), vectors.shape[1]) if ranks != (None, None) else 1
    picked = vectors[:, -count:].flip(1)
    if p * q <= s * t:  # unit left singular vectors a: their best partners are R^T a
        a_starts, b_starts = picked.T, picked.T @ rearranged
    else:  # unit right singular vectors b: their best partners are R b
        b_starts, a_starts = picked.T, (rearranged @ picked).T
    bound = max(total - sigma2, 0.0)
    a_mat, b_mat = a_starts[0].reshape(p, q), b_starts[0].reshape(s, t)
    if ranks == (None, None) or sigma2 == 0:  # closed form (or a zero target: the zero update)
        return a_mat, b_mat, 0, True, bound
    limits: tuple[int | None, int | None]
    if ranks[1] is None:  # B full, A rank-limited: B is the outer factor
        rows, starts, inner, limits = rearranged.T, b_starts.reshape(-1, s, t), first, (None, ranks[0])
    else:
        rows, starts, inner, limits = rearranged, a_starts.reshape(-1, p, q), second, ranks
    # The problem has local minima: race every start to a loose tolerance, then polish the best.
    starts = starts / torch.linalg.vector_norm(starts, dim=(1, 2), keepdim=True).clamp_min(1e-300)

    def search_from(start: torch.Tensor) -> _KroneckerSearch:
        return _KroneckerSearch(rows, total, start, inner, limits)

    def race(start: torch.Tensor) -> tuple[_KroneckerSearch, float]:
        search = search_from(start)
        search.run(RACE_TOL, max_iterations)
        return search, search.result()[2]

    # The partial eigensolver (scipy's LAPACK) at one thread: its own threads on the cores torch's spin on cost
    # more than they give at these sizes (4096x11008 at two torch threads: 5.37 s with them, 3.68 s without).
    with threadpool_limits(1, user_api="blas"):
        raced = _parallel(race, list(starts), _workers(rows.device)) if len(starts) > 1 else []
        best = min(raced, key=lambda run: run[1])[0] if raced else search_from(starts[0])  # one start: no race
        converged = best.run(tol * POLISH_CHANGE, max_iterations, POLISH_GRAD)
        outer, partner, _ = best.result()
    steps = sum(run.steps for run, _ in raced) if raced else best.steps
    a_mat, b_mat = (partner, outer) if ranks[1] is None else (outer, partner)
    return a_mat, b_mat, steps, converged, bound


def lokr_factors(layer: Any, name: str = "default") -> tuple[tuple[Any, Any], tuple[int | None, int | None]]:
    """PEFT LoKr layer's factor shapes ``(w1, w2)`` and their ranks (``None``: a full factor)."""
    shapes: list[tuple[Any, Any]] = []
    ranks: list[int | None] = []
    for full, a, b in (("lokr_w1", "lokr_w1_a", "lokr_w1_b"), ("lokr_w2", "lokr_w2_a", "lokr_w2_b")):
        if name in getattr(layer, full):
            rows, cols = getattr(layer, full)[name].shape
            shapes.append((rows, cols))
            ranks.append(None)
        else:
            shapes.append((getattr(layer, a)[name].shape[0], getattr(layer, b)[name].shape[1]))
            ranks.append(int(getattr(layer, a)[name].shape[1]))
    return (shapes[0], shapes[1]), (ranks[0], ranks[1])


def _lokr(layer: Any, target: torch.Tensor, tol: float, max_iterations: int) -> Optimum:
    name = "default"
    scale = float(layer.scaling[name])
    if scale == 0:
        raise ValueError("LoKr with scale 0 has only the zero update")
    if name in layer.lokr_t2:
        raise ValueError("no optimum for LoKr's effective-conv2d factorisation")
    (first, second), (rank1, rank2) = lokr_factors(layer)
    full1, full2 = rank1 is None, rank2 is None
    exact = binding_ranks(first, second, (rank1, rank2)) == (None, None)
    a, b, steps, converged, bound = nearest_kronecker(target, first, second, (rank1, rank2), tol, max_iterations)
    b = b / scale
    if full1:
        _write(layer.lokr_w1[name], a)
    else:
        for param, value in zip((layer.lokr_w1_a[name], layer.lokr_w1_b[name]), _split(a, rank1 or 1), strict=True):
            _write(param, value)
    if full2:
        _write(layer.lokr_w2[name], b)
    else:
        for param, value in zip((layer.lokr_w2_a[name], layer.lokr_w2_b[name]), _split(b, rank2 or 1), strict=True):
            _write(param, value)
    solver = (
        "nearest Kronecker product (Van Loan-Pitsianis): top singular pair of the rearranged target, float64"
        if exact
        else "Kronecker product with low-rank factors: the best low-rank partner of each full factor in closed form "
        "(truncated SVD), the full factor by float64 L-BFGS from the rearranged target's top "
        + (
            f"{LOKR_STARTS} singular vectors, raced, the best polished"
            if lokr_starts(target.numel()) > 1
            else "singular vector (one start: a large target)"
        )
        + " to a stationary point (best found)"
    )
    return Optimum(_update(layer), math.sqrt(bound), steps, converged, exact, solver, 0.0)
