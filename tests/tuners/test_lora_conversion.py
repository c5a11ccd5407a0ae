"""PEFT's own LoRA conversion (``convert_to_lora``, ``save_as_lora``) on KRAdapter and SinLoRA models.

Each converted layer's ``B A`` is checked against ``kradapter export`` of the same adapter and against a numpy
float64 truncated SVD of the update, compared in float64. PEFT takes the SVD in float32 (``delta_weight.float()`` in
``peft/tuners/lora/conversion.py``), so a truncation inside the spectrum agrees to float32 accuracy divided by the
relative spectral gap at the cut (Davis-Kahan): ``16 * eps32 * s_1 / (s_r - s_{r+1})``, and at least 32 eps32
(3.8e-6, the whole update's float32 round trip). Export, float64 throughout, agrees with the float64 reference within
1e-6, and the update PEFT is handed is, bit for bit, the one export truncates.
Convolutions, ``add_weighted_adapter`` and hotswapping are refused with errors that name what is missing.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.conversion import convert_to_lora, save_as_lora
from peft.utils.hotswap import hotswap_adapter
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2Model

import kradapter
from kradapter.export import export_lora

PREFIX = "base_model.model."


class Net(nn.Module):
    """Linear layers of odd shapes: prime, tall, wide, square."""

    def __init__(self) -> None:
        super().__init__()
        self.tall = nn.Linear(23, 41)
        self.wide = nn.Linear(41, 29)
        self.square = nn.Linear(29, 29)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(torch.tanh(self.wide(torch.tanh(self.tall(x)))))


def gpt2() -> GPT2Model:
    """Conv1D layers stored (in, out): c_attn 22 -> 66, c_fc 22 -> 89, c_proj 89 -> 22 and 22 -> 22."""
    return GPT2Model(GPT2Config(vocab_size=50, n_positions=16, n_embd=22, n_inner=89, n_layer=1, n_head=2)).eval()


def method_config(method: str, targets: list[str]):  # type: ignore[no-untyped-def]
    if method == "kradapter":
        return kradapter.KRAdapterConfig(target_modules=targets, init_weights=False)
    return kradapter.SinLoRAConfig(target_modules=targets, r=4, alpha=16.0, frequency=20.0, init_weights=False)


def adapted(method: str, kind: str, generator: torch.Generator) -> tuple[nn.Module, nn.Module, list[str]]:
    """(a float64 PEFT model with random factors, a fresh copy of its base, the targets)."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    base, targets = (Net(), ["tall", "wide", "square"]) if kind == "linear" else (gpt2(), ["c_attn", "c_fc", "c_proj"])
    base = base.double().eval()
    model = get_peft_model(copy.deepcopy(base), method_config(method, targets)).double().eval()
    return model, base, targets


def layer_updates(model: nn.Module) -> dict[str, np.ndarray]:
    """Each adapted layer's update as an (out, in) float64 matrix, from the layer's own ``delta_matrix``."""
    return {
        name.removeprefix(PREFIX): module.delta_matrix("default").detach().double().numpy()
        for name, module in model.named_modules()
        if hasattr(module, "delta_matrix")
    }


def product(state: dict[str, torch.Tensor], name: str, config: Any = None) -> np.ndarray:
    """The update a LoRA layer adds, ``scaling * B A``, as an (out, in) float64 matrix; ``config`` (a LoraConfig)
    gives the scaling ``lora_alpha / r`` with its per-layer patterns (PEFT's conversion: always 1)."""
    a, b = (state[f"{PREFIX}{name}.lora_{x}.weight"].double() for x in "AB")
    scaling = 1.0
    if config is not None:
        scaling = config.alpha_pattern.get(name, config.lora_alpha) / config.rank_pattern.get(name, config.r)
    return scaling * (b @ a).numpy()


