"""Every execution path of KRAdapter computes the same numbers as an independent dense reference.

Paths: ``khatri_rao_linear`` fused with the base weight and as a separate term, the standalone layer's
``fused``/``separate``/``auto``, the PEFT tuner's ``execution`` choices, a merged layer, and the benchmarks'
re-implementation of the published layer. Each is checked on forward, gradients of the input and both
factors, on odd shapes (both orientations, crops and exact fits, both write strategies), in float32 and
bfloat16, on the CPU and on CUDA when there is one. The reference builds ``dW`` row by row with
``torch.kron`` in float64, independently of the library's blockwise code.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

import kradapter.khatri_rao as kr
from benchmarks.published_layer import PublishedKRAdapterLinear
from kradapter import KRAdapterConfig, KRAdapterLinear
from kradapter.khatri_rao import KhatriRaoShape, init_factors, khatri_rao_linear, write_update
from kradapter.tuners.kradapter import KRAdapterLayer

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
# (out, in): square, tall, wide, primes, crops (M not a multiple of r) and exact fits (M = r * r2).
SHAPES = [(1, 1), (7, 1), (1, 7), (5, 5), (13, 29), (29, 13), (48, 100), (100, 48), (72, 130), (130, 72), (97, 389)]
PATHS = ["fused", "separate", "layer-fused", "layer-separate", "layer-auto", "peft-auto", "peft-separate", "published"]


def reference_delta(u: torch.Tensor, v: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Row i of the raw update is kron(V[i], U[i]); crop to max(d, k); transpose when the input side is smaller."""
    big = max(out_features, in_features)
    rows = torch.stack([torch.kron(v[i], u[i])[:big] for i in range(u.shape[0])])
    return rows.T if out_features > in_features else rows


class Wrapped(nn.Module):
    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def run_path(path: str, base: nn.Linear, u: torch.Tensor, v: torch.Tensor, scaling: float):  # type: ignore[no-untyped-def]
    """A callable ``x -> y`` for ``path`` with factors ``u``, ``v`` and the frozen ``base``, and its (U, V)."""
    shape = KhatriRaoShape(base.out_features, base.in_features)
    if path in ("fused", "separate"):
        weight, bias = base.weight.detach(), base.bias.detach()
        if path == "fused":
            return (lambda x: khatri_rao_linear(x, u, v, shape, scaling, weight, bias)), (u, v)
        return (lambda x: F.linear(x, weight, bias) + khatri_rao_linear(x, u, v, shape, scaling)), (u, v)
    if path.startswith("layer-"):
        layer = KRAdapterLinear(copy.deepcopy(base), scaling=scaling, path=path.removeprefix("layer-"))
        with torch.no_grad():
            layer.kr_u.copy_(u)
            layer.kr_v.copy_(v)
        return layer, (layer.kr_u, layer.kr_v)
    if path.startswith("peft-"):
        execution = path.removeprefix("peft-")
        config = KRAdapterConfig(target_modules=["layer"], scaling=scaling, execution=execution)
        model = get_peft_model(Wrapped(copy.deepcopy(base)), config)
        layer = next(m for m in model.modules() if isinstance(m, KRAdapterLayer))
        with torch.no_grad():
            layer.kradapter_u["default"].copy_(u)
            layer.kradapter_v["default"].copy_(v)
        return model, (layer.kradapter_u["default"], layer.kradapter_v["default"])
    assert path == "published"
    published = PublishedKRAdapterLinear(copy.deepcopy(base), scaling=scaling).float()
    with torch.no_grad():
        published.weight.copy_(u)
        published.v_weight.copy_(v)
    return published, (published.weight, published.v_weight)


def make_case(shape, dtype, device, generator):  # type: ignore[no-untyped-def]
    d, k = shape
    s = KhatriRaoShape(d, k)
    base = nn.Linear(k, d)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, k, generator=generator))
        base.bias.copy_(torch.randn(d, generator=generator))
    u = torch.randn(s.u_shape, generator=generator)
    v = torch.randn(s.v_shape, generator=generator)
    x = torch.randn(3, 4, k, generator=generator)
    g = torch.randn(3, 4, d, generator=generator)
    return base.to(device, dtype), u.to(device), v.to(device), x.to(device, dtype), g.to(device, dtype)


