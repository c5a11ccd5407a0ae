"""The results store: one run folder per study, finished results never lost, overwritten or mixed.

The contract (``docs/results.md`` says it to users), the same for ``kradapter compare``, ``kradapter finetune``
and the benchmarks:

- A run folder holds ``run.json`` (the settings that determine every finished number, content hashes of the
  input files, the independent axes run so far, the environment of each invocation, and every path the run
  wrote) and ``records.jsonl`` (one line per finished unit of work, appended with ``fsync``; nothing is ever
  rewritten in it). Summaries, tables and plots are derived from the records and rebuilt after each unit.
- A folder that holds results is continued only with ``resume`` (settings and inputs must match; the axes may
  grow) and replaced only with ``overwrite`` (which deletes what the earlier run wrote, nothing else); without
  either, opening it is an error naming both.
- The folder is locked (``fcntl.flock`` on ``.lock``) for the whole run: a second run into it fails at once,
  naming the holder.
- Files are replaced atomically (temporary file, ``fsync``, rename, ``fsync`` of the folder) with ordinary modes.
  A ``run.json`` or ``records.jsonl`` that cannot be read is an error and is left untouched; the one exception
  is a last record line without its newline, which only an interrupted append leaves: it is dropped on resume.

Only the standard library is imported, so every check happens before any heavy work starts.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .files import dumps as dumps  # re-exported: the store's own names for the file helpers
from .files import file_hash as file_hash
from .files import fsync_dir, write_atomic, write_json

SCHEMA_VERSION = 1
RUN_FILE = "run.json"
RECORDS_FILE = "records.jsonl"
LOCK_FILE = ".lock"
HOLDER_WAIT_S = 2.0  # how long a refused run looks for the name of a holder that is just taking or leaving the lock
MODES = ("new", "resume", "overwrite")

Key = tuple[str | int, ...]


class StoreError(ValueError):
    """A run folder that cannot be used as asked; the message names the folder and what to do."""


# -- files (kradapter.files; re-exported for ``from kradapter.store import write_atomic``) -------------------------


def __getattr__(name: str) -> Any:
    """``write_figure`` now lives in :mod:`kradapter.plotting`; this keeps old imports working without the store
    importing anything of matplotlib's."""
    if name == "write_figure":
        from .plotting import write_figure

        return write_figure
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the lock ---------------------------------------------------------------------------------------------------------


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/.lock``, released when closed or when the process ends."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self.handle: TextIO | None = None

    def acquire(self) -> None:
        """Take the lock or name its holder. The holder writes its name just after it locks and clears it just before
        it unlocks, so an empty file while locked means one of those moments: look again for up to ``HOLDER_WAIT_S``
        seconds (taking the lock if it comes free) rather than naming no one."""
        handle = self.path.open("a+", encoding="utf-8")
        deadline = time.monotonic() + HOLDER_WAIT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    handle.close()
                    raise
            handle.seek(0)
            holder = handle.read().strip()
            if holder or time.monotonic() > deadline:
                handle.close()
                raise StoreError(
                    f"{self.path.parent} is in use by another run ({holder or 'another process'}); "
                    "wait for it or use another folder"
                )
            time.sleep(0.02)
        handle.seek(0)
        handle.truncate()
        started = dt.datetime.now().isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {' '.join(sys.argv)}\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.truncate(0)
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


