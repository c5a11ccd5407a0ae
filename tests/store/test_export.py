"""Export of KRAdapter/SinLoRA adapters to PEFT LoRA, checked against a dense float64 truncated SVD in numpy."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, GPT2Model

import kradapter
from kradapter.export import ExportError, check_request, export_lora
from tests import support

SRC = Path(kradapter.__file__).parent
BERT_TARGETS = ["query", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def bert(seed: int = 0) -> BertForSequenceClassification:
    """Odd sizes: 30x30 attention, 37x30 and 30x37 MLP, a 3-class head."""
    config = support.tiny_bert_config(num_labels=3)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


def method_config(method: str, **kwargs: object):  # type: ignore[no-untyped-def]
    if method == "kradapter":
        return kradapter.KRAdapterConfig(init_weights=False, **kwargs)
    return kradapter.SinLoRAConfig(r=5, alpha=40.0, frequency=30.0, init_weights=False, **kwargs)


@pytest.fixture
def trained(tmp_path: Path, generator: torch.Generator):  # type: ignore[no-untyped-def]
    """A saved adapter (random factors, perturbed trained biases and head) and its base model folder."""

    def build(method: str) -> tuple[Path, Path]:
        base_dir, adapter_dir = tmp_path / "base", tmp_path / f"{method}_adapter"
        bert().save_pretrained(base_dir)
        config = method_config(method, task_type="SEQ_CLS", target_modules=BERT_TARGETS, bias="all")
        model = get_peft_model(bert(), config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad and ("bias" in name or "classifier" in name):
                    param.add_(0.1 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(adapter_dir)
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(base_dir)
        (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
        return adapter_dir, base_dir

    return build


def float64_reference(adapter_dir: Path) -> BertForSequenceClassification:
    """The source adapter merged into a float64 copy of its base: every update and head in float64."""
    model = bert().double()
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()


def truncated(delta: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return approx, float(np.linalg.norm(delta - approx) / np.linalg.norm(delta))


def smallest_rank(delta: np.ndarray, max_error: float) -> int:
    return next(r for r in range(1, min(delta.shape) + 1) if truncated(delta, r)[1] <= max_error)


@pytest.mark.parametrize("method", ["kradapter", "sinlora"])
@pytest.mark.parametrize("mode", [{"rank": 3}, {"max_error": 0.35}, {"rank": 40}])
def test_export_matches_dense_truncated_svd(method, mode, trained, tmp_path, generator) -> None:
    """Ranks, errors and the merged LoRA weights match a float64 numpy SVD of each update; outputs match a model
    holding the truncated updates; head and trained biases come across."""
    adapter_dir, _ = trained(method)
    out = tmp_path / "lora"
    report = export_lora(adapter_dir, out, **mode)

    ref = float64_reference(adapter_dir)
    base = {k: v.double().numpy() for k, v in bert().state_dict().items()}
    truth = {k: v.numpy() for k, v in ref.state_dict().items()}
    layers = {layer.name: layer for layer in report.layers}
    assert len(layers) == 2 * 5
    for name, layer in layers.items():
        key = f"{name}.weight"
        delta = truth[key] - base[key]
        want_rank = min(mode["rank"], *delta.shape) if "rank" in mode else smallest_rank(delta, mode["max_error"])
        approx, error = truncated(delta, want_rank)
        assert layer.rank == want_rank
        assert layer.relative_error == pytest.approx(error, rel=1e-6, abs=1e-6)  # float32 factors: rounding
        assert (layer.out_features, layer.in_features) == delta.shape
        if "max_error" in mode:
            assert error <= mode["max_error"] < truncated(delta, want_rank - 1)[1] if want_rank > 1 else True
        truth[key] = base[key] + approx  # the model the LoRA must reproduce

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] and config["task_type"] == "SEQ_CLS"
    if "rank" in mode:  # one rank everywhere, capped at what a layer can use (30 here) and said so
        assert config["r"] == min(mode["rank"], 30) and not config["rank_pattern"]
        assert bool(report.capped) == (mode["rank"] > 30)
    assert report.file_bytes == (out / "adapter_model.safetensors").stat().st_size

    other_head = bert()
    with torch.no_grad():
        other_head.classifier.weight.normal_(generator=generator)  # the exported head must replace it
    lora = PeftModel.from_pretrained(other_head, out).eval()
    assert isinstance(lora.peft_config["default"], LoraConfig)
    ids = torch.randint(0, 97, (3, 11), generator=generator)
    expected = bert().double()
    expected.load_state_dict({k: torch.from_numpy(v) for k, v in truth.items()})
    with torch.no_grad():
        got = lora(input_ids=ids).logits.double()
        want = expected.eval()(input_ids=ids).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    merged = {k: v.double().numpy() for k, v in lora.merge_and_unload().state_dict().items()}
    for name in layers:
        key = f"{name}.weight"
        np.testing.assert_allclose(merged[key], truth[key], rtol=0, atol=2e-6)


def test_full_rank_export_reproduces_source_and_is_reported(trained, tmp_path, generator) -> None:
    adapter_dir, _ = trained("kradapter")
    report = export_lora(adapter_dir, tmp_path / "full", rank=37)
    assert report.global_relative_error < 1e-6  # the float32 rounding of the stored factors, nothing more
    saved = json.loads((tmp_path / "full" / "export_report.json").read_text())
    assert saved["layers"][0]["rank"] == 30 and saved["file_bytes"] == report.file_bytes  # capped: min(out, in)
    source = PeftModel.from_pretrained(bert(), adapter_dir).eval()
    lora = PeftModel.from_pretrained(bert(), tmp_path / "full").eval()
    ids = torch.randint(0, 97, (2, 13), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids).logits, source(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_gpt2_conv1d_layers_and_model_object(tmp_path, generator) -> None:
    """Conv1D (fan_in_fan_out) layers of a tall/wide GPT-2, the base given as a model object left unchanged."""
    config = support.tiny_gpt2_config(vocab_size=53, n_embd=22, n_layer=2, n_inner=41)
    torch.manual_seed(0)
    base = GPT2Model(config).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(0)  # the same base weights as `base`
    source = get_peft_model(GPT2Model(config), kradapter.KRAdapterConfig(target_modules=["c_attn", "c_fc", "c_proj"]))
    with torch.no_grad():
        for name, param in source.named_parameters():
            if "kradapter_u" in name:
                param.normal_(generator=generator)
    source.save_pretrained(tmp_path / "src")
    report = export_lora(tmp_path / "src", tmp_path / "lora", rank=4, base=base)
    assert all(k in before and torch.equal(v, before[k]) for k, v in base.state_dict().items())
    shapes = {(layer.out_features, layer.in_features) for layer in report.layers}
    assert shapes == {(66, 22), (41, 22), (22, 22), (22, 41)}
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True

    torch.manual_seed(0)
    lora = PeftModel.from_pretrained(GPT2Model(config), tmp_path / "lora").merge_and_unload()
    merged = source.merge_and_unload()
    for layer in report.layers:
        w0 = before[f"{layer.name}.weight"].double().T.numpy()
        delta = merged.get_submodule(layer.name).weight.detach().double().T.numpy() - w0
        approx, error = truncated(delta, 4)
        got = lora.get_submodule(layer.name).weight.detach().double().T.numpy()
        np.testing.assert_allclose(got, w0 + approx, rtol=0, atol=1e-5)
        assert layer.relative_error == pytest.approx(error, rel=1e-5)


def test_bad_requests_are_refused_before_any_work(trained, tmp_path) -> None:
    adapter_dir, _ = trained("kradapter")
    lora_dir = tmp_path / "a_lora"
    get_peft_model(bert(), LoraConfig(target_modules=["query"])).save_pretrained(lora_dir)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    cases = {
        "does not exist": dict(adapter_dir=tmp_path / "missing", rank=2),
        "'LORA' adapter, not a KRAdapter": dict(adapter_dir=lora_dir, rank=2),
        "rank must be a positive integer, got 0": dict(rank=0),
        "rank must be a positive integer, got -3": dict(rank=-3),
        "max_error must be a relative error in (0, 1), got 1.0": dict(max_error=1.0),
        "max_error must be a relative error in (0, 1), got 0": dict(max_error=0),
        "exactly one of rank and max_error": dict(rank=2, max_error=0.1),
        "already holds files": dict(out_dir=full, rank=2),
        "is the adapter folder itself": dict(out_dir=adapter_dir, rank=2, overwrite=True),
        "unknown dtype 'int8'": dict(rank=2, dtype="int8"),
        "base model folder '/no/such/base' does not exist": dict(rank=2, base="/no/such/base"),
    }
    for message, kwargs in cases.items():
        kwargs = {"adapter_dir": adapter_dir, "out_dir": tmp_path / "out", **kwargs}
        with pytest.raises(ExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_request(**kwargs)
    assert not (tmp_path / "out").exists() and (full / "keep.txt").read_text() == "mine"

    wider = BertForSequenceClassification(BertConfig(**{**bert().config.to_dict(), "hidden_size": 32}))
    with pytest.raises(ExportError, match=r"does not fit the base model: .*query.*\(32x32\)"):
        export_lora(adapter_dir, tmp_path / "misfit", rank=2, base=wider)
    gpt2 = GPT2Model(support.tiny_gpt2_config(vocab_size=53, n_embd=22))
    with pytest.raises(ExportError, match="does not fit the base model: Target modules"):
        export_lora(adapter_dir, tmp_path / "misfit", rank=2, base=gpt2)

    report = export_lora(adapter_dir, full, rank=2, overwrite=True)  # --overwrite replaces the adapter files
    assert report.layers and (full / "adapter_model.safetensors").exists() and (full / "keep.txt").exists()


def test_cli_module_imports_only_the_standard_library_and_exits_2(trained, tmp_path, capsys) -> None:
    spec = importlib.util.find_spec("kradapter.export_cli")
    assert spec is not None and spec.origin is not None
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('export_cli', {spec.origin!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "heavy = sorted(m for m in ('torch', 'peft', 'transformers', 'numpy') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"

    adapter_dir, _ = trained("sinlora")
    bad = [
        ([str(tmp_path / "missing"), str(tmp_path / "o"), "--rank", "2"], "does not exist"),
        ([str(adapter_dir), str(tmp_path / "o"), "--rank", "0"], "rank must be a positive integer, got 0"),
        ([str(adapter_dir), str(tmp_path / "o"), "--max-error", "2"], "got 2.0"),
        ([str(adapter_dir), str(adapter_dir.parent), "--rank", "2"], "already holds files"),
    ]
    for argv, message in bad:
        done = subprocess.run(
            [sys.executable, "-m", "kradapter.export_cli", *argv], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.startswith("kradapter export: error:")]
        assert len(lines) == 1 and message in lines[0], done.stderr
    from kradapter.export_cli import main  # the success path in-process: torch is loaded here already

    assert main([str(adapter_dir), str(tmp_path / "o"), "--max-error", "0.5"]) == 0
    assert "worst layer" in capsys.readouterr().out and (tmp_path / "o" / "adapter_model.safetensors").exists()
