"""The published ``KRAdapterLinearLayer``'s execution, re-written from its formulas: the benchmarks' "before".

The published layer builds the whole update ``dW`` with a broadcast product of the factors' rows, crops and
orients it, then runs two dense matmuls, ``x @ dW^T * scaling + base(x)``. Autograd keeps ``dW`` (and the
uncropped product's graph) alive until backward, and backward runs three matmuls of the base's size. This
module reproduces exactly that execution so the library's paths can be timed against it; only the factor sizes
come from the library's shape rule. It is not used by the library. Its output equals the library's
(``tests/test_execution_paths.py`` checks it).
"""

from __future__ import annotations

import torch
from torch import nn

from kradapter.khatri_rao import KhatriRaoShape


class PublishedKRAdapterLinear(nn.Module):
    """``y = x @ dW^T * scaling + base(x)`` with ``dW`` built in full every forward, as published.

    ``weight`` is ``U`` (m x r, zeros) and ``v_weight`` is ``V`` (m x r2, Kaiming-uniform with ``a=5``),
    the published names, so a state dict loads into :class:`kradapter.KRAdapterLinear` unchanged. The
    factors take the base weight's dtype (what ``model.to(dtype)`` does to the published layer).
    """

    def __init__(self, base_layer: nn.Linear, scaling: float = 2.0) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"PublishedKRAdapterLinear wraps an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        shape = KhatriRaoShape(self.out_features, self.in_features)  # the published factor sizes ("sqrt_min")
        small, self.r, self.r2 = shape.m, shape.r, shape.r2
        self.scaling = float(scaling)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.weight = nn.Parameter(torch.zeros(small, self.r, **factory))
        self.v_weight = nn.Parameter(torch.empty(small, self.r2, **factory))
        nn.init.kaiming_uniform_(self.v_weight, a=5)

    def get_update(self) -> torch.Tensor:
        """``dW^T`` of shape ``(in, out)``: row ``i`` of the product is ``kron(V[i], U[i])``, cropped, oriented."""
        rows = (self.weight.unsqueeze(1) * self.v_weight.unsqueeze(2)).view(self.weight.shape[0], -1)
        if self.out_features > self.in_features:  # the m side must lie along the smaller layer dimension
            rows = rows.T
        return rows[: self.out_features, : self.in_features].T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.get_update() * self.scaling + self.base_layer(x)


def apply_published_layers(model: nn.Module, targets: tuple[str, ...], scaling: float = 2.0) -> list[str]:
    """Replace every ``nn.Linear`` whose name ends with one of ``targets`` by a published layer; returns their names."""
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, PublishedKRAdapterLinear(module, scaling))
            replaced.append(name)
    if not replaced:
        raise ValueError(f"no nn.Linear in the model ends with any of {targets}")
    return replaced
