"""Causal language models end to end: a tiny Llama built from a config with KRAdapter (and SinLoRA) on every linear
layer — gradient checkpointing, generate(), save/load, merge_and_unload, bf16 base with fp32 adapters,
torch.compile with fullgraph=True where PEFT's LoRA compiles fullgraph."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from kradapter import KRAdapterConfig, SinLoRAConfig
from kradapter.tuners.base import DeltaLayer
from tests import support

VOCAB = 67
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "kradapter": lambda **kw: KRAdapterConfig(init_weights=False, scaling=0.5, **kw),
    "sinlora": lambda **kw: SinLoRAConfig(init_weights=False, r=2, alpha=1.0, frequency=10.0, **kw),
}


def llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Two layers, hidden 24, MLP 37 (odd), grouped-query attention (4 heads, 2 key/value heads)."""
    return support.tiny_llama(seed, dtype, vocab_size=VOCAB)


def tokens(generator: torch.Generator, batch: int = 3, length: int = 11) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def layers(model: torch.nn.Module) -> dict[str, DeltaLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DeltaLayer)}


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("targets", ["all-linear", LINEAR], ids=["all-linear", "explicit"])
def test_every_linear_layer_is_adapted(method, targets):
    model = get_peft_model(llama(), METHODS[method](target_modules=targets))
    names = sorted(layers(model))
    assert len(names) == 2 * len(LINEAR)
    assert {n.rsplit(".", 1)[-1] for n in names} == set(LINEAR)
    assert not any("lm_head" in n for n in names)


def config_of(method: str, **kw):  # type: ignore[no-untyped-def]
    if method == "lora":
        return LoraConfig(r=4, init_lora_weights=False, **kw)
    return METHODS[method](**kw)


@pytest.mark.parametrize("method", ["lora", *METHODS])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(method, reentrant, generator):
    ids = tokens(generator)
    grads = []
    for checkpointing in (False, True):
        base = llama()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model = get_peft_model(base, config_of(method, target_modules="all-linear"))
        model.train()
        assert model.base_model.model.model.gradient_checkpointing == checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2 * len(LINEAR)
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow  # 15 training steps with checkpointing: 3-18 s (busy 2-core machine)
@pytest.mark.parametrize("method", list(METHODS))
def test_training_lowers_the_loss_with_checkpointing(method, generator):
    base = llama()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, METHODS[method](target_modules="all-linear"))
    model.train()
    ids = tokens(generator, batch=2, length=12)  # two sequences to memorise
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("method", list(METHODS))
def test_generate_save_load_merge(method, generator, tmp_path):
    model = get_peft_model(llama(), METHODS[method](target_modules="all-linear")).eval()
    ids = tokens(generator, batch=2, length=6)
    # min_new_tokens: a random model may greedily pick the end-of-sequence token in every row and stop early
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        generated = model.generate(input_ids=ids, **settings)
        with model.disable_adapter():
            base_generated = model.generate(input_ids=ids, **settings)
    assert generated.shape == (2, 12) and torch.equal(generated[:, :6], ids)
    want = logits(model, generated)
    assert not torch.allclose(want, logits(llama(), generated))  # the adapter changes the model
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(llama(), tmp_path).eval()
    torch.testing.assert_close(logits(again, generated), want, rtol=0, atol=0)
    with torch.no_grad():
        assert torch.equal(again.generate(input_ids=ids, **settings), generated)
    plain = again.merge_and_unload()
    assert not layers(plain) and type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(plain, generated), want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(llama().generate(input_ids=ids, **settings), base_generated)


@pytest.mark.parametrize("method", ["lora", *METHODS])
def test_generate_with_an_adapter_per_sample(method, generator):
    model = get_peft_model(llama(), config_of(method, target_modules="all-linear"), adapter_name="one")
    model.add_adapter("two", config_of(method, target_modules=["q_proj", "down_proj"]))
    model.eval()
    ids = tokens(generator, batch=3, length=5)
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    names = ["two", "__base__", "one"]
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **settings)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    want = model.generate(input_ids=ids[i : i + 1], **settings)
            else:
                model.set_adapter(name)
                want = model.generate(input_ids=ids[i : i + 1], **settings)
            # a sample that stops early at the end-of-sequence token is padded in the batch
            assert torch.equal(mixed[i : i + 1, : want.shape[1]], want), name
            assert (mixed[i, want.shape[1] :] == 0).all(), name


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_base_with_fp32_adapters(method, generator):
    reference = get_peft_model(llama(), METHODS[method](target_modules="all-linear"))
    model = get_peft_model(llama(dtype=torch.bfloat16), METHODS[method](target_modules="all-linear"))
    model.load_state_dict(reference.state_dict())
    for layer in layers(model).values():
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
        assert all(getattr(layer, n)["default"].dtype == torch.float32 for n in layer.adapter_layer_names)
    ids = tokens(generator)
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out.logits.float(), reference(input_ids=ids).logits.detach(), rtol=0.05, atol=0.05)
    model.eval()
    want = logits(model, ids).float()
    plain = copy.deepcopy(model).merge_and_unload()
    assert plain.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(logits(plain, ids).float(), want, rtol=0.05, atol=0.05)


@pytest.mark.slow  # a Dynamo + AOTAutograd trace of a training step: 6-10 s (busy 2-core machine)
@pytest.mark.parametrize("method", ["lora", *METHODS])
def test_torch_compile_fullgraph(method, generator):
    """The adapted model compiles as one graph (forward and backward), as PEFT's LoRA does, with the same results.

    ``aot_eager`` traces exactly what inductor would compile (Dynamo + AOTAutograd) without generating C++ code,
    which would take minutes on two cores.
    """
    model = get_peft_model(llama(), config_of(method, target_modules="all-linear"))
    model.train()
    ids = tokens(generator)
    eager = model(input_ids=ids, labels=ids)
    eager.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-5)
    for name, grad in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)
