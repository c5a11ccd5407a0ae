"""PEFT tuners of kradapter, registered with PEFT by :func:`register`."""

from __future__ import annotations

from typing import Any, cast

from .kradapter import KRAdapterConfig, KRAdapterModel
from .peft_type import MethodType
from .sinlora import SinLoRAConfig, SinLoRAModel

METHODS = {
    MethodType("KRADAPTER"): (KRAdapterConfig, KRAdapterModel),
    MethodType("SINLORA"): (SinLoRAConfig, SinLoRAModel),
}


def register() -> None:
    """Make PEFT know our methods, as ``register_peft_method`` fills PEFT's tables for its own (that function only
    accepts members of PEFT's closed enum); idempotent, PEFT itself untouched. Not mixed-compatible: PEFT's
    ``PeftMixedModel`` refuses these types with its own ``ValueError``."""
    from peft import mapping

    for peft_type, (config_cls, model_cls) in METHODS.items():
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[cast(Any, peft_type)] = config_cls
        mapping.PEFT_TYPE_TO_TUNER_MAPPING[cast(Any, peft_type)] = model_cls
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING[cast(Any, peft_type)] = model_cls.prefix


register()  # importing the tuners makes PEFT know them (kradapter imports this module once PEFT is imported)
