"""A method's ``peft_type`` that behaves like a member of PEFT's ``PeftType`` enum.

PEFT's enum is closed, so a method outside PEFT keeps a string key in PEFT's mappings. PEFT's own code reads
``config.peft_type.value`` (model cards, ``PeftMixedModel``, hot-swapping, gradient-checkpointing errors), so a
plain ``str`` breaks those paths; this ``str`` subclass has ``.value`` and ``.name`` as enum members do, compares
and hashes as its string, and round-trips through JSON and pickle as that string.
"""

from __future__ import annotations


class MethodType(str):
    """The name of a PEFT method, e.g. ``MethodType("KRADAPTER")``; equal to ``"KRADAPTER"``."""

    __slots__ = ()

    @property
    def value(self) -> str:
        """The plain string, as ``PeftType.LORA.value == "LORA"``."""
        return str.__str__(self)

    @property
    def name(self) -> str:
        """The member name, as ``PeftType.LORA.name == "LORA"``."""
        return str.__str__(self)

    def __reduce__(self) -> tuple[type[MethodType], tuple[str]]:
        return MethodType, (str.__str__(self),)
