"""KRAdapter and SinLoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: the update is the weight seen as an
``(out_channels, in_channels / groups * prod(kernel))`` matrix, checked against float64 convolutions with an
independently built update, on a small CNN and a ViT-style patch embedding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn

from kradapter import KRAdapterConfig, SinLoRAConfig
from kradapter.khatri_rao import ConvGeometry, khatri_rao_conv
from kradapter.shape import KhatriRaoShape
from kradapter.tuners.base import DeltaLayer
from tests.support import reference_delta

# (id, conv factory, input spatial size): odd kernels, stride, padding (numbers, "same", reflect), dilation, groups
CONVS = [
    ("k3-s2-p1", lambda: nn.Conv2d(5, 7, 3, stride=2, padding=1), (9, 11)),
    ("k3x5-dil2", lambda: nn.Conv2d(3, 11, (3, 5), dilation=2, padding=(1, 2)), (10, 13)),
    ("k1x1-wide-out", lambda: nn.Conv2d(2, 13, 1), (4, 5)),
    ("same-reflect", lambda: nn.Conv2d(4, 6, 5, padding="same", padding_mode="reflect"), (7, 8)),
    ("groups3", lambda: nn.Conv2d(6, 9, 3, groups=3, padding=1), (6, 7)),
    ("depthwise", lambda: nn.Conv2d(4, 4, 3, groups=4, bias=False), (6, 6)),
    ("patch-embed-7", lambda: nn.Conv2d(3, 29, 7, stride=7), (21, 14)),
    ("conv1d-k5-s3", lambda: nn.Conv1d(6, 10, 5, stride=3, padding=2), (23,)),
    ("conv1d-groups2-circular", lambda: nn.Conv1d(4, 6, 3, groups=2, padding=1, padding_mode="circular"), (9,)),
    ("conv3d", lambda: nn.Conv3d(2, 5, 3, padding=1), (4, 5, 3)),
]
METHODS = {
    "kradapter": lambda **kw: KRAdapterConfig(target_modules=["conv"], init_weights=False, scaling=1.7, **kw),
    "sinlora": lambda **kw: SinLoRAConfig(
        target_modules=["conv"], init_weights=False, r=2, alpha=1.0, frequency=20.0, **kw
    ),
}


class Holder(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def adapted(factory, method: str, seed: int = 0, **kw) -> tuple[nn.Module, DeltaLayer]:
    torch.manual_seed(seed)
    model = get_peft_model(Holder(factory()), METHODS[method](**kw)).eval()
    return model, model.base_model.model.conv


def reference_update(layer: DeltaLayer, method: str) -> torch.Tensor:
    """The update in the weight's shape, in float64, built without the package's update code."""
    weight = layer.get_base_layer().weight
    out_features, in_features = weight.shape[0], math.prod(weight.shape[1:])
    if method == "kradapter":
        u, v = (p["default"].detach().double().numpy() for p in (layer.kradapter_u, layer.kradapter_v))
        dw = torch.from_numpy(reference_delta(u, v, out_features, in_features)) * 1.7
    else:
        a, b = layer.sinlora_A["default"].detach().double(), layer.sinlora_B["default"].detach().double()
        dw = torch.sin(20.0 * b @ a) * (1.0 / 2 / math.sqrt(in_features))
    return dw.reshape(weight.shape)


def reference_conv(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv``'s own forward (its padding mode included) in float64 with another weight."""
    bias = None if conv.bias is None else conv.bias.detach().double()
    return conv._conv_forward(x.double(), weight, bias)


def inputs(size: tuple[int, ...], conv: nn.Module, generator: torch.Generator, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, conv.in_channels, *size, generator=generator)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("factory", "size"), [pytest.param(f, s, id=i) for i, f, s in CONVS])
def test_forward_matches_float64_reference(factory, size, method, generator):
    for execution in ("fused", "separate") if method == "kradapter" else (None,):
        kw = {"execution": execution} if execution else {}
        _, layer = adapted(factory, method, **kw)
        conv = layer.get_base_layer()
        x = inputs(size, conv, generator)
        want = reference_conv(conv, x, conv.weight.detach().double() + reference_update(layer, method))
        torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            layer.get_delta_weight("default").double().reshape(conv.weight.shape), reference_update(layer, method)
        )


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("factory", "size"), [pytest.param(f, s, id=i) for i, f, s in CONVS])
def test_merge_unmerge_and_save(factory, size, method, generator, tmp_path):
    model, layer = adapted(factory, method)
    conv = layer.get_base_layer()
    x = inputs(size, conv, generator)
    with torch.no_grad():
        want = model(x)
        w0 = conv.weight.detach().clone()
        model.merge_adapter()
        torch.testing.assert_close(conv.weight.double(), w0.double() + reference_update(layer, method))
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(conv.weight, w0, rtol=0, atol=1e-6)
        model.save_pretrained(tmp_path)
        torch.manual_seed(0)
        again = PeftModel.from_pretrained(Holder(factory()), tmp_path).eval()
        torch.testing.assert_close(again(x), want, rtol=0, atol=0)
        plain = again.merge_and_unload()
        assert type(plain.conv) is type(conv)
        torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("factory", "size"), [pytest.param(f, s, id=i) for i, f, s in CONVS[:3] + CONVS[4:9]])
