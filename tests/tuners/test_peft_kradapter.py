"""KRAdapter as a PEFT method: the same three lines as LoRA, checked against dense references."""

from __future__ import annotations

import importlib
import json
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from torch import nn

import kradapter
from kradapter import KRAdapterConfig
from kradapter.khatri_rao import KhatriRaoShape
from kradapter.tuners.kradapter import KRAdapterLayer
from tests import support

TARGETS = ["query", "value", "intermediate.dense", "output.dense"]


def ids(generator: torch.Generator, batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=generator)


def adapted_layers(model: nn.Module) -> dict[str, KRAdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, KRAdapterLayer)}


def test_counts_and_zero_update_at_start(tiny_bert, generator):
    model = get_peft_model(tiny_bert(), KRAdapterConfig(target_modules=TARGETS))
    layers = adapted_layers(model)
    # per block: query, value, attention.output.dense (30x30), intermediate.dense (37x30), output.dense (30x37)
    assert len(layers) == 2 * 5
    expected = sum(KhatriRaoShape(m.out_features, m.in_features).num_params for m in layers.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected
    x = ids(generator)
    with torch.no_grad():
        adapted = model(input_ids=x).last_hidden_state
        with model.disable_adapter():
            base = model(input_ids=x).last_hidden_state
    assert torch.equal(adapted, base)


@pytest.mark.parametrize("execution", ["auto", "fused", "separate"])
def test_layer_output_matches_dense_reference(tiny_bert, generator, execution):
    model = get_peft_model(
        tiny_bert(), KRAdapterConfig(target_modules=TARGETS, init_weights=False, scaling=1.3, execution=execution)
    )
    for name, layer in adapted_layers(model).items():
        base = layer.get_base_layer()
        x = torch.randn(3, layer.in_features, generator=generator)
        dw = layer.get_delta_weight("default").double()
        want = x.double() @ (base.weight.double() + dw).T + base.bias.double()
        torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(
            dw,
            1.3
            * kradapter.delta_weight(
                layer.kradapter_u["default"], layer.kradapter_v["default"], layer.kradapter_shape["default"]
            ).double(),
        )


def test_save_load_merge_unmerge(tiny_bert, generator, tmp_path):
    model = get_peft_model(tiny_bert(), KRAdapterConfig(target_modules=TARGETS, init_weights=False))
    x = ids(generator)
    with torch.no_grad():
        want = model(input_ids=x).last_hidden_state
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "KRADAPTER"

    again = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).last_hidden_state, want, rtol=0, atol=0)

    base_weights = {n: m.get_base_layer().weight.detach().clone() for n, m in adapted_layers(again).items()}
    again.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).last_hidden_state, want, rtol=1e-5, atol=1e-5)
    again.unmerge_adapter()
    for name, layer in adapted_layers(again).items():
        w0 = base_weights[name]
        assert (layer.get_base_layer().weight - w0).norm() / w0.norm() < 1e-6, name

    plain = model.merge_and_unload()
    assert not adapted_layers(plain) and type(plain.encoder.layer[0].attention.self.query) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).last_hidden_state, want, rtol=1e-5, atol=1e-5)


def test_several_adapters(tiny_bert, generator):
    model = get_peft_model(tiny_bert(), KRAdapterConfig(target_modules=["query"], init_weights=False))
    model.add_adapter("other", KRAdapterConfig(target_modules=["query"], init_weights=False, scaling=0.5))
    x = ids(generator)
    with torch.no_grad():
        out_default = model(input_ids=x).last_hidden_state
        model.set_adapter("other")
        out_other = model(input_ids=x).last_hidden_state
        with model.disable_adapter():
            out_base = model(input_ids=x).last_hidden_state
    assert not torch.allclose(out_default, out_other)
    assert not torch.allclose(out_other, out_base)
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    assert layer.active_adapters == ["other"]
    assert layer.kradapter_u["other"].requires_grad and not layer.kradapter_u["default"].requires_grad
    # both active at once: the sum of both updates
    layer.set_adapter(["default", "other"])
    x1 = torch.randn(4, 30, generator=generator)
    want = (
        x1 @ (layer.get_base_layer().weight + layer.get_delta_weight("default") + layer.get_delta_weight("other")).T
        + layer.get_base_layer().bias
    )
    torch.testing.assert_close(layer(x1), want, rtol=1e-5, atol=1e-5)


