"""Per-sample ``adapter_names`` over a quantized base with bfloat16 activations: each sample's output is the one a
single-adapter pass gives it (issue 23.7: the mixed-batch path cast no input to the adapter's dtype)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from kradapter import KRAdapterConfig, SinLoRAConfig

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama whose shapes bitsandbytes' CPU 4-bit kernel takes (outputs x32, inputs x64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama") / "tiny"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load(path: Path, kind: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging

    pytest.importorskip("bitsandbytes")
    logging.set_verbosity_error()
    if kind == "bnb_int8":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quant, device_map="cpu", dtype=torch.bfloat16
        )


def config(method: str, seed: int):  # type: ignore[no-untyped-def]
    if method == "kradapter":
        return KRAdapterConfig(target_modules=TARGETS, init_weights=False)
    if method == "sinlora":
        return SinLoRAConfig(target_modules=TARGETS, r=4, init_weights=False)
    return LoraConfig(target_modules=TARGETS, r=8, init_lora_weights=False)


@pytest.mark.parametrize(
    "kind, method",
    [
        ("bnb_nf4", "kradapter"),
        pytest.param("bnb_int8", "kradapter", marks=pytest.mark.slow),
        pytest.param("bnb_nf4", "sinlora", marks=pytest.mark.slow),
        pytest.param("bnb_nf4", "lora", marks=pytest.mark.slow),  # PEFT's LoRA: the behaviour to match
    ],
)
def test_mixed_batch_equals_single_adapter_passes(llama_path: Path, kind: str, method: str) -> None:
    torch.manual_seed(1)
    model = get_peft_model(load(llama_path, kind), config(method, 1), adapter_name="a")
    torch.manual_seed(2)
    model.add_adapter("b", config(method, 2))
    model.eval()
    ids = torch.randint(0, 101, (4, 9), generator=torch.Generator().manual_seed(3))
    names = ["a", "b", "__base__", "a"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits.double()
        single = {}
        for adapter in ("a", "b"):
            model.set_adapter(adapter)
            single[adapter] = model(input_ids=ids).logits.double()
        with model.disable_adapter():
            single["__base__"] = model(input_ids=ids).logits.double()
    for row, adapter in enumerate(names):
        want = single[adapter][row]
        assert float((mixed[row] - want).norm() / want.norm()) < 1e-3, (row, adapter)
