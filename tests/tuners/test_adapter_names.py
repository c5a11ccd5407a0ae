"""Per-sample adapters in one batch, ``model(x, adapter_names=[...])``, as PEFT's LoRA takes them: each sample's
output equals a pass of that sample with its adapter alone (``"__base__"``: with adapters disabled)."""

from __future__ import annotations

import re

import pytest
import torch
from peft import get_peft_model
from torch import nn

from kradapter import KRAdapterConfig, SinLoRAConfig
from tests import support

METHODS = {
    "kradapter": lambda seed, **kw: KRAdapterConfig(init_weights=False, scaling=1.0 + seed, **kw),
    "sinlora": lambda seed, **kw: SinLoRAConfig(init_weights=False, r=2, alpha=1.0 + seed, frequency=10.0, **kw),
}
NAMES = ["a", "b", "c"]


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.lin = nn.Linear(5 * 3 * 4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin(torch.relu(self.conv(x)).flatten(1))))


def gpt2():
    return support.tiny_gpt2()


# (id, model factory, targets of each adapter, input maker): adapters on partly different layers
MODELS = [
    ("linear", ConvNet, [["lin"], ["lin", "head"], ["head"]], lambda g, n: torch.randn(n, 3, 6, 7, generator=g)),
    ("conv2d", ConvNet, [["conv"], ["conv", "lin"], ["conv"]], lambda g, n: torch.randn(n, 3, 6, 7, generator=g)),
    ("gpt2-conv1D", gpt2, [["c_attn"], ["c_attn", "c_fc"], ["c_proj"]], lambda g, n: torch.randint(0, 50, (n, 5))),
]


def build(method: str, factory, targets: list[list[str]], modules_to_save: list[str] | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = None
    for seed, (name, target) in enumerate(zip(NAMES, targets, strict=True)):
        config = METHODS[method](seed, target_modules=target, modules_to_save=modules_to_save)
        if model is None:
            model = get_peft_model(factory(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model.eval()


def output(model: nn.Module, x: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = model(x, **kw)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("factory", "targets", "make"), [pytest.param(*m[1:], id=m[0]) for m in MODELS])
def test_each_sample_gets_its_adapter(method, factory, targets, make, generator):
    model = build(method, factory, targets)
    x = make(generator, 7)
    names = ["b", "__base__", "a", "c", "b", "a", "__base__"]
    mixed = output(model, x, adapter_names=names)
    for name in set(names):
        rows = [i for i, n in enumerate(names) if n == name]
        if name == "__base__":
            with model.disable_adapter():
                want = output(model, x[rows])
        else:
            model.set_adapter(name)
            want = output(model, x[rows])
        torch.testing.assert_close(mixed[rows], want, rtol=1e-5, atol=1e-6, msg=name)
    # the adapters really differ, so the check above tells them apart
    model.set_adapter("a")
    a_out = output(model, x)
    model.set_adapter("b")
    assert not torch.allclose(a_out, output(model, x))


@pytest.mark.parametrize("method", list(METHODS))
def test_modules_to_save_follow_the_sample(method, generator):
    model = build(method, ConvNet, [["lin"], ["conv"], ["lin"]], modules_to_save=["head"])
    for name in NAMES:  # give every adapter its own head
        torch.nn.init.normal_(model.base_model.model.head.modules_to_save[name].weight)
    x = torch.randn(4, 3, 6, 7, generator=generator)
    names = ["c", "a", "__base__", "b"]
    mixed = output(model, x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                want = output(model, x[i : i + 1])
        else:
            model.set_adapter(name)
            want = output(model, x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_errors_are_peft_loras(method, generator):
    model = build(method, ConvNet, [["lin"], ["conv"], ["lin"]])
    x = torch.randn(3, 3, 6, 7, generator=generator)
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter\\(s\\): nope, zzz"):
        model(x, adapter_names=["a", "zzz", "nope"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs"):
        model(x, adapter_names=["a", "b"])
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        model(x, adapter_names=["a", "b", "c"])
    model.eval()
    model.merge_adapter(["a"])
    msg = "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
    with pytest.raises(ValueError, match=re.escape(msg)):
        model(x, adapter_names=["a", "b", "c"])
    model.unmerge_adapter()
    assert output(model, x, adapter_names=["a", "b", "c"]).shape == (3, 2)
