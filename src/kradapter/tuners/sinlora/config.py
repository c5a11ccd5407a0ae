"""Configuration of the SinLoRA PEFT tuner."""

from __future__ import annotations

from dataclasses import dataclass, field

from ... import guards
from ..base import DeltaConfig
from ..peft_type import MethodType

PEFT_TYPE = MethodType("SINLORA")


@dataclass
class SinLoRAConfig(DeltaConfig):
    """SinLoRA: ``dW = sin(frequency * B @ A) / sqrt(in_features) * alpha / r``."""

    r: int = field(default=8, metadata={"help": "Rank of B @ A."})
    alpha: float = field(default=8.0, metadata={"help": "Scale numerator: the update is multiplied by alpha / r."})
    frequency: float = field(default=200.0, metadata={"help": "Frequency of the sine."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        guards.positive_int("SinLoRA rank r", self.r)
        self.check_finite("alpha", self.alpha)
        self.check_finite("frequency", self.frequency)
