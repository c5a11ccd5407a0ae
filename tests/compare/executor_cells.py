"""Module-level helpers for the compare executor tests (Ray workers import them by reference)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from kradapter.compare import study

CELL = study.cell_unit  # the real one, whatever a test puts in its place in the driver


def crash_on(method: str, counter: str, *args: Any) -> dict[str, Any]:
    """``study.cell_unit``, except that the cell of ``method`` counts its attempt in ``counter`` and then dies the
    way an out-of-memory kill does (SIGKILL of the worker process)."""
    if args[0] == method:
        with Path(counter).open("a") as f:
            f.write(f"{os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return CELL(*args)


def fit_bits(method: str, shape: tuple[int, int], seed: int, iterations: int) -> dict[str, Any]:
    """One cell's fitted update as raw float32 bits (the records round to 7 digits; this does not)."""
    import torch

    from kradapter.compare.config import StudyConfig, with_changes
    from kradapter.compare.fit import fit_method
    from kradapter.compare.matrices import load_target

    config = with_changes(StudyConfig(), matrices={"size": shape}, training={"iterations": iterations})
    target = load_target("random_noise", seed, config, torch.float32, torch.device("cpu"))
    fit = fit_method(study.plan_method(method, shape, config), target.matrix, config, seed)
    return {"update": fit.update.numpy().tobytes().hex(), "loss": fit.loss, "threads": torch.get_num_threads()}
