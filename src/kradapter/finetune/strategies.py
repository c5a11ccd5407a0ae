"""The three kinds of training, one small strategy each: the head alone on the frozen model's cached features
(:class:`HeadOnly`), every weight (:class:`Full`), or a PEFT adapter plus the head (:class:`Adapter`).

:func:`training_for` picks a method's strategy once, from its registry entry; everything else (sizing, building,
saving, loading, the data a run sees) asks the strategy, never the method's kind.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import default_data_collator

from .. import registry
from ..files import directory_bytes, replace_dir, write_atomic
from ..registry import Plan as MethodPlan
from .models import HeadProbe, load_classifier
from .pooling import quiet_transformers
from .protocol import SettingsError
from .train import Examples

if TYPE_CHECKING:
    from .plan import ModelProbe
    from .runner import Tokens


class Training:
    """What one kind of training does; subclasses override what differs."""

    learns_update = False  # whether the run learns a weight update whose spectrum is worth recording

    def __init__(self, method: registry.Method, head_input: str = "native", name: str | None = None) -> None:
        self.method = method
        self.name = name or method.name  # the method, or a variant of it at a fixed size (registry.variant)
        self.head_input = head_input  # what the head reads (Recipe.head_input): built and reloaded the same way

    def classifier(
        self, path: Path | str, num_labels: int, seed: int, trust: bool, **kw: Any
    ) -> tuple[nn.Module, list[str]]:
        """The pretrained classifier with this strategy's head input."""
        return load_classifier(path, num_labels, seed, trust_remote_code=trust, head_input=self.head_input, **kw)

    def size(self, probe: ModelProbe, budget: int, **options: Any) -> MethodPlan:
        """The method at ``budget`` on the probed layers (baselines: what they train besides the head)."""
        return MethodPlan(self.method.name, {}, 0, None)

    def build(self, size: MethodPlan, layers: list[str], model_dir: Path, num_labels: int, seed: int,
              trust: bool = False) -> nn.Module:  # fmt: skip
        """The trainable model for ``seed`` (the head initialised from ``seed`` first)."""
        raise NotImplementedError

    def save_files(self, model: nn.Module, directory: Path) -> None:
        with quiet_transformers():  # no "Writing model shards" bar between the comparison's own progress lines
            model.save_pretrained(directory)  # type: ignore[operator]

    def load(self, directory: Path, model_dir: Path | str, num_labels: int, trust: bool = False) -> nn.Module:
        """The model saved by :meth:`save`, rebuilt from the pretrained checkpoint plus the saved files (eval mode)."""
        raise NotImplementedError

    def save(self, model: nn.Module, directory: Path) -> int:
        """Save what the method trained atomically (a whole folder renamed into place); its size in bytes."""
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.save_files(model, tmp)
        replace_dir(tmp, directory)
        return directory_bytes(directory)

    def dataset(self, tokens: Tokens, indices: np.ndarray) -> Examples:
        """The examples a run of this kind reads: tokenised texts."""
        return Examples(tokens.columns, tokens.local(indices))

    def collator(self, tokens: Tokens) -> Any:
        return tokens.text_collator


class HeadOnly(Training):
    """The classifier head alone, trained on the frozen model's cached inputs to it (a linear probe)."""

    def build(self, size: MethodPlan, layers: list[str], model_dir: Path, num_labels: int, seed: int,
              trust: bool = False) -> nn.Module:  # fmt: skip
        model, head = self.classifier(model_dir, num_labels, seed, trust)
        if len(head) != 1:
            raise SettingsError(f"head-only training needs one head module; this model's head is {head}")
        return HeadProbe(copy.deepcopy(model.get_submodule(head[0])))

    def save_files(self, model: nn.Module, directory: Path) -> None:
        from safetensors.torch import save

        assert isinstance(model, HeadProbe)
        weights = {k: v.detach().contiguous() for k, v in model.head.state_dict().items()}
        write_atomic(directory / "head.safetensors", save(weights))

    def load(self, directory: Path, model_dir: Path | str, num_labels: int, trust: bool = False) -> nn.Module:
        from safetensors.torch import load_file

        model, head = self.classifier(model_dir, num_labels, 0, trust)
        probe = HeadProbe(copy.deepcopy(model.get_submodule(head[0])))
        probe.head.load_state_dict(load_file(directory / "head.safetensors"))
        return probe.eval()

    def dataset(self, tokens: Tokens, indices: np.ndarray) -> Examples:
        return Examples({"features": tokens.head_features(), "labels": tokens.columns["labels"]}, tokens.local(indices))

    def collator(self, tokens: Tokens) -> Any:
        return default_data_collator


class Full(Training):
    """Every weight of the model and its head (the whole model is saved)."""

    def size(self, probe: ModelProbe, budget: int, **options: Any) -> MethodPlan:
        return MethodPlan(self.method.name, {}, probe.base_params, None)

    def build(self, size: MethodPlan, layers: list[str], model_dir: Path, num_labels: int, seed: int,
              trust: bool = False) -> nn.Module:  # fmt: skip
        model, _ = self.classifier(model_dir, num_labels, seed, trust)
        return model.requires_grad_(True)

    def load(self, directory: Path, model_dir: Path | str, num_labels: int, trust: bool = False) -> nn.Module:
        model, _ = self.classifier(directory, num_labels, 0, trust, pooling_from=model_dir)
        return model.eval()


class Adapter(Training):
    """A PEFT adapter configured by the registry on the target layers; the head trains and saves with it."""

    learns_update = True

    def size(self, probe: ModelProbe, budget: int, **options: Any) -> MethodPlan:
        try:
            sized = registry.plan(self.name, list(probe.layers.values()), budget, **options)
            self.method.config(list(probe.layers), **sized.settings, modules_to_save=probe.head)  # PEFT's checks
        except registry.MethodError as exc:
            raise SettingsError(str(exc)) from None
        return sized

    def build(self, size: MethodPlan, layers: list[str], model_dir: Path, num_labels: int, seed: int,
              trust: bool = False) -> nn.Module:  # fmt: skip
        model, head = self.classifier(model_dir, num_labels, seed, trust)
        return get_peft_model(model, self.method.config(layers, **size.settings, modules_to_save=head))

    def load(self, directory: Path, model_dir: Path | str, num_labels: int, trust: bool = False) -> nn.Module:
        model, _ = self.classifier(model_dir, num_labels, 0, trust)
        return PeftModel.from_pretrained(model, str(directory)).eval()


def training_for(method: str, head_input: str = "native") -> Training:
    """The strategy of ``method``, from its registry entry (the one place that tells the kinds apart), building
    models whose head reads ``head_input`` (:data:`kradapter.finetune.protocol.HEAD_INPUTS`); a variant
    (``METHOD@KNOB=VALUE``) is its method's strategy at the variant's fixed size."""
    entry = registry.entry(method)
    if entry.is_adapter:
        return Adapter(entry, head_input, method)
    return Full(entry, head_input) if entry.trains_base else HeadOnly(entry, head_input)


def load_trained(method: str, directory: Path, model_dir: Path | str, num_labels: int, *,
                 trust_remote_code: bool = False, head_input: str = "native") -> nn.Module:  # fmt: skip
    """What a run of ``method`` saved in ``directory``, loaded back onto the pretrained model (eval mode), with
    the head input it was trained with."""
    return training_for(method, head_input).load(directory, model_dir, num_labels, trust_remote_code)
