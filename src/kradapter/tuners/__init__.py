"""PEFT tuners of kradapter, registered with PEFT by :func:`register`."""

from __future__ import annotations

from .kradapter import KRAdapterConfig, KRAdapterModel
from .sinlora import SinLoRAConfig, SinLoRAModel

METHODS = {
    "KRADAPTER": (KRAdapterConfig, KRAdapterModel),
    "SINLORA": (SinLoRAConfig, SinLoRAModel),
}


def register() -> None:
    """Make PEFT know our methods by their string ``peft_type``; idempotent, PEFT itself untouched."""
    from peft import mapping

    for peft_type, (config_cls, model_cls) in METHODS.items():
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = model_cls.prefix


register()  # importing the tuners is what makes PEFT know them (``import kradapter`` arranges it)
