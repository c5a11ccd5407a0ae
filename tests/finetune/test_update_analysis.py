"""The learned-update analysis against a dense float64 SVD of the update measured through the forward pass.

The reference update of each layer is read off the layer's own forward: ``layer(I) - base_layer(I)`` with the
identity as input is ``dW^T`` (the path training runs, not ``get_delta_weight``), and its spectrum comes from
``numpy.linalg.svd`` in float64. Models are tiny, built from configs (a BERT with hidden 30 and MLP 37, a GPT-2
with ``Conv1D`` layers of 22 -> 66 and 22 -> 89), adapters created with ``init_weights=False`` and then given
fresh random weights so every update is non-zero.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft import LoHaConfig, RandLoraConfig, get_peft_model
from torch import nn

from kradapter import registry
from kradapter.finetune import updates
from kradapter.registry import get as registered
from tests import support

BERT_TARGETS = ["query", "value", "intermediate.dense", "output.dense"]  # 30x30, 37x30, 30x37 (and 30x30)
METHODS = {
    "lora": lambda t: registered("lora").config(t, r=3, init_lora_weights=False),
    "kronecker": lambda t: registered("kronecker").config(t, r=2, init_weights=False),
    "loha": lambda t: LoHaConfig(target_modules=t, r=3, alpha=3, init_weights=False),
    "randlora": lambda t: RandLoraConfig(target_modules=t, r=4, randlora_alpha=80, init_weights=False),
    "kradapter": lambda t: registered("kradapter").config(t, init_weights=False),
    "sinlora": lambda t: registered("sinlora").config(t, r=3, init_weights=False),
}


def randomise_adapters(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)


def measured_update(layer: nn.Module) -> np.ndarray:
    """``dW`` (out, in) from the layer's forward on the identity, minus the base layer's."""
    eye = torch.eye(layer.in_features, dtype=torch.float64)
    with torch.no_grad():
        return (layer(eye) - layer.get_base_layer()(eye)).T.numpy()


def reference(delta: np.ndarray, weight: np.ndarray) -> dict[str, float | np.ndarray]:
    s = np.linalg.svd(delta, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return {
        "s": s,
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "stable_rank": float((s**2).sum() / s[0] ** 2),
        "frobenius_norm": float(np.sqrt((delta**2).sum())),
        "relative_norm": float(np.sqrt((delta**2).sum()) / np.sqrt((weight**2).sum())),
    }


def check_rows(model: nn.Module, rows: list[dict], top: int | None) -> None:
    layers = {name: layer for name, layer, _ in updates.adapted_layers(model)}
    assert [r["layer"] for r in rows] == list(layers)
    for row in rows:
        layer = layers[row["layer"]]
        delta = measured_update(layer)
        assert row["shape"] == list(delta.shape)
        base = layer.get_base_layer().weight.detach().double().numpy()
        ref = reference(delta, base)
        s_ref = ref["s"]
        n = len(s_ref) if top is None else min(top, len(s_ref))
        assert len(row["singular_values"]) == n
        np.testing.assert_allclose(row["singular_values"], s_ref[:n], rtol=0, atol=1e-6 * s_ref[0])  # Gram floor
        # The Gram matrix's numerical zeros (up to ~1e-7 of the largest value) lift a low-rank update's effective
        # rank by up to ~1e-5 relative; norms and stable rank use squares, where they vanish.
        assert row["effective_rank"] == pytest.approx(ref["effective_rank"], rel=1e-4), row["layer"]
        for key in ("stable_rank", "frobenius_norm", "relative_norm"):
            assert row[key] == pytest.approx(ref[key], rel=1e-6), (row["layer"], key)
        assert row["spectral_norm"] == pytest.approx(s_ref[0], rel=1e-6)  # C3A computes in float32
        assert 1 - 1e-9 <= row["stable_rank"] <= min(delta.shape) and 1 - 1e-9 <= row["effective_rank"] <= min(
            delta.shape
        )


@pytest.mark.parametrize("method", list(METHODS))
def test_bert_updates_match_a_dense_svd(method: str, tiny_bert, generator: torch.Generator) -> None:
    model = get_peft_model(tiny_bert(), METHODS[method](BERT_TARGETS)).double()
    randomise_adapters(model, generator)
    rows = updates.analyse_updates(model, top=None)
    assert len(rows) == 2 * 5  # two blocks: query, value, intermediate, attention output, output
    check_rows(model, rows, top=None)
    assert {tuple(r["shape"]) for r in rows} == {(30, 30), (37, 30), (30, 37)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(r["parameters"] for r in rows) == trainable
    truncated = updates.analyse_updates(model, top=5)
    check_rows(model, truncated, top=5)
    assert all(len(r["singular_values"]) == 5 for r in truncated)
    if method == "lora":  # rank 3: three non-zero singular values, an effective rank of at most 3
        assert all(
            r["effective_rank"] <= 3 + 1e-6 and r["singular_values"][3] < 1e-6 * r["spectral_norm"] for r in rows
        )


@pytest.mark.parametrize("method", ["lora", "kradapter", "randlora", "sinlora"])  # LoHa refuses Conv1D
def test_gpt2_conv1d_updates(method: str, generator: torch.Generator) -> None:
    from transformers import GPT2Model

    config = support.tiny_gpt2_config(vocab_size=31, n_embd=22, n_inner=89)
    settings = {"fan_in_fan_out": True} if method in ("lora", "randlora") else {}
    peft_config = METHODS[method](["c_attn", "c_fc"])
    for key, value in settings.items():
        setattr(peft_config, key, value)
    model = get_peft_model(GPT2Model(config), peft_config).double()
    randomise_adapters(model, generator)
    rows = updates.analyse_updates(model)
    assert [tuple(r["shape"]) for r in rows] == [(66, 22), (89, 22)]
    check_rows(model, rows, top=updates.SPECTRUM_TOP)


CONTENDERS = {
    "c3a": lambda t: registry.get("c3a").config(t, block_size=5, init_weights=False),
    "shira": lambda t: registry.get("shira").config(t, r=2, init_weights=False),
    "gralora": lambda t: registry.get("gralora").config(t, r=3, gralora_k=3, init_weights=False),
    "hira": lambda t: registry.get("hira").config(t, r=2, init_weights=False),
}


@pytest.mark.parametrize("method", list(CONTENDERS))
def test_contender_updates_match_a_dense_svd(method: str, generator: torch.Generator) -> None:
    from transformers import BertModel

    # sides 30 and 45: C3A blocks of 5 and GraLoRA's 3 x 3 grid divide them
    config = support.tiny_bert_config(vocab_size=31, num_hidden_layers=1, intermediate_size=45)
    model = get_peft_model(BertModel(config), CONTENDERS[method](BERT_TARGETS)).double()
    randomise_adapters(model, generator)
    rows = updates.analyse_updates(model, top=None)
    assert {tuple(r["shape"]) for r in rows} == {(30, 30), (45, 30), (30, 45)}
    check_rows(model, rows, top=None)
    assert sum(r["parameters"] for r in rows) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_zero_update_merged_and_adapter_choice(tiny_bert, generator: torch.Generator) -> None:
    model = get_peft_model(tiny_bert(), registered("lora").config(["query"], r=2))  # B = 0: dW = 0
    rows = updates.analyse_updates(model)
    assert all(r["effective_rank"] == 0 and r["stable_rank"] == 0 and r["relative_norm"] == 0 for r in rows)
    model.add_adapter("other", registered("lora").config(["query"], r=2, init_lora_weights=False))
    assert {r["adapter"] for r in updates.analyse_updates(model)} == {"default"}
    other = updates.analyse_updates(model, adapter="other")
    assert {r["adapter"] for r in other} == {"other"} and all(r["effective_rank"] > 1 for r in other)
    with pytest.raises(ValueError, match="'missing'"):
        updates.analyse_updates(model, adapter="missing")
    model.set_adapter("other")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        updates.analyse_updates(model, adapter="other")
    with pytest.raises(ValueError, match="no adapted layer"):
        updates.analyse_updates(tiny_bert())
    with pytest.raises(ValueError, match="top"):
        updates.update_metrics(torch.ones(3, 4), top=0)


def test_summary_and_plots(tiny_bert, generator: torch.Generator, tmp_path) -> None:
    results = {}
    for method in ("lora", "kradapter", "loha"):
        model = get_peft_model(tiny_bert(), METHODS[method](BERT_TARGETS))
        randomise_adapters(model, generator)
        results[method] = updates.analyse_updates(model)
    summary = updates.summarise_updates(results["kradapter"])
    assert summary["layers"] == 10
    assert summary["mean_effective_rank"] == pytest.approx(np.mean([r["effective_rank"] for r in results["kradapter"]]))
    assert math.isfinite(summary["mean_relative_norm"])
    # Full-rank methods beat LoRA's rank 3 on every layer.
    assert all(k["effective_rank"] > 3 for k in results["kradapter"])
    erank = updates.plot_effective_rank(results, tmp_path / "erank.png")
    spectra = updates.plot_spectra(results, tmp_path / "spectra.png", max_layers=3)
    assert erank.stat().st_size > 10_000 and spectra.stat().st_size > 10_000
    with pytest.raises(ValueError, match="unknown layer"):
        updates.plot_spectra(results, tmp_path / "x.png", layers=["nope"])
