"""The KRAdapter PEFT tuner: injects :class:`~.layer.Linear` / :class:`~.layer.Conv` into the targeted layers."""

from __future__ import annotations

from ..base import DeltaTuner
from .layer import Conv, KRAdapterLayer, Linear


class KRAdapterModel(DeltaTuner):
    prefix: str = "kradapter_"
    tuner_layer_cls = KRAdapterLayer
    layer_cls = Linear
    conv_cls = Conv
    not_closed_under_sums = (
        "a weighted sum of two Khatri-Rao products U * V is not a Khatri-Rao product of factors of the same shapes"
    )
