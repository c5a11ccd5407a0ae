"""KRAdapter and SinLoRA on every path a LoRA adapter takes through PEFT 0.21.

The cases of PEFT's custom-model test matrix (``tests/test_custom_models.py`` with ``tests/testing_common.py``),
written anew for our two methods on small models of our own: an MLP, transformers ``Conv1D`` after an embedding,
``nn.Conv1d``, ``nn.Conv2d`` (3x3, 1x1, grouped) — forward, merge/unmerge, safe merge, save/load with and without
safetensors, selected adapters, pickling, several and several active adapters, delete/disable, dtypes,
``modules_to_save``, gradient flow, trainable-parameter counts, model cards, and PEFT's own errors.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
import warnings
from collections.abc import Callable

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_base_model_state_dict, set_base_model_state_dict
from torch import nn
from transformers.pytorch_utils import Conv1D

from kradapter import KRAdapterConfig, SinLoRAConfig
from kradapter.tuners.base import DeltaLayer

BATCH = 4


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(11, 17)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(17, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.act(self.lin0(x.to(self.lin0.weight.dtype))))

    @staticmethod
    def inputs(generator: torch.Generator) -> torch.Tensor:
        return torch.randn(BATCH, 11, generator=generator)


class EmbConv1D(nn.Module):
    """transformers ``Conv1D`` (weight stored as (in, out)) after an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 5)
        self.conv1d = Conv1D(7, 5)
        self.lin0 = nn.Linear(7 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(torch.relu(self.conv1d(self.emb(x))).flatten(1))

    @staticmethod
    def inputs(generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, 50, (BATCH, 6), generator=generator)


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(3, 4, 3, padding=1)
        self.lin0 = nn.Linear(4 * 10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(torch.relu(self.conv1d(x.to(self.conv1d.weight.dtype))).flatten(1))

    @staticmethod
    def inputs(generator: torch.Generator) -> torch.Tensor:
        return torch.randn(BATCH, 3, 10, generator=generator)


class Conv2dNet(nn.Module):
    def __init__(self, kernel: int = 3, groups: int = 1, channels: tuple[int, int] = (5, 6)) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(*channels, kernel, groups=groups)
        self.in_channels = channels[0]
        side = 5 - kernel + 1
        self.lin0 = nn.Linear(channels[1] * side * side, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.conv2d.weight.dtype).reshape(len(x), self.in_channels, 5, 5)
        return self.lin0(torch.relu(self.conv2d(x)).flatten(1))

    def inputs(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(BATCH, self.in_channels, 5, 5, generator=generator)


# (id, model factory, config fields shared by both methods)
MODELS: list[tuple[str, Callable[[], nn.Module], dict]] = [
    ("mlp-lin0", MLP, {"target_modules": ["lin0"]}),
    ("mlp-lin1", MLP, {"target_modules": ["lin1"]}),
    ("mlp-both", MLP, {"target_modules": ["lin0", "lin1"]}),
    ("mlp-regex", MLP, {"target_modules": r".*lin\d"}),
    ("mlp-modules-to-save", MLP, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("mlp-dropout", MLP, {"target_modules": ["lin0"], "dropout": 0.3}),
    ("emb-conv1D", EmbConv1D, {"target_modules": ["conv1d"]}),
    ("nn-conv1d", Conv1dNet, {"target_modules": ["conv1d", "lin0"]}),
    ("conv2d", Conv2dNet, {"target_modules": ["conv2d"]}),
    ("conv2d-1x1", lambda: Conv2dNet(kernel=1, channels=(3, 6)), {"target_modules": ["conv2d", "lin0"]}),
    ("conv2d-groups", lambda: Conv2dNet(groups=2, channels=(4, 6)), {"target_modules": ["conv2d"]}),
]
METHODS = {
    "kradapter": (KRAdapterConfig, {"scaling": 1.5}),
    "sinlora": (SinLoRAConfig, {"r": 2, "alpha": 4.0, "frequency": 30.0}),
}
CASES = [
    pytest.param(method, factory, fields, id=f"{method}-{name}")
    for method in METHODS
    for name, factory, fields in MODELS
]


def make_config(method: str, fields: dict, **extra) -> PeftConfig:
    config_cls, defaults = METHODS[method]
    return config_cls(**{**defaults, **fields, **extra})


def build(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory().eval()


def tuner_layers(model: nn.Module) -> list[DeltaLayer]:
    return [m for m in model.modules() if isinstance(m, DeltaLayer)]


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def adapted(method: str, factory, fields: dict, seed: int = 0, **extra) -> nn.Module:
    """A model with a moved (non-zero) adapter, in eval mode (new dropout modules start in training mode)."""
    return get_peft_model(build(factory, seed), make_config(method, fields, init_weights=False, **extra)).eval()


# -- peft_type and the config -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_peft_type_behaves_like_peft_enum_members(method, tmp_path):
    config = make_config(method, {"target_modules": ["lin0"]})
    name = method.upper()
    assert config.peft_type == name and config.peft_type.value == name and config.peft_type.name == name
    assert isinstance(config.peft_type.value, str) and type(config.peft_type.value) is str
    assert hash(config.peft_type) == hash(name)
    assert json.loads(json.dumps(config.to_dict(), default=sorted))["peft_type"] == name
    again = pickle.loads(pickle.dumps(config))
    assert again == config and again.peft_type.value == name
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config) and loaded.peft_type.value == name and loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize("method", list(METHODS))
def test_mixed_model_is_refused_clearly(method):
    with pytest.raises(ValueError, match=f"The provided `peft_type` '{method.upper()}' is not compatible"):
        get_peft_model(MLP(), make_config(method, {"target_modules": ["lin0"]}), mixed=True)


# -- forward ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "factory", "fields"), CASES)
def test_forward_starts_at_the_base_and_moves(method, factory, fields, generator):
    model = build(factory)
    x = model.inputs(generator)
    base = run(model, x)
    peft_model = get_peft_model(copy.deepcopy(model), make_config(method, fields)).eval()
    close(run(peft_model, x), base, 0)  # init_weights=True: dW = 0
    moved = adapted(method, factory, fields)
    out = run(moved, x)
    assert torch.isfinite(out).all() and not torch.allclose(out, base)
    for layer in tuner_layers(moved):  # PEFT exposes these on every tuner layer
        base_layer = layer.get_base_layer()
        expected = (
            (base_layer.in_channels, base_layer.out_channels)
            if isinstance(base_layer, nn.Conv1d | nn.Conv2d)
            else (layer.in_features, layer.out_features)
        )
        assert (layer.in_features, layer.out_features) == expected


@pytest.mark.parametrize(("method", "factory", "fields"), CASES)
def test_trainable_parameter_counts(method, factory, fields):
    model = adapted(method, factory, fields)
    trainable, total = model.get_nb_trainable_parameters()
    base_count = sum(p.numel() for p in build(factory).parameters())
    adapter_count = sum(p.numel() for n, p in model.named_parameters() if f"{method}_" in n)
    saved = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n)
    assert trainable == adapter_count + saved
    assert total == base_count + adapter_count + saved
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- merging ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "factory", "fields"), CASES)
def test_merge_unmerge_unload(method, factory, fields, generator):
    model = adapted(method, factory, fields)
    x = model.inputs(generator)
    want = run(model, x)
    weights = {id(m): m.get_base_layer().weight.detach().clone() for m in tuner_layers(model)}
    model.merge_adapter()
    assert all(m.merged for m in tuner_layers(model))
    close(run(model, x), want)
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        model.merge_adapter()  # idempotent: nothing merged twice
    close(run(model, x), want)
    model.unmerge_adapter()
    for layer in tuner_layers(model):
        close(layer.get_base_layer().weight, weights[id(layer)], 1e-6)
    close(run(model, x), want)
    plain = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    close(run(plain, x), want)
    unloaded = copy.deepcopy(model).unload()
    close(run(unloaded, x), run(build(factory), x), 1e-5)  # the base weights after a merge and an unmerge


@pytest.mark.parametrize(("method", "factory", "fields"), CASES)
def test_safe_merge(method, factory, fields, generator):
    model = adapted(method, factory, fields)
    x = model.inputs(generator)
    want = run(model, x)
    plain = copy.deepcopy(model).merge_and_unload(safe_merge=True)
    close(run(plain, x), want)

    layer = tuner_layers(model)[0]
    with torch.no_grad():
        getattr(layer, layer.adapter_layer_names[0])["default"].view(-1)[0] = float("nan")
    weights = [m.get_base_layer().weight.detach().clone() for m in tuner_layers(model)]
    msg = "NaNs detected in the merged weights. The adapter default seems to be broken"
    with pytest.raises(ValueError, match=re.escape(msg)):
        model.merge_and_unload(safe_merge=True)
    for m, w in zip(tuner_layers(model), weights, strict=True):
        assert torch.equal(m.get_base_layer().weight, w)


@pytest.mark.parametrize(("method", "factory", "fields"), CASES)
def test_merge_in_half_precision(method, factory, fields, generator):
    model = adapted(method, factory, fields).to(torch.bfloat16)
    x = model.inputs(generator)
    want = run(model, x)
    model.merge_adapter()
    close(run(model, x).float(), want.float(), 0.1)


# -- saving and loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "torch-pickle"])
@pytest.mark.parametrize(("method", "factory", "fields"), CASES)
def test_save_load(method, factory, fields, safe, generator, tmp_path):
    model = adapted(method, factory, fields)
    x = model.inputs(generator)
    want = run(model, x)
    model.save_pretrained(tmp_path, safe_serialization=safe)
    assert (tmp_path / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == method.upper()
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and len(card) > 1000  # PEFT's pre-filled model card
    again = PeftModel.from_pretrained(build(factory), tmp_path).eval()
    close(run(again, x), want, 0)
    assert not any(p.requires_grad for p in again.parameters())
    trainable = PeftModel.from_pretrained(build(factory), tmp_path, is_trainable=True)
    assert all(p.requires_grad for n, p in trainable.named_parameters() if f"{method}_" in n)
    low_mem = PeftModel.from_pretrained(build(factory), tmp_path, low_cpu_mem_usage=True).eval()
    assert not any(p.device.type == "meta" for p in low_mem.parameters())
    close(run(low_mem, x), want, 0)


@pytest.mark.parametrize("method", list(METHODS))
def test_save_selected_adapters_and_names(method, generator, tmp_path):
    fields = {"target_modules": ["lin0", "lin1"]}
    model = get_peft_model(build(MLP), make_config(method, fields, init_weights=False), adapter_name="adapter").eval()
    model.add_adapter("adapter_two", make_config(method, fields, init_weights=False))
    assert any(".adapter_two" in key for key in model.state_dict())
    x = MLP.inputs(generator)
    outs = {}
    for name in ("adapter", "adapter_two"):
        model.set_adapter(name)
        outs[name] = run(model, x)
    model.save_pretrained(tmp_path, selected_adapters=["adapter_two"])
    assert (tmp_path / "adapter_two" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter_config.json").exists()
    model.save_pretrained(tmp_path / "all")  # an adapter not called "default" goes to a folder of its name
    # "adapter" is a substring of "adapter_two": each loads its own weights
    loaded = PeftModel.from_pretrained(build(MLP), str(tmp_path / "all" / "adapter"), adapter_name="adapter").eval()
    loaded.load_adapter(str(tmp_path / "all" / "adapter_two"), adapter_name="adapter_two")
    for name in ("adapter", "adapter_two"):
        loaded.set_adapter(name)
        close(run(loaded, x), outs[name], 0)
    with pytest.raises(ValueError, match="Adapter with name 'adapter' already exists"):
        loaded.add_adapter("adapter", make_config(method, fields))


@pytest.mark.parametrize(("method", "factory", "fields"), CASES)
def test_pickle_round_trip(method, factory, fields, generator):
    model = adapted(method, factory, fields)
    x = model.inputs(generator)
    again = pickle.loads(pickle.dumps(model))
    close(run(again, x), run(model, x), 0)
    assert again.peft_config["default"].peft_type.value == method.upper()


@pytest.mark.parametrize("method", list(METHODS))
def test_existing_model_card_is_kept(method, tmp_path):
    (tmp_path / "README.md").write_text("---\nmeta: hello\n---\nOur card\n")
    get_peft_model(MLP(), make_config(method, {"target_modules": ["lin0"]})).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and "meta: hello" in card and "Our card" in card


@pytest.mark.parametrize(("method", "factory", "fields"), CASES)
def test_base_model_state_dict_round_trip(method, factory, fields):
    base = build(factory)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, make_config(method, fields, init_weights=False))
    extracted = get_base_model_state_dict(model)
    assert extracted.keys() == original.keys()
    with torch.no_grad():
        for p in model.get_base_model().parameters():
            p.add_(1.0)
    result = set_base_model_state_dict(model, original, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in get_base_model_state_dict(model).items():
        assert torch.equal(value, original[key]), key


# -- several adapters ---------------------------------------------------------------------------------------


# PEFT refuses two active adapters that share one modules_to_save module, so that model is not a case of the next
# test; test_modules_to_save_with_several_adapters checks it: the refusal, switching, and deleting.
SEVERAL_ACTIVE_CASES = [case for case in CASES if "modules_to_save" not in case.values[2]]


@pytest.mark.parametrize(("method", "factory", "fields"), SEVERAL_ACTIVE_CASES)
def test_several_adapters_active_merge_delete(method, factory, fields, generator):
    model = adapted(method, factory, fields)
    model.add_adapter("other", make_config(method, fields, init_weights=False))
    model.eval()
    x = model.inputs(generator)
    base = run(build(factory), x)
    one = run(model, x)
    model.set_adapter("other")
    two = run(model, x)
    assert not torch.allclose(one, two)
    layers = tuner_layers(model)
    for layer in layers:
        adapter_params = [getattr(layer, n) for n in layer.adapter_layer_names]
        assert all(d["other"].requires_grad and not d["default"].requires_grad for d in adapter_params)
    # both active: each layer adds both updates
    model.base_model.set_adapter(["default", "other"])
    both = run(model, x)
    for layer in layers:
        base_layer = layer.get_base_layer()
        inp = torch.randn(2, *_layer_input_shape(base_layer), generator=generator)
        want = base_layer(inp) + layer.adapter_term(inp, "default") + layer.adapter_term(inp, "other")
        close(layer(inp), want)
    model.merge_adapter(["default", "other"])
    close(run(model, x), both)
    with pytest.raises(ValueError, match=re.escape("Cannot delete adapter(s) ['other'] while they are merged")):
        model.delete_adapter("other")
    model.unmerge_adapter()  # the base weights come back up to rounding
    with model.disable_adapter():
        close(run(model, x), base)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert all("other" not in getattr(m, m.adapter_layer_names[0]) for m in layers)
    assert all(m.active_adapters == ["default"] for m in layers)
    close(run(model, x), one)
    with pytest.raises(ValueError, match="Adapter unknown does not exist"):
        model.delete_adapter("unknown")
    model.add_adapter("inactive", make_config(method, fields))
    model.delete_adapter("inactive")  # deleting an inactive adapter leaves the active one
    close(run(model, x), one)


def _layer_input_shape(base_layer: nn.Module) -> tuple[int, ...]:
    if isinstance(base_layer, nn.Conv1d):
        return (base_layer.in_channels, 8)
    if isinstance(base_layer, nn.Conv2d):
        return (base_layer.in_channels, 6, 7)
    return (base_layer.weight.shape[0] if isinstance(base_layer, Conv1D) else base_layer.in_features,)


@pytest.mark.parametrize("method", list(METHODS))
def test_modules_to_save_with_several_adapters(method, generator):
    config = make_config(method, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}, init_weights=False)
    model = get_peft_model(build(MLP), config)
    model.add_adapter("other", copy.deepcopy(config))
    model.eval()
    x = MLP.inputs(generator)
    one = run(model, x)
    with pytest.raises(ValueError, match="modules_to_save"):
        model.base_model.set_adapter(["default", "other"])
    # each adapter trains its own copy of lin1
    model.set_adapter("other")
    wrapper = model.base_model.model.lin1
    assert wrapper.modules_to_save["other"].weight.requires_grad
    assert not wrapper.modules_to_save["default"].weight.requires_grad
    with torch.no_grad():
        wrapper.modules_to_save["other"].weight.add_(1.0)  # the other adapter's own head, moved
    two = run(model, x)
    want = model.base_model.model.lin1.modules_to_save["other"](
        torch.relu(model.base_model.model.lin0(x))  # lin0 with the other adapter active
    )
    close(two, want)
    assert not torch.allclose(one, two)
    model.set_adapter("default")  # back: the first adapter's update and its own, unmoved copy of lin1
    close(run(model, x), one)
    model.delete_adapter("other")
    assert "other" not in model.peft_config and "other" not in wrapper.modules_to_save
    close(run(model, x), one)


@pytest.mark.parametrize(("method", "factory", "fields"), CASES)
def test_disable_adapter_with_and_without_merging(method, factory, fields, generator):
    model = adapted(method, factory, fields)
    x = model.inputs(generator)
    base = run(build(factory), x)
    with model.disable_adapter():
        close(run(model, x), base, 0)
    adapted_out = run(model, x)
    model.merge_adapter()
    with model.disable_adapter():
        close(run(model, x), base, 1e-5)  # disabling unmerges
    close(run(model, x), adapted_out, 1e-5)


# -- dtypes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [True, False], ids=["fp32-adapter", "half-adapter"])
@pytest.mark.parametrize(("method", "factory", "fields"), CASES)
def test_half_precision_forward(method, factory, fields, dtype, autocast, generator):
    reference = adapted(method, factory, fields)
    model = get_peft_model(
        build(factory).to(dtype), make_config(method, fields, init_weights=False), autocast_adapter_dtype=autocast
    ).eval()
    model.load_state_dict(reference.state_dict())
    for name, p in model.named_parameters():
        if f"{method}_" in name:
            assert p.dtype == (torch.float32 if autocast else dtype), name
    x = reference.inputs(generator)
    out = run(model, x if not x.is_floating_point() else x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    close(out.float(), run(reference, x), 0.1)


# -- training -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "factory", "fields"), CASES)
def test_training_updates_only_adapter_parameters(method, factory, fields, generator):
    model = adapted(method, factory, fields)
    model.train()
    x = model.inputs(generator)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f"{method}_" in n or "modules_to_save" in n for n in trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    target = torch.randn(BATCH, 3, generator=generator)

    def loss_now() -> torch.Tensor:
        return (model(x) - target).pow(2).mean()

    losses = []
    for step in range(4):
        model.zero_grad()
        loss = loss_now()
        loss.backward()
        if not step:  # every trainable parameter gets a non-zero gradient from a moved start
            assert all(
                p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable
            )
        losses.append(loss.item())
        # gradient descent with backtracking: the gradient must be a descent direction at some step size
        # (SinLoRA's sine of frequency 30 makes any one fixed rate too large for some random draws)
        # A rejected step restores saved values: adding a large step back is not exact in float32, and the
        # rounding, through the sine, can raise the loss.
        grads = [p.grad.clone() for p in params]
        start = [p.detach().clone() for p in params]
        lr = 1e-3 if "dropout" in fields else 1.0  # dropout makes the loss random: one small step
        for _ in range(30):
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(lr * g)
                if "dropout" in fields or loss_now().item() < losses[-1]:
                    break
                for p, s in zip(params, start, strict=True):
                    p.copy_(s)
            lr /= 4
    with torch.no_grad():
        losses.append(loss_now().item())
    if "dropout" not in fields:
        assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name


@pytest.mark.parametrize("method", list(METHODS))
def test_requires_grad_follows_active_adapter(method):
    model = get_peft_model(build(MLP), make_config(method, {"target_modules": ["lin0"]}))
    model.add_adapter("other", make_config(method, {"target_modules": ["lin1"]}))
    grads = {n: p.requires_grad for n, p in model.named_parameters() if f"{method}_" in n}
    assert all(v == n.endswith(".default") for n, v in grads.items())
    model.set_adapter("other")
    grads = {n: p.requires_grad for n, p in model.named_parameters() if f"{method}_" in n}
    assert all(v == n.endswith(".other") for n, v in grads.items())
    model.set_requires_grad("default", requires_grad=True)
    assert all(p.requires_grad for n, p in model.named_parameters() if f"{method}_" in n)


def test_unsupported_layer_is_named():
    class WithEmbedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)

    for method in METHODS:
        with pytest.raises(TypeError, match="'emb' of type Embedding"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(WithEmbedding(), make_config(method, {"target_modules": ["emb"]}))


# -- the feature table of docs/guide.md, for the PEFT methods beside ours ----------------------------------------


class AllLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 6)
        self.gpt2_conv1d = Conv1D(6, 8)
        self.conv1d = nn.Conv1d(2, 4, 3)
        self.conv2d = nn.Conv2d(2, 4, 3)
        self.conv2d_groups = nn.Conv2d(4, 4, 3, groups=2)
        self.emb = nn.Embedding(10, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _table_config(method: str, targets: list[str]) -> PeftConfig:
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    makers = {
        "lora": lambda: LoraConfig(target_modules=targets, r=2, init_lora_weights=False),
        "loha": lambda: LoHaConfig(target_modules=targets, r=2, init_weights=False),
        "lokr": lambda: LoKrConfig(target_modules=targets, r=2, init_weights=False),
        "kradapter": lambda: make_config("kradapter", {"target_modules": targets}, init_weights=False),
        "sinlora": lambda: make_config("sinlora", {"target_modules": targets, "r": 1}, init_weights=False),
    }
    return makers[method]()


TABLE = {  # layer types accepted, per-sample adapter_names, PeftMixedModel
    "lora": ({"lin", "gpt2_conv1d", "conv1d", "conv2d", "conv2d_groups", "emb"}, True, True),
    "loha": ({"lin", "conv1d", "conv2d", "conv2d_groups"}, False, True),
    "lokr": ({"lin", "conv1d", "conv2d", "conv2d_groups"}, False, True),
    "kradapter": ({"lin", "gpt2_conv1d", "conv1d", "conv2d", "conv2d_groups"}, True, False),
    "sinlora": ({"lin", "gpt2_conv1d", "conv1d", "conv2d", "conv2d_groups"}, True, False),
}


@pytest.mark.parametrize("method", list(TABLE))
def test_guide_feature_table(method, generator):
    """What docs/guide.md's table says of each method, checked on PEFT 0.21 and this package."""
    layer_types, per_sample, mixed = TABLE[method]
    accepted = set()
    for name in ("lin", "gpt2_conv1d", "conv1d", "conv2d", "conv2d_groups", "emb"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                get_peft_model(AllLayers(), _table_config(method, [name]))
                accepted.add(name)
            except (TypeError, ValueError):
                pass
    assert accepted == layer_types
    torch.manual_seed(0)
    model = get_peft_model(AllLayers(), _table_config(method, ["lin"]))
    model.add_adapter("other", _table_config(method, ["lin"]))
    model.eval()
    x = torch.randn(3, 8, generator=generator)
    close(run(pickle.loads(pickle.dumps(model)), x), run(model, x), 0)
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        got = model(x, adapter_names=names)
    if not per_sample:  # PEFT 0.21's LoHa and LoKr take the argument and silently run the active adapter
        model.set_adapter("other")
        assert not torch.allclose(got[:1], run(model, x[:1]), atol=1e-4)
        model.set_adapter("default")
        close(got, run(model, x))
    else:
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    want = run(model, x[i : i + 1])
            else:
                model.set_adapter(name)
                want = run(model, x[i : i + 1])
            close(got[i : i + 1], want)
    if mixed:
        get_peft_model(AllLayers(), _table_config(method, ["lin"]), mixed=True)
    else:
        with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
            get_peft_model(AllLayers(), _table_config(method, ["lin"]), mixed=True)