def svd_truncation(delta: np.ndarray, rank: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def energy_rank(delta: np.ndarray, threshold: float) -> int:
    s = np.linalg.svd(delta, compute_uv=False)
    cum = np.cumsum(s**2)
    return int(np.searchsorted(cum, threshold * cum[-1]) + 1)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def float32_tolerance(delta: np.ndarray, rank: int) -> float:
    """How far a float32 SVD's rank-``rank`` truncation may sit from the exact one: 32 eps32 (a float32 SVD
    reconstructs the whole update to a few eps32 times the size; measured up to 1.1e-6 = 9 eps32), or float32
    accuracy over the relative gap at the cut when that is larger (measured at most 8 eps32 / gap, 224 cases)."""
    eps = float(np.finfo(np.float32).eps)
    s = np.linalg.svd(delta, compute_uv=False)
    if rank >= s.size:
        return 32 * eps
    gap = (s[rank - 1] - s[rank]) / s[0]
    return max(32 * eps, 16 * eps / gap)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("method", ["kradapter", "sinlora"])
@pytest.mark.parametrize("rank", [3, 8, 22, 0.6, 0.9])  # 22: every GPT-2 layer whole
def test_convert_to_lora_agrees_with_export(
    method: str, kind: str, rank: float, tmp_path: Path, generator: torch.Generator
) -> None:
    model, base, _ = adapted(method, kind, generator)
    assert model.supports_lora_conversion()
    updates = layer_updates(model)
    for name, delta in updates.items():  # what PEFT converts: the update in the weight's layout, exactly
        handed = model.base_model.model.get_submodule(name).get_delta_weight("default").detach().numpy()
        np.testing.assert_array_equal(handed.T if kind == "conv1d" else handed, delta)
    lora_config, state = convert_to_lora(model, rank=rank)

    model.save_pretrained(tmp_path / "source")
    if isinstance(rank, int):
        report = export_lora(tmp_path / "source", tmp_path / "export", rank=rank, base=base)
    else:  # PEFT's energy threshold t keeps a relative error of at most sqrt(1 - t), export's criterion
        report = export_lora(tmp_path / "source", tmp_path / "export", max_error=math.sqrt(1 - rank), base=base)
    exported = load_file(str(tmp_path / "export" / "adapter_model.safetensors"))
    export_config = LoraConfig.from_pretrained(str(tmp_path / "export"))
    ranks = {layer.name: layer.rank for layer in report.layers}

    assert set(updates) == set(ranks)
    telling: list[bool] = []
    for name, delta in updates.items():
        want_rank = rank if isinstance(rank, int) else energy_rank(delta, rank)
        got_rank = state[f"{PREFIX}{name}.lora_A.weight"].shape[0]
        assert got_rank == want_rank == ranks[name], name
        converted = product(state, name)
        reference = svd_truncation(delta, want_rank)
        tolerance = float32_tolerance(delta, want_rank)
        assert relative(converted, product(exported, name, export_config)) <= tolerance, name
        assert relative(converted, reference) <= tolerance, name
        assert relative(product(exported, name, export_config), reference) <= 1e-6, name  # export: float64 throughout
        if want_rank < min(delta.shape):  # a real truncation, not the whole update
            assert relative(reference, delta) > 0, name
            telling.append(relative(reference, delta) > 2 * tolerance)  # can the checks above tell the two apart?
    # a layer whose spectrum is nearly flat at the cut has a loose tolerance; at least one truncated layer must not
    assert not telling or any(telling)
    if isinstance(rank, int):
        assert lora_config.r == rank and not lora_config.rank_pattern
    else:
        assert lora_config.rank_pattern == {name: ranks[name] for name in updates}


@pytest.mark.parametrize("method", ["kradapter", "sinlora"])
def test_save_as_lora_loads_in_peft(method: str, tmp_path: Path, generator: torch.Generator) -> None:
    """The saved LoRA, loaded with ``PeftModel.from_pretrained`` onto a fresh base, gives the outputs of the base with
    each layer's truncated update added (dense float64 reference)."""
    model, base, _ = adapted(method, "conv1d", generator)
    updates = layer_updates(model)
    save_as_lora(tmp_path / "lora", model, rank=6)
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").double().eval()
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name, delta in updates.items():
            layer = reference.get_submodule(name)
            layer.weight += torch.from_numpy(svd_truncation(delta, 6).T)  # Conv1D stores (in, out)
        x = torch.randint(0, 50, (2, 7), generator=generator)
        got, want = lora(input_ids=x).last_hidden_state, reference(input_ids=x).last_hidden_state
        untruncated = model(input_ids=x).last_hidden_state
    # float32 accuracy of PEFT's SVD, through two layer norms; the untruncated adapter is much further away
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)
    assert (untruncated - want).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["kradapter", "sinlora"])
def test_conv_layers_refused_with_peft_message(method: str) -> None:
    host = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(5 * 4 * 4, 7))
    model = get_peft_model(host, method_config(method, ["0", "2"]))
    assert not model.supports_lora_conversion()
    with pytest.raises(TypeError, match=r"do not support LoRA conversion: .*tuners\.\w+\.layer\.Conv'>"):
        convert_to_lora(model, rank=2)


@pytest.mark.parametrize("method", ["kradapter", "sinlora"])
def test_weighted_adapter_refused_naming_the_reason(method: str) -> None:
    model = get_peft_model(Net(), method_config(method, ["tall"]))
    model.add_adapter("second", method_config(method, ["tall"]))
    with pytest.raises(NotImplementedError, match=r"does not support add_weighted_adapter: .*not .*save_as_lora"):
        model.add_weighted_adapter(["default", "second"], [0.5, 0.5], "combined")


@pytest.mark.parametrize("method", ["kradapter", "sinlora"])
def test_hotswap_refused_by_peft(method: str, tmp_path: Path) -> None:
    model = get_peft_model(Net(), method_config(method, ["tall"]))
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=f"Hotswapping only supports LORA but {method.upper()} was passed"):
        hotswap_adapter(model, str(tmp_path / "a"), adapter_name="default")
