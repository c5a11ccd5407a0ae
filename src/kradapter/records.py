"""What a study records: the provenance of each run, the structure every record read back must have, and the
one reader of a finished results document.

Provenance (:func:`provenance`, :func:`environment`): the versions of the libraries the numbers depend on, the
code that made them and the machine. The code's identity (:func:`code_identity`) is a content hash of the
package's own source files (``kradapter/**/*.py``, sorted by name), the same whether it runs from a git checkout
or an installed wheel; from a checkout it also names the commit and whether the tree differed from it. The
results store records it with every invocation and refuses ``--resume`` when it changed (``store.py``).

:func:`problem` is what the results store checks each record line against when it reads a folder back (a resumed
run, a report): a record of the wrong structure stops the run naming the file and line, instead of a ``KeyError``
deep in a report or, worse, a silent gap (a ``{}`` run counted among the seeds but missing from their mean).
:func:`read_results` reads a study's results document (``finetune_results.json`` and the others) for the report
and the PEFT export.

Only the standard library is imported at load time (the store checks records before any heavy import).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from .files import file_hash

Number = (int, float)
VERSIONED = ("torch", "peft", "transformers", "numpy", "scipy", "scikit-learn", "ray")  # distributions recorded
GIT_TIMEOUT_S = 10.0


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- provenance -------------------------------------------------------------------------------------------------------


def package_dir() -> Path:
    """The folder of the ``kradapter`` package this process runs."""
    return Path(__file__).resolve().parent


def source_hash(root: Path | None = None) -> str:
    """``sha256:<hex>`` of the package's Python source files (relative names and contents, sorted): what the
    code is, wherever it was installed from."""
    return file_hash(root or package_dir(), list_files=lambda folder: folder.rglob("*.py"))


def _git(root: Path, *args: str) -> str | None:
    """``git -C root ARGS``'s output, or None when git is missing, fails or takes too long."""
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(root: Path | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` when the package runs from a git checkout (its ``__init__.py`` tracked there), else
    None (an installed wheel, even one inside some repository's virtual environment). ``dirty``: a tracked file of
    the checkout differs from the commit."""
    root = root or package_dir()
    if not _git(root, "ls-files", "--", "__init__.py"):
        return None
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    if commit is None or status is None:
        return None
    return {"commit": commit.strip(), "dirty": bool(status.strip())}


def _version() -> str:
    from . import __version__

    return __version__


@functools.cache
def code_identity() -> dict[str, Any]:
    """The code this process runs: ``source`` (:func:`source_hash`, the identity the store compares), the package
    ``version``, and ``commit`` and ``dirty`` from a git checkout (None otherwise: an installed wheel, a copy of
    the files). Computed once per process."""
    git = git_state()
    return {
        "source": source_hash(),
        "version": _version(),
        "commit": git["commit"] if git else None,
        "dirty": git["dirty"] if git else None,
        "origin": "git checkout" if git else "not a git checkout",
    }


def describe_code(code: Mapping[str, Any] | None) -> str:
    """A code identity in a few words: ``commit 1a2b3c4d5e6f (dirty), source sha256:0123456789ab``."""
    if not code:
        return "no recorded code identity"
    source = str(code.get("source", "?"))[:19]
    if code.get("commit"):
        return f"commit {str(code['commit'])[:12]}{' (dirty)' if code.get('dirty') else ''}, source {source}"
    return f"version {code.get('version', '?')}, source {source}"


def versions() -> dict[str, str | None]:
    """The installed versions of kradapter and of the libraries its numbers depend on (None: not installed; ``ray``
    only where installed); read from the distributions' metadata, so nothing is imported."""
    return {"kradapter": _version(), **_installed_versions()}


@functools.cache
def _installed_versions() -> dict[str, str | None]:
    """Read once per process (a few hundred milliseconds of metadata lookups)."""
    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name != "ray":
                out[name] = None
    return out


def machine() -> dict[str, Any]:
    """The machine: host name, platform, Python, CPU model and counts."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def provenance() -> dict[str, Any]:
    """What the store records with every invocation before any heavy import: :func:`versions` (flat, one key per
    distribution), :func:`machine` (flat) and ``code`` (:func:`code_identity`)."""
    return {**versions(), **machine(), "code": code_identity()}


def environment() -> dict[str, Any]:
    """:func:`provenance` plus what needs torch: the versions of the modules as loaded, the torch threads, the GPU
    (if any) and CUDA."""
    import torch

    loaded = {name: getattr(sys.modules.get(name), "__version__", None) for name in ("peft", "transformers", "numpy")}
    return {
        **provenance(),
        **{name: version for name, version in loaded.items() if version is not None},
        "torch": torch.__version__,
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
REFERENCE_ROWS = ("majority", "linear_probe")  # the shift study's baselines (kradapter.finetune.baselines' names)
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
        if key[-2] in REFERENCE_ROWS:  # nothing trained at a learning rate
            return _fields(record, {"seed": _integer, "test": _scores})
        return _fields(record, {**TRAINED, "test": _scores}, TRAINED_OPTIONAL)
    return _fields(record, TRAINED, TRAINED_OPTIONAL)


# -- reading a results document ---------------------------------------------------------------------------------------

RESULTS_FILES = {  # kind -> the results document its run folder holds (rebuilt from the records)
    "compare": "experimental_results.json",
    "finetune": "finetune_results.json",
    "shift": "shift_results.json",
}
RESULTS_TABLES = {"compare": "results", "finetune": "runs", "shift": "benchmarks"}  # kind -> its table of results
COMMANDS = {"compare": "kradapter compare", "finetune": "kradapter finetune", "shift": "kradapter shift"}


class ResultsError(ValueError):
    """A folder that holds no readable results document; the message names it."""


def results_file(folder: str | os.PathLike[str], kind: str | None = None) -> tuple[str, Path]:
    """The kind and results document of ``folder`` (of ``kind``, or of any kind), or a ResultsError naming what is
    missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ResultsError(f"{str(folder)!r} is not a folder")
    kinds = [kind] if kind is not None else list(RESULTS_FILES)
    for k in kinds:
        if (folder / RESULTS_FILES[k]).is_file():
            return k, folder / RESULTS_FILES[k]
    if kind is not None:
        raise ResultsError(f"{str(folder)!r} holds no {RESULTS_FILES[kind]}: not a finished `{COMMANDS[kind]}` folder")
    raise ResultsError(
        f"{str(folder)!r} is not a results folder: it holds none of {', '.join(RESULTS_FILES.values())} "
        f"(written by {', '.join(f'`{c}`' for c in COMMANDS.values())})"
    )


def read_results(folder: str | os.PathLike[str], kind: str | None = None) -> tuple[str, dict[str, Any]]:
    """The kind and the results document of a run folder (``finetune_results.json`` and the others), checked to
    be a JSON object holding its kind's table of results (``runs`` for finetune); the one reader the report and
    the PEFT export share. A ResultsError names the folder or file otherwise."""
    kind, path = results_file(folder, kind)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsError(f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{str(path)!r} does not hold a results object")
    table = RESULTS_TABLES[kind]
    if not isinstance(data.get(table), dict):
        raise ResultsError(f"{str(path)!r} has no {table!r}: not a {kind} results file")
    return kind, data
