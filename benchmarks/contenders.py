"""Workloads and the contenders run on them, all built from the library and PEFT, never a second copy of the maths.

Every contender of a workload starts from a copy of the same base model, so they differ only in the adapter.
LoRA gets the rank whose trainable count is closest to KRAdapter's on that workload (both counts are reported),
from :func:`kradapter.registry.plan`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import get_peft_model
from torch import nn

from kradapter import assets, registry
from kradapter.tuners.kradapter import KRAdapterLayer

try:  # the benchmarks' own "before" contender; importable both as a package module and from a script
    from .published_layer import apply_published_layers
except ImportError:  # pragma: no cover - run as `python benchmarks/run.py`
    from published_layer import apply_published_layers  # type: ignore[no-redef]

MINILM_TARGETS = ("query", "key", "value", "dense")  # every nn.Linear of the encoder (no pooler)
LAYER_SHAPES = {"layer-1024x768": (1024, 768), "layer-768x1024": (768, 1024)}
LAYER_SHAPES |= {"layer-4096x4096": (4096, 4096), "layer-4096x11008": (4096, 11008)}
WORKLOADS = (*LAYER_SHAPES, "minilm", "minilm-merged")
KR = registry.budget_method().name  # the method under test
LORA = registry.reference_adapter()  # what it is timed against
TRAIN_CONTENDERS = ("base", LORA, f"{KR}-fused", f"{KR}-separate", "published")
MERGED_CONTENDERS = ("base", f"{KR}-merged", f"{LORA}-merged", f"{KR}-unmerged")


@dataclass
class Contender:
    """A model ready to run, its trainable parameters, and a ``step()`` that runs one unit of work."""

    name: str
    model: nn.Module
    params: list[nn.Parameter]
    inputs: list[torch.Tensor]
    step: Callable[[], torch.Tensor] = field(repr=False, default=lambda: torch.zeros(()))
    extra: dict = field(default_factory=dict)

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)


class SingleLayer(nn.Module):
    """One ``nn.Linear`` as a model, so PEFT can target it by name."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.layer = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def load_minilm() -> tuple[nn.Module, str]:
    """all-MiniLM-L6-v2 without its pooler (sentence embeddings mean-pool); random weights if the asset is absent.

    Step time and memory do not depend on the weights' values, so a machine without the offline asset package
    (a lent GPU, say) builds the same architecture from its published config instead.
    """
    from transformers import AutoModel, BertConfig, BertModel
    from transformers.utils import logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.set_verbosity_error()  # the pooler's weights are left out on purpose: no load report
    try:
        path = assets.minilm_dir()
    except assets.MissingPackageError:
        config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        torch.manual_seed(0)
        return BertModel(config, add_pooling_layer=False), "config only (random weights)"
    return AutoModel.from_pretrained(str(path), add_pooling_layer=False), "pretrained"


def linear_shapes(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[int, int]]:
    return [
        (m.out_features, m.in_features)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.split(".")[-1] in targets
    ]


@dataclass(frozen=True)
class Spec:
    """What a contender is: a registry method (or ``base``: no adapter; ``published``: the published layer), its
    execution (KRAdapter's ``execution`` setting, if given), a random (non-zero) update, merged or not."""

    method: str
    execution: str | None = None
    random_update: bool = False
    merge: bool = False


SPECS = {
    "base": Spec("base"),
    LORA: Spec(LORA),
    f"{KR}-fused": Spec(KR, "fused"),
    f"{KR}-separate": Spec(KR, "separate"),
    "published": Spec("published"),
    f"{KR}-merged": Spec(KR, random_update=True, merge=True),
    f"{LORA}-merged": Spec(LORA, random_update=True, merge=True),
    f"{KR}-unmerged": Spec(KR, random_update=True),
}


