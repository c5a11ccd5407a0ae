"""Export is honest about what it writes: the reported errors are those of the factors in the file (after the
dtype's rounding), --max-error holds for them, ranks are capped at what a layer can use, convolutions load into
PEFT's LoRA conv layers, and a bad weights file or a non-finite factor is one line naming it, exit 2."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import kradapter
from kradapter.export import ExportError, export_lora

SRC = str(Path(kradapter.__file__).parents[1])


class PatchNet(nn.Module):
    """A ViT-style patch embedding (a 7x7 kernel, stride 7, odd channel counts) and a non-square linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 13, 7, stride=7)
        self.proj = nn.Linear(13, 29)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.patch(x).flatten(2).transpose(1, 2))


def saved_adapter(tmp_path: Path, generator: torch.Generator, scale: float = 1.0) -> Path:
    torch.manual_seed(0)
    model = get_peft_model(PatchNet(), kradapter.KRAdapterConfig(target_modules=["patch", "proj"], init_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "kradapter_" in name:
                param.normal_(generator=generator).mul_(scale)
    model.save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def base() -> PatchNet:
    torch.manual_seed(0)
    return PatchNet().eval()


def source_deltas(adapter: Path) -> dict[str, np.ndarray]:
    """Each layer's update from the source adapter merged in float64 (independent of the export's code path)."""
    merged = PeftModel.from_pretrained(base().double(), adapter).merge_and_unload()
    w0 = base().double().state_dict()
    return {n: (merged.state_dict()[f"{n}.weight"] - w0[f"{n}.weight"]).numpy() for n in ("patch", "proj")}


def file_errors(out: Path) -> dict[str, float]:
    """Each layer's relative error recomputed from the written file and config alone, in numpy float64."""
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(out / "adapter_model.safetensors")
    deltas = source_deltas(out.parent / "src")
    errors = {}
    for name, delta in deltas.items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"].double().numpy()
        b = tensors[f"base_model.model.{name}.lora_B.weight"].double().numpy()
        r = config["rank_pattern"].get(name, config["r"])
        scaling = config["lora_alpha"] / r
        product = scaling * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))
        matrix = delta.reshape(delta.shape[0], -1)
        errors[name] = float(np.linalg.norm(matrix - product) / np.linalg.norm(matrix))
    return errors


