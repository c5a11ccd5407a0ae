"""The files a study reads and what a finished number of it depends on, known before any heavy import.

:func:`run_spec` is the study's identity in the results store: the settings that change results, the content
hash of every input file, and the independent axes (matrices, methods, seeds) a resumed study may extend.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

from ..assets import minilm_dir, whisper_parts
from ..store import RunSpec, file_hash
from .config import CLIP_TYPES, SYNTHETIC_TYPES, StudyConfig

# A study holds a target, its fit, their float64 spectra and SVD workspaces: about this many float64 copies of
# the largest matrix. A matrix whose copies would not fit in the machine's memory is refused before allocating.
MATRIX_COPIES = 6
NPY_BYTES = {"f2": 2, "f4": 4, "f8": 8, "i1": 1, "i2": 2, "i4": 4, "i8": 8, "u1": 1, "u2": 2, "u4": 4, "u8": 8}
ST_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "U8": 1, "BOOL": 1}

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
    for user in config.matrices.user:
        shape = declared_shape(Path(user.path).expanduser(), user.key)
        if shape is not None:
            check_fits(f"matrix {user.name!r} ({user.path})", shape)
    if any(name in SYNTHETIC_TYPES for name in selected):
        check_fits(f"matrices.size {config.matrices.size[0]}x{config.matrices.size[1]}", config.matrices.size)
    return files


def memory_bytes() -> int | None:
    """The machine's physical memory in bytes, where the platform says."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - platforms without sysconf
        return None


def check_fits(what: str, shape: tuple[int, ...] | list[int]) -> None:
    """A MissingInputError if a study of a matrix of ``shape`` needs more memory than the machine has."""
    memory = memory_bytes()
    need = MATRIX_COPIES * 8 * max(1, _product(shape))
    if memory is not None and need > memory:
        raise MissingInputError(
            f"{what}: a {'x'.join(map(str, shape))} matrix needs about {need / 2**30:,.0f} GiB for a study, more than "
            f"this machine's {memory / 2**30:,.0f} GiB of memory"
        )


def _product(shape: tuple[int, ...] | list[int]) -> int:
    out = 1
    for n in shape:
        out *= int(n)
    return out


def declared_shape(path: Path, key: str | None) -> tuple[int, ...] | None:
    """The shape a user matrix file declares for ``key``, read from its header alone (no data is loaded), after
    checking the header against the file's size; None where only loading can tell (``.pt``/``.bin`` pickles).
    A file whose header is unreadable, or declares more data than the file holds, or a tensor that is not a matrix,
    is a MissingInputError naming it."""
    try:
        if path.suffix == ".npy":
            with path.open("rb") as f:
                shape, itemsize, offset = _npy_header(f, path)
            _check_data(path, shape, itemsize, path.stat().st_size - offset)
        elif path.suffix == ".npz":
            with zipfile.ZipFile(path) as archive:
                member = f"{key}.npy"
                if member not in archive.namelist():
                    return None  # named (with the keys it has) when loaded
                info = archive.getinfo(member)
                with archive.open(member) as f:
                    shape, itemsize, offset = _npy_header(f, path)
                _check_data(path, shape, itemsize, info.file_size - offset)
        elif path.suffix == ".safetensors":
            declared = _safetensors_shape(path, key)
            if declared is None:
                return None
            shape = declared
        else:
            return None
    except (OSError, zipfile.BadZipFile, ValueError, KeyError, TypeError, struct.error) as exc:
        raise MissingInputError(f"cannot read the matrix file {path}: {exc}") from None
    if len(shape) != 2 or 0 in shape:
        raise MissingInputError(f"{path}{':' + key if key else ''} has shape {shape}; a target must be a 2-D matrix")
    return shape


def _npy_header(f: Any, path: Path) -> tuple[tuple[int, ...], int, int]:
    import ast

    magic = f.read(8)
    if len(magic) < 8 or magic[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy file")
    size_bytes = 2 if magic[6] == 1 else 4
    raw = f.read(size_bytes)
    length = struct.unpack("<H" if size_bytes == 2 else "<I", raw)[0]
    header = ast.literal_eval(f.read(length).decode("latin-1"))
    if not isinstance(header, dict) or not isinstance(header.get("shape"), tuple):
        raise ValueError("a .npy header without a shape")
    descr = str(header.get("descr", ""))
    itemsize = NPY_BYTES.get(descr.lstrip("<>|="))
    if itemsize is None:
        raise ValueError(f"unsupported element type {descr!r}")
    shape = tuple(header["shape"])
    if not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"a .npy header with shape {shape!r}")
    return shape, itemsize, 8 + size_bytes + length


def _check_data(path: Path, shape: tuple[int, ...], itemsize: int, available: int) -> None:
    if _product(shape) * itemsize > available:
        raise ValueError(
            f"its header declares a {'x'.join(map(str, shape))} array ({_product(shape) * itemsize:,} bytes) but the "
            f"file holds {max(available, 0):,} bytes of data"
        )


def _safetensors_shape(path: Path, key: str | None) -> tuple[int, ...] | None:
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("not a safetensors file (too short)")
        length = struct.unpack("<Q", raw)[0]
        if length > size - 8:
            raise ValueError(f"its header length {length:,} is beyond the file's {size:,} bytes")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("its header is not a table")
    entry = header.get(key) if key else None
    if entry is None:
        return None  # named (with the keys it has) when loaded
    shape, dtype, (start, end) = tuple(entry["shape"]), entry["dtype"], entry["data_offsets"]
    if not all(isinstance(n, int) and n >= 0 for n in shape) or dtype not in ST_BYTES:
        raise ValueError(f"tensor {key!r} has shape {shape!r} and dtype {dtype!r}")
    if end - start != _product(shape) * ST_BYTES[dtype] or end > size - 8 - length or start < 0:
        raise ValueError(f"tensor {key!r} declares more data than the file holds")
    return shape


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