def adapt(base: nn.Module, name: str, targets: tuple[str, ...], plans: dict) -> tuple[nn.Module, dict]:
    """A fresh copy of ``base`` with contender ``name``'s adapter (its method's config from the registry, sized by
    ``plans[method]``); the same seed for every contender."""
    if name not in SPECS:
        raise ValueError(f"unknown contender {name!r}; choose from {tuple(SPECS)}")
    spec = SPECS[name]
    model = copy.deepcopy(base)
    torch.manual_seed(1234)
    extra: dict = {}
    if spec.method in ("base", "published"):
        model.requires_grad_(False)
        if spec.method == "base" and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # backpropagate through the frozen encoder, as adapters make it do
        if spec.method == "published":
            extra["replaced"] = len(apply_published_layers(model, targets))
        return model, extra
    method = registry.get(spec.method)
    settings = dict(plans[spec.method].settings)
    if spec.execution is not None:
        settings["execution"] = spec.execution
    if spec.random_update and method.init_setting:
        settings[method.init_setting] = False
    model = get_peft_model(model, method.config(list(targets), **settings))
    if method.rank_knob in settings:
        extra["rank"] = settings[method.rank_knob]
    layers = [m for m in model.modules() if isinstance(m, KRAdapterLayer)]
    if layers:
        extra["execution"] = spec.execution or "auto"
        extra["paths_taken"] = sorted({"fused" if m.fuses("default") else "separate" for m in layers})
    if spec.merge:
        model = model.merge_and_unload()
    return model, extra


def build(
    workload: str, contenders: tuple[str, ...], device: torch.device, dtype: torch.dtype, tokens: int, batch: int
) -> tuple[list[Contender], dict]:
    """The contenders of ``workload`` with their inputs and step functions, and the workload's description."""
    generator = torch.Generator().manual_seed(0)
    if workload in LAYER_SHAPES:
        k, d = LAYER_SHAPES[workload]
        torch.manual_seed(0)
        base: nn.Module = SingleLayer(k, d)
        targets: tuple[str, ...] = ("layer",)
        x = torch.randn(tokens, k, generator=generator).to(device, dtype).requires_grad_(True)
        inputs: dict = {"x": x}
        info = {"in_features": k, "out_features": d, "tokens": tokens, "input_requires_grad": True}
    elif workload in ("minilm", "minilm-merged"):
        base, weights = load_minilm()
        targets = MINILM_TARGETS
        seq = tokens // batch
        ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=generator).to(device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        info = {"batch": batch, "seq_len": seq, "weights": weights}
    else:
        raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}")
    base = base.to(device, dtype)
    shapes = linear_shapes(base, targets)
    budget = registry.budget_method().count(shapes)
    plans = {name: registry.plan(name, shapes, budget) for name in (KR, LORA)}
    lora = registry.get(LORA)
    info |= {"adapted_linears": len(shapes), f"{KR}_params": budget}
    info |= {f"{LORA}_rank": plans[LORA].settings[lora.rank_knob], f"{LORA}_params": plans[LORA].count}
    target = None
    if workload.startswith("minilm"):
        target = torch.randn(batch, base.config.hidden_size, generator=generator).to(device, dtype)
    built = []
    for name in contenders:
        model, extra = adapt(base, name, targets, plans)
        params = [p for p in model.parameters() if p.requires_grad]
        contender = Contender(name, model, params, list(inputs.values()), extra=extra)
        contender.step = _make_step(workload, contender, inputs, target)
        built.append(contender)
    return built, info


def _make_step(workload: str, contender: Contender, inputs: dict, target: torch.Tensor | None) -> Callable:
    """One training step (forward, backward, AdamW) or, for the merged workload, one inference forward."""
    model = contender.model
    if workload == "minilm-merged":
        model.eval()

        def infer() -> torch.Tensor:
            with torch.inference_mode():
                return model(**inputs).last_hidden_state.sum()

        return infer
    model.train()
    optimizer = torch.optim.AdamW(contender.params, lr=1e-4) if contender.params else None
    contender.extra["optimizer"] = optimizer

    def loss_fn() -> torch.Tensor:
        if workload == "minilm":
            pooled = model(**inputs).last_hidden_state.mean(dim=1)
            return (pooled - target).pow(2).mean()
        return model(inputs["x"]).pow(2).mean()

    def train() -> torch.Tensor:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        if "x" in inputs:
            inputs["x"].grad = None
        loss = loss_fn()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss.detach()

    return train
