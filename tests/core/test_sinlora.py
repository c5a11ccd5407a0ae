"""SinLoRA: the published definition, and the same PEFT life cycle as KRAdapter."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel, get_peft_model

from kradapter import SinLoRAConfig, sinlora_delta
from kradapter.tuners.sinlora import SinLoRALayer


@pytest.mark.parametrize(("out_features", "in_features", "r"), [(13, 29, 3), (29, 13, 1), (72, 130, 8)])
def test_delta_matches_definition(out_features, in_features, r, generator):
    a = torch.randn(r, in_features, generator=generator, dtype=torch.float64)
    b = torch.randn(out_features, r, generator=generator, dtype=torch.float64)
    got = sinlora_delta(a, b, frequency=30.0, alpha=16.0)
    want = torch.tensor(
        [
            [math.sin(30.0 * sum(b[i, j].item() * a[j, c].item() for j in range(r))) for c in range(in_features)]
            for i in range(out_features)
        ],
        dtype=torch.float64,
    ) * (16.0 / r / math.sqrt(in_features))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("out_features", "in_features", "r"), [(13, 29, 3), (31, 7, 2)])
def test_gradients_match_autograd_of_the_definition(out_features, in_features, r, generator):
    a = torch.randn(r, in_features, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_features, r, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: sinlora_delta(a, b, frequency=3.0, alpha=5.0), (a, b))
    (sinlora_delta(a, b, frequency=20.0, alpha=4.0) * weight).sum().backward()
    got = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    plain = torch.sin(20.0 * (b @ a)) * (4.0 / r / math.sqrt(in_features))
    (plain * weight).sum().backward()
    torch.testing.assert_close(got, (a.grad, b.grad))


def test_peft_life_cycle(tiny_bert, generator, tmp_path):
    config = SinLoRAConfig(target_modules=["query", "intermediate.dense"], r=4, alpha=8, frequency=50)
    model = get_peft_model(tiny_bert(), config)
    x = torch.randint(0, 97, (2, 9), generator=generator)
    with torch.no_grad():
        base = tiny_bert()(input_ids=x).last_hidden_state
        torch.testing.assert_close(model(input_ids=x).last_hidden_state, base)  # B = 0: exact no-op at start
    layers = [m for m in model.modules() if isinstance(m, SinLoRALayer)]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        4 * (m.in_features + m.out_features) for m in layers
    )
    for m in layers:  # move away from the no-op start
        torch.nn.init.normal_(m.sinlora_B["default"])
    layer = layers[0]
    xi = torch.randn(3, layer.in_features, generator=generator)
    base_layer = layer.get_base_layer()
    want = xi @ (base_layer.weight + layer.get_delta_weight("default")).T + base_layer.bias
    torch.testing.assert_close(layer(xi), want, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        out = model(input_ids=x).last_hidden_state
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).last_hidden_state, out, rtol=0, atol=0)
        weights = [m.get_base_layer().weight.clone() for m in again.modules() if isinstance(m, SinLoRALayer)]
        again.merge_adapter()
        torch.testing.assert_close(again(input_ids=x).last_hidden_state, out, rtol=1e-5, atol=1e-5)
        again.unmerge_adapter()
        for w0, m in zip(weights, [m for m in again.modules() if isinstance(m, SinLoRALayer)], strict=True):
            assert (m.get_base_layer().weight - w0).norm() / w0.norm() < 1e-6
        plain = again.merge_and_unload()
        torch.testing.assert_close(plain(input_ids=x).last_hidden_state, out, rtol=1e-5, atol=1e-5)


def test_gradients_reach_both_factors(tiny_bert, generator):
    model = get_peft_model(tiny_bert(), SinLoRAConfig(target_modules=["value"], r=2, init_weights=False))
    model.train()
    model(input_ids=torch.randint(0, 97, (2, 5), generator=generator)).last_hidden_state.pow(2).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "sinlora_" in n]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "r=0|got 0"),
        ({"r": -2}, "-2"),
        ({"alpha": float("inf")}, "inf"),
        ({"frequency": float("nan")}, "nan"),
    ],
)
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinLoRAConfig(target_modules=["query"], **kwargs)


def test_rank_above_layer_size_is_named(tiny_bert):
    with pytest.raises(ValueError, match="r=31"):
        get_peft_model(tiny_bert(), SinLoRAConfig(target_modules=["query"], r=31))
