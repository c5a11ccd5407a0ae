"""The model side of a run: the pretrained classifier, its new head, the target layers, the head-only probe.

Each method's own model (built, saved, loaded) is its training strategy's (:mod:`kradapter.finetune.strategies`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.pytorch_utils import Conv1D

from ..guards import one_of
from .pooling import attach, native_pooling, quiet_transformers
from .protocol import HEAD_INPUTS, SettingsError

HEAD_NAMES = ("classifier", "score")  # where transformers keeps the head when the checkpoint already has one


def load_tokenizer(path: Path | str, *, trust_remote_code: bool = False) -> Any:
    """The model folder's tokenizer; a SettingsError naming the folder if it does not load."""
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for a broken folder: one line naming it
        raise SettingsError(
            f"--model {str(path)!r}: the tokenizer does not load ({type(exc).__name__}: {exc})"
        ) from None


def load_classifier(
    path: Path | str,
    num_labels: int,
    seed: int,
    *,
    trust_remote_code: bool = False,
    head_input: str = "native",
    pooling_from: Path | str | None = None,
) -> tuple[nn.Module, list[str]]:
    """The pretrained model with a ``num_labels`` head initialised from ``seed``, and the head's module names
    (never the folder's own code unless ``trust_remote_code``).

    ``head_input``: ``"native"`` (default) feeds the head the encoder's own sentence-transformers pooling, read
    from ``pooling_from`` (default ``path``: a saved fine-tuned model has no pooling config of its own), in place
    of the pooler; ``"pooler"`` keeps transformers' head as it is (BERT: ``tanh(dense(CLS))``).
    """
    one_of("--head-input", head_input, HEAD_INPUTS, error=SettingsError)
    mode = native_pooling(pooling_from or path) if head_input == "native" else None
    torch.manual_seed(seed)
    try:
        with quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(path),
                num_labels=num_labels,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                trust_remote_code=trust_remote_code,
            )
    except Exception as exc:  # a broken config or weights file: one line naming the folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SettingsError(
            f"--model {str(path)!r} does not load as a classifier ({type(exc).__name__}: {first})"
        ) from None
    if mode is not None:
        attach(model.base_model, mode)
    new = set(info.get("missing_keys", ()))
    new |= {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())}
    return model, head_modules(model, new)


def head_modules(model: nn.Module, new_keys: set[str]) -> list[str]:
    """Top-most modules whose parameters the checkpoint did not provide (the head); else ``classifier``/``score``."""
    params = dict(model.named_parameters())
    new = {k for k in new_keys if k in params}

    def all_new(module: str) -> bool:
        inside = [n for n in params if n.startswith(module + ".")]
        return bool(inside) and all(n in new for n in inside)

    tops: set[str] = set()
    for key in new:
        name = key.rpartition(".")[0]
        while "." in name and all_new(name.rpartition(".")[0]):
            name = name.rpartition(".")[0]
        tops.add(name)
    heads = sorted(n for n in tops if n and not any(n.startswith(t + ".") for t in tops))
    if not heads:
        heads = [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
    if not heads:
        raise ValueError(
            f"cannot tell the classification head of {type(model).__name__}: "
            f"the checkpoint provides every module and it has none of {HEAD_NAMES}"
        )
    return heads


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a ``nn.Linear`` or transformers ``Conv1D``."""
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    if isinstance(module, Conv1D):
        return int(weight.shape[1]), int(weight.shape[0])
    return int(weight.shape[0]), int(weight.shape[1])


def target_layers(model: nn.Module, head: list[str], patterns: tuple[str, ...] | None) -> dict[str, tuple[int, int]]:
    """Linear layers to adapt, ``{name: (out, in)}``.

    Default: every linear layer inside the numbered transformer blocks (attention and MLP), so not the pooler or
    the head. ``patterns``: layers whose name is, or ends with ``.`` + , one of them.
    """
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | Conv1D) or any(name == h or name.startswith(h + ".") for h in head):
            continue
        if patterns:
            hit = any(name == p or name.endswith("." + p) for p in patterns)
        else:
            hit = any(part.isdigit() for part in name.split("."))
        if hit:
            layers[name] = layer_shape(module)
    if not layers:
        what = f"matching --targets {list(patterns)}" if patterns else "inside numbered transformer blocks"
        raise ValueError(f"{type(model).__name__} has no linear layers {what}")
    return layers


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class HeadProbe(nn.Module):
    """The head alone on cached inputs of the frozen model (eval mode): a linear probe, same head init per seed."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.head(features)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class _StopForwardError(Exception):
    """Raised by the hook once the head input is captured: the head itself need not run."""


class FeatureTap(nn.Module):
    """Returns, as ``logits``, the input the frozen model feeds its head (the forward stops there)."""

    def __init__(self, model: nn.Module, head: str) -> None:
        super().__init__()
        self.model = model.eval()
        self.head = model.get_submodule(head)

    def forward(self, **batch: torch.Tensor) -> SequenceClassifierOutput:
        batch.pop("labels", None)
        captured: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            captured["x"] = args[0]
            raise _StopForwardError

        handle = self.head.register_forward_pre_hook(hook)
        try:
            self.model(**batch)
        except _StopForwardError:
            pass
        finally:
            handle.remove()
        return SequenceClassifierOutput(logits=captured["x"])
