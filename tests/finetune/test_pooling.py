"""The native pooling head: one pooling definition, checked against float64 references, through PEFT, save/reload,
head-only features and full fine-tuning; the frozen MiniLM embedding of the linear probe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kradapter import registry
from kradapter.finetune.models import FeatureTap, HeadProbe, load_classifier, target_layers
from kradapter.finetune.plan import ModelProbe
from kradapter.finetune.pooling import NativePooling, embed, native_pooling, pool
from kradapter.finetune.protocol import SettingsError
from kradapter.finetune.strategies import training_for
from tests import support

MODES = ("mean", "max", "cls", "mean_sqrt_len")


def random_mask(generator: torch.Generator, batch: int, tokens: int) -> torch.Tensor:
    """Right-padded masks of random lengths 1..tokens (at least one row full, one row of length 1 when batch > 1)."""
    lengths = torch.randint(1, tokens + 1, (batch,), generator=generator)
    lengths[0] = tokens
    if batch > 1:
        lengths[1] = 1
    return (torch.arange(tokens)[None, :] < lengths[:, None]).long()


def reference_pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """sentence-transformers' pooling in float64, row by row over the real tokens."""
    out = []
    for h, m in zip(hidden.astype(np.float64), mask.astype(bool), strict=True):
        real = h[m]
        out.append({"mean": real.mean(0), "max": real.max(0), "cls": h[0],
                    "mean_sqrt_len": real.sum(0) / np.sqrt(len(real))}[mode])  # fmt: skip
    return np.stack(out)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("batch", "tokens", "width"), [(1, 1, 1), (5, 7, 13), (3, 29, 2), (7, 2, 31)])
def test_pool_matches_a_float64_reference(generator: torch.Generator, mode: str, batch: int, tokens: int, width: int):
    hidden = torch.randn(batch, tokens, width, generator=generator) * 3
    mask = random_mask(generator, batch, tokens)
    hidden = hidden.masked_fill(mask[..., None] == 0, 1e4)  # padding holds huge values: they must not leak in
    got = pool(hidden, mask, mode).double().numpy()
    np.testing.assert_allclose(got, reference_pool(hidden.numpy(), mask.numpy(), mode), rtol=1e-5, atol=1e-4)


def test_unknown_mode_is_named() -> None:
    with pytest.raises(ValueError, match="unknown pooling mode 'median'"):
        pool(torch.zeros(1, 2, 3), None, "median")
    with pytest.raises(ValueError, match="unknown pooling mode 'median'"):
        NativePooling("median")


def write_pooling(folder: Path, **flags: bool) -> None:
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
    config = {"word_embedding_dimension": 30} | {f"pooling_mode_{k}": v for k, v in flags.items()}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))


def test_native_pooling_reads_the_sentence_transformers_config(minilm_path: str, tmp_path: Path) -> None:
    assert native_pooling(minilm_path) == "mean"  # all-MiniLM-L6-v2 is a mean-pooling sentence encoder
    with pytest.raises(SettingsError, match=r"has no 1_Pooling/config\.json.*--head-input pooler"):
        native_pooling(tmp_path)
    write_pooling(tmp_path, mean_tokens=True, max_tokens=True)
    with pytest.raises(SettingsError, match="needs exactly one of"):
        native_pooling(tmp_path)
    write_pooling(tmp_path, mean_tokens=False, lasttoken=True)
    with pytest.raises(SettingsError, match="needs exactly one of"):
        native_pooling(tmp_path)
    write_pooling(tmp_path, max_tokens=True)
    assert native_pooling(tmp_path) == "max"


# -- a tiny sentence-transformers-style folder: BERT weights plus 1_Pooling ----------------------------------------


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    from transformers import BertModel

    folder = tmp_path / "tiny"
    torch.manual_seed(0)
    BertModel(support.tiny_bert_config()).save_pretrained(folder)
    write_pooling(folder, mean_tokens=True)
    return folder


def batch_of(generator: torch.Generator, rows: int = 5, tokens: int = 11) -> dict[str, torch.Tensor]:
    mask = random_mask(generator, rows, tokens)
    ids = torch.randint(1, 97, (rows, tokens), generator=generator).masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}


def reference_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """The head applied, in float64, to the float64 mean over the mask of the encoder's last hidden states."""
    with torch.no_grad():
        hidden = model.base_model(**batch).last_hidden_state.numpy()
    pooled = reference_pool(hidden, batch["attention_mask"].numpy(), "mean")
    head = model.get_submodule("classifier")
    head = head.modules_to_save["default"] if hasattr(head, "modules_to_save") else head  # PEFT's trained copy
    return pooled @ head.weight.detach().double().numpy().T + head.bias.detach().double().numpy()


def test_native_head_reads_the_mean_over_the_mask(tiny_folder: Path, generator: torch.Generator) -> None:
    model, head = load_classifier(tiny_folder, 3, seed=1)
    assert head == ["classifier"] and isinstance(model.base_model.pooler, NativePooling)
    assert not any("pooler" in n for n, _ in model.named_parameters())  # the untrained CLS pooler is gone
    model.eval()
    batch = batch_of(generator)
    with torch.no_grad():
        logits = model(**batch).logits.double().numpy()
    np.testing.assert_allclose(logits, reference_logits(model, batch), rtol=1e-5, atol=1e-5)
    # The old head stays an option, and it does read tanh(dense(CLS)).
    old, _ = load_classifier(tiny_folder, 3, seed=1, head_input="pooler")
    old.eval()
    with torch.no_grad():
        hidden = old.bert(**batch).last_hidden_state
        expected = old.classifier(torch.tanh(old.bert.pooler.dense(hidden[:, 0])))
        torch.testing.assert_close(old(**batch).logits, expected)
    with pytest.raises(SettingsError, match="unknown --head-input 'cls'"):
        load_classifier(tiny_folder, 3, seed=1, head_input="cls")


