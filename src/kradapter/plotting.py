"""Figures: the shared matplotlib setup (headless), the one atomic figure writer, and the plots of learned updates.

Every figure of the package is written by :func:`write_figure` (through :func:`kradapter.files.write_atomic`), so a
reader never sees half a PNG; matplotlib is imported only when a figure is made, so importing this module is cheap.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .files import write_atomic

FIGURE_DPI = 130


def pyplot(font_size: float | None = None) -> Any:
    """``matplotlib.pyplot`` on the headless Agg backend (forced: a figure never needs a display), with the font
    size if given."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if font_size is not None:
        plt.rcParams.update({"font.size": font_size})
    return plt


def write_figure(fig: Any, path: Path | str, **savefig: Any) -> Path:
    """A matplotlib figure written atomically (format from the suffix, PNG without one), then closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", **savefig)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
    return path


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
    plt = pyplot()
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
    import torch

    from .analysis import RESOLUTION

    plt = pyplot()
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
