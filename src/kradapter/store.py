"""The results store: one run folder per study, finished results never lost, overwritten or mixed.

The contract (``docs/results.md`` says it to users), the same for ``kradapter compare``, ``kradapter finetune``
and the benchmarks:

- A run folder holds ``run.json`` (the settings that determine every finished number, content hashes of the
  input files, the independent axes run so far, the provenance of each invocation: library versions, the code's
  identity and the machine, :func:`kradapter.records.provenance`; and every path the run wrote) and
  ``records.jsonl`` (one line per finished unit of work, appended with ``fsync``; nothing is ever rewritten in
  it). Summaries, tables and plots are derived from the records and rebuilt after each unit.
- A folder holds results once a unit has finished (a complete line in ``records.jsonl``): derived files are
  written only from then on, so a run that finished nothing leaves no results, and a new run (with any settings,
  with or without ``resume``) starts over it, deleting what that run wrote. A folder that holds results is
  continued only with ``resume`` (settings, inputs and the code must match; the axes may grow) and replaced only
  with ``overwrite`` (which deletes what the earlier run wrote, nothing else); without either, opening it is an
  error naming both.
- A run writes only paths it created, and records exactly those (a folder it wrote into but did not make is never
  recorded). A path in the folder that no run there wrote is never replaced: a run that declares it among its
  ``outputs`` is refused when the folder is opened, before any work; any other write to it is refused naming it.
- The code is the content hash of the package's source files (:func:`kradapter.records.code_identity`; with the
  commit and dirty state from a git checkout): a ``resume`` whose code differs from the one the latest records
  were made with is refused naming both, unless ``allow_code_change`` (``--allow-code-change``), and then the
  invocation records ``code_change`` (from, to). A folder from before code identities resumes with a note.
- The folder is locked (``fcntl.flock`` on ``.lock``) for the whole run: a second run into it fails at once,
  naming the holder. A run refused when it opens the folder leaves it as it was: a lock file (or folder) it made
  is removed again.
- An older version listed the whole ``adapters`` folder as a run's output; a resume or overwrite narrows that to
  the entries the run declares or its records name (the rest of the folder is the user's).
- Files are replaced atomically (an unnamed temporary file, ``fsync``, named and renamed at once, ``fsync`` of the
  folder) with ordinary modes; a temporary file a kill leaves in the instant between naming and renaming is
  deleted by the next run's opening. A ``run.json`` or ``records.jsonl`` that cannot be read, or a record of the
  wrong structure (:mod:`kradapter.records`), is an error naming the file and line, and is left untouched; the one
  exception is a last record line without its newline, which only an interrupted append leaves: it is dropped on
  resume.
- A folder's content hash (:func:`file_hash`) leaves out the run folders inside it (their store files and
  outputs), so a run's input hashes never include its own output folder.

Only the standard library is imported, so every check happens before any heavy work starts.
"""

from __future__ import annotations

import contextlib
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

from . import files
from .files import TMP_SUFFIX, fsync_dir, remove_temporaries, write_atomic, write_json
from .files import dumps as dumps  # re-exported: the store's own names for the file helpers

SCHEMA_VERSION = 1
RUN_FILE = "run.json"
RECORDS_FILE = "records.jsonl"
LOCK_FILE = ".lock"
STORE_FILES = (RUN_FILE, RECORDS_FILE, LOCK_FILE)
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


def file_hash(path: Path | str) -> str:
    """:func:`kradapter.files.file_hash` leaving out the run folders inside ``path`` (their store files, outputs
    and temporaries), so a run whose output folder lies inside its input folder hashes that input the same before
    and after it writes."""
    return files.file_hash(path, list_files=_input_files)


def _input_files(folder: Path) -> list[Path]:
    """The files under ``folder`` that are not a run folder's own (:func:`file_hash`)."""
    names = set(os.listdir(folder))
    skip: set[Path] = set()
    if RUN_FILE in names and LOCK_FILE in names:  # a run folder: its store files and outputs are not inputs
        skip = {folder / n for n in STORE_FILES}
        try:
            outputs = json.loads((folder / RUN_FILE).read_text(encoding="utf-8")).get("outputs", [])
            skip |= {folder / o for o in outputs if isinstance(o, str) and o}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            pass
    found: list[Path] = []
    stack = [folder / n for n in names]
    while stack:
        item = stack.pop()
        if item in skip or item.name.endswith(TMP_SUFFIX):
            continue
        if item.is_dir():
            found += _input_files(item) if (item / RUN_FILE).exists() else []
            if not (item / RUN_FILE).exists():
                stack += [item / n for n in os.listdir(item)]
        elif item.is_file():
            found.append(item)
    return found


