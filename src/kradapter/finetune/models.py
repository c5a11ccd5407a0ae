"""The model side of a run: the pretrained classifier, its new head, the target layers, and each method's model.

Baselines are plain PyTorch (the head alone on cached features, or every weight); adapters go through
``peft.get_peft_model`` with configs from :mod:`kradapter.registry`, all at KRAdapter's trainable count on the
same target layers, the head trained by all (``modules_to_save``).
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers import logging as hf_logging
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.pytorch_utils import Conv1D

from .. import registry
from .protocol import SettingsError

HEAD_NAMES = ("classifier", "score")  # where transformers keeps the head when the checkpoint already has one


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (it lists the new head as missing, which is expected)."""
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: Path | str) -> Any:
    """The model folder's tokenizer; a SettingsError naming the folder if it does not load."""
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types for a broken folder: one line naming it
        raise SettingsError(
            f"--model {str(path)!r}: the tokenizer does not load ({type(exc).__name__}: {exc})"
        ) from None


def load_classifier(path: Path | str, num_labels: int, seed: int) -> tuple[nn.Module, list[str]]:
    """The pretrained model with a ``num_labels`` head initialised from ``seed``, and the head's module names."""
    torch.manual_seed(seed)
    try:
        with quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=num_labels, output_loading_info=True, ignore_mismatched_sizes=True
            )
    except Exception as exc:  # a broken config or weights file: one line naming the folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SettingsError(
            f"--model {str(path)!r} does not load as a classifier ({type(exc).__name__}: {first})"
        ) from None
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


def build_model(
    method: str, settings: dict[str, Any], targets: list[str], path: Path, num_labels: int, seed: int
) -> nn.Module:
    """The trainable model of ``method`` (an adapter: its PEFT ``settings`` on layers ``targets``) for ``seed``: the
    head is initialised first, then the adapter, both from ``seed``; adapters train and save the head with them."""
    model, head = load_classifier(path, num_labels, seed)
    entry = registry.METHODS[method]
    if entry.trains_base:
        return model.requires_grad_(True)
    if not entry.is_adapter:
        if len(head) != 1:
            raise SettingsError(f"head-only training needs one head module; this model's head is {head}")
        return HeadProbe(copy.deepcopy(model.get_submodule(head[0])))
    return get_peft_model(model, entry.config(targets, **settings, modules_to_save=head))


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


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def save_trained(model: nn.Module, directory: Path) -> int:
    """Save what ``method`` trained (adapter + head, head, or whole model) atomically; returns its size in bytes."""
    from safetensors.torch import save_file

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if isinstance(model, HeadProbe):
        save_file({k: v.detach().contiguous() for k, v in model.head.state_dict().items()}, tmp / "head.safetensors")
    else:
        with quiet_transformers():  # no "Writing model shards" bar between the comparison's own progress lines
            model.save_pretrained(tmp)  # type: ignore[operator]
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory_bytes(directory)


def load_trained(method: str, directory: Path, path: Path | str, num_labels: int) -> nn.Module:
    """The model saved by :func:`save_trained`, rebuilt from the pretrained checkpoint plus the saved files."""
    entry = registry.METHODS[method]
    if entry.trains_base:
        with quiet_transformers():
            return AutoModelForSequenceClassification.from_pretrained(str(directory)).eval()
    model, head = load_classifier(path, num_labels, seed=0)
    if not entry.is_adapter:
        from safetensors.torch import load_file

        probe = HeadProbe(copy.deepcopy(model.get_submodule(head[0])))
        probe.head.load_state_dict(load_file(directory / "head.safetensors"))
        return probe.eval()
    return PeftModel.from_pretrained(model, str(directory)).eval()
