"""Files written so that a reader never sees part of one: the one atomic writer, JSON as the studies write it,
content hashes, and byte sizes for people.

:func:`write_atomic` is the only way the library replaces a file (the results store, exports, saved models):
a temporary file in the same folder, ``fsync``, ``chmod`` to an ordinary mode (``0666`` less the umask unless
``mode`` is given; ``mkstemp`` makes ``0600``), rename over the target, ``fsync`` of the folder, so after a crash
the folder holds the old file or the new one. :func:`atomic_path` does the same for writers that need a file
name (``safetensors.save_file``), and :func:`replace_dir` for a folder written whole (a saved model). Only the
standard library is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA_KEY = "schema_version"  # the version key of every result document (an int)
OLD_SCHEMA_KEYS = ("format",)  # what earlier documents used instead; readers accept them
BYTE_UNITS = ("B", "kB", "MB", "GB", "TB")  # decimal (SI): 1 kB = 1000 B, as the sizes file managers show


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(directory: Path | str) -> None:
    """Make a rename inside ``directory`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path, mode: int | None) -> None:
    os.chmod(tmp, (0o666 & ~_umask()) if mode is None else mode)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextmanager
def atomic_path(path: Path | str, *, mode: int | None = None) -> Iterator[Path]:
    """A temporary file name next to ``path`` for a writer to fill; on success it is synced and renamed to
    ``path`` (as :func:`write_atomic`), on an error removed and ``path`` left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        _publish(tmp, path, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path | str, data: str | bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` (text as UTF-8) so readers see the old file or the new one, never part of
    one; ``mode`` is the new file's permission bits (default ``0666`` less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(staging: Path | str, directory: Path | str) -> None:
    """Put the fully written folder ``staging`` (a sibling of ``directory``) in place of ``directory``: its files
    synced, the old folder moved aside, the new one renamed in, the old one deleted. After a crash the place holds
    the old folder or the new one (the old one perhaps still aside as ``.<name>.old``), never a mix."""
    staging, directory = Path(staging), Path(directory)
    for item in staging.rglob("*"):
        if item.is_file():
            with item.open("rb+") as f:
                os.fsync(f.fileno())
    fsync_dir(staging)
    aside = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    if directory.exists():
        os.replace(directory, aside)
    os.replace(staging, directory)
    fsync_dir(directory.parent)
    shutil.rmtree(aside, ignore_errors=True)


def dumps(data: Any, indent: int | None = None) -> str:
    """JSON text as the studies write it: compact by default (one C-encoder pass), NaN allowed, newline ended."""
    return json.dumps(data, indent=indent, separators=None if indent else (",", ":"), allow_nan=True) + "\n"


def write_json(path: Path | str, data: Any, indent: int | None = None) -> None:
    """:func:`dumps` of ``data`` written atomically to ``path``."""
    write_atomic(path, dumps(data, indent))


def schema_version(document: Mapping[str, Any]) -> Any:
    """The version of a result document: its ``schema_version``, or the old key an earlier release wrote
    (:data:`OLD_SCHEMA_KEYS`); ``None`` if it has neither."""
    for key in (SCHEMA_KEY, *OLD_SCHEMA_KEYS):
        if key in document:
            return document[key]
    return None


def file_hash(path: Path | str) -> str:
    """``sha256:<hex>`` of a file's bytes, or of a folder's files (relative names and contents, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(item.relative_to(path)).encode() + b"\0")
            _hash_into(digest, item)
    else:
        _hash_into(digest, path)
    return "sha256:" + digest.hexdigest()


def _hash_into(digest: Any, path: Path) -> None:
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)


def directory_bytes(path: Path | str) -> int:
    """Bytes of the files under ``path`` (a file: its own size)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def format_bytes(n: float) -> str:
    """``n`` bytes for people, in decimal units (:data:`BYTE_UNITS`): ``512 B``, ``3.3 MB``, ``1.2 GB``."""
    for unit in BYTE_UNITS:
        if abs(n) < 1000 or unit == BYTE_UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