def test_a_conv2d_layer_exports_in_peft_conv_shapes_and_loads(tmp_path: Path, generator: torch.Generator) -> None:
    """Issue 23.5: the patch embedding's factors are (r, in, kh, kw) and (out, r, 1, 1); PEFT loads them, and the
    loaded update is the float64 truncated SVD of the flattened kernel update."""
    adapter = saved_adapter(tmp_path, generator)
    report = export_lora(adapter, tmp_path / "lora", rank=5, base=base())
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert tuple(tensors["base_model.model.patch.lora_A.weight"].shape) == (5, 3, 7, 7)
    assert tuple(tensors["base_model.model.patch.lora_B.weight"].shape) == (13, 5, 1, 1)
    lora = PeftModel.from_pretrained(base().double(), tmp_path / "lora").merge_and_unload()
    for name, delta in source_deltas(adapter).items():
        matrix = delta.reshape(delta.shape[0], -1)
        u, s, vh = np.linalg.svd(matrix, full_matrices=False)
        want = (u[:, :5] * s[:5]) @ vh[:5]
        got = (lora.state_dict()[f"{name}.weight"] - base().double().state_dict()[f"{name}.weight"]).numpy()
        np.testing.assert_allclose(got.reshape(matrix.shape), want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert {layer.name: layer.rank for layer in report.layers} == {"patch": 5, "proj": 5}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_reported_errors_are_those_of_the_stored_factors(tmp_path: Path, generator, dtype: str) -> None:
    """Issue 23.6: the reported per-layer error is the error of the file's factors in ``dtype``, and --max-error
    holds for them (a bf16 rounding error is met by a higher rank, not hidden)."""
    adapter = saved_adapter(tmp_path, generator)
    report = export_lora(adapter, tmp_path / "lora", max_error=0.02, dtype=dtype, base=base())
    recomputed = file_errors(tmp_path / "lora")
    for layer in report.layers:
        assert layer.relative_error == pytest.approx(recomputed[layer.name], rel=1e-6, abs=1e-9)
        assert recomputed[layer.name] <= 0.02


def test_an_unreachable_max_error_in_bfloat16_fails_naming_the_layer(tmp_path: Path, generator) -> None:
    adapter = saved_adapter(tmp_path, generator)
    with pytest.raises(ExportError, match=r"layer '(patch|proj)': even at its full rank .* bfloat16"):
        export_lora(adapter, tmp_path / "lora", max_error=1e-5, dtype="bfloat16", base=base())


def test_a_rank_above_a_layers_full_rank_is_capped_and_said(tmp_path: Path, generator) -> None:
    adapter = saved_adapter(tmp_path, generator)
    report = export_lora(adapter, tmp_path / "lora", rank=20, base=base())
    ranks = {layer.name: layer.rank for layer in report.layers}
    assert ranks == {"patch": 13, "proj": 13} and set(report.capped) == {"patch", "proj"}
    assert "capped" in report.table()
    assert max(file_errors(tmp_path / "lora").values()) < 1e-6


class Boom:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch PWNED",))


def _weights_damage(adapter: Path, how: str, layer: str = "proj") -> None:
    path = adapter / "adapter_model.safetensors"
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif how == "pickle":
        path.unlink()
        (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"x": Boom()}))
    elif how == "nan":
        tensors = load_file(path)
        key = next(k for k in tensors if "kradapter_u" in k and layer in k)
        tensors[key][0, 0] = float("nan")
        save_file(tensors, path)


@pytest.fixture(scope="module")
def bert_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved KRAdapter on a tiny BERT whose folder the adapter config names (the CLI loads it)."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bert")
    config = BertConfig(vocab_size=31, hidden_size=12, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=17, max_position_embeddings=16)  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "base")
    model = get_peft_model(BertModel(config), kradapter.KRAdapterConfig(target_modules=["query", "value"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "kradapter_" in name:
                param.normal_()
    model.save_pretrained(root / "src")
    cfg = json.loads((root / "src" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(root / "base")
    (root / "src" / "adapter_config.json").write_text(json.dumps(cfg))
    return root / "src"


@pytest.mark.parametrize("how", ["truncated", "empty", "random", "pickle", "nan"])
def test_a_bad_weights_file_is_one_line_naming_it(tmp_path: Path, bert_adapter: Path, how: str) -> None:
    """Issue 23.8: truncated, empty, random or pickle-holding weights and NaN factors: exit 2, one line naming the
    file (and the tensor), no traceback, no pickle run, nothing written."""
    import shutil

    adapter = tmp_path / "src"
    shutil.copytree(bert_adapter, adapter)
    _weights_damage(adapter, how, "query")
    run = subprocess.run(
        [sys.executable, "-m", "kradapter.export_cli", str(adapter), str(tmp_path / "out"), "--rank", "2"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": SRC},
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("kradapter export: error:")]
    assert "Traceback" not in run.stderr and len(errors) == 1, run.stderr
    name = "adapter_model.bin" if how == "pickle" else "adapter_model.safetensors"
    assert name in errors[0] and ("query.kradapter_u" in errors[0] if how == "nan" else True), run.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["truncated", "empty", "random", "pickle", "nan"])
def test_a_bad_weights_file_is_an_export_error(tmp_path: Path, generator, how: str) -> None:
    adapter = saved_adapter(tmp_path, generator)
    _weights_damage(adapter, how)
    name = "adapter_model.bin" if how == "pickle" else "adapter_model.safetensors"
    with pytest.raises(ExportError, match=name + (r".*'base_model.model.proj.kradapter_u" if how == "nan" else "")):
        export_lora(adapter, tmp_path / "out", rank=2, base=base())
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()
