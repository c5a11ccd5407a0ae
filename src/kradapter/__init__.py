"""KRAdapter: Khatri-Rao product adapters for parameter-efficient fine-tuning (ICCV 2025).

Importing this package registers ``KRAdapterConfig`` and ``SinLoRAConfig`` with Hugging Face PEFT.
"""

from .khatri_rao import KhatriRaoShape, delta_weight, khatri_rao_linear
from .layer import KRAdapterLinear
from .sinlora import sinlora_delta
from .tuners import KRAdapterConfig, KRAdapterModel, SinLoRAConfig, SinLoRAModel, register

register()

__version__ = "0.1.0"
__all__ = [
    "KRAdapterConfig",
    "KRAdapterLinear",
    "KRAdapterModel",
    "KhatriRaoShape",
    "SinLoRAConfig",
    "SinLoRAModel",
    "delta_weight",
    "khatri_rao_linear",
    "sinlora_delta",
]