# -- the lock ---------------------------------------------------------------------------------------------------------


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/.lock``, released when closed or when the process ends."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self.handle: TextIO | None = None
        self.created = False  # whether this run made the lock file (a refused run removes it again)

    def acquire(self) -> None:
        """Take the lock or name its holder. The holder writes its name just after it locks and clears it just before
        it unlocks, so an empty file while locked means one of those moments: look again for up to ``HOLDER_WAIT_S``
        seconds (taking the lock if it comes free) rather than naming no one."""
        handle = self._open()
        deadline = time.monotonic() + HOLDER_WAIT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if self._current(handle):
                    break
                handle.close()  # a refused run removed the file we locked: lock the one at the path now
                handle = self._open()
                continue
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

    def _open(self) -> TextIO:
        self.created = not self.path.exists()
        try:
            return self.path.open("a+", encoding="utf-8")
        except OSError as exc:
            raise StoreError(
                f"cannot write in the output folder {self.path.parent} ({exc.strerror}); choose another output folder"
            ) from None

    def _current(self, handle: TextIO) -> bool:
        """Whether ``handle`` is still the file at the lock's path (:meth:`discard` may have removed it)."""
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(handle.fileno())
        return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)

    def discard(self) -> None:
        """Release the lock of a run that was refused, removing the lock file if this run made it, so a refusal
        leaves the folder as it found it. A run waiting on the removed file takes the lock of a new one."""
        if self.handle is not None and self.created:
            self.path.unlink(missing_ok=True)
        self.release()

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
        self,
        directory: Path,
        spec: RunSpec,
        meta: dict[str, Any],
        records: dict[Key, Any],
        lock: FolderLock | None,
        found: frozenset[str] = frozenset(),
    ) -> None:
        self.directory = directory
        self.spec = spec
        self.meta = meta
        self.records = records
        self.lock = lock
        self.resumed = bool(records)
        self.found = found  # paths in the folder (relative) that no run there wrote: never replaced

    # -- opening --------------------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        directory: Path | str,
        spec: RunSpec,
        mode: str = "new",
        *,
        legacy: Iterable[str] = (),
        outputs: Iterable[str] = (),
        writer: bool = True,
        allow_code_change: bool = False,
    ) -> Store:
        """Open ``directory`` for ``spec``: ``mode`` is ``new``, ``resume`` or ``overwrite`` (module docstring).

        ``legacy``: names of files an older version of the study wrote there (they count as results when the folder
        has no ``run.json``). ``outputs``: the paths (relative; files or folders) this run may write: one that is
        in the folder and was not written by a run there stops the opening, naming it. ``writer`` False opens
        without the lock and writes nothing (the other processes of a ``torchrun`` job). ``allow_code_change``: a
        resume may continue records made by other code (:func:`kradapter.records.code_identity`); the invocation
        records from what to what. Without it that resume is refused, naming both.
        """
        if mode not in MODES:
            raise StoreError(f"unknown mode {mode!r}; choose one of {MODES}")
        directory = Path(directory)
        if directory.is_symlink() and not directory.exists():
            raise StoreError(
                f"the output folder {directory} is a symbolic link to {os.readlink(directory)}, which does not "
                "exist; create its target or choose another output folder"
            )
        if directory.exists() and not directory.is_dir():
            raise StoreError(f"{directory} exists and is not a folder; choose another output folder")
        if not writer:
            return cls._read_only(directory, spec, mode)
        made = not directory.exists()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the output folder {directory}: {exc.strerror}") from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StoreError(f"cannot write in the output folder {directory} (permission denied); choose another")
        lock = FolderLock(directory)
        try:
            lock.acquire()
        except BaseException:
            if made:
                _remove_empty(directory)
            raise
        try:
            store = cls._open_locked(directory, spec, mode, tuple(legacy), tuple(outputs), lock, allow_code_change)
        except BaseException:
            lock.discard()  # a refused run leaves the folder as it found it: no lock file, no folder it made
            if made:
                _remove_empty(directory)
            raise
        return store

    @classmethod
    def read(cls, directory: Path | str, spec: RunSpec) -> Store:
        """A run folder as it stands, for reading while its run may still be going: its ``run.json`` and finished
        records (an unfinished last line is skipped, not cut), checked against ``spec`` as a resume checks them; no
        lock is taken and nothing is ever written through it."""
        directory = Path(directory)
        run_path = directory / RUN_FILE
        if not run_path.is_file():
            raise StoreError(f"{directory} holds no run to read ({RUN_FILE} is missing): check --out")
        meta = _read_meta(run_path, spec.kind)
        _check_resumable(directory, meta, spec, "read")
        return cls(directory, spec, meta, _read_records(directory / RECORDS_FILE, spec.kind, repair=False), None)

    @classmethod
    def _read_only(cls, directory: Path, spec: RunSpec, mode: str) -> Store:
        records: dict[Key, Any] = {}
        if mode == "resume" and (directory / RECORDS_FILE).exists():
            records = _read_records(directory / RECORDS_FILE, spec.kind, repair=False)
        meta = _fresh_meta(spec)
        meta["axes"] = _merge_axes({}, spec.axes)
        meta["invocations"].append({"mode": mode})
        return cls(directory, spec, meta, records, None)

    @classmethod
    def _open_locked(
        cls,
        directory: Path,
        spec: RunSpec,
        mode: str,
        legacy: tuple[str, ...],
        outputs: tuple[str, ...],
        lock: FolderLock,
        allow_code_change: bool = False,
    ) -> Store:
        run_path, records_path = directory / RUN_FILE, directory / RECORDS_FILE
        remove_temporaries(directory)
        earlier = _earlier_results(directory, legacy)
        meta: dict[str, Any] | None = None
        records: dict[Key, Any] = {}
        invocation: dict[str, Any] = {"mode": mode}
        environment = _provenance()
        if earlier and mode == "new":
            raise StoreError(
                f"{directory} holds the results of an earlier run ({', '.join(earlier)}): pass --resume to continue "
                "it, or --overwrite to delete them and start again (or choose another output folder)"
            )
        if earlier and mode == "resume" and not run_path.exists():
            if records_path.exists():
                raise StoreError(
                    f"{directory} holds {RECORDS_FILE} but its {RUN_FILE} is missing (deleted or moved?): the settings "
                    f"its records were made with are unknown, so it cannot be resumed; put {RUN_FILE} back, pass "
                    "--overwrite to delete the records and start again, or choose another output folder"
                )
            raise StoreError(
                f"{directory} holds {', '.join(earlier)} from an older version of kradapter, which cannot be "
                "resumed; pass --overwrite to delete it and start again, or choose another output folder"
            )
        if earlier and mode == "resume":
            meta = _read_meta(run_path, spec.kind)
            _check_resumable(directory, meta, spec)
            invocation.update(_check_code(directory, meta, environment["code"], allow_code_change))
            records = _read_records(records_path, spec.kind, repair=True)
            _narrow_outputs(directory, meta, records, outputs)
        elif earlier or run_path.exists() or records_path.exists():
            # --overwrite, or an earlier run that finished nothing: what it wrote goes (nothing else)
            _remove_outputs(directory, legacy if earlier else (), outputs)
        kept = [str(o) for o in meta["outputs"]] if meta is not None else []
        found = _found(directory, kept)
        clash = [name for name in outputs if _covered(_relative(name), found)]
        if clash:
            raise StoreError(
                f"{directory} holds {', '.join(sorted(clash))}, which this run would write, and no run there wrote it: "
                "move it away or choose another output folder (a run never replaces files it did not write)"
            )
        now = dt.datetime.now().isoformat(timespec="seconds")
        if meta is None:
            meta = _fresh_meta(spec)
        meta["axes"] = _merge_axes(meta.get("axes", {}), spec.axes)
        meta["inputs"] = {**meta.get("inputs", {}), **spec.inputs}
        per_value = meta.setdefault("per_value", {})
        for axis, values in _normal(dict(spec.per_value)).items():
            per_value.setdefault(axis, {}).update(values)
        meta["invocations"].append({"started": now, "command": sys.argv[:], **invocation, "environment": environment})
        store = cls(directory, spec, meta, records, lock, frozenset(found))
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
        """Write a derived file (rebuilt from the records) atomically and remember it as this run's output. Before
        the first record nothing is written: a folder with no finished unit holds no results."""
        path = self.path(name)
        if self.lock is not None and self.records:
            with self.writing(name):
                write_json(path, data, indent)
        return path

    def write_text(self, name: str, text: str) -> Path:
        """Like :meth:`write_json`, for text."""
        path = self.path(name)
        if self.lock is not None and self.records:
            with self.writing(name):
                write_atomic(path, text)
        return path

    @contextlib.contextmanager
    def writing(self, name: str | Path) -> Iterator[Path]:
        """The path of ``name``, listed as this run's output *before* the caller writes it: a kill mid-write leaves
        a listed path (a resume writes it again), never a file that no run wrote (which a resume must refuse to
        replace). Unlisted again if nothing was written there."""
        relative = self.claim(name)
        listed = self._list(relative)
        try:
            yield self.directory / relative
        finally:
            if listed and not (self.directory / relative).exists():
                self.meta["outputs"].remove(relative)
                self.save_meta()

    def claim(self, name: str | Path) -> str:
        """``name`` relative to the folder, after checking this run may write it: inside the folder, and not a path
        that was there before the run without a run there writing it (a StoreError names it)."""
        path = Path(name)
        if path.is_absolute():
            try:
                path = path.relative_to(self.directory.absolute())
            except ValueError:
                raise StoreError(f"{path} is not inside the run folder {self.directory}") from None
        relative = _relative(path)
        if _covered(relative, self.found):
            raise StoreError(
                f"{self.directory / relative} was in the output folder before this run, which did not write it: "
                "it is left as it is; move it away or choose another output folder"
            )
        return relative

    def make_dir(self, name: str | Path) -> Path:
        """Create the folder ``name`` (and missing parents) for this run's files and remember the outermost folder it
        created as this run's output (a folder that was already there is never recorded, so never deleted)."""
        relative = self.claim(name)
        path = self.directory / relative
        chain = [*reversed(Path(relative).parents[:-1]), Path(relative)]
        for parent in chain:
            target = self.directory / parent
            if target.exists() and not target.is_dir():
                raise StoreError(f"{target} is a file, not a folder; move it away or choose another output folder")
        created = next((p for p in chain if not (self.directory / p).exists()), None)
        if created is not None:
            self.written(created)  # listed before it exists, as in writing()
            path.mkdir(parents=True, exist_ok=True)
        return path

    def written(self, name: str | Path) -> None:
        """Remember ``name`` (a file or folder inside the run folder that this run is about to make: list it first,
        as :meth:`writing` does) as written by this run: ``--overwrite`` deletes it. A path that was there before
        the run (and no run wrote) is refused."""
        self._list(self.claim(name))

    def _list(self, relative: str) -> bool:
        """Add ``relative`` to run.json's outputs unless a listed path covers it; whether it was added."""
        outputs = self.meta["outputs"]
        if self.lock is None or any(_inside(relative, str(o)) for o in outputs):
            return False
        outputs.append(relative)
        self.save_meta()
        return True

    def set_environment(self, environment: Mapping[str, Any]) -> None:
        """Add what the study knows of its environment (torch threads, GPU) to the invocation's provenance, which
        the store recorded when it opened the folder."""
        invocation = self.meta["invocations"][-1]
        invocation["environment"] = {**invocation.get("environment", {}), **_normal(dict(environment))}
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