def test_gradients_match_autograd_of_the_reference(factory, size, method, generator):
    model, layer = adapted(factory, method)
    model.train()
    conv = layer.get_base_layer()
    x = inputs(size, conv, generator)
    g = torch.randn_like(layer(x), dtype=torch.float64)
    (layer(x).double() * g).sum().backward()
    names = layer.adapter_layer_names
    got = [getattr(layer, n)["default"].grad.double() for n in names]
    factors = [getattr(layer, n)["default"].detach().double().requires_grad_(True) for n in names]
    weight = conv.weight.detach().double()
    out_features, in_features = weight.shape[0], math.prod(weight.shape[1:])
    if method == "kradapter":
        u, v = factors
        shape = KhatriRaoShape(out_features, in_features)
        rows = (v.unsqueeze(2) * u.unsqueeze(1)).reshape(shape.m, -1)[:, : shape.M]  # row i = kron(V[i], U[i])
        dw = (rows.T if shape.transposed else rows) * 1.7
    else:
        a, b = factors
        dw = torch.sin(20.0 * b @ a) / 2 / math.sqrt(in_features)
    (reference_conv(conv, x, weight + dw.reshape(weight.shape)) * g).sum().backward()
    for mine, ref in zip(got, factors, strict=True):
        torch.testing.assert_close(mine, ref.grad, rtol=1e-4, atol=1e-5)


def test_memory_lean_training_saves_no_weight_sized_tensor(generator):
    """The fused conv path keeps only x, U, V and the frozen weight itself between forward and backward."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    model = get_peft_model(Holder(conv), KRAdapterConfig(target_modules=["conv"], init_weights=False))
    model.train()
    layer = model.base_model.model.conv
    assert layer.fuses("default")
    x = inputs((8, 8), conv, generator)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    u, v = layer.kradapter_u["default"], layer.kradapter_v["default"]
    weight_sized = [t for t in saved if t.numel() >= conv.weight.numel() and t.data_ptr() != conv.weight.data_ptr()]
    assert all(t.data_ptr() == x.data_ptr() for t in weight_sized), [tuple(t.shape) for t in weight_sized]
    assert any(t.data_ptr() == u.data_ptr() for t in saved) and any(t.data_ptr() == v.data_ptr() for t in saved)
    out.sum().backward()
    assert u.grad is not None and v.grad is not None and conv.weight.grad is None


def test_small_cnn_and_patch_embedding_train(generator):
    """A CNN with a ViT-style patch embedding (kernel = stride = 5) learns a task through its conv adapters."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 12, 5, stride=5)
            self.mix = nn.Conv2d(12, 12, 3, padding=1, groups=3)
            self.head = nn.Linear(12, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.mix(torch.relu(self.patch(x)))).mean((2, 3)))

    torch.manual_seed(0)
    model = get_peft_model(
        Net(), KRAdapterConfig(target_modules=["patch", "mix"], modules_to_save=["head"], dropout=0.1)
    )
    x = torch.randn(16, 3, 15, 15, generator=generator)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])
    assert type(model.base_model.model.patch).__name__ == "Conv"


def test_geometry_errors_are_named(generator):
    geometry = ConvGeometry((4, 2, 3, 3), (1, 1), (0, 0), (1, 1), groups=1)
    shape = KhatriRaoShape(4, 18)
    u, v = torch.zeros(shape.u_shape), torch.zeros(shape.v_shape)
    with pytest.raises(ValueError, match="does not have the 2 channels"):
        khatri_rao_conv(torch.randn(1, 3, 5, 5, generator=generator), u, v, shape, 1.0, geometry)
    with pytest.raises(ValueError, match=r"\(4, 17\)"):
        small = KhatriRaoShape(4, 17)
        khatri_rao_conv(
            torch.randn(1, 2, 5, 5), torch.zeros(small.u_shape), torch.zeros(small.v_shape), small, 1, geometry
        )
    with pytest.raises(ValueError, match="stride"):
        ConvGeometry((4, 2, 3, 3), (1,), (0, 0), (1, 1))


@pytest.mark.parametrize("method", list(METHODS))
def test_transposed_convolution_is_refused_by_name(method):
    model = Holder(nn.ConvTranspose2d(3, 4, 3))
    with pytest.raises(TypeError, match="'conv' of type ConvTranspose2d"):
        get_peft_model(model, METHODS[method]())
