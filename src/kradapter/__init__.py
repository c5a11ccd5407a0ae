"""KRAdapter: Khatri-Rao product adapters for parameter-efficient fine-tuning (ICCV 2025).

``KRAdapterConfig`` and ``SinLoRAConfig`` are PEFT methods: after ``import kradapter``, PEFT knows them by their
``peft_type`` (``get_peft_model``, ``PeftModel.from_pretrained``), whether PEFT was imported before or after.

Names load on first use (PEP 562), so ``import kradapter`` and the ``kradapter`` command start without torch,
PEFT or transformers; the studies (``kradapter.compare``, ``kradapter.finetune``) are never imported by it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "KRAdapterConfig": "tuners",
    "KRAdapterModel": "tuners",
    "SinLoRAConfig": "tuners",
    "SinLoRAModel": "tuners",
    "KRAdapterLinear": "layer",
    "KhatriRaoShape": "shape",
    "delta_weight": "khatri_rao",
    "khatri_rao_linear": "khatri_rao",
    "sinlora_delta": "sinlora",
}
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

if TYPE_CHECKING:
    from .khatri_rao import delta_weight, khatri_rao_linear
    from .layer import KRAdapterLinear
    from .shape import KhatriRaoShape
    from .sinlora import sinlora_delta
    from .tuners import KRAdapterConfig, KRAdapterModel, SinLoRAConfig, SinLoRAModel


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kradapter' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


def _register_tuners() -> None:
    importlib.import_module(".tuners", __name__)  # registers itself with PEFT at import


class _RegisterAfterPeft(importlib.abc.MetaPathFinder):
    """Registers the tuners right after ``peft`` finishes importing (then leaves ``sys.meta_path``)."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            if "kradapter.tuners" not in sys.modules:  # else the tuners are importing peft and register themselves
                _register_tuners()

        loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if "peft" in sys.modules:
    _register_tuners()
elif not any(isinstance(f, _RegisterAfterPeft) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterPeft())