def _relative(name: str | Path) -> str:
    """A path inside the run folder, normalised (``a/./b`` -> ``a/b``); one reaching outside is a StoreError."""
    parts = [p for p in Path(name).parts if p not in ("", ".")]
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise StoreError(f"{str(name)!r} is not a path inside the run folder")
    return "/".join(parts)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _covered(relative: str, found: Iterable[str]) -> bool:
    """Whether writing ``relative`` would replace something in ``found`` (it, or something inside it)."""
    return any(_inside(f, relative) for f in found)


def _found(directory: Path, outputs: list[str]) -> set[str]:
    """The paths in ``directory`` that no run there wrote (neither a store file nor inside a recorded output)."""
    found: set[str] = set()
    stack = [Path(n) for n in os.listdir(directory)]
    while stack:
        relative = stack.pop()
        name = relative.as_posix()
        if name in STORE_FILES or any(_inside(name, o) for o in outputs):
            continue
        full = directory / relative
        if not any(_inside(o, name) for o in outputs):
            found.add(name)  # a folder holding outputs is the user's only in what else it holds
        if full.is_dir() and not full.is_symlink():
            stack += [relative / n for n in os.listdir(full)]
    return found


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
    if not all(isinstance(o, str) and o for o in meta["outputs"]):
        raise StoreError(f"{path}: 'outputs' is not a list of paths; it is left untouched")
    if not all(isinstance(i, dict) for i in meta["invocations"]):
        raise StoreError(f"{path}: 'invocations' is not a list of tables; it is left untouched")
    per_value = meta.get("per_value", {})
    if not isinstance(per_value, dict) or not all(isinstance(v, dict) for v in per_value.values()):
        raise StoreError(f"{path}: 'per_value' is not a table of tables; it is left untouched")
    return meta


