"""What KRAdapter and SinLoRA share as PEFT tuners: config fields, merge/unmerge, injection, per-sample adapters.

A method only supplies its factors (``update_layer``), its scaled update (``get_delta_weight``), what one adapter
adds to the base layer's output (``adapter_term``) and, optionally, a fused forward (``adapted_forward``).
Linear layers, transformers ``Conv1D`` and ``nn.Conv1d/2d/3d`` differ only in how the ``update_shape`` matrix
maps onto the weight (:meth:`DeltaLayer.to_weight_layout`) and which operation applies it
(:meth:`DeltaLayer.apply_update`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import guards
from ..khatri_rao import ConvGeometry, runs_as_linear
from . import quantized

SUPPORTED_BASE_LAYERS = (nn.Linear, Conv1D)
# Convolutions: the update is the (out_channels, in_channels / groups * prod(kernel)) matrix the weight reshapes to.
CONV_BASE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BASE_PLACEHOLDER = "__base__"  # in `adapter_names`: this sample runs through the base layer alone, as in PEFT's LoRA


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
            self.target_modules = cast(Any, set(self.target_modules))
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = cast(Any, set(self.exclude_modules))
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a regex string")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @staticmethod
    def check_finite(name: str, value: Any) -> None:
        guards.finite_number(name, value)


class DeltaLayer(BaseTunerLayer):
    """A base layer plus named adapters whose update is a dense ``(out, in)`` matrix."""

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        base: Any = self.get_base_layer()
        # A quantized base (bitsandbytes, torchao): its backend knows the shape of a packed weight.
        self.quantization_backend = quantized.resolve(base, kwargs.get("get_apply_tensor_subclass"))
        if self.quantization_backend is not None:
            self.out_features, self.in_features = self.quantization_backend.features(base)
            self.fan_in_fan_out = False
        elif isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
            self.fan_in_fan_out = False
        elif isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape
            self.fan_in_fan_out = True
        elif isinstance(base, CONV_BASE_LAYERS):
            self.in_features, self.out_features = base.in_channels, base.out_channels
            self.fan_in_fan_out = False
        else:
            raise TypeError(
                f"unsupported layer type {type(base).__name__}: only nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d"
            )
        self.conv = conv_geometry(base) if isinstance(base, CONV_BASE_LAYERS) else None

    # -- supplied by each method -------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The scaled update of ``adapter`` as an ``update_shape`` matrix, in the adapter's dtype."""
        raise NotImplementedError

    def adapter_term(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """What ``adapter`` adds to the base layer's output for input ``x`` (its dropout included)."""
        raise NotImplementedError

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output plus each adapter's term; a method may override it to fuse."""
        result = self.base_layer(x, *args, **kwargs)
        for adapter in adapters:
            result = result + self.adapter_term(x, adapter).to(result.dtype)
        return result

    # -- shared -------------------------------------------------------------------------------
    @property
    def update_shape(self) -> tuple[int, int]:
        """``(out, in)`` of the update matrix: ``(out_channels, in_channels / groups * prod(kernel))`` for a conv."""
        return self.conv.update_shape if self.conv is not None else (self.out_features, self.in_features)

    def base_weight(self) -> torch.Tensor:
        """The base weight as an ``update_shape`` view, whatever the layer's storage layout."""
        weight: Any = self.get_base_layer().weight
        if self.conv is not None:
            return weight.flatten(1)
        return weight.T if self.fan_in_fan_out else weight

    def to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """An ``update_shape`` matrix in the base weight's own layout (transposed for Conv1D, the kernel's shape)."""
        if self.conv is not None:
            return delta.reshape(self.conv.weight_shape)
        return delta.T if self.fan_in_fan_out else delta

    def conv_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the convolution of :attr:`conv` takes it: padded here when the base layer pads by name
        (``"same"``) or with a mode other than zeros, as its own forward does."""
        base: Any = self.get_base_layer()
        if self.conv is None or (base.padding_mode == "zeros" and not isinstance(base.padding, str)):
            return x
        mode = "constant" if base.padding_mode == "zeros" else base.padding_mode
        return F.pad(x, base._reversed_padding_repeated_twice, mode=mode)

    def apply_update(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` through this layer's operation with an ``update_shape`` ``weight`` (``F.linear`` or the conv)."""
        if self.conv is not None:
            return self.conv.conv(self.conv_input(x), weight, bias)
        return F.linear(x, weight, bias)

    def can_fuse(self) -> bool:
        """True when the base layer is a plain dense layer whose forward can be replaced by ``F.linear``."""
        return self.quantization_backend is None and runs_as_linear(
            self.get_base_layer(), SUPPORTED_BASE_LAYERS + CONV_BASE_LAYERS
        )

    def check_forward_args(self, x: torch.Tensor, adapter_names: list[str] | None) -> None:
        """PEFT LoRA's checks, word for word, of per-sample ``adapter_names``."""
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Sample ``i`` of the batch through adapter ``adapter_names[i]`` (``"__base__"``: the base layer alone)."""
        result = self.base_layer(x, *args, **kwargs)
        known = getattr(self, self.adapter_layer_names[0])
        for adapter in dict.fromkeys(adapter_names):
            if adapter == BASE_PLACEHOLDER or adapter not in known:  # a layer that this adapter does not target
                continue
            rows = [i for i, name in enumerate(adapter_names) if name == adapter]
            index = torch.tensor(rows, device=result.device)
            term = self.adapter_term(x[index], adapter)
            result = result.index_add(0, index, term.to(result.dtype))
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        self.check_forward_args(x, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:  # per sample, whichever adapters are active
            return self.mixed_batch_forward(x, adapter_names, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapters = [a for a in self.active_adapters if a in getattr(self, self.adapter_layer_names[0])]
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            return quantized.forward(self, x, adapters, *args, **kwargs)
        return self.adapted_forward(x, adapters, *args, **kwargs)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active (or named) adapters into the base weight; ``safe_merge`` refuses non-finite results."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight: Any = self.get_base_layer().weight
        for adapter in adapter_names:
            if adapter not in getattr(self, self.adapter_layer_names[0]):
                continue
            if self.quantization_backend is not None:  # dequantize, add, requantize
                quantized.add_update(self, adapter, 1, safe_merge)
                self.merged_adapters.append(adapter)
                continue
            delta = self.to_weight_layout(self.get_delta_weight(adapter)).to(weight.dtype)
            if safe_merge:
                merged = weight + delta
                if not torch.isfinite(merged).all():
                    raise quantized.broken_adapter(adapter)
                weight.copy_(merged)
            else:
                weight.add_(delta)
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight: Any = self.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in getattr(self, self.adapter_layer_names[0]) and self.quantization_backend is not None:
                quantized.add_update(self, adapter, -1)  # approximate: requantizing rounds again
            elif adapter in getattr(self, self.adapter_layer_names[0]):
                weight.sub_(self.to_weight_layout(self.get_delta_weight(adapter)).to(weight.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
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
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)


def conv_geometry(conv: Any) -> ConvGeometry:
    """The geometry of an ``nn.Conv1d/2d/3d``, with its padding made explicit (see :meth:`DeltaLayer.conv_input`)."""
    if conv.transposed:
        raise TypeError(f"transposed convolutions ({type(conv).__name__}) are not supported")
    explicit = conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
    dims = conv.weight.dim() - 2
    return ConvGeometry(
        weight_shape=tuple(conv.weight.shape),
        stride=tuple(conv.stride),
        padding=tuple(conv.padding) if explicit else (0,) * dims,
        dilation=tuple(conv.dilation),
        groups=conv.groups,
    )


def concrete(layer: type[DeltaLayer], name: str, module: str) -> type:
    """The ``nn.Module`` subclass PEFT injects, named ``module.name`` so that pickle finds it; nn.Module comes first
    in its bases, as in PEFT's own tuners (``Linear`` wraps nn.Linear/Conv1D, ``Conv`` nn.Conv1d/2d/3d)."""

    class Injected(nn.Module, layer):  # type: ignore[misc, valid-type]
        forward = DeltaLayer.forward
        _load_from_state_dict = DeltaLayer._load_from_state_dict

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: PeftConfig, **kwargs: Any) -> None:
            super().__init__()
            layer.__init__(self, base_layer, **kwargs)
            self._active_adapter = adapter_name
            cast(Any, self).update_layer(adapter_name, config)

        def __repr__(self) -> str:
            return f"{layer.__name__.removesuffix('Layer').lower()}.{super().__repr__()}"

    Injected.__qualname__ = Injected.__name__ = name
    Injected.__module__ = module
    return Injected


