"""KRAdapter as a PEFT tuner layer: a thin skin over :mod:`kradapter.khatri_rao`.

The update of a convolution is its weight seen as an ``(out_channels, in_channels / groups * prod(kernel))``
matrix, the same Khatri-Rao update and the same memory-lean autograd functions as for a linear layer.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from ...khatri_rao import (
    KhatriRaoShape,
    delta_weight,
    delta_weight_traceable,
    fusing_pays,
    init_factors,
    khatri_rao_conv,
    khatri_rao_linear,
)
from ..base import DeltaLayer, concrete
from .config import KRAdapterConfig


class KRAdapterLayer(DeltaLayer):
    adapter_layer_names = ("kradapter_u", "kradapter_v")
    other_param_names = ("kradapter_shape", "kradapter_scaling", "kradapter_execution", "kradapter_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.kradapter_u = nn.ParameterDict({})
        self.kradapter_v = nn.ParameterDict({})
        self.kradapter_dropout = nn.ModuleDict({})
        self.kradapter_shape: dict[str, KhatriRaoShape] = {}
        self.kradapter_scaling: dict[str, float] = {}
        self.kradapter_execution: dict[str, str] = {}

    def update_layer(self, adapter_name: str, config: KRAdapterConfig) -> None:
        shape = KhatriRaoShape(*self.update_shape, config.factorization)  # type: ignore[arg-type]
        self.kradapter_shape[adapter_name] = shape
        self.kradapter_scaling[adapter_name] = float(config.scaling)
        self.kradapter_execution[adapter_name] = config.execution
        self.kradapter_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.kradapter_u[adapter_name] = nn.Parameter(torch.empty(shape.u_shape))
        self.kradapter_v[adapter_name] = nn.Parameter(torch.empty(shape.v_shape))
        init_factors(self.kradapter_u[adapter_name], self.kradapter_v[adapter_name], config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def delta_matrix(self, adapter: str) -> torch.Tensor:
        shape = self.kradapter_shape[adapter]
        return self.kradapter_scaling[adapter] * delta_weight(
            self.kradapter_u[adapter], self.kradapter_v[adapter], shape
        )

    def fuses(self, adapter: str, x: torch.Tensor | None = None) -> bool:
        """The documented rule: fuse into one matmul unless told not to, dropout makes the adapter's input differ
        from the base's, the base is not a plain dense layer or convolution, or (for a linear input ``x``) the
        separate path is faster (:func:`kradapter.khatri_rao.fusing_pays`; measurements in BENCHMARKS.md)."""
        execution = self.kradapter_execution[adapter]
        dropout_active = cast(Any, self).training and not isinstance(self.kradapter_dropout[adapter], nn.Identity)
        if execution == "separate" or dropout_active or not self.can_fuse():
            return False
        if execution == "fused" or x is None or self.conv is not None or torch.compiler.is_compiling():
            return True
        return fusing_pays(self.kradapter_shape[adapter], x)

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        first = adapters[0]
        if self.fuses(first, x):
            base: Any = self.get_base_layer()
            result = self._term(x, first, base.weight if self.conv is not None else self.base_weight(), base.bias)
            adapters = adapters[1:]
        else:
            result = self.base_layer(x, *args, **kwargs)
        for adapter in adapters:
            result = result + self.adapter_term(x, adapter).to(result.dtype)
        return result

    def adapter_term(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        return self._term(self.kradapter_dropout[adapter](x), adapter)

    def _term(
        self, x: torch.Tensor, adapter: str, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` through ``W + s * dW`` (or the adapter alone without ``weight``), saving only ``x, U, V``."""
        factors = (self.kradapter_u[adapter], self.kradapter_v[adapter], self.kradapter_shape[adapter])
        scaling = self.kradapter_scaling[adapter]
        if torch.compiler.is_compiling():  # plain operations that Dynamo traces and the compiler fuses
            delta = scaling * delta_weight_traceable(*factors)
            merged = delta if weight is None else weight.reshape(delta.shape) + delta
            return self.apply_update(x, merged.to(x.dtype), None if bias is None else bias.to(x.dtype))
        if self.conv is not None:
            return khatri_rao_conv(self.conv_input(x), *factors, scaling, self.conv, weight, bias)
        return khatri_rao_linear(x, *factors, scaling, weight, bias)


Linear = concrete(KRAdapterLayer, "Linear", __name__)
"""KRAdapter around an ``nn.Linear`` or ``Conv1D``."""
Conv = concrete(KRAdapterLayer, "Conv", __name__)
"""KRAdapter around an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``."""
