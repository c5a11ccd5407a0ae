"""The KRAdapter update: one definition used by the layer, the PEFT tuner and every benchmark.

For a layer with ``out_features = d`` and ``in_features = k`` let ``m = min(d, k)``, ``M = max(d, k)``.
The trainable factors are ``U`` (m x r, zeros at start) and ``V`` (m x r2). Row ``i`` of the raw update
``K`` (m x r*r2) is ``kron(V[i], U[i])``, i.e. ``K^T`` is the column-wise Khatri-Rao product of ``V^T``
and ``U^T``. ``K`` is cropped to its first ``M`` columns and oriented so the ``m`` side lies along the
smaller layer dimension, giving ``dW`` of shape ``(d, k)``.

Training never keeps ``dW`` alive between forward and backward: :class:`KhatriRaoLinearFunction` saves
only ``U``, ``V`` and the input and rebuilds the update in backward. With a frozen base weight it runs a
single matmul against ``W + s * dW`` (the "fused" path) instead of the published layer's two.

Execution choices made here, per shape, dtype and device (measured in ``BENCHMARKS.md``):

- Whether fusing pays for an input (:func:`fusing_pays`): always, except half precision on the CPU with few
  tokens, where the base matmul plus a separate adapter term is faster.
- ``W + s * dW`` is written by :func:`write_update` block by block straight into place for layers of at least
  ``BLOCKWISE_MIN_NUMEL`` weights (``BLOCKWISE_MIN_NUMEL_TRANSPOSED`` when in_features < out_features), and
  through a padded buffer in two operations for smaller ones (:func:`blockwise`).
- The factor gradient ``G = g^T x`` is one matmul into a zero-padded ``(m, r2, r)`` buffer with the scaling as
  its ``alpha``, then two batched products give ``dU`` and ``dV``. Half-precision activations are contracted
  into float32 (``out_dtype`` on CUDA, upcast on the CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .shape import FACTORIZATIONS as FACTORIZATIONS
from .shape import Factorization as Factorization
from .shape import KhatriRaoShape


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


def _k_view(t: torch.Tensor, shape: KhatriRaoShape) -> torch.Tensor:
    """An ``(out, in)`` tensor seen in the layout of ``K``: ``(m, M)``, a view, never a copy."""
    return t.T if shape.transposed else t


# Updates of at least this many elements are written block by block straight into place (two passes over the
# weight); smaller ones, which live in cache and whose cost is the number of operations, by _write_padded. A
# transposed update (in_features < out_features) pays for the padded path's strided crop much earlier: blockwise
# is 2-3x faster from a few 100k elements on (1536x384, 1024x768; benchmarks/paths.py).
BLOCKWISE_MIN_NUMEL = 1 << 20
BLOCKWISE_MIN_NUMEL_TRANSPOSED = 1 << 18
# Devices whose elementwise loops want the small factors stored m-fastest for a transposed blockwise write: the
# CPU then vectorises along the result's rows (1.5x on 11008x4096); CUDA reads the factors from cache anyway.
FACTOR_COPY_DEVICES = {"cpu"}


def _blocks(k: torch.Tensor, shape: KhatriRaoShape) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A ``K``-layout ``(m, M)`` view as its ``q`` whole blocks ``(m, q, r)`` and its cropped tail ``(m, tail)``."""
    (q, tail), r = shape.blocks, shape.r
    if not tail:
        return k.view(shape.m, q, r), None
    return k[:, : q * r].view(shape.m, q, r), k[:, q * r :]


# Fusing saves two matmuls with dW per step (2 T d k multiply-adds for T tokens) but writes W + s dW, reading W,
# where the separate path writes s dW alone. In float32, and on CUDA, the write costs little and fusing is as fast
# or faster from one token on. CPU half precision is the exception: the mixed-precision write is slow there, and the
# separate path wins below ~256 tokens on small layers, ~1,000 on small transposed ones (in < out) and, by the
# measured slopes, ~2,000 on 4096-wide ones (benchmarks/paths.py, BENCHMARKS.md).
HALF_DTYPES = (torch.float16, torch.bfloat16)
CPU_HALF_FUSE_MIN_TOKENS = {"small": 256, "small_transposed": 1024, "large": 2048}