class DeltaTuner(BaseTuner):
    """Injects ``layer_cls`` in place of every targeted ``nn.Linear`` / ``Conv1D``, ``conv_cls`` in place of every
    targeted ``nn.Conv1d/2d/3d``."""

    layer_cls: type[DeltaLayer]
    conv_cls: type[DeltaLayer]
    target_module_mapping = cast(Any, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Per-sample adapters, ``model(..., adapter_names=[...])``, as PEFT's LoRA takes them (and its errors)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known: set[str] = set()
        for module in self.model.modules():
            if isinstance(module, self.tuner_layer_cls):
                known |= set(getattr(module, module.adapter_layer_names[0]).keys())
        unknown = {name for name in adapter_names if name != BASE_PLACEHOLDER} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:  # generate() repeats every input num_beams times
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        hook = partial(_inject_adapter_names, adapter_names=adapter_names)
        handles = [
            cast(Any, module).register_forward_pre_hook(hook, with_kwargs=True)
            for module in self.model.modules()
            if isinstance(module, self.tuner_layer_cls | AuxiliaryTrainingWrapper)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _create_and_replace(  # type: ignore[override]
        self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None:
        if isinstance(target, self.tuner_layer_cls):
            cast(Any, target).update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, SUPPORTED_BASE_LAYERS + CONV_BASE_LAYERS):
            raise TypeError(
                f"{type(self).__name__} cannot adapt module {current_key!r} of type {type(base).__name__}: "
                "only torch.nn.Linear, transformers Conv1D and torch.nn.Conv1d/Conv2d/Conv3d layers are supported"
            )
        cls = self.conv_cls if isinstance(base, CONV_BASE_LAYERS) else self.layer_cls
        new_module = cast(Any, cls)(target, adapter_name, config, **quantized.layer_kwargs(self.model))
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


def _inject_adapter_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]) -> tuple[tuple, dict]:
    """Forward pre-hook: hand ``adapter_names`` to a tuner layer or a ``modules_to_save`` wrapper."""
    kwargs["adapter_names"] = adapter_names
    return args, kwargs
