"""Spectra and learned-update analysis shared by both studies: what an adapter learned, and how close a fit is.

Spectra (``kradapter compare`` and ``kradapter finetune`` measure with the same functions):

- :func:`singular_values`: descending, from the float64 Gram matrix of the shorter side;
- :func:`effective_rank` (Roy & Vetterli 2007): ``exp(H(p))``, ``p = s / sum(s)``; 0 for the zero matrix;
- :func:`stable_rank`: ``||dW||_F^2 / ||dW||_2^2`` (sum of squared singular values over the largest squared; at
  most the rank, and unlike the rank insensitive to tiny singular values; 0 for a zero matrix);
- :func:`nuclear_error`: the published code's "nuclear error", ``mean |s_hat - s|`` over sorted singular values.

Learned updates: the update ``dW`` of a layer is what its own PEFT layer says it is:
``layer.get_delta_weight(adapter)``, the code that ``merge()`` runs (LoRA, LoKr, LoHa, RandLoRA, KRAdapter,
SinLoRA, C3A, SHiRA, GraLoRA, and any other PEFT layer that has it; for HiRA, whose ``get_delta_weight`` is the
factor ``B A``, the frozen weight times it), so the analysis measures the method users run, scaling included. Per
layer (:func:`update_metrics`): ``effective_rank``, ``stable_rank``, ``singular_values`` (the largest ``top``,
default :data:`SPECTRUM_TOP` = 64; ``None`` keeps all; the metrics always use the full spectrum),
``relative_norm`` (``||dW||_F / ||W||_F`` with ``W`` the frozen base weight), ``frobenius_norm``,
``spectral_norm``, the layer's ``shape`` (out, in) and its adapter ``parameters``.

Singular values below about 1e-7 of the largest are numerical zeros (a rank-``r`` update shows a floor of them past
index ``r``; on MiniLM-size layers they raise a low-rank update's effective rank by a relative ~1e-5); plots leave
out values below :data:`RESOLUTION`. Results are JSON-able lists of dicts. Figures of updates are in
:mod:`kradapter.plotting`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from .guards import positive_int

SPECTRUM_TOP = 64
RESOLUTION = 1e-6  # singular values below this fraction of the largest are numerical zeros (float64 Gram matrix)


def at_least_fp32(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` detached, in float32 or wider (norms of half-precision matrices lose too much)."""
    return matrix.detach().to(torch.promote_types(matrix.dtype, torch.float32))


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values in descending order, in float32 at least.

    Square roots of the eigenvalues of the float64 Gram matrix of the shorter side: on the CPU about twice as
    fast as LAPACK's float32 SVD at 1024x768, and more accurate (each value within ~1e-8 of the largest; float32's
    SVD is within ~1e-7 of it).
    """
    m = matrix.detach().double()
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    s = torch.linalg.eigvalsh(gram).clamp_min_(0).sqrt_().flip(0)
    return s.to(torch.promote_types(matrix.dtype, torch.float32))


def effective_rank(s: torch.Tensor) -> float:
    """``exp`` of the entropy of ``s / sum(s)`` (Roy & Vetterli); 0 for an all-zero spectrum."""
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))


def stable_rank(s: torch.Tensor) -> float:
    """``sum(s^2) / max(s)^2`` of a descending spectrum ``s`` (float64); 0 for an all-zero spectrum."""
    s = s.double()
    frobenius = float(torch.sqrt((s**2).sum()))
    spectral = float(s[0]) if s.numel() else 0.0
    return frobenius**2 / spectral**2 if spectral > 0 else 0.0


def nuclear_error(s_fit: torch.Tensor, s_target: torch.Tensor) -> float:
    """Mean absolute difference of two sorted spectra (spectra only: blind to singular vectors)."""
    return float((s_fit - s_target).abs().mean())


def adapted_layers(model: nn.Module, adapter: str | None = None) -> list[tuple[str, Any, str]]:
    """``(module name, tuner layer, adapter name)`` for every PEFT tuner layer holding ``adapter``.

    ``adapter=None`` takes each layer's first active adapter. A ValueError if no layer holds the adapter.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "get_delta_weight"):
            continue
        wanted = adapter if adapter is not None else (module.active_adapters or [None])[0]
        if wanted is not None and any(_holds(getattr(module, a, None), wanted) for a in module.adapter_layer_names):
            found.append((name, module, wanted))
    if not found:
        raise ValueError(
            f"no adapted layer holds adapter {adapter!r}" if adapter else "the model has no adapted layers"
        )
    return found


