"""Factor sizes of a KRAdapter update: pure arithmetic on a layer's shape, importable without torch.

The studies and the command line size and validate adapters with it before any heavy library is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from . import guards

Factorization = Literal["sqrt_min", "sqrt_max"]
FACTORIZATIONS: tuple[str, ...] = ("sqrt_min", "sqrt_max")


@dataclass(frozen=True)
class KhatriRaoShape:
    """Factor sizes of a KRAdapter update for a ``(out_features, in_features)`` weight.

    ``"sqrt_min"`` (the published layer): ``r = floor(sqrt(m))``, ``r2`` the smallest integer with
    ``r * r2 >= M``. ``"sqrt_max"`` (the paper's matrix study): ``r = floor(sqrt(M))``,
    ``r2 = ceil(M / r)``; fewest parameters, about ``2 * m * sqrt(M)``.
    """

    out_features: int
    in_features: int
    factorization: Factorization = "sqrt_min"

    def __post_init__(self) -> None:
        for name in ("out_features", "in_features"):
            value = getattr(self, name)
            if not guards.is_int(value, 1):
                raise ValueError(f"KRAdapter needs a positive integer {name}, got {value!r}")
        if self.factorization not in FACTORIZATIONS:
            raise ValueError(f"unknown KRAdapter factorization {self.factorization!r}; choose one of {FACTORIZATIONS}")

    @cached_property
    def m(self) -> int:
        return min(self.out_features, self.in_features)

    @cached_property
    def M(self) -> int:  # noqa: N802 - the paper's notation
        return max(self.out_features, self.in_features)

    @cached_property
    def r(self) -> int:
        return math.isqrt(self.m if self.factorization == "sqrt_min" else self.M)

    @cached_property
    def r2(self) -> int:
        return -(-self.M // self.r)

    @cached_property
    def transposed(self) -> bool:
        """True when the ``m`` side is the input side, so ``dW = K[:, :M]^T``."""
        return self.out_features > self.in_features

    @cached_property
    def num_params(self) -> int:
        return self.m * (self.r + self.r2)

    @cached_property
    def u_shape(self) -> tuple[int, int]:
        return (self.m, self.r)

    @cached_property
    def v_shape(self) -> tuple[int, int]:
        return (self.m, self.r2)

    @cached_property
    def blocks(self) -> tuple[int, int]:
        """``(q, tail)``: ``K``'s first ``M`` columns are ``q`` whole ``r``-wide blocks and ``tail < r`` more."""
        return divmod(self.M, self.r)
