"""What an adapter learned: the spectrum, effective rank and size of its weight update in every adapted layer.

The update ``dW`` of a layer is what its own PEFT layer says it is: ``layer.get_delta_weight(adapter)``, the code
that ``merge()`` runs (LoRA, LoKr, LoHa, RandLoRA, KRAdapter, SinLoRA, C3A, SHiRA, GraLoRA, and any other PEFT
layer that has it; for HiRA, whose ``get_delta_weight`` is the factor ``B A``, the frozen weight times it), so the
analysis measures the method users run, scaling included. Per layer:

- ``effective_rank``: Roy & Vetterli's ``exp(H(s / sum s))``, by :func:`kradapter.compare.metrics.effective_rank`,
  the same function as ``kradapter compare`` (0 for a zero update);
- ``stable_rank``: ``||dW||_F^2 / ||dW||_2^2`` (sum of squared singular values over the largest squared; at most
  the rank, and unlike the rank insensitive to tiny singular values; 0 for a zero update);
- ``singular_values``: the spectrum in descending order, truncated to the largest ``top`` values (default
  :data:`SPECTRUM_TOP` = 64; ``None`` keeps all ``min(out, in)``); the metrics always use the full spectrum;
- ``relative_norm``: ``||dW||_F / ||W||_F`` with ``W`` the frozen base weight (how far the update moves the layer);
- ``frobenius_norm``, ``spectral_norm`` of ``dW``, the layer's ``shape`` (out, in) and its adapter ``parameters``.

Singular values come from :func:`kradapter.compare.metrics.singular_values` (float64 Gram matrix), as in
``compare``: values below about 1e-7 of the largest are numerical zeros (a rank-``r`` update shows a floor of
them past index ``r``; on MiniLM-size layers they raise a low-rank update's effective rank by a relative ~1e-5);
:func:`plot_spectra` leaves out values below :data:`RESOLUTION`. Results are JSON-able lists of dicts. The plot
functions import matplotlib when called.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..compare.metrics import effective_rank, singular_values
from ..store import write_figure

SPECTRUM_TOP = 64
FIGURE_DPI = 130
RESOLUTION = 1e-6  # singular values below this fraction of the largest are numerical zeros (float64 Gram matrix)


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
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ValueError(f"top must be a positive integer or None, got {top!r}")
    s = singular_values(delta).double()
    frobenius = float(torch.sqrt((s**2).sum()))
    spectral = float(s[0]) if s.numel() else 0.0
    out: dict[str, Any] = {
        "effective_rank": effective_rank(s),
        "stable_rank": frobenius**2 / spectral**2 if spectral > 0 else 0.0,
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


def _short(name: str) -> str:
    """``base_model.model.encoder.layer.3.attention.self.query`` -> ``3.attention.self.query``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i:])
    return name


def plot_effective_rank(results: Mapping[str, Sequence[Mapping[str, Any]]], path: Path | str, title: str = "") -> Path:
    """Effective rank of the update per adapted layer, one line per method (the paper's figure).

    ``results`` maps a method label to its :func:`analyse_updates` rows (same layers in the same order). The
    dashed line is ``min(out, in)`` of each layer, the largest possible rank.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("no methods to plot")
    first = next(iter(results.values()))
    labels = [_short(r["layer"]) for r in first]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(labels) + 2), 4.2))
    for method, rows in results.items():
        ax.plot(range(len(rows)), [r["effective_rank"] for r in rows], marker="o", ms=3, label=method)
    ax.plot(range(len(first)), [min(r["shape"]) for r in first], "k--", lw=1, label="min(out, in)")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("effective rank of dW")
    ax.set_yscale("log")
    ax.set_title(title or "Effective rank of the learned update per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return write_figure(fig, path, dpi=FIGURE_DPI)


def plot_spectra(
    results: Mapping[str, Sequence[Mapping[str, Any]]],
    path: Path | str,
    layers: Sequence[str] | None = None,
    max_layers: int = 4,
) -> Path:
    """Singular values of the update (normalised by the largest, numerical zeros left out) for a few layers, one
    panel per layer.

    ``layers`` names the layers to show (default: ``max_layers`` spread evenly over the model).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("no methods to plot")
    first = next(iter(results.values()))
    names = [r["layer"] for r in first]
    if layers is None:
        step = max(1, len(names) // max_layers)
        layers = names[::step][:max_layers]
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; the analysed layers are {names}")
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 3.2), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        for method, rows in results.items():
            row = next(r for r in rows if r["layer"] == layer)
            s = torch.tensor(row["singular_values"], dtype=torch.float64)
            if s.numel() and s[0] > 0:
                s = s / s[0]
                s = s[s >= RESOLUTION]  # numerical zeros: not drawn
                ax.plot(range(1, s.numel() + 1), s.numpy(), label=method)
        ax.set_yscale("log")
        ax.set_xlabel("index")
        ax.set_title(_short(layer), fontsize=8)
    axes[0][0].set_ylabel("singular value / largest")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return write_figure(fig, path, dpi=FIGURE_DPI)