def _read_records(path: Path, kind: str, repair: bool) -> dict[Key, Any]:
    """Every record, the last one for a repeated key, each checked (:func:`kradapter.records.problem`). A final line
    without its newline (an append the process was killed in) is dropped (and, with ``repair``, cut from the file);
    any other unreadable line, or a record of the wrong structure, is an error naming the line."""
    from .records import problem

    if not path.exists():
        return {}
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read {path} ({exc.strerror}); it is left untouched") from None
    complete, _, partial = raw.rpartition(b"\n")
    records: dict[Key, Any] = {}
    for number, line in enumerate(complete.split(b"\n") if complete else [], start=1):
        try:
            entry = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(
                f"{path} line {number} is not a record ({type(exc).__name__}: {exc}); the file is left untouched: "
                "fix it, or pass --overwrite"
            ) from None
        wrong = _entry_problem(entry)
        if wrong is None:
            wrong = problem(kind, tuple(entry["key"]), entry["record"])
        if wrong is not None:
            raise StoreError(
                f"{path} line {number} is not a record of a {kind} run ({wrong}); the file is left untouched: "
                "fix or delete that line, or pass --overwrite"
            )
        records[tuple(entry["key"])] = entry["record"]
    if partial and repair:
        with path.open("r+b") as f:
            f.truncate(len(complete) + 1 if complete or raw.startswith(b"\n") else 0)
            os.fsync(f.fileno())
        print(f"note: dropped an unfinished record at the end of {path} (an interrupted run)", file=sys.stderr)
    return records


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with a record line's frame ``{"key": [...], "record": ...}``, or None."""
    if not isinstance(entry, dict) or set(entry) != {"key", "record"}:
        return 'expected {"key": [...], "record": ...}'
    key = entry["key"]
    if not isinstance(key, list) or not key:
        return "its key is not a non-empty list"
    if not all(isinstance(part, str | int) and not isinstance(part, bool) for part in key):
        return "its key holds something other than names and integers"
    return None


