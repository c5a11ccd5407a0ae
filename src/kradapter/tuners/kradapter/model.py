"""The KRAdapter PEFT tuner: injects :class:`~.layer.Linear` into the targeted layers."""

from __future__ import annotations

from ..base import DeltaTuner
from .layer import KRAdapterLayer, Linear


class KRAdapterModel(DeltaTuner):
    prefix: str = "kradapter_"
    tuner_layer_cls = KRAdapterLayer
    layer_cls = Linear
