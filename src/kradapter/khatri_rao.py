"""The KRAdapter update: one definition used by the layer, the PEFT tuner and every benchmark.

For a layer with ``out_features = d`` and ``in_features = k`` let ``m = min(d, k)``, ``M = max(d, k)``.
The trainable factors are ``U`` (m x r, zeros at start) and ``V`` (m x r2). Row ``i`` of the raw update
``K`` (m x r*r2) is ``kron(V[i], U[i])``, i.e. ``K^T`` is the column-wise Khatri-Rao product of ``V^T``
and ``U^T``. ``K`` is cropped to its first ``M`` columns and oriented so the ``m`` side lies along the
smaller layer dimension, giving ``dW`` of shape ``(d, k)``.

Training never keeps ``dW`` alive between forward and backward: :class:`KhatriRaoLinearFunction` saves
only ``U``, ``V`` and the input and rebuilds the update in backward. With a frozen base weight it runs a
single matmul against ``W + s * dW`` (the "fused" path) instead of the published layer's two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Factorization = Literal["sqrt_min", "sqrt_max"]
FACTORIZATIONS: tuple[str, ...] = ("sqrt_min", "sqrt_max")


@dataclass(frozen=True)
class KhatriRaoShape:
    """Factor sizes of a KRAdapter update for a ``(out_features, in_features)`` weight.

    ``"sqrt_min"`` (the published layer): ``r = floor(sqrt(m))``, ``r2`` the smallest integer with
    ``r * r2 >= M``. ``"sqrt_max"`` (the paper's matrix study): ``r = floor(sqrt(M))``,
    ``r2 = ceil(M / r)``; fewest parameters, about ``2 * m * sqrt(M)``.
    """

    out_features: int
    in_features: int
    factorization: Factorization = "sqrt_min"

    def __post_init__(self) -> None:
        for name in ("out_features", "in_features"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KRAdapter needs a positive integer {name}, got {value!r}")
        if self.factorization not in FACTORIZATIONS:
            raise ValueError(f"unknown KRAdapter factorization {self.factorization!r}; choose one of {FACTORIZATIONS}")

    @property
    def m(self) -> int:
        return min(self.out_features, self.in_features)

    @property
    def M(self) -> int:  # noqa: N802 - the paper's notation
        return max(self.out_features, self.in_features)

    @property
    def r(self) -> int:
        return math.isqrt(self.m if self.factorization == "sqrt_min" else self.M)

    @property
    def r2(self) -> int:
        return -(-self.M // self.r)

    @property
    def transposed(self) -> bool:
        """True when the ``m`` side is the input side, so ``dW = K[:, :M]^T``."""
        return self.out_features > self.in_features

    @property
    def num_params(self) -> int:
        return self.m * (self.r + self.r2)

    @property
    def u_shape(self) -> tuple[int, int]:
        return (self.m, self.r)

    @property
    def v_shape(self) -> tuple[int, int]:
        return (self.m, self.r2)


def init_factors(u: torch.Tensor, v: torch.Tensor, zero_update: bool = True) -> None:
    """Initialise in place as the published layer does: ``U = 0`` and ``V`` Kaiming-uniform with ``a=5``.

    With ``zero_update=False`` ``U`` is drawn the same way, so ``dW != 0`` (useful for tests).
    """
    with torch.no_grad():
        torch.nn.init.kaiming_uniform_(v, a=5)
        if zero_update:
            u.zero_()
        else:
            torch.nn.init.kaiming_uniform_(u, a=5)


def _check_factors(u: torch.Tensor, v: torch.Tensor, shape: KhatriRaoShape) -> None:
    if tuple(u.shape) != shape.u_shape or tuple(v.shape) != shape.v_shape:
        raise ValueError(
            f"KRAdapter factors for a {shape.out_features}x{shape.in_features} weight "
            f"({shape.factorization}) must be U{shape.u_shape} and V{shape.v_shape}, "
            f"got U{tuple(u.shape)} and V{tuple(v.shape)}"
        )


def delta_weight(u: torch.Tensor, v: torch.Tensor, shape: KhatriRaoShape) -> torch.Tensor:
    """The update ``dW`` of shape ``(out_features, in_features)``; differentiable by plain autograd."""
    _check_factors(u, v, shape)
    rows = (v.unsqueeze(2) * u.unsqueeze(1)).reshape(shape.m, shape.r2 * shape.r)[:, : shape.M]
    return rows.T if shape.transposed else rows


def factor_grads(
    grad_rows: torch.Tensor, u: torch.Tensor, v: torch.Tensor, shape: KhatriRaoShape
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``U`` and ``V`` from the gradient of the cropped update ``K[:, :M]`` (m x M)."""
    pad = shape.r * shape.r2 - shape.M
    grad_k = F.pad(grad_rows, (0, pad)) if pad else grad_rows
    grad_k = grad_k.reshape(shape.m, shape.r2, shape.r)
    grad_u = torch.bmm(v.unsqueeze(1), grad_k).squeeze(1)
    grad_v = torch.bmm(grad_k, u.unsqueeze(2)).squeeze(2)
    return grad_u, grad_v


def _effective_weight(dtype, u, v, weight, shape, scaling):  # type: ignore[no-untyped-def]
    """``W + s * dW`` (or ``s * dW`` without ``W``) in the compute dtype: one weight-sized temporary."""
    delta = delta_weight(u, v, shape).to(dtype)
    return delta * scaling if weight is None else torch.add(weight.to(dtype), delta, alpha=scaling)


class KhatriRaoLinearFunction(torch.autograd.Function):
    """``y = x @ (W + s * dW)^T + b`` (or ``s * x @ dW^T`` without ``W``) saving only ``x, U, V``.

    ``W`` is the caller's frozen weight in ``(out, in)`` layout (a view is fine); saving it costs nothing.
    The update is rebuilt in backward, so no weight-sized tensor lives between forward and backward.
    """

    @staticmethod
    def forward(ctx, x, u, v, weight, bias, shape: KhatriRaoShape, scaling: float):  # type: ignore[override]
        merged = _effective_weight(x.dtype, u, v, weight, shape, scaling)
        ctx.save_for_backward(x, u, v, weight)
        ctx.shape, ctx.scaling, ctx.has_bias = shape, scaling, bias is not None
        return F.linear(x, merged, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, u, v, weight = ctx.saved_tensors
        shape: KhatriRaoShape = ctx.shape
        s = ctx.scaling
        need_x, need_u, need_v, need_w, need_b = ctx.needs_input_grad[:5]
        grad_x = grad_u = grad_v = grad_w = grad_b = None
        grad_out = grad_out.to(x.dtype)
        if need_x:
            grad_x = grad_out @ _effective_weight(x.dtype, u, v, weight, shape, s)
        g2 = grad_out.reshape(-1, shape.out_features)
        x2 = x.reshape(-1, shape.in_features)
        if need_u or need_v:
            # gradient of the cropped K (m x M) straight from the matmul, no transpose copy
            grad_rows = (x2.T @ g2) if shape.transposed else (g2.T @ x2)
            grad_u, grad_v = factor_grads(grad_rows.to(u.dtype).mul_(s), u, v, shape)
        if need_w:
            grad_w = (g2.T @ x2).to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_b = g2.sum(0)
        return grad_x, grad_u, grad_v, grad_w, grad_b, None, None


def khatri_rao_linear(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    shape: KhatriRaoShape,
    scaling: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply ``x -> x @ (W + scaling * dW)^T + b``; without ``weight`` only the adapter term."""
    _check_factors(u, v, shape)
    if x.shape[-1] != shape.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {shape.in_features}")
    if weight is not None and tuple(weight.shape) != (shape.out_features, shape.in_features):
        raise ValueError(
            f"base weight has shape {tuple(weight.shape)}, expected {(shape.out_features, shape.in_features)}"
        )
    return KhatriRaoLinearFunction.apply(x, u, v, weight, bias, shape, float(scaling))