def reference(base: nn.Linear, u, v, x, g, scaling, magnitude: bool = False):  # type: ignore[no-untyped-def]
    """Output and gradients (x, U, V) of the dense float64 computation, by plain autograd.

    With ``magnitude=True`` every input is replaced by its absolute value: each result is then the sum of the
    absolute values of the terms that make it up, the scale that rounding errors are proportional to.
    """
    prep = torch.abs if magnitude else (lambda t: t)
    u64, v64, x64 = (prep(t.detach().double().cpu()).requires_grad_() for t in (u, v, x))
    w, b = (prep(t.detach().double().cpu()) for t in (base.weight, base.bias))
    y = x64 @ (w + scaling * reference_delta(u64, v64, base.out_features, base.in_features)).T + b
    (y * prep(g.double().cpu())).sum().backward()
    return y.detach(), x64.grad, u64.grad, v64.grad


def assert_close(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, rel: float, what: str) -> None:
    """Max error relative to the largest entry of ``scale`` (the sum of the terms' magnitudes, or ``|want|``)."""
    got = got.detach().double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - want).abs().max().item() / (scale.abs().max().item() + 1e-30)
    assert err <= rel, f"{what}: relative error {err:.2e} > {rel:.0e}"


def check_path(path, base, u, v, x, g, scaling, rel):  # type: ignore[no-untyped-def]
    """Run ``path`` forward and backward and compare output and gradients with the float64 reference."""
    want = reference(base, u, v, x, g, scaling)
    scale = reference(base, u, v, x, g, scaling, magnitude=True)
    fn, (pu, pv) = run_path(path, base, u.clone().requires_grad_(), v.clone().requires_grad_(), scaling)
    x = x.clone().requires_grad_()
    y = fn(x)
    (y * g).sum().backward()
    names = ("forward", "grad x", "grad U", "grad V")
    for name, got, w, sc in zip(names, (y, x.grad, pu.grad, pv.grad), want, scale, strict=True):
        assert_close(got, w, sc, rel, f"{path} {name}")
    return y, x.grad, pu.grad, pv.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_float32(shape, path, device, generator):
    base, u, v, x, g = make_case(shape, torch.float32, device, generator)
    check_path(path, base, u, v, x, g, 1.7, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["fused", "separate", "layer-auto", "peft-auto", "peft-separate"])
@pytest.mark.parametrize("shape", [(29, 13), (72, 130), (130, 72), (97, 389)])
def test_bfloat16_base_with_float32_factors(shape, path, device, generator):
    """A half-precision model with float32 factors (what PEFT's autocast gives): bf16 accuracy, float32 grads."""
    base, u, v, x, g = make_case(shape, torch.bfloat16, device, generator)
    y, grad_x, grad_u, grad_v = check_path(path, base, u, v, x, g, 0.9, 1e-2)
    assert y.dtype == grad_x.dtype == torch.bfloat16
    assert grad_u.dtype == grad_v.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_merged_layer_matches_reference(shape, device, generator):
    base, u, v, x, g = make_case(shape, torch.float32, device, generator)
    want, scale = reference(base, u, v, x, g, 2.0)[0], reference(base, u, v, x, g, 2.0, magnitude=True)[0]
    layer, _ = run_path("layer-auto", base, u, v, 2.0)
    layer.merge()
    with torch.no_grad():
        assert_close(layer(x), want, scale, 1e-5, "merged forward")