def test_padding_does_not_change_the_native_logits(tiny_folder: Path, generator: torch.Generator) -> None:
    model, _ = load_classifier(tiny_folder, 2, seed=0)
    model.eval()
    batch = batch_of(generator, rows=4, tokens=6)
    padded = {k: torch.cat([v, torch.zeros(4, 9, dtype=v.dtype)], dim=1) for k, v in batch.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, model(**padded).logits, rtol=1e-5, atol=1e-5)


def perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random values in every trainable parameter, so a saved copy that dropped any of them would differ."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def probe_of(folder: Path, num_labels: int) -> ModelProbe:
    model, head = load_classifier(folder, num_labels, seed=0)
    layers = target_layers(model, head, None)
    head_params = sum(p.numel() for h in head for p in model.get_submodule(h).parameters())
    return ModelProbe(head, head_params, layers, sum(p.numel() for p in model.parameters()) - head_params)


@pytest.mark.parametrize("method", ["kradapter", "lora", "full"])
def test_native_head_through_peft_and_full_saves_and_reloads(
    method: str, tiny_folder: Path, tmp_path: Path, generator: torch.Generator
) -> None:
    probe = probe_of(tiny_folder, 3)
    assert len(probe.layers) == 12  # 2 blocks x (q, k, v, attention out, MLP in, MLP out): every linear layer
    training = training_for(method)
    shapes = list(probe.layers.values())
    budget = registry.kradapter_budget(shapes) if method != "lora" else 4 * sum(o + i for o, i in shapes)  # LoRA r 4
    sized = training.size(probe, budget)
    model = training.build(sized, list(probe.layers), tiny_folder, 3, seed=2)
    perturb(model, generator)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sized.count + probe.head_params  # no pooler weights among them
    model.eval()
    batch = batch_of(generator)
    with torch.no_grad():
        logits = model(**batch).logits
    inner = model.get_base_model() if method != "full" else model  # the transformers model, adapters in place
    assert isinstance(inner.base_model.pooler, NativePooling)
    # The adapted model still reads the mean over the mask of its (adapted) hidden states.
    np.testing.assert_allclose(logits.double().numpy(), reference_logits(inner, batch), rtol=1e-5, atol=1e-5)
    training.save(model, tmp_path / "saved")
    again = training.load(tmp_path / "saved", tiny_folder, 3)
    assert isinstance((again.get_base_model() if method != "full" else again).base_model.pooler, NativePooling)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, logits, rtol=0, atol=1e-6)


def test_head_only_reads_the_same_pooled_input(tiny_folder: Path, generator: torch.Generator) -> None:
    model, head = load_classifier(tiny_folder, 3, seed=4)
    batch = batch_of(generator)
    with torch.no_grad():
        features = FeatureTap(model, head[0])(**batch).logits
    with torch.no_grad():
        hidden = model.base_model(**batch).last_hidden_state.numpy()
    np.testing.assert_allclose(features.double().numpy(), reference_pool(hidden, batch["attention_mask"].numpy(),
                                                                         "mean"), rtol=1e-5, atol=1e-5)  # fmt: skip
    probe = training_for("head").build(None, [], tiny_folder, 3, seed=4)  # type: ignore[arg-type]
    assert isinstance(probe, HeadProbe)
    with torch.no_grad():
        torch.testing.assert_close(probe(features).logits, model.eval()(**batch).logits, rtol=1e-5, atol=1e-5)
    # embed(): the same definition of the embedding, from the frozen encoder.
    columns = {k: [row[m.bool()].tolist() for row, m in zip(v, batch["attention_mask"], strict=True)]
               for k, v in batch.items()}  # fmt: skip
    np.testing.assert_allclose(embed(tiny_folder, columns, batch_size=2), features.numpy(), rtol=1e-5, atol=1e-5)


def test_minilm_embedding_is_384_wide_and_independent_of_padding(minilm_path: str) -> None:
    from kradapter.finetune.models import load_tokenizer

    torch.set_num_threads(1)
    texts = ["A gripping, beautifully acted film.", "Dull.", "The plot wanders for two hours and then " * 6 + "ends."]
    encoded = load_tokenizer(minilm_path)(texts, truncation=True, max_length=64)
    columns = {k: list(v) for k, v in encoded.items()}
    together = embed(minilm_path, columns, batch_size=3)  # the short texts padded to the long one's length
    alone = embed(minilm_path, columns, batch_size=1)  # no padding at all
    assert together.shape == (3, 384) and together.dtype == np.float32  # the model card's 384-dimensional vectors
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(together[0] - together[1]) > 0.1  # different texts, different embeddings


def test_the_command_refuses_a_native_head_without_pooling_before_any_work(tiny_folder: Path) -> None:
    import argparse
    import shutil

    from kradapter.finetune.commands import check_model
    from kradapter.finetune.protocol import Recipe

    shutil.rmtree(tiny_folder / "1_Pooling")
    (tiny_folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    args = argparse.Namespace(model=str(tiny_folder), trust_remote_code=False)
    with pytest.raises(SettingsError, match=r"no 1_Pooling.*give --head-input pooler"):
        check_model(args, Recipe(max_length=16), 1)
    assert check_model(args, Recipe(max_length=16, head_input="pooler"), 1) == tiny_folder
