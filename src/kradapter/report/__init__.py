"""``kradapter report``: one self-contained interactive HTML page for a results folder of ``compare``,
``finetune`` or the shift study (:mod:`.data` reads the folder, :mod:`.page` draws it with Altair)."""

from __future__ import annotations

import os
from pathlib import Path

from ..files import write_atomic
from .data import ReportData, ReportError, load

__all__ = ["ReportData", "ReportError", "build_report", "load"]


def build_report(results_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write the report of ``results_dir`` to ``out`` (default ``<results_dir>/report.html``), atomically, and
    return its path; a ReportError names a folder that is not a results folder."""
    from .page import render

    data = load(Path(results_dir))
    path = Path(out) if out is not None else Path(results_dir) / "report.html"
    page = render(data)
    write_atomic(path, page)
    return path