@pytest.mark.parametrize("blockwise", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_both_write_strategies_equal_the_reference(shape, blockwise, generator, monkeypatch):
    """The blockwise and the padded writer of ``W + s * dW`` (and of ``s * dW``) agree with the reference."""
    for name in ("BLOCKWISE_MIN_NUMEL", "BLOCKWISE_MIN_NUMEL_TRANSPOSED"):
        monkeypatch.setattr(kr, name, 0 if blockwise else 1 << 62)
    d, k = shape
    s = KhatriRaoShape(d, k)
    u, v = torch.randn(s.u_shape, generator=generator), torch.randn(s.v_shape, generator=generator)
    w = torch.randn(d, k, generator=generator)
    dw = reference_delta(u.double(), v.double(), d, k)
    scale = w.double().abs() + 1.3 * reference_delta(u.double().abs(), v.double().abs(), d, k)
    assert_close(write_update(u, v, s, 1.3, w), w.double() + 1.3 * dw, scale, 1e-6, "W + s dW")
    assert_close(write_update(u, v, s, 1.3), 1.3 * dw, scale, 1e-6, "s dW")
    assert_close(write_update(u, v, s, 1.0, w.T.contiguous().T), w.double() + dw, scale, 1e-6, "strided base")
    half = write_update(u, v, s, 1.3, w.bfloat16(), torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert_close(half, w.bfloat16().double() + 1.3 * dw, scale, 2**-8, "bf16 W + s dW (one rounding)")


def test_factor_grads_half_inputs_contract_in_float32(generator):
    """bf16 activations: the factor gradient is accumulated in the factors' float32, not rounded to bf16."""
    s = KhatriRaoShape(40, 90)
    u = torch.randn(s.u_shape, generator=generator, requires_grad=True)
    v = torch.randn(s.v_shape, generator=generator, requires_grad=True)
    x = torch.randn(64, 90, generator=generator).bfloat16()
    g = torch.randn(64, 40, generator=generator).bfloat16()
    khatri_rao_linear(x, u, v, s, 1.0).backward(g)
    u64, v64 = u.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    (x.double() @ reference_delta(u64, v64, 40, 90).T).backward(g.double())
    # exact products of bf16 values summed in float32: far inside bf16's 4e-3
    assert_close(u.grad, u64.grad, u64.grad, 1e-5, "grad U")
    assert_close(v.grad, v64.grad, v64.grad, 1e-5, "grad V")


class DoublingLinear(nn.Linear):
    """A subclass: fusing would skip its own forward, so ``auto`` must not fuse it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_auto_rule():
    """``auto`` fuses exactly when fusing computes what running the base layer would."""
    assert KRAdapterLinear(nn.Linear(6, 4)).execution_path() == "fused"
    assert KRAdapterLinear(DoublingLinear(6, 4)).execution_path() == "separate"
    assert KRAdapterLinear(nn.Linear(6, 4), path="separate").execution_path() == "separate"
    hooked = KRAdapterLinear(nn.Linear(6, 4))
    handle = hooked.base_layer.register_forward_hook(lambda mod, inp, out: out + 1)
    assert hooked.execution_path() == "separate"
    x = torch.randn(3, 6)
    torch.testing.assert_close(hooked(x), hooked.base_layer(x) + hooked.scaling * x @ hooked.delta_weight().T)
    handle.remove()
    assert hooked.execution_path() == "fused"
    model = get_peft_model(Wrapped(nn.Linear(6, 4)), KRAdapterConfig(target_modules=["layer"], dropout=0.1))
    layer = next(m for m in model.modules() if isinstance(m, KRAdapterLayer))
    assert not layer.fuses("default")  # dropout in training: the adapter's input differs from the base's
    model.eval()
    assert layer.fuses("default")


def test_auto_rule_per_input():
    """Half precision on the CPU with few tokens runs the separate path; float32 and many tokens fuse."""
    small, tall, large = (KRAdapterLinear(nn.Linear(k, d)) for k, d in ((96, 40), (40, 96), (1024, 1024)))
    for layer, crossover in ((small, 256), (tall, 1024), (large, 2048)):
        k = layer.shape.in_features
        assert layer.execution_path(torch.randn(3, 7, k)) == "fused"
        for dtype in (torch.bfloat16, torch.float16):
            assert layer.execution_path(torch.randn(crossover - 1, k, dtype=dtype)) == "separate"
            assert layer.execution_path(torch.randn(2, crossover // 2, k, dtype=dtype)) == "fused"
    model = get_peft_model(Wrapped(nn.Linear(96, 40)), KRAdapterConfig(target_modules=["layer"]))
    layer = next(m for m in model.modules() if isinstance(m, KRAdapterLayer))
    assert layer.fuses("default", torch.randn(5, 96)) and not layer.fuses("default", torch.randn(5, 96).bfloat16())
    layer.kradapter_execution["default"] = "fused"  # asked for explicitly: fused whatever the input
    assert layer.fuses("default", torch.randn(5, 96).bfloat16())


def test_peft_paths_agree_on_a_training_step(tiny_bert, generator):
    """Two SGD steps on a small BERT reach the same factors through the fused and the separate paths.

    (SGD, not Adam: Adam's normalisation turns rounding in near-zero gradients into full-size steps.)
    """
    ids = torch.randint(0, 97, (2, 9), generator=generator)
    factors = {}
    for execution in ("fused", "separate"):
        config = KRAdapterConfig(target_modules=["query", "value", "dense"], execution=execution, init_weights=False)
        model = get_peft_model(tiny_bert(seed=3), config).eval()  # eval: no dropout, the steps are deterministic
        torch.manual_seed(0)
        for layer in model.modules():
            if isinstance(layer, KRAdapterLayer):
                init_factors(layer.kradapter_u["default"], layer.kradapter_v["default"], zero_update=False)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
            opt.step()
        factors[execution] = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(factors["fused"], factors["separate"], rtol=1e-4, atol=1e-5)
