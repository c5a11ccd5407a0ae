"""What a study records: the environment of each run, and the structure every record read back must have.

:func:`problem` is what the results store checks each record line against when it reads a folder back (a resumed
run, a report): a record of the wrong structure stops the run naming the file and line, instead of a ``KeyError``
deep in a report or, worse, a silent gap (a ``{}`` run counted among the seeds but missing from their mean).
Only the standard library is imported at load time (the store checks records before any heavy import).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

Number = (int, float)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """The machine, the torch threads, the GPU (if any) and the versions of the libraries the numbers depend on."""
    import numpy
    import peft
    import torch
    import transformers

    from . import __version__

    return {
        "kradapter": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
    }


# -- the structure of records -----------------------------------------------------------------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, Number) and not isinstance(value, bool)


def _positive_number(value: Any) -> bool:
    return _number(value) and value > 0


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fields(record: Any, required: Mapping[str, Any], optional: Mapping[str, Any] = {}) -> str | None:
    """What is wrong with ``record`` as a table with these typed fields (``check(value) -> bool``), or None."""
    if not isinstance(record, dict):
        return f"the record is a {type(record).__name__}, not a table"
    for name, check in required.items():
        if name not in record:
            return f"it has no {name!r}"
        if not check(record[name]):
            return f"its {name!r} is {record[name]!r}"
    for name, check in optional.items():
        if name in record and record[name] is not None and not check(record[name]):
            return f"its {name!r} is {record[name]!r}"
    return None


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and all(_number(v) for v in value)


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _scores(value: Any) -> bool:
    return _fields(value, {"accuracy": _number, "macro_f1": _number}, {"loss": _number}) is None


COMPARE_TARGET = {"label": _text, "source": _text, "shape": _numbers, "singular_values": _numbers}
COMPARE_TARGET_OPTIONAL = {"frobenius_norm": _number, "effective_rank": _number, "svd_seconds": _number}
COMPARE_CELL = {"relative_frobenius_error": _number}
COMPARE_CELL_OPTIONAL = {
    "params": _number,
    "nuclear_error": _number,
    "frobenius_error": _number,
    "effective_rank": _number,
    "spectral_energy_ratio": _number,
    "seconds": _number,
    "iterations": _number,
    "budget_ratio": _number,
    "singular_values": _numbers,
}
TRAINED = {"seed": _integer, "lr": _number}
TRAINED_OPTIONAL = {
    "trainable_params": _integer,
    "train_time_s": _number,
    "loss_first_epoch": _number,
    "loss_last_epoch": _number,
    "val": _scores,
    "adapter_dir": _text,
}


def problem(kind: str, key: tuple[Any, ...], record: Any) -> str | None:
    """What is wrong with ``record`` under ``key`` for a study of ``kind``, or None; kinds this module does not know
    (a benchmark's own) are checked for nothing beyond the store's frame."""
    if kind == "compare":
        return _compare(key, record)
    if kind in ("finetune", "shift"):
        return _trained(key, record)
    return None


def _compare(key: tuple[Any, ...], record: Any) -> str | None:
    if key[0] == "target" and len(key) == 3 and _text(key[1]) and _integer(key[2]):
        return _fields(record, COMPARE_TARGET, COMPARE_TARGET_OPTIONAL)
    if key[0] == "cell" and len(key) == 4 and _text(key[1]) and _text(key[2]) and _integer(key[3]):
        if isinstance(record, dict) and "error" in record:
            return None if isinstance(record["error"], str) and record["error"] else "its 'error' is not a message"
        return _fields(record, COMPARE_CELL, COMPARE_CELL_OPTIONAL)
    return f"unknown key {list(key)!r}"


def _trained(key: tuple[Any, ...], record: Any) -> str | None:
    """``(..., "sweep", METHOD, LR)`` and ``(..., "run", METHOD, SEED)``: a trained (or reloaded) run's numbers;
    ``(..., "chosen", METHOD)``: the learning rate its sweep chose."""
    if len(key) >= 2 and key[-2] == "chosen" and _text(key[-1]):
        return _fields(record, {"lr": _positive_number})
    if len(key) < 3 or key[-3] not in ("sweep", "run") or not _text(key[-2]):
        return f"unknown key {list(key)!r}"
    if key[-3] == "run":
        if not _integer(key[-1]):
            return f"unknown key {list(key)!r}"
        return _fields(record, {**TRAINED, "test": _scores}, TRAINED_OPTIONAL)
    return _fields(record, TRAINED, TRAINED_OPTIONAL)
