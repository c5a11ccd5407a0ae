"""Configuration of the KRAdapter PEFT tuner."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...khatri_rao import FACTORIZATIONS
from ...layer import PATHS
from ..base import DeltaConfig
from ..peft_type import MethodType

PEFT_TYPE = MethodType("KRADAPTER")


@dataclass
class KRAdapterConfig(DeltaConfig):
    """KRAdapter: a full-rank-capable Khatri-Rao update; its size follows from each layer's shape.

    ``scaling`` multiplies the update (2.0 as in the published layer). ``factorization`` is
    ``"sqrt_min"`` (published layer) or ``"sqrt_max"`` (fewer parameters, the paper's matrix study).
    ``execution`` is ``"auto"`` (fused single matmul where possible), ``"fused"`` or ``"separate"``.
    """

    scaling: float = field(default=2.0, metadata={"help": "Multiplier of the update."})
    factorization: str = field(default="sqrt_min", metadata={"help": f"One of {FACTORIZATIONS}."})
    execution: str = field(default="auto", metadata={"help": f"One of {PATHS}."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self.check_finite("scaling", self.scaling)
        if self.factorization not in FACTORIZATIONS:
            raise ValueError(f"unknown factorization {self.factorization!r}; choose one of {FACTORIZATIONS}")
        if self.execution not in PATHS:
            raise ValueError(f"unknown execution {self.execution!r}; choose one of {PATHS}")
