"""A standalone KRAdapter layer: the authors' published ``KRAdapterLinearLayer``, fixed.

Drop-in for an ``nn.Linear`` outside PEFT. Its factors load from the published layer's state dict
(:meth:`KRAdapterLinear.load_published_state_dict`), so weights are interchangeable with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import guards
from .khatri_rao import (
    Factorization,
    KhatriRaoShape,
    delta_weight,
    fusing_pays,
    init_factors,
    khatri_rao_linear,
    runs_as_linear,
)

PATHS = ("auto", "fused", "separate")


def check_scaling(scaling: float) -> float:
    return guards.finite_number("KRAdapter scaling", scaling)


class KRAdapterLinear(nn.Module):
    """``y = base(x) + scaling * x @ dW^T`` with a Khatri-Rao ``dW``; the base layer is frozen.

    ``path`` picks the execution: ``"fused"`` runs one matmul against ``W + scaling * dW``;
    ``"separate"`` runs the base layer and the update as two terms (both save only ``x, U, V``);
    ``"auto"`` (default) is ``"fused"`` for a plain ``nn.Linear`` base without hooks, ``"separate"`` otherwise
    (:meth:`execution_path`).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        scaling: float = 2.0,
        factorization: Factorization = "sqrt_min",
        init_zero: bool = True,
        path: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"KRAdapterLinear wraps an nn.Linear, got {type(base_layer).__name__}")
        if path not in PATHS:
            raise ValueError(f"unknown execution path {path!r}; choose one of {PATHS}")
        self.base_layer = base_layer.requires_grad_(False)
        self.shape = KhatriRaoShape(base_layer.out_features, base_layer.in_features, factorization)
        self.scaling = check_scaling(scaling)
        self.path = path
        # In the state dict, so a merged layer's weights load as merged (not with the update applied twice).
        self.register_buffer("merged_flag", torch.zeros((), dtype=torch.bool, device=base_layer.weight.device))
        factory: dict[str, Any] = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.kr_u = nn.Parameter(torch.empty(self.shape.u_shape, **factory))
        self.kr_v = nn.Parameter(torch.empty(self.shape.v_shape, **factory))
        init_factors(self.kr_u, self.kr_v, zero_update=init_zero)

    @property
    def merged(self) -> bool:
        """Whether the update is folded into the base weight (then the forward is the base layer's alone)."""
        return bool(self.merged_flag)

    @merged.setter
    def merged(self, value: bool) -> None:
        flag: torch.Tensor = self.merged_flag  # type: ignore[assignment]
        flag.fill_(bool(value))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """State dicts saved before the flag existed hold unmerged weights."""
        state_dict.setdefault(prefix + "merged_flag", torch.zeros((), dtype=torch.bool))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def num_params(self) -> int:
        return self.shape.num_params

    def delta_weight(self) -> torch.Tensor:
        """The unscaled update ``dW``, shape ``(out_features, in_features)``."""
        return delta_weight(self.kr_u, self.kr_v, self.shape)

    def execution_path(self, x: torch.Tensor | None = None) -> str:
        """The path ``forward`` takes (for input ``x``, if given): ``"fused"`` or ``"separate"``.

        ``"auto"`` fuses when that computes the same thing as running the base layer (a plain ``nn.Linear`` with
        no hooks) and, for ``x``, is the faster path (:func:`kradapter.khatri_rao.fusing_pays`: always, except
        half precision on the CPU with few tokens). BENCHMARKS.md has the measurements behind the rule.
        """
        if self.path != "auto":
            return self.path
        if not runs_as_linear(self.base_layer, (nn.Linear,)):
            return "separate"
        return "fused" if x is None or fusing_pays(self.shape, x) else "separate"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        if self.execution_path(x) == "separate":
            return base(x) + khatri_rao_linear(x, self.kr_u, self.kr_v, self.shape, self.scaling)
        return khatri_rao_linear(x, self.kr_u, self.kr_v, self.shape, self.scaling, base.weight, base.bias)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scaling * dW`` into the base weight; refuses a non-finite result."""
        if self.merged:
            return
        weight = self.base_layer.weight
        merged = weight + (self.scaling * self.delta_weight()).to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError("merging KRAdapter would make the base weight non-finite; the adapter is broken")
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.sub_((self.scaling * self.delta_weight()).to(weight.dtype))
        self.merged = False

    def load_published_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a state dict of the authors' ``KRAdapterLinearLayer`` (``weight`` = U, ``v_weight`` = V)."""
        renamed = {
            "kr_u": state_dict["weight"],
            "kr_v": state_dict["v_weight"],
            **{k.replace("original_layer.", "base_layer.", 1): t for k, t in state_dict.items() if "." in k},
        }
        self.load_state_dict(renamed)

    def extra_repr(self) -> str:
        s = self.shape
        return f"r={s.r}, r2={s.r2}, factorization={s.factorization!r}, scaling={self.scaling}, params={s.num_params}"
