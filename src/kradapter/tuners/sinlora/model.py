"""The SinLoRA PEFT tuner: injects :class:`~.layer.Linear` / :class:`~.layer.Conv` into the targeted layers."""

from __future__ import annotations

from ..base import DeltaTuner
from .layer import Conv, Linear, SinLoRALayer


class SinLoRAModel(DeltaTuner):
    prefix: str = "sinlora_"
    tuner_layer_cls = SinLoRALayer
    layer_cls = Linear
    conv_cls = Conv
    not_closed_under_sums = "its update, a sine of the product B A, is not linear in the factors"
