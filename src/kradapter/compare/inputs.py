"""The files a study reads and what a finished number of it depends on, known before any heavy import.

:func:`run_spec` is the study's identity in the results store: the settings that change results, the content
hash of every input file, and the independent axes (matrices, methods, seeds) a resumed study may extend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..assets import minilm_dir, whisper_parts
from ..store import RunSpec, file_hash
from .config import CLIP_TYPES, StudyConfig

# Keys that are not settings of a finished number: how results are shown and the CPU thread count; the axes
# (matrices, methods, seeds: a resume may extend them); user matrices (their content hashes are inputs); and each
# method's own settings (compared per method, ``per_value``).
PRESENTATION = {"output"}
NOT_RESULTS = {"runtime.threads", "training.log_interval", "matrices.types", "matrices.user", "methods.names"}
NOT_RESULTS |= {"training.seeds", "methods.settings"}


class MissingInputError(ValueError):
    """An input file a selected matrix needs is not there."""


def minilm_weights() -> Path:
    return minilm_dir() / "model.safetensors"


def input_files(config: StudyConfig) -> dict[str, list[Path]]:
    """The files each selected real or user matrix is read from."""
    selected = config.matrices.selected()
    files: dict[str, list[Path]] = {}
    if "minilm_attention" in selected:
        files["minilm_attention"] = [minilm_weights()]
    if "whisper_qkv" in selected:
        files["whisper_qkv"] = whisper_parts()
    for name in CLIP_TYPES:
        if name in selected:
            files[name] = [Path(config.matrices.clip_checkpoint).expanduser()]
    for user in config.matrices.user:
        files[user.name] = [Path(user.path).expanduser()]
    for name, paths in files.items():
        for path in paths:
            if not path.is_file():
                raise MissingInputError(f"matrix {name!r}: file not found: {path}")
    return files


def run_spec(config: StudyConfig) -> RunSpec:
    """The study's identity for the results store (module docstring)."""
    settings: dict[str, Any] = {}
    for section, table in config.to_dict().items():
        if section in PRESENTATION:
            continue
        for key, value in table.items():
            if f"{section}.{key}" not in NOT_RESULTS:
                settings[f"{section}.{key}"] = value
    keys = {u.name: u.key for u in config.matrices.user}
    inputs = {
        f"matrix {name}": "+".join(file_hash(p) for p in paths) + (f" key {keys[name]}" if keys.get(name) else "")
        for name, paths in input_files(config).items()
    }
    axes: dict[str, list[Any]] = {
        "matrices": config.matrices.selected(),
        "methods": [*config.methods.names],
        "seeds": list(config.training.seeds),
    }
    per_value = {"methods": {name: config.methods.settings.get(name, {}) for name in config.methods.names}}
    return RunSpec("compare", settings, axes, inputs, per_value)
