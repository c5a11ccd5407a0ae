"""What KRAdapter and SinLoRA share as PEFT tuners: config fields, merge/unmerge, injection.

A method only supplies its factors (``update_layer``), its scaled update (``get_delta_weight``) and
its forward for unmerged adapters (``adapted_forward``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..khatri_rao import runs_as_linear

SUPPORTED_BASE_LAYERS = (nn.Linear, Conv1D)


@dataclass
class DeltaConfig(PeftConfig):
    """Fields every PEFT user expects of a weight-update tuner config."""

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names (suffix match) or a regex (full match) of the layers to adapt."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of layers never to adapt."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: the update is exactly zero at start. False: random (for tests)."}
    )
    bias: str = field(default="none", metadata={"help": "Train biases too: 'none', 'all' or '<method>_only'."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules (e.g. a new classifier head) to train and save."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt layers with these indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list that `layers_to_transform` indexes."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a regex string")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @staticmethod
    def check_finite(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")


class DeltaLayer(BaseTunerLayer):
    """A base layer plus named adapters whose update is a dense ``(out, in)`` matrix."""

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
            self.fan_in_fan_out = False
        elif isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape
            self.fan_in_fan_out = True
        else:
            raise TypeError(f"unsupported layer type {type(base).__name__}: only nn.Linear and Conv1D")

    # -- supplied by each method -------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The scaled update of ``adapter`` in ``(out, in)`` layout, in the adapter's dtype."""
        raise NotImplementedError

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The base weight as an ``(out, in)`` view, whatever the layer's storage layout."""
        weight = self.get_base_layer().weight
        return weight.T if self.fan_in_fan_out else weight

    def can_fuse(self) -> bool:
        """True when the base layer is a plain dense layer whose forward can be replaced by ``F.linear``."""
        return runs_as_linear(self.get_base_layer(), SUPPORTED_BASE_LAYERS)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapters = [a for a in self.active_adapters if a in getattr(self, self.adapter_layer_names[0])]
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, adapters, *args, **kwargs)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active (or named) adapters into the base weight; ``safe_merge`` refuses non-finite results."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for adapter in adapter_names:
            if adapter not in getattr(self, self.adapter_layer_names[0]):
                continue
            delta = self.get_delta_weight(adapter)
            delta = (delta.T if self.fan_in_fan_out else delta).to(weight.dtype)
            if safe_merge:
                merged = weight + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"non-finite values when merging adapter {adapter!r}: the adapter is broken")
                weight.copy_(merged)
            else:
                weight.add_(delta)
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in getattr(self, self.adapter_layer_names[0]):
                delta = self.get_delta_weight(adapter)
                weight.sub_((delta.T if self.fan_in_fan_out else delta).to(weight.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Refuse, naming the module, an adapter trained for a base layer of another shape."""
        for name in self.adapter_layer_names:
            params = getattr(self, name)
            for key, tensor in state_dict.items():
                head = f"{prefix}{name}."
                if not key.startswith(head) or key[len(head) :] not in params:
                    continue
                want = tuple(params[key[len(head) :]].shape)
                if tuple(tensor.shape) != want:
                    raise ValueError(
                        f"cannot load {key}: it has shape {tuple(tensor.shape)} but module '{prefix[:-1]}' "
                        f"({self.out_features}x{self.in_features}) needs {want}; "
                        "the adapter was trained for a base model of other shapes"
                    )
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]


def concrete(layer: type[DeltaLayer]) -> type:
    """The ``nn.Module`` subclass PEFT injects; nn.Module comes first in its bases, as in PEFT's own tuners."""

    class Linear(nn.Module, layer):  # type: ignore[misc, valid-type]
        forward = DeltaLayer.forward
        _load_from_state_dict = DeltaLayer._load_from_state_dict

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: PeftConfig, **kwargs: Any) -> None:
            super().__init__()
            layer.__init__(self, base_layer, **kwargs)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, config)

        def __repr__(self) -> str:
            return f"{layer.__name__.removesuffix('Layer').lower()}.{super().__repr__()}"

    Linear.__qualname__ = Linear.__name__ = "Linear"
    return Linear


class DeltaTuner(BaseTuner):
    """Injects ``layer_cls`` in place of every targeted ``nn.Linear`` / ``Conv1D``."""

    layer_cls: type[DeltaLayer]
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(  # type: ignore[override]
        self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None:
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, SUPPORTED_BASE_LAYERS):
            raise TypeError(
                f"{type(self).__name__} cannot adapt module {current_key!r} of type {type(base).__name__}: "
                "only torch.nn.Linear and transformers Conv1D layers are supported"
            )
        new_module = self.layer_cls(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