def _has_records(path: Path) -> bool:
    """Whether ``records.jsonl`` holds a complete line (a finished unit)."""
    try:
        complete = path.read_bytes().rpartition(b"\n")[0]
    except OSError:
        return path.exists()
    return bool(complete.strip())


def _earlier_results(directory: Path, legacy: tuple[str, ...]) -> list[str]:
    """The files in ``directory`` that hold an earlier run's results: its records once a unit finished, and with no
    ``run.json`` (an older version's folder) the ``legacy`` files too. A run that stopped before it finished a unit
    (a bad input found after the folder was opened, a device that failed, a kill) holds none: a new run starts over
    it. An unreadable ``run.json`` counts as results (and is left untouched)."""
    run_path = directory / RUN_FILE
    found = [RECORDS_FILE] if _has_records(directory / RECORDS_FILE) else []
    if not run_path.exists():
        return found + [name for name in legacy if (directory / name).exists()]
    try:
        meta = json.loads(run_path.read_text(encoding="utf-8"))
        readable = isinstance(meta, dict) and isinstance(meta.get("outputs"), list)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        readable = False
    return [RUN_FILE, *found] if found or not readable else []


def _check_resumable(directory: Path, meta: dict[str, Any], spec: RunSpec, verb: str = "resume") -> None:
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
            f"cannot {verb} {directory}: its results were made with other settings ({'; '.join(changed)}). "
            + (
                "Run with the earlier settings, pass --overwrite to start again, or choose another output folder"
                if verb == "resume"
                else "Give the settings it was run with"
            )
        )


def _provenance() -> dict[str, Any]:
    """The invocation's provenance (:func:`kradapter.records.provenance`: versions, machine, code identity)."""
    from . import records

    return records.provenance()


