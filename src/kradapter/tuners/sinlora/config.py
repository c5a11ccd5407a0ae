"""Configuration of the SinLoRA PEFT tuner."""

from __future__ import annotations

from dataclasses import dataclass, field

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
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"SinLoRA rank r must be a positive integer, got {self.r!r}")
        self.check_finite("alpha", self.alpha)
        self.check_finite("frequency", self.frequency)
