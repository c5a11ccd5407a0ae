"""The learned-update analysis, now in :mod:`kradapter.analysis` (figures in :mod:`kradapter.plotting`); these names
stay importable from here for existing code."""

from __future__ import annotations

from ..analysis import (
    RESOLUTION,
    SPECTRUM_TOP,
    adapted_layers,
    analyse_updates,
    effective_rank,
    layer_update,
    singular_values,
    stable_rank,
    summarise_updates,
    update_metrics,
    updates_summary,
)
from ..plotting import FIGURE_DPI, plot_effective_rank, plot_spectra

__all__ = [
    "FIGURE_DPI",
    "RESOLUTION",
    "SPECTRUM_TOP",
    "adapted_layers",
    "analyse_updates",
    "effective_rank",
    "layer_update",
    "plot_effective_rank",
    "plot_spectra",
    "singular_values",
    "stable_rank",
    "summarise_updates",
    "update_metrics",
    "updates_summary",
]