def fusing_pays(shape: KhatriRaoShape, x: torch.Tensor) -> bool:
    """Whether one matmul against ``W + s dW`` beats the base matmul plus a separate adapter term for input ``x``."""
    if x.device.type != "cpu" or x.dtype not in HALF_DTYPES:
        return True
    tokens = x.numel() // max(x.shape[-1], 1)
    if shape.m * shape.M >= BLOCKWISE_MIN_NUMEL:
        return tokens >= CPU_HALF_FUSE_MIN_TOKENS["large"]
    return tokens >= CPU_HALF_FUSE_MIN_TOKENS["small_transposed" if shape.transposed else "small"]


def runs_as_linear(module: nn.Module, types: tuple[type, ...]) -> bool:
    """Whether ``module``'s forward is exactly ``F.linear`` of its weight: one of ``types`` itself (no subclass)
    with no forward hooks of its own or global ones, so the fused path may replace it."""
    hooks = nn.modules.module
    return type(module) in types and not (
        module._forward_hooks
        or module._forward_pre_hooks
        or hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
    )


def blockwise(shape: KhatriRaoShape, onto_base: bool = True) -> bool:
    """Whether :func:`write_update` writes ``shape``'s update block by block (else through a padded buffer).

    The earlier switch for transposed layouts applies onto a base weight only: ``dW`` alone comes out of the
    padded buffer as a transposed view, without the strided write (and its gradient keeps that fast layout).
    """
    transposed = shape.transposed and onto_base
    return shape.m * shape.M >= (BLOCKWISE_MIN_NUMEL_TRANSPOSED if transposed else BLOCKWISE_MIN_NUMEL)