def _holds(holder: Any, adapter: str) -> bool:
    """Whether a per-adapter container of a tuner layer (ModuleDict, ParameterDict, dict) has ``adapter``."""
    return isinstance(holder, nn.ModuleDict | nn.ParameterDict | dict) and adapter in holder


def _adapter_parameters(layer: Any, adapter: str) -> int:
    """Elements of the adapter's own weights in ``layer`` (its ``adapter_layer_names``; frozen bases excluded)."""
    total = 0
    for attr in layer.adapter_layer_names:
        holder = getattr(layer, attr, None)
        if _holds(holder, adapter):
            value = cast(Any, holder)[adapter]
            tensors = value.parameters() if isinstance(value, nn.Module) else [value]
            total += sum(t.numel() for t in tensors)
    return total


def layer_update(layer: Any, adapter: str) -> torch.Tensor:
    """The update ``merge()`` adds for ``adapter``: ``get_delta_weight``, times the base weight for HiRA.

    HiRA's ``get_delta_weight`` returns the factor ``B A``; its update is ``W0 * (B A)`` (entrywise), which is
    what its merge adds. Every other layer's ``get_delta_weight`` is the update itself (SHiRA's a sparse tensor,
    made dense here).
    """
    from peft.tuners.hira import HiraLayer

    delta = layer.get_delta_weight(adapter)
    if delta.layout != torch.strided:  # SHiRA's update is a sparse COO tensor
        delta = delta.to_dense()
    if isinstance(layer, HiraLayer):
        delta = layer.get_base_layer().weight * delta
    return delta


def update_metrics(delta: torch.Tensor, weight: torch.Tensor | None = None, top: int | None = SPECTRUM_TOP) -> dict:
    """The metrics of one update ``delta`` (2-D); ``weight`` is the base weight for ``relative_norm``."""
    if delta.dim() != 2:
        raise ValueError(f"the update must be a matrix, got shape {tuple(delta.shape)}")
    if top is not None:
        top = positive_int("top (or None)", top)
    s = singular_values(delta).double()
    frobenius = float(torch.sqrt((s**2).sum()))
    spectral = float(s[0]) if s.numel() else 0.0
    out: dict[str, Any] = {
        "effective_rank": effective_rank(s),
        "stable_rank": stable_rank(s),
        "frobenius_norm": frobenius,
        "spectral_norm": spectral,
    }
    if weight is not None:
        base = float(torch.linalg.vector_norm(weight.detach().double()))
        out["relative_norm"] = frobenius / base if base > 0 else math.nan
    out["singular_values"] = [float(v) for v in (s if top is None else s[:top])]
    return out


@torch.no_grad()
def analyse_updates(model: nn.Module, adapter: str | None = None, top: int | None = SPECTRUM_TOP) -> list[dict]:
    """Per adapted layer of a PEFT model, in module order: name, shape, adapter parameters and the metrics.

    Layers must not be merged (the base weight would then hold the update); a ValueError names a merged one.
    """
    rows = []
    for name, layer, active in adapted_layers(model, adapter):
        if active in getattr(layer, "merged_adapters", []):
            raise ValueError(f"layer {name!r} has adapter {active!r} merged; unmerge it before analysing the update")
        delta = layer_update(layer, active)
        weight = layer.get_base_layer().weight
        shape = [int(layer.out_features), int(layer.in_features)]
        row = {"layer": name, "adapter": active, "shape": shape, "parameters": _adapter_parameters(layer, active)}
        rows.append(row | update_metrics(delta, weight, top))
    return rows


def summarise_updates(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over layers of the scalar metrics (and the number of layers), for a results table."""
    keys = ("effective_rank", "stable_rank", "relative_norm", "frobenius_norm", "spectral_norm")
    summary: dict[str, Any] = {"layers": len(rows)}
    for key in keys:
        values = [float(r[key]) for r in rows if key in r]
        if values:
            summary[f"mean_{key}"] = sum(values) / len(values)
    return summary


def updates_summary(runs: list[Mapping[str, Any]]) -> dict[str, float]:
    """Means over the layers of every run of the learned updates' effective rank, stable rank and relative norm
    (:func:`summarise_updates`), as ``update_<metric>_mean``."""
    rows = [row for r in runs for row in r.get("updates", [])]
    means = summarise_updates(rows) if rows else {}
    keys = ("effective_rank", "stable_rank", "relative_norm")
    return {f"update_{k}_mean": means[f"mean_{k}"] for k in keys if f"mean_{k}" in means}