def test_safe_merge_refuses_non_finite(tiny_bert):
    model = get_peft_model(tiny_bert(), KRAdapterConfig(target_modules=["query"], init_weights=False))
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.kradapter_u["default"][0, 0] = float("nan")
    w0 = layer.get_base_layer().weight.detach().clone()
    msg = "NaNs detected in the merged weights. The adapter default seems to be broken"  # PEFT's wording
    with pytest.raises(ValueError, match=re.escape(msg)):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, w0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_adapter(tiny_bert, generator, dtype):
    ref = get_peft_model(tiny_bert(), KRAdapterConfig(target_modules=TARGETS, init_weights=False))
    model = get_peft_model(tiny_bert().to(dtype), KRAdapterConfig(target_modules=TARGETS, init_weights=False))
    model.load_state_dict(ref.state_dict(), strict=False)  # same adapter factors
    for layer in adapted_layers(model).values():
        assert layer.kradapter_u["default"].dtype == torch.float32
        assert layer.get_base_layer().weight.dtype == dtype
    x = ids(generator)
    out = model(input_ids=x).last_hidden_state
    assert out.dtype == dtype
    out.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        torch.testing.assert_close(out.float(), ref(input_ids=x).last_hidden_state, rtol=0.05, atol=0.05)


def test_conv1d_targets(generator):
    """GPT-2 style ``Conv1D`` layers store the weight as (in, out)."""
    base = support.tiny_gpt2(seed=0, n_embd=24)
    model = get_peft_model(base, KRAdapterConfig(target_modules=["c_attn", "c_fc"], init_weights=False))
    for layer in adapted_layers(model).values():
        conv = layer.get_base_layer()
        x = torch.randn(2, 3, layer.in_features, generator=generator)
        want = x @ (conv.weight + layer.get_delta_weight("default")) + conv.bias  # PEFT's layout: (in, out)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    x = torch.randint(0, 50, (2, 7), generator=generator)
    with torch.no_grad():
        want = model(input_ids=x).last_hidden_state
        plain = model.merge_and_unload()
        torch.testing.assert_close(plain(input_ids=x).last_hidden_state, want, rtol=1e-5, atol=1e-5)


def test_layers_to_transform_and_trainable_only_adapters(tiny_bert):
    model = get_peft_model(tiny_bert(), KRAdapterConfig(target_modules=["query", "value"], layers_to_transform=[1]))
    names = sorted(adapted_layers(model))
    assert names and all(".layer.1." in n for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("kradapter_" in n for n in trainable)


def test_importing_twice_is_harmless(tiny_bert):
    importlib.reload(importlib.import_module("kradapter"))
    assert PEFT_TYPE_TO_CONFIG_MAPPING["KRADAPTER"].__name__ == "KRAdapterConfig"
    model = get_peft_model(tiny_bert(), kradapter.KRAdapterConfig(target_modules=["query"]))
    assert adapted_layers(model)


def test_same_api_as_peft_lora(tiny_bert, generator):
    """Both methods plug into the same calls; KRAdapter at its budget reaches a higher-rank update."""
    lora = get_peft_model(tiny_bert(), LoraConfig(target_modules=["query"], r=4, init_lora_weights=False))
    kra = get_peft_model(tiny_bert(), KRAdapterConfig(target_modules=["query"], init_weights=False))
    lora_dw = lora.base_model.model.encoder.layer[0].attention.self.query.get_delta_weight("default")
    kra_dw = kra.base_model.model.encoder.layer[0].attention.self.query.get_delta_weight("default")
    assert lora_dw.shape == kra_dw.shape == (30, 30)
    assert torch.linalg.matrix_rank(lora_dw) == 4 and torch.linalg.matrix_rank(kra_dw) == 30


def test_trainer_lowers_loss(tmp_path):
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = support.tiny_bert_config(hidden_size=32, num_labels=3)
    model = get_peft_model(
        BertForSequenceClassification(config), KRAdapterConfig(target_modules=TARGETS, modules_to_save=["classifier"])
    )
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (24,), generator=g)
    # a learnable task: the label is a function of the (repeated) token
    data = [{"input_ids": t.repeat(12), "labels": int(t) % 3} for t in tokens]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=24,
        lr_scheduler_type="constant",
        learning_rate=2e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 20
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