def write_update(
    u: torch.Tensor,
    v: torch.Tensor,
    shape: KhatriRaoShape,
    scaling: float = 1.0,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``base + scaling * dW`` (or ``scaling * dW``) as a new ``(out, in)`` tensor, without autograd.

    This is the one place ``dW`` is computed: block ``b`` of row ``i`` of ``K`` is ``V[i, b] * U[i]``, so the
    whole blocks are one broadcast product and the cropped last block another, each written straight into its
    place in the result (``addcmul`` onto the base weight). The result is the only weight-sized tensor made:
    no uncropped ``m x r*r2`` product, no ``dW`` beside ``W + s * dW``. Products are formed in the inputs'
    promoted dtype and rounded once to ``dtype`` (default: ``base``'s dtype, else the factors').
    """
    if dtype is None:
        dtype = base.dtype if base is not None else torch.promote_types(u.dtype, v.dtype)
    if not blockwise(shape, base is not None):
        return _write_padded(u, v, shape, scaling, base, dtype)
    out = torch.empty(shape.out_features, shape.in_features, dtype=dtype, device=u.device)
    q, tail = shape.blocks
    if shape.transposed:
        out, base = out.T, (None if base is None else base.T)
        if u.device.type in FACTOR_COPY_DEVICES:
            u, v = u.T.contiguous().T, v.T.contiguous().T
    out_blocks, out_tail = _blocks(out, shape)
    left = (v[:, :q] if tail else v).unsqueeze(2)
    if base is None:
        if scaling != 1:
            left, v = left * scaling, v * scaling
        torch.mul(left, u.unsqueeze(1), out=out_blocks)
        if tail:
            torch.mul(v[:, q:], u[:, :tail], out=out_tail)
    else:
        base_blocks, base_tail = _blocks(base, shape)
        torch.addcmul(base_blocks, left, u.unsqueeze(1), value=scaling, out=out_blocks)
        if tail:
            assert base_tail is not None  # the base has the same blocks as the update
            torch.addcmul(base_tail, v[:, q:], u[:, :tail], value=scaling, out=out_tail)
    return out.T if shape.transposed else out


def _write_padded(u, v, shape, scaling, base, dtype):
    """:func:`write_update` in two kernels for small layers: all of ``K`` into a padded buffer, then the crop.

    The result is a view of that ``(m, r2 * r)`` buffer (rows padded, which matmuls take as is). It moves the
    update through memory twice more than the blockwise path, but small layers stay in cache, and it runs half
    the operations: on small layers the time goes to launching operations, not to moving bytes. A half-precision
    result onto a base weight gets its own tensor, so that ``K`` is not rounded before the sum (one rounding).
    """
    compute = torch.promote_types(u.dtype, v.dtype)
    separate = base is not None and dtype != compute
    buffer = torch.empty(shape.m, shape.r2 * shape.r, dtype=compute if separate else dtype, device=u.device)
    if base is None and scaling != 1:
        v = v * scaling
    torch.mul(v.unsqueeze(2), u.unsqueeze(1), out=buffer.view(shape.m, shape.r2, shape.r))
    out = buffer[:, : shape.M] if shape.blocks[1] else buffer
    if separate:
        target = _k_view(torch.empty(shape.out_features, shape.in_features, dtype=dtype, device=u.device), shape)
        out = torch.add(_k_view(base, shape), out, alpha=scaling, out=target)
    elif base is not None:
        torch.add(_k_view(base, shape), out, alpha=scaling, out=out)
    return out.T if shape.transposed else out


def _contract(grad_blocks: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dU[i] = sum_b V[i, b] G[i, b]`` and ``dV[i, b] = <G[i, b], U[i]>`` for ``G`` as ``(m, r2, r)`` blocks.

    The cropped columns of ``G``'s last block must be zero.
    """
    if u.dtype != grad_blocks.dtype:
        u, v = u.to(grad_blocks.dtype), v.to(grad_blocks.dtype)
    return torch.bmm(v.unsqueeze(1), grad_blocks).squeeze(1), torch.bmm(grad_blocks, u.unsqueeze(2)).squeeze(2)


def _padded(shape: KhatriRaoShape, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """An ``(m, r2, r)`` buffer whose cropped columns are zero, and its ``(m, M)`` part to fill."""
    buffer = torch.empty(shape.m, shape.r2 * shape.r, dtype=dtype, device=device)
    if not shape.blocks[1]:
        return buffer.view(shape.m, shape.r2, shape.r), buffer
    buffer[:, shape.M :].zero_()
    return buffer.view(shape.m, shape.r2, shape.r), buffer[:, : shape.M]


def factor_grads(
    grad_rows: torch.Tensor, u: torch.Tensor, v: torch.Tensor, shape: KhatriRaoShape
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``U`` and ``V`` from the gradient of the cropped update ``K[:, :M]`` (m x M, any strides)."""
    if not shape.blocks[1]:
        return _contract(_blocks(grad_rows, shape)[0], u, v)
    blocks, view = _padded(shape, grad_rows.dtype, grad_rows.device)
    view.copy_(grad_rows)
    return _contract(blocks, u, v)


class _DeltaWeightFunction(torch.autograd.Function):
    """``dW`` from :func:`write_update` with the gradients of :func:`factor_grads`."""

    @staticmethod
    def forward(ctx, u, v, shape: KhatriRaoShape):
        ctx.save_for_backward(u, v)
        ctx.shape = shape
        return write_update(u, v, shape)

    @staticmethod
    def backward(ctx, grad):
        u, v = ctx.saved_tensors
        grad_u, grad_v = factor_grads(_k_view(grad, ctx.shape), u, v, ctx.shape)
        return grad_u, grad_v, None


def delta_weight(u: torch.Tensor, v: torch.Tensor, shape: KhatriRaoShape) -> torch.Tensor:
    """The update ``dW`` of shape ``(out_features, in_features)``; differentiable (saves only ``U`` and ``V``)."""
    _check_factors(u, v, shape)
    return _DeltaWeightFunction.apply(u, v, shape)


def _scaled_grad_blocks(
    grad_out2: torch.Tensor, x2: torch.Tensor, shape: KhatriRaoShape, scaling: float, dtype: torch.dtype
) -> torch.Tensor:
    """``scaling * G`` as ``(m, r2, r)`` blocks: ``G = g^T x``, the gradient of ``K``, summed over tokens in ``dtype``.

    The matmul writes straight into a buffer whose cropped columns are zero (no padded copy) and applies the
    scaling as its ``alpha``. Half-precision inputs keep their fast matmul and return float32 on CUDA
    (``out_dtype``); elsewhere they are upcast first (CPUs without native half matmuls run float32 tens of times
    faster, and float32 accumulation is what the factors' optimiser needs).
    """
    a, b = (x2.T, grad_out2) if shape.transposed else (grad_out2.T, x2)
    blocks, view = _padded(shape, dtype, a.device)
    if a.dtype == dtype:
        torch.addmm(view, a, b, beta=0, alpha=scaling, out=view)
    elif a.is_cuda and dtype == torch.float32:
        _half_product_into(view, a, b, scaling)
    else:
        torch.addmm(view, a.to(dtype), b.to(dtype), beta=0, alpha=scaling, out=view)
    return blocks


# Whether this torch runs ``addmm(..., out_dtype=float32)`` on half CUDA inputs; learnt on first use.
CUDA_HALF_ADDMM_OUT_DTYPE: list[bool] = []


def _half_product_into(view: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
    """``view = scaling * a @ b`` for half CUDA inputs, accumulated and stored in float32.

    Torch builds without the ``out_dtype`` matmul fall back to a half-precision product stored in float32.
    """
    if not CUDA_HALF_ADDMM_OUT_DTYPE or CUDA_HALF_ADDMM_OUT_DTYPE[0]:
        try:
            torch.addmm(view, a, b, out_dtype=view.dtype, beta=0, alpha=scaling, out=view)
            CUDA_HALF_ADDMM_OUT_DTYPE[:] = [True]
            return
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, NotImplementedError):
            CUDA_HALF_ADDMM_OUT_DTYPE[:] = [False]
    torch.mul(a @ b, scaling, out=view)


class KhatriRaoLinearFunction(torch.autograd.Function):
    """``y = x @ (W + s * dW)^T + b`` (or ``s * x @ dW^T`` without ``W``) saving only ``x, U, V``.

    ``W`` is the caller's frozen weight in ``(out, in)`` layout (a view is fine); saving it costs nothing.
    The update is rebuilt in backward, so no weight-sized tensor lives between forward and backward.
    Cost per step: one matmul forward; in backward one for ``grad_x`` and one for ``G = g^T x`` (``U``, ``V``).
    """

    @staticmethod
    def forward(ctx, x, u, v, weight, bias, shape: KhatriRaoShape, scaling: float):
        merged = write_update(u, v, shape, scaling, weight, x.dtype)
        ctx.save_for_backward(x, u, v, weight)
        ctx.shape, ctx.scaling, ctx.has_bias = shape, scaling, bias is not None
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, u, v, weight = ctx.saved_tensors
        shape: KhatriRaoShape = ctx.shape
        need_x, need_u, need_v, need_w, need_b = ctx.needs_input_grad[:5]
        grad_x = grad_u = grad_v = grad_w = grad_b = None
        if grad_out.dtype != x.dtype:
            grad_out = grad_out.to(x.dtype)
        if need_x:
            grad_x = grad_out @ write_update(u, v, shape, ctx.scaling, weight, x.dtype)
        g2 = grad_out.reshape(-1, shape.out_features)
        x2 = x.reshape(-1, shape.in_features)
        if need_u or need_v:
            grad_u, grad_v = _contract(_scaled_grad_blocks(g2, x2, shape, ctx.scaling, u.dtype), u, v)
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


# -- convolutions: the same update, seen as a weight of shape (out_channels, in_channels / groups, *kernel) ---------


@dataclass(frozen=True)
class ConvGeometry:
    """How a convolution applies its weight, with explicit integer padding (``"same"`` or a non-zero padding mode
    is applied to the input beforehand by the caller).

    The update of a convolution is the ``(out_channels, in_channels / groups * prod(kernel))`` matrix that the weight
    is a reshape of, as PEFT's LoHa and LoKr use: a Khatri-Rao update of that matrix shape, viewed as the weight.
    """

    weight_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int = 1

    def __post_init__(self) -> None:
        dims = len(self.weight_shape) - 2
        if dims not in (1, 2, 3):
            raise ValueError(f"a convolution weight has 3 to 5 dimensions, got shape {self.weight_shape}")
        for name in ("stride", "padding", "dilation"):
            if len(getattr(self, name)) != dims:
                raise ValueError(f"{name} {getattr(self, name)} does not match a {dims}-d convolution")

    @property
    def dims(self) -> int:
        return len(self.weight_shape) - 2

    @property
    def update_shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the update matrix."""
        return self.weight_shape[0], math.prod(self.weight_shape[1:])

    @property
    def in_channels(self) -> int:
        return self.weight_shape[1] * self.groups

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution with ``weight`` (either the weight's shape or the update's ``(out, in)`` matrix)."""
        op = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        return op(x, weight.reshape(self.weight_shape), bias, self.stride, self.padding, self.dilation, self.groups)


class KhatriRaoConvFunction(torch.autograd.Function):
    """``y = conv(x, W + s * dW) + b`` (or ``conv(x, s * dW)`` without ``W``) saving only ``x, U, V`` and ``W``.

    The convolution counterpart of :class:`KhatriRaoLinearFunction`: the update is written by :func:`write_update`
    as the weight's ``(out, in / groups * prod(kernel))`` matrix, and rebuilt in backward, where one
    ``convolution_backward`` gives the input's gradient and the gradient of the whole weight, from which
    :func:`factor_grads` takes those of ``U`` and ``V``.
    """

    @staticmethod
    def forward(ctx, x, u, v, weight, bias, shape: KhatriRaoShape, scaling: float, geometry: ConvGeometry):
        merged = _conv_weight(u, v, shape, scaling, weight, x.dtype, geometry)
        ctx.save_for_backward(x, u, v, weight)
        ctx.shape, ctx.scaling, ctx.geometry, ctx.has_bias = shape, scaling, geometry, bias is not None
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return geometry.conv(x, merged, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, u, v, weight = ctx.saved_tensors
        shape: KhatriRaoShape = ctx.shape
        geometry: ConvGeometry = ctx.geometry
        need_x, need_u, need_v, need_w, need_b = ctx.needs_input_grad[:5]
        if grad_out.dtype != x.dtype:
            grad_out = grad_out.to(x.dtype)
        merged = _conv_weight(u, v, shape, ctx.scaling, weight, x.dtype, geometry)
        need_weight_grad = need_u or need_v or need_w
        grad_x, grad_weight, grad_b = torch.ops.aten.convolution_backward(
            grad_out,
            x,
            merged,
            [geometry.weight_shape[0]] if ctx.has_bias else None,
            list(geometry.stride),
            list(geometry.padding),
            list(geometry.dilation),
            False,
            [0] * geometry.dims,
            geometry.groups,
            [need_x, need_weight_grad, need_b and ctx.has_bias],
        )
        grad_u = grad_v = grad_w = None
        if need_u or need_v:
            rows = grad_weight.reshape(shape.out_features, shape.in_features).to(u.dtype) * ctx.scaling
            grad_u, grad_v = factor_grads(_k_view(rows, shape), u, v, shape)
        if need_w:
            grad_w = grad_weight.to(weight.dtype)
        if not (need_b and ctx.has_bias):
            grad_b = None
        return grad_x if need_x else None, grad_u, grad_v, grad_w, grad_b, None, None, None


def _conv_weight(u, v, shape, scaling, weight, dtype, geometry):
    """``W + s * dW`` (or ``s * dW``) in the convolution weight's shape."""
    base = None if weight is None else weight.reshape(shape.out_features, shape.in_features)
    return write_update(u, v, shape, scaling, base, dtype).reshape(geometry.weight_shape)


def khatri_rao_conv(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    shape: KhatriRaoShape,
    scaling: float,
    geometry: ConvGeometry,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply ``x -> conv(x, W + scaling * dW) + b`` for a convolution of ``geometry``; without ``weight`` only the
    adapter term. ``shape`` must be the update matrix's shape, ``geometry.update_shape``."""
    _check_factors(u, v, shape)
    if (shape.out_features, shape.in_features) != geometry.update_shape:
        raise ValueError(
            f"a KRAdapter update of shape {(shape.out_features, shape.in_features)} does not fit a convolution weight "
            f"of shape {geometry.weight_shape} (needs {geometry.update_shape})"
        )
    if x.dim() < geometry.dims + 1 or x.shape[-geometry.dims - 1] != geometry.in_channels:
        raise ValueError(
            f"input of shape {tuple(x.shape)} does not have the {geometry.in_channels} channels the convolution expects"
        )
    if weight is not None and tuple(weight.shape) != geometry.weight_shape:
        raise ValueError(f"base weight has shape {tuple(weight.shape)}, expected {geometry.weight_shape}")
    return KhatriRaoConvFunction.apply(x, u, v, weight, bias, shape, float(scaling), geometry)


def delta_weight_traceable(u: torch.Tensor, v: torch.Tensor, shape: KhatriRaoShape) -> torch.Tensor:
    """``dW`` (unscaled, ``(out, in)``) from plain differentiable operations, for ``torch.compile``.

    Dynamo cannot trace the autograd functions above (they write into views with ``out=``); this form reads only
    the shape's plain fields, and the compiler fuses it into whatever consumes it. Same values as
    :func:`delta_weight`.
    """
    out_features, in_features = shape.out_features, shape.in_features
    rows = (v.unsqueeze(2) * u.unsqueeze(1)).reshape(u.shape[0], -1)[:, : max(out_features, in_features)]
    return rows.T if out_features > in_features else rows