# -- the run ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """What a run is: its ``kind``, the ``settings`` every finished number depends on, the ``inputs`` (name ->
    content hash), and the independent ``axes`` (name -> values) along which a resumed run may grow. ``per_value``
    holds the settings of single axis values (a method's learning-rate grid): they must match for values run before,
    and a new value brings its own."""

    kind: str
    settings: Mapping[str, Any]
    axes: Mapping[str, list[Any]] = field(default_factory=dict)
    inputs: Mapping[str, str] = field(default_factory=dict)
    per_value: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # axis -> value -> its own settings


def _normal(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists, keys as strings), so old and new compare equal."""
    return json.loads(json.dumps(value))


def differences(old: Mapping[str, Any], new: Mapping[str, Any], what: str) -> list[str]:
    """``"<what> name: old -> new"`` for each key whose value differs (a missing key reads as ``<unset>``)."""
    a, b = _normal(dict(old)), _normal(dict(new))
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(f"{what} {key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    return out


class Store:
    """An open run folder: its records, and the only way a run writes into the folder."""

    def __init__(
        self, directory: Path, spec: RunSpec, meta: dict[str, Any], records: dict[Key, Any], lock: FolderLock | None
    ) -> None:
        self.directory = directory
        self.spec = spec
        self.meta = meta
        self.records = records
        self.lock = lock
        self.resumed = bool(records)

    # -- opening --------------------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        directory: Path | str,
        spec: RunSpec,
        mode: str = "new",
        *,
        legacy: Iterable[str] = (),
        writer: bool = True,
    ) -> Store:
        """Open ``directory`` for ``spec``: ``mode`` is ``new``, ``resume`` or ``overwrite`` (module docstring).

        ``legacy``: names of files an older version of the study wrote there (they count as results). ``writer``
        False opens without the lock and writes nothing (the other processes of a ``torchrun`` job).
        """
        if mode not in MODES:
            raise StoreError(f"unknown mode {mode!r}; choose one of {MODES}")
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise StoreError(f"{directory} exists and is not a folder; choose another output folder")
        if not writer:
            return cls._read_only(directory, spec, mode)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the output folder {directory}: {exc.strerror}") from None
        lock = FolderLock(directory)
        lock.acquire()
        try:
            store = cls._open_locked(directory, spec, mode, tuple(legacy), lock)
        except BaseException:
            lock.release()
            raise
        return store

    @classmethod
    def _read_only(cls, directory: Path, spec: RunSpec, mode: str) -> Store:
        records: dict[Key, Any] = {}
        if mode == "resume" and (directory / RECORDS_FILE).exists():
            records = _read_records(directory / RECORDS_FILE, repair=False)
        meta = _fresh_meta(spec)
        meta["axes"] = _merge_axes({}, spec.axes)
        meta["invocations"].append({"mode": mode})
        return cls(directory, spec, meta, records, None)

    @classmethod
    def _open_locked(
        cls, directory: Path, spec: RunSpec, mode: str, legacy: tuple[str, ...], lock: FolderLock
    ) -> Store:
        run_path, records_path = directory / RUN_FILE, directory / RECORDS_FILE
        earlier = _earlier_results(directory, legacy)
        meta: dict[str, Any] | None = None
        records: dict[Key, Any] = {}
        if earlier and mode == "new":
            raise StoreError(
                f"{directory} holds the results of an earlier run ({', '.join(earlier)}): pass --resume to continue "
                "it, or --overwrite to delete them and start again (or choose another output folder)"
            )
        if earlier and mode == "overwrite":
            _remove_outputs(directory, legacy)
        elif earlier and mode == "resume":
            if not run_path.exists():
                raise StoreError(
                    f"{directory} holds {', '.join(earlier)} from an older version of kradapter, which cannot be "
                    "resumed; pass --overwrite to delete it and start again, or choose another output folder"
                )
            meta = _read_meta(run_path, spec.kind)
            _check_resumable(directory, meta, spec)
            if records_path.exists():
                records = _read_records(records_path, repair=True)
        now = dt.datetime.now().isoformat(timespec="seconds")
        if meta is None:
            meta = _fresh_meta(spec)
        meta["axes"] = _merge_axes(meta.get("axes", {}), spec.axes)
        meta["inputs"] = {**meta.get("inputs", {}), **spec.inputs}
        per_value = meta.setdefault("per_value", {})
        for axis, values in _normal(dict(spec.per_value)).items():
            per_value.setdefault(axis, {}).update(values)
        meta["invocations"].append({"started": now, "command": sys.argv[:], "mode": mode})
        store = cls(directory, spec, meta, records, lock)
        store.save_meta()
        return store

    # -- records ---------------------------------------------------------------------------------------------------
    def done(self, key: Key) -> bool:
        """Whether unit ``key`` finished (a recorded failure does not count: a resumed run tries it again)."""
        record = self.records.get(tuple(key))
        return record is not None and not (isinstance(record, dict) and record.get("error"))

    def add(self, key: Key, record: Any) -> None:
        """Append one finished unit; on disk (``fsync``) before this returns."""
        key = tuple(key)
        line = json.dumps({"key": list(key), "record": record}, separators=(",", ":"), allow_nan=True) + "\n"
        if self.lock is not None:
            path = self.directory / RECORDS_FILE
            fresh = not path.exists()
            with path.open("a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            if fresh:
                fsync_dir(self.directory)
        self.records[key] = _normal(record)

    def matching(self, *prefix: str | int) -> Iterator[tuple[Key, Any]]:
        """Records whose key starts with ``prefix``."""
        n = len(prefix)
        for key, record in self.records.items():
            if key[:n] == prefix:
                yield key, record

    # -- derived files and artifacts ---------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.directory / name

    def write_json(self, name: str, data: Any, indent: int | None = None) -> Path:
        """Write a derived file (rebuilt from the records) atomically and remember it as this run's output."""
        path = self.path(name)
        if self.lock is not None:
            write_json(path, data, indent)
            self.written(name)
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self.path(name)
        if self.lock is not None:
            write_atomic(path, text)
            self.written(name)
        return path

    def written(self, name: str | Path) -> None:
        """Remember ``name`` (a file or folder inside the run folder) as written by this run: ``--overwrite``
        deletes it."""
        relative = str(Path(name).relative_to(self.directory) if Path(name).is_absolute() else Path(name))
        if self.lock is not None and relative not in self.meta["outputs"]:
            self.meta["outputs"].append(relative)
            self.save_meta()

    def set_environment(self, environment: Mapping[str, Any]) -> None:
        self.meta["invocations"][-1]["environment"] = dict(environment)
        self.save_meta()

    def finish(self, **summary: Any) -> None:
        self.meta["invocations"][-1].update(finished=dt.datetime.now().isoformat(timespec="seconds"), **summary)
        self.save_meta()

    def save_meta(self) -> None:
        if self.lock is not None:
            write_json(self.directory / RUN_FILE, self.meta, indent=1)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reading and checking -------------------------------------------------------------------------------------------


def _fresh_meta(spec: RunSpec) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": spec.kind,
        "settings": _normal(dict(spec.settings)),
        "inputs": dict(spec.inputs),
        "axes": {},
        "per_value": {},
        "outputs": [],
        "invocations": [],
    }


def _read_meta(path: Path, kind: str) -> dict[str, Any]:
    """``run.json``, checked; a StoreError (the file untouched) if it is not one this version wrote."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"cannot read {path} ({exc}); it is left untouched: fix it, or pass --overwrite") from None
    if not isinstance(meta, dict):
        raise StoreError(f"{path} is not a run description (a JSON object); it is left untouched")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema_version {meta.get('schema_version')!r}, this kradapter reads {SCHEMA_VERSION}; "
            "it is left untouched: use the version that wrote it, or pass --overwrite"
        )
    if meta.get("kind") != kind:
        raise StoreError(f"{path} is a {meta.get('kind')!r} run, not {kind!r}; choose another output folder")
    for name, kind_ in (("settings", dict), ("inputs", dict), ("axes", dict), ("outputs", list), ("invocations", list)):
        if not isinstance(meta.get(name), kind_):
            raise StoreError(f"{path}: {name!r} is missing or not a {kind_.__name__}; it is left untouched")
    per_value = meta.get("per_value", {})
    if not isinstance(per_value, dict) or not all(isinstance(v, dict) for v in per_value.values()):
        raise StoreError(f"{path}: 'per_value' is not a table of tables; it is left untouched")
    return meta


def _read_records(path: Path, repair: bool) -> dict[Key, Any]:
    """Every record, the last one for a repeated key. A final line without its newline (an append the process
    was killed in) is dropped (and, with ``repair``, cut from the file); any other unreadable line is an error."""
    raw = path.read_bytes()
    complete, _, partial = raw.rpartition(b"\n")
    if partial and repair:
        with path.open("r+b") as f:
            f.truncate(len(complete) + 1 if complete or raw.startswith(b"\n") else 0)
            os.fsync(f.fileno())
        print(f"note: dropped an unfinished record at the end of {path} (an interrupted run)", file=sys.stderr)
    records: dict[Key, Any] = {}
    for number, line in enumerate(complete.split(b"\n") if complete else [], start=1):
        try:
            entry = json.loads(line)
            key, record = tuple(entry["key"]), entry["record"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise StoreError(
                f"{path} line {number} is not a record ({type(exc).__name__}: {exc}); the file is left untouched: "
                "fix it, or pass --overwrite"
            ) from None
        records[key] = record
    return records


def _earlier_results(directory: Path, legacy: tuple[str, ...]) -> list[str]:
    """The files in ``directory`` that hold an earlier run's results. A ``run.json`` alone, with no record and no
    output (a run stopped before it finished anything: a bad input found after the folder was opened, a kill), holds
    none: a new run may start over it."""
    found = [name for name in (RECORDS_FILE, *legacy) if (directory / name).exists()]
    if found == [RECORDS_FILE] and (directory / RECORDS_FILE).stat().st_size == 0:
        found = []
    run_path = directory / RUN_FILE
    if run_path.exists():
        try:
            meta = json.loads(run_path.read_text(encoding="utf-8"))
            empty = isinstance(meta, dict) and meta.get("outputs") == [] and not found
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            empty = False  # unreadable: treated as results (and left untouched)
        if not empty:
            found.insert(0, RUN_FILE)
    return found


def _check_resumable(directory: Path, meta: dict[str, Any], spec: RunSpec) -> None:
    changed = differences(meta["settings"], spec.settings, "setting")
    old_inputs = meta["inputs"]
    changed += [
        f"input {name}: content {old_inputs[name]} -> {value}"
        for name, value in spec.inputs.items()
        if name in old_inputs and old_inputs[name] != value
    ]
    for axis, values in _normal(dict(spec.per_value)).items():
        old = meta.get("per_value", {}).get(axis, {})
        for value, settings in values.items():
            if value in old:
                changed += differences(old[value], settings, f"{axis} {value}:")
    if changed:
        raise StoreError(
            f"cannot resume {directory}: its results were made with other settings ({'; '.join(changed)}). "
            "Run with the earlier settings, pass --overwrite to start again, or choose another output folder"
        )


def _merge_axes(old: Mapping[str, list[Any]], new: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
    merged = {name: list(values) for name, values in _normal(dict(old)).items()}
    for name, values in _normal(dict(new)).items():
        merged.setdefault(name, [])
        merged[name] += [v for v in values if v not in merged[name]]
    return merged


def _remove_outputs(directory: Path, legacy: tuple[str, ...]) -> None:
    """Delete what an earlier run wrote here: its records, its listed outputs, known older files; nothing else."""
    names = [RECORDS_FILE, *legacy]
    try:
        meta = json.loads((directory / RUN_FILE).read_text(encoding="utf-8"))
        names += [str(n) for n in meta.get("outputs", []) if isinstance(n, str)]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        pass
    root = directory.resolve()
    for name in names:
        target = (directory / name).resolve()
        if root not in target.parents:  # only inside the run folder
            continue
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    (directory / RUN_FILE).unlink(missing_ok=True)
