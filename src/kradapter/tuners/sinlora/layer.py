"""SinLoRA as a PEFT tuner layer: a thin skin over :mod:`kradapter.sinlora`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...sinlora import sinlora_delta
from ..base import DeltaLayer, concrete
from .config import SinLoRAConfig


class SinLoRALayer(DeltaLayer):
    adapter_layer_names = ("sinlora_A", "sinlora_B")
    other_param_names = ("sinlora_r", "sinlora_alpha", "sinlora_frequency", "sinlora_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.sinlora_A = nn.ParameterDict({})
        self.sinlora_B = nn.ParameterDict({})
        self.sinlora_dropout = nn.ModuleDict({})
        self.sinlora_r: dict[str, int] = {}
        self.sinlora_alpha: dict[str, float] = {}
        self.sinlora_frequency: dict[str, float] = {}

    def update_layer(self, adapter_name: str, config: SinLoRAConfig) -> None:
        out_features, in_features = self.update_shape
        if config.r > min(out_features, in_features):
            raise ValueError(
                f"SinLoRA rank r={config.r} exceeds the smaller side of a {out_features}x{in_features} update"
            )
        self.sinlora_r[adapter_name] = config.r
        self.sinlora_alpha[adapter_name] = float(config.alpha)
        self.sinlora_frequency[adapter_name] = float(config.frequency)
        self.sinlora_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        a = nn.Parameter(torch.empty(config.r, in_features))
        b = nn.Parameter(torch.empty(out_features, config.r))
        with torch.no_grad():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if config.init_weights:
                b.zero_()
            else:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        self.sinlora_A[adapter_name], self.sinlora_B[adapter_name] = a, b
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def delta_matrix(self, adapter: str) -> torch.Tensor:
        return sinlora_delta(
            self.sinlora_A[adapter],
            self.sinlora_B[adapter],
            self.sinlora_frequency[adapter],
            self.sinlora_alpha[adapter],
        )

    def adapter_term(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """The adapter's output alone, ``dropout(x) @ dW^T`` (or its convolution)."""
        delta = self.delta_matrix(adapter).to(x.dtype)
        return self.apply_update(self.sinlora_dropout[adapter](x), delta)


Linear = concrete(SinLoRALayer, "Linear", __name__)
"""SinLoRA around an ``nn.Linear`` or ``Conv1D``."""
Conv = concrete(SinLoRALayer, "Conv", __name__)
"""SinLoRA around an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` (the update is the weight's matrix view)."""