def _recorded_code(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The code identity of the latest invocation that recorded one (the code the latest records were made with)."""
    for invocation in reversed(meta["invocations"]):
        code = (invocation.get("environment") or {}).get("code")
        if isinstance(code, dict) and code.get("source"):
            return code
    return None


def _check_code(directory: Path, meta: Mapping[str, Any], code: dict[str, Any], allow: bool) -> dict[str, Any]:
    """Refuse to resume records made by other code unless ``allow``; what the invocation records about it."""
    from .records import describe_code

    old = _recorded_code(meta)
    if old is None:
        print(
            f"note: the records in {directory} were made by a kradapter that recorded no code identity; "
            f"resuming them with {describe_code(code)}",
            file=sys.stderr,
        )
        return {"code_change": {"from": None, "to": code}}
    if old.get("source") == code.get("source"):
        return {}
    change = f"{describe_code(old)} -> {describe_code(code)}"
    if not allow:
        raise StoreError(
            f"cannot resume {directory}: its results were made by other code ({change}); run that code, pass "
            "--allow-code-change to continue them with this code (recorded in run.json), or --overwrite to start again"
        )
    print(f"note: resuming {directory} across a code change ({change}); recorded in {RUN_FILE}", file=sys.stderr)
    return {"code_change": {"from": old, "to": code, "allowed": True}}


def _narrow_outputs(directory: Path, meta: dict[str, Any], records: Mapping[Key, Any], outputs: Iterable[str]) -> None:
    """On resume: :func:`_narrowed` ``meta``'s outputs, with the names in the records read."""
    named = {part for key in records for part in key if isinstance(part, str)}
    meta["outputs"] = _narrowed(directory, meta["outputs"], named, outputs)


def _narrowed(directory: Path, listed: Iterable[str], named: set[str], outputs: Iterable[str]) -> list[str]:
    """``listed`` (a run.json's outputs) with each folder an older version listed whole although this version
    writes into it (``adapters``, where runs now list ``adapters/<method>``) replaced by the entries of it that
    this run declares (``outputs``) or its records name (``named``), so neither ``--overwrite`` nor a later write
    treats the rest of that folder (yours) as the run's."""
    declared = [_relative(o) for o in outputs]
    out: list[str] = []
    for old in listed:
        folder = directory / old
        if not any(d != old and _inside(d, old) for d in declared) or folder.is_symlink() or folder.is_file():
            out.append(old)
            continue
        if not folder.exists():
            continue  # nothing of it left to list
        kept = sorted(
            f"{old}/{name}"
            for name in os.listdir(folder)
            if name in named or any(_inside(d, f"{old}/{name}") for d in declared)
        )
        out += kept
        print(
            f"note: {directory / RUN_FILE} (an older version's) listed the whole folder {old}; it now lists "
            f"{', '.join(kept) or 'nothing in it'}; anything else in {old} is left as yours",
            file=sys.stderr,
        )
    return out


def _key_names(path: Path) -> set[str]:
    """The names in the keys of a ``records.jsonl`` read leniently (an overwrite reads it only to narrow an older
    listing: :func:`_narrowed`)."""
    names: set[str] = set()
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError:
        return names
    for line in lines:
        try:
            key = json.loads(line)["key"]
        except (ValueError, TypeError, KeyError):
            continue
        if isinstance(key, list):
            names |= {part for part in key if isinstance(part, str)}
    return names


def _remove_empty(directory: Path) -> None:
    """Remove ``directory`` if it is empty (a folder a refused run made)."""
    with contextlib.suppress(OSError):
        directory.rmdir()


def _merge_axes(old: Mapping[str, list[Any]], new: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
    merged = {name: list(values) for name, values in _normal(dict(old)).items()}
    for name, values in _normal(dict(new)).items():
        merged.setdefault(name, [])
        merged[name] += [v for v in values if v not in merged[name]]
    return merged


def _remove_outputs(directory: Path, legacy: tuple[str, ...], outputs: tuple[str, ...] = ()) -> None:
    """Delete what an earlier run wrote here: its records, its listed outputs (an older version's listing of a whole
    folder this run writes into narrowed first: :func:`_narrowed`), known older files; nothing else."""
    names = [RECORDS_FILE, *legacy]
    try:
        meta = json.loads((directory / RUN_FILE).read_text(encoding="utf-8"))
        listed = [str(n) for n in meta.get("outputs", []) if isinstance(n, str) and n]
        names += _narrowed(directory, listed, _key_names(directory / RECORDS_FILE), outputs)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        pass
    root = directory.resolve()
    for name in names:
        target = directory / name
        parent = target.parent.resolve()
        if target.name in ("", ".", "..") or (parent != root and root not in parent.parents):
            continue  # only inside the run folder
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
    (directory / RUN_FILE).unlink(missing_ok=True)
