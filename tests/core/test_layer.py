"""The standalone KRAdapterLinear: the published layer, fixed at every shape."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kradapter import KRAdapterLinear
from kradapter.khatri_rao import KhatriRaoShape
from tests.support import reference_delta

SHAPES = [(1024, 768), (768, 1024), (130, 72), (72, 130), (97, 389), (1000, 768)]


def make(in_features: int, out_features: int, **kwargs) -> KRAdapterLinear:
    layer = KRAdapterLinear(nn.Linear(in_features, out_features), init_zero=False, **kwargs)
    return layer


def test_readme_example():
    layer = KRAdapterLinear(nn.Linear(1024, 768), scaling=2.0)
    assert layer.delta_weight().shape == (768, 1024)
    assert layer.num_params == KhatriRaoShape(768, 1024).num_params
    assert not any(p.requires_grad for p in layer.base_layer.parameters())


@pytest.mark.parametrize(("in_features", "out_features"), SHAPES)
@pytest.mark.parametrize("path", ["fused", "separate", "auto"])
def test_forward_matches_reference(in_features, out_features, path, generator):
    layer = make(in_features, out_features, path=path)
    x = torch.randn(2, 3, in_features, generator=generator)
    dw = torch.from_numpy(
        reference_delta(
            layer.kr_u.double().detach().numpy(), layer.kr_v.double().detach().numpy(), out_features, in_features
        )
    )
    base = layer.base_layer
    want = x.double() @ (base.weight.double() + 2.0 * dw).T + base.bias.double()
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("in_features", "out_features"), SHAPES)
def test_merge_unmerge(in_features, out_features, generator):
    layer = make(in_features, out_features)
    x = torch.randn(4, in_features, generator=generator)
    before = layer(x)
    weight0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    assert not torch.equal(layer.base_layer.weight, weight0)
    layer.unmerge()
    rel = (layer.base_layer.weight - weight0).norm() / weight0.norm()
    assert rel < 1e-6
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_merge_refuses_non_finite():
    layer = make(20, 10)
    with torch.no_grad():
        layer.kr_u[0, 0] = math.inf
    weight0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, weight0) and not layer.merged


def test_loads_published_state_dict(generator):
    """Weights are interchangeable with the authors' layer: ``weight`` is U (m x r), ``v_weight`` is V (m x r2)."""
    base = nn.Linear(1024, 768)
    s = KhatriRaoShape(768, 1024)
    published = {
        "weight": torch.randn(s.u_shape, generator=generator),
        "v_weight": torch.randn(s.v_shape, generator=generator),
        "original_layer.weight": base.weight.detach().clone(),
        "original_layer.bias": base.bias.detach().clone(),
    }
    layer = KRAdapterLinear(nn.Linear(1024, 768))
    layer.load_published_state_dict(published)
    # The published forward: x @ update * s + base(x), with update = the crop of kron rows, transposed to (in, out).
    want = reference_delta(published["weight"].double().numpy(), published["v_weight"].double().numpy(), 768, 1024)
    torch.testing.assert_close(layer.delta_weight().double(), torch.from_numpy(want))


def test_training_lowers_loss(generator):
    layer = make(37, 23)
    target = nn.Linear(37, 23)
    opt = torch.optim.AdamW([layer.kr_u, layer.kr_v], lr=1e-2)
    x = torch.randn(64, 37, generator=generator)
    losses = []
    for _ in range(30):
        loss = (layer(x) - target(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]
    assert layer.base_layer.weight.grad is None


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="Conv2d"):
        KRAdapterLinear(nn.Conv2d(3, 3, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nan"):
        KRAdapterLinear(nn.Linear(4, 4), scaling=float("nan"))
    with pytest.raises(ValueError, match="'fast'"):
        KRAdapterLinear(nn.Linear(4, 4), path="fast")


@pytest.mark.parametrize("merge_first", [False, True])
@pytest.mark.parametrize(("d", "k"), [(13, 29), (29, 13), (64, 100)])
def test_state_dict_round_trip_merged_or_not(generator, merge_first, d, k) -> None:
    """A merged layer's state dict loaded into a fresh layer gives the same outputs (the update applied once) and
    unmerges back to the base weight; so does an unmerged one."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)))
    layer = KRAdapterLinear(nn.Linear(k, d), scaling=1.7, init_zero=False)
    base = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, k, generator=generator)
    want = (x.double() @ (base.double() + 1.7 * layer.delta_weight().double()).T) + layer.base_layer.bias.double()
    if merge_first:
        layer.merge()
    fresh = KRAdapterLinear(nn.Linear(k, d), scaling=1.7)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.merged is merge_first
    torch.testing.assert_close(fresh(x).double(), want, rtol=1e-5, atol=1e-5)
    fresh.unmerge()
    torch.testing.assert_close(fresh.base_layer.weight, base, rtol=1e-6, atol=1e-6)


def test_state_dict_without_merge_flag_loads_as_unmerged() -> None:
    layer = KRAdapterLinear(nn.Linear(7, 5), init_zero=False)
    old = {k: v for k, v in layer.state_dict().items() if k != "merged_flag"}
    fresh = KRAdapterLinear(nn.Linear(7, 5))
    fresh.load_state_dict(old)
    assert not fresh.merged
