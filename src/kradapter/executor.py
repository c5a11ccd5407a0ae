"""Where a study's units run: one after another in this process, or as Ray tasks on a cluster.

A study is a grid of independent units. A :class:`Unit` describes one of them so that another process can run it:
a key (the results store's key), a top-level function and its arguments. The function returns a JSON-able record,
or a :class:`UnitResult` with the record and small artifacts (bytes keyed by relative path, e.g. a trained
adapter's files, see :func:`collect_artifacts`).

Both executors hand results to the driver in completion order through ``on_result(key, record, artifacts)`` and
failures through ``on_failure(key, reason)``; the driver alone writes (the one-writer rule: workers never touch
the results folder, so a Ray run's folder is what a sequential run would have written). A unit that raises is a
failure with a one-line reason and the run goes on. On Ray, a worker process that dies mid-unit (killed, out of
memory) has its unit retried ``max_retries`` times, then reported failed. Each unit carries the driver's
fingerprint (package versions, input hashes): a worker whose own differs refuses the unit with a one-line reason
(not retried) instead of computing numbers from other inputs.

Only the standard library is imported here; Ray and torch load when a run starts, so argument checks are cheap.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pickle
import socket
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

EXECUTORS = ("sequential", "ray")
PACKAGES = ("kradapter", "torch", "peft", "transformers", "numpy")  # the versions a unit's numbers depend on
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
RAY_EXTRA = 'pip install "kradapter[ray]"'
CONNECT_TIMEOUT_S = 5.0

Key = tuple[str | int, ...]
OnResult = Callable[[Key, Any, dict[str, bytes]], None]
OnFailure = Callable[[Key, str], None]


class ExecutorError(RuntimeError):
    """An executor that cannot run: a cluster that cannot be reached, Ray missing; the message is one line."""


class EnvironmentMismatchError(RuntimeError):
    """A worker whose packages or inputs differ from the driver's; it refuses the unit."""


# -- units ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitResult:
    """What a unit returns when it has artifacts: the record (JSON-able) and files as bytes by relative path."""

    record: Any
    artifacts: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Unit:
    """One unit of a study: ``fn(*args, **kwargs)`` computes the record stored under ``key``.

    ``fn`` must be a module-level function (pickled by reference), so a worker on another node imports the same
    code instead of receiving a copy of it.
    """

    key: Key
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", tuple(self.key))
        qualname = getattr(self.fn, "__qualname__", "")
        if not callable(self.fn) or "<" in qualname or "." in qualname:
            raise TypeError(f"unit {self.key}: fn must be a module-level function, got {self.fn!r}")


@dataclass(frozen=True)
class Outcome:
    """A finished unit as the driver receives it: a record and artifacts, or a one-line failure reason."""

    key: Key
    record: Any = None
    artifacts: Mapping[str, bytes] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Summary:
    """What a run did: the keys finished and the failed keys with their reasons, in delivery order."""

    finished: list[Key] = field(default_factory=list)
    failed: list[tuple[Key, str]] = field(default_factory=list)


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (what a failure record and the CLI show)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _check_artifacts(key: Key, artifacts: Mapping[str, bytes]) -> dict[str, bytes]:
    checked: dict[str, bytes] = {}
    for name, data in artifacts.items():
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ValueError(f"unit {key}: artifact path must be relative without '..', got {name!r}")
        if not isinstance(data, bytes | bytearray):
            raise TypeError(f"unit {key}: artifact {name!r} must be bytes, got {type(data).__name__}")
        checked[str(path)] = bytes(data)
    return checked


def _normalise(key: Key, value: Any) -> tuple[Any, dict[str, bytes]]:
    """The record and artifacts of a unit's return value; a record that is not JSON is the unit's error."""
    record, artifacts = (value.record, dict(value.artifacts)) if isinstance(value, UnitResult) else (value, {})
    try:
        json.dumps(record, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"unit {key}: record is not JSON-able ({exc})") from None
    return record, _check_artifacts(key, artifacts)


def collect_artifacts(folder: Path | str, prefix: str = "") -> dict[str, bytes]:
    """Every file under ``folder`` as bytes, keyed by ``prefix/relative path`` (e.g. a ``save_pretrained`` folder)."""
    folder = Path(folder)
    return {
        str(PurePosixPath(prefix) / p.relative_to(folder).as_posix()) if prefix else p.relative_to(folder).as_posix(): (
            p.read_bytes()
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def write_artifacts(root: Path | str, artifacts: Mapping[str, bytes]) -> list[Path]:
    """The driver's side: write each artifact under ``root`` atomically; returns the paths written."""
    from .store import write_atomic

    paths = []
    for name, data in _check_artifacts(("artifacts",), artifacts).items():
        path = Path(root) / name
        write_atomic(path, data)
        paths.append(path)
    return paths


# -- the environment check ---------------------------------------------------------------------------------------


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages the numbers depend on (``None`` for one not installed)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        if name == "kradapter":
            from . import __version__

            versions[name] = __version__  # the code actually imported (a source tree may shadow an install)
            continue
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass(frozen=True)
class Fingerprint:
    """What a worker must share with the driver: package versions and the hashes of the study's inputs.

    ``probe`` is a module-level callable (or a ``functools.partial`` of one) that computes the input hashes where
    it runs, the same way the driver computed ``inputs`` (e.g. ``file_hash`` of the model folder): a worker with
    other files or data gets other hashes and refuses its units.
    """

    packages: Mapping[str, str | None]
    inputs: Mapping[str, str] = field(default_factory=dict)
    probe: Callable[[], Mapping[str, str]] | None = None

    @classmethod
    def here(cls, inputs: Mapping[str, str] | None = None, probe: Callable[[], Mapping[str, str]] | None = None):
        return cls(package_versions(), dict(inputs or {}), probe)


@functools.cache
def _worker_versions() -> dict[str, str | None]:
    """This process's versions, looked up once (installed packages do not change under a running worker)."""
    return package_versions()


_PROBED: dict[str, dict[str, str]] = {}  # a worker hashes its inputs once per process


def _probe_inputs(probe: Callable[[], Mapping[str, str]]) -> dict[str, str]:
    try:
        cache_key = hashlib.sha256(pickle.dumps(probe)).hexdigest()
    except Exception:  # a probe that standard pickle cannot serialise is simply not cached
        return dict(probe())
    if cache_key not in _PROBED:
        _PROBED[cache_key] = dict(probe())
    return _PROBED[cache_key]


def check_environment(expected: Fingerprint) -> None:
    """Raise :class:`EnvironmentMismatchError` naming the first differences between this process and ``expected``."""
    problems = []
    mine = _worker_versions()
    for name, version in expected.packages.items():
        if mine.get(name) != version:
            problems.append(f"{name} {mine.get(name)} (driver {version})")
    if expected.probe is not None:
        found = _probe_inputs(expected.probe)
        for name, digest in expected.inputs.items():
            if found.get(name) != digest:
                problems.append(f"input {name!r} {_short(found.get(name))} (driver {_short(digest)})")
    if problems:
        where = socket.gethostname()
        raise EnvironmentMismatchError(f"worker on {where} differs from the driver: " + "; ".join(problems))


def _short(digest: str | None) -> str:
    return "missing" if digest is None else digest[:19]


# -- running one unit (the same code in both executors) ------------------------------------------------------------


def _set_threads(threads: int) -> None:
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def run_unit(unit: Unit, threads: int | None = None, expected: Fingerprint | None = None) -> tuple[Any, dict]:
    """Check the environment, pin the threads, run the unit: its record and artifacts (exceptions propagate).

    The thread variables only reach libraries not yet loaded; numpy's BLAS (an SVD in a unit's analysis) has
    started its threads by then in a driver process, so it is held to ``threads`` with threadpoolctl as well."""
    if expected is not None:
        check_environment(expected)
    if threads is None:
        return _normalise(unit.key, unit.fn(*unit.args, **dict(unit.kwargs)))
    from threadpoolctl import threadpool_limits

    _set_threads(threads)
    with threadpool_limits(limits=threads):
        return _normalise(unit.key, unit.fn(*unit.args, **dict(unit.kwargs)))


# -- executors ------------------------------------------------------------------------------------------------------


class Executor:
    """Runs units and delivers each outcome to the driver as it completes (see the module docstring)."""

    name = "executor"

    def __enter__(self) -> Executor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Connect or start what the executor needs; an :class:`ExecutorError` before any unit otherwise."""

    def close(self) -> None:
        """Release what :meth:`start` took."""

    def outcomes(self, units: Iterable[Unit]) -> Generator[Outcome]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The executor's settings, for the run's environment record."""
        return {"executor": self.name}

    def run(
        self,
        units: Iterable[Unit],
        on_result: OnResult,
        on_failure: OnFailure | None = None,
        *,
        progress: bool = True,
        desc: str | None = None,
        initial: int = 0,
        total: int | None = None,
    ) -> Summary:
        """Run ``units``, calling ``on_result``/``on_failure`` in completion order; a tqdm bar shows progress.

        ``initial``/``total`` let a resumed run count the units already on disk (``total`` is needed when ``units``
        has no length: a lazy iterable whose units are made as they are handed out). An exception raised by a
        callback stops the run (units in flight are cancelled) and propagates.
        """
        from tqdm.auto import tqdm

        summary = Summary()
        bar = tqdm(
            total=(len(units) if isinstance(units, Sized) else 0) + initial if total is None else total,
            initial=initial,
            desc=desc,
            unit="unit",
            disable=not progress,
            leave=True,
            dynamic_ncols=True,
        )
        counts = {"running": 0, "finished": 0, "failed": 0}

        def show(running: int) -> None:
            counts["running"] = running
            bar.set_postfix(counts, refresh=True)

        self._on_running = show
        outcomes = self.outcomes(units)
        try:
            for outcome in outcomes:
                if outcome.error is None:
                    on_result(outcome.key, outcome.record, dict(outcome.artifacts))
                    summary.finished.append(outcome.key)
                    counts["finished"] += 1
                else:
                    if on_failure is not None:
                        on_failure(outcome.key, outcome.error)
                    summary.failed.append((outcome.key, outcome.error))
                    counts["failed"] += 1
                bar.update(1)
                bar.set_postfix(counts, refresh=True)
            show(0)
        finally:
            outcomes.close()  # at once, so a stopped run cancels the units in flight before the error propagates
            self._on_running = None
            bar.close()
        return summary

    _on_running: Callable[[int], None] | None = None

    def _running(self, n: int) -> None:
        if self._on_running is not None:
            self._on_running(n)


class SequentialExecutor(Executor):
    """Units one after another in this process (the default, and what every study did before)."""

    name = "sequential"

    def __init__(self, threads_per_unit: int | None = None) -> None:
        self.threads_per_unit = threads_per_unit

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "threads_per_unit": self.threads_per_unit}

    def outcomes(self, units: Iterable[Unit]) -> Generator[Outcome]:
        for unit in units:
            self._running(1)
            try:
                record, artifacts = run_unit(unit, self.threads_per_unit)
            except Exception as exc:  # a unit's failure is reported; the run goes on
                yield Outcome(unit.key, error=one_line(exc))
            else:
                yield Outcome(unit.key, record, artifacts)


def _ray_task(unit: Unit, threads: int, expected: Fingerprint | None) -> tuple[Any, dict]:
    """The body of every Ray task (module level so workers import it rather than unpickle a copy)."""
    return run_unit(unit, threads, expected)


class RayExecutor(Executor):
    """Units as Ray tasks: on a local cluster started here (``workers`` units at once) or on ``address``.

    Each task reserves ``threads_per_unit`` CPUs and runs with that many torch/OpenMP threads. ``workers`` bounds
    the units in flight (default: the local cluster's size, or the remote cluster's CPUs / threads). A worker
    process that dies is retried ``max_retries`` times; a unit that raises, or refuses on its fingerprint, is not.
    """

    name = "ray"

    def __init__(
        self,
        workers: int | None = None,
        threads_per_unit: int = 1,
        address: str | None = None,
        *,
        max_retries: int = 2,
        fingerprint: Fingerprint | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        if workers is not None and workers < 1:
            raise ExecutorError(f"workers must be at least 1, got {workers}")
        if threads_per_unit < 1:
            raise ExecutorError(f"threads per unit must be at least 1, got {threads_per_unit}")
        if max_retries < 0:
            raise ExecutorError(f"max_retries must be at least 0, got {max_retries}")
        self.address = address if address is not None else os.environ.get("RAY_ADDRESS") or None
        self.workers = workers if workers is not None or self.address else (os.cpu_count() or 1)
        self.threads_per_unit = threads_per_unit
        self.max_retries = max_retries
        self.fingerprint = fingerprint if fingerprint is not None else Fingerprint.here()
        self.connect_timeout_s = connect_timeout_s
        self._owned = False
        self._task: Any = None

    # -- connection ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        ray = _import_ray()
        if self.address and self.address not in ("auto", "local"):
            check_reachable(self.address, self.connect_timeout_s)  # before Ray's own minute-long retries
        if ray.is_initialized():  # an already connected driver (e.g. a notebook) is used as it is
            self._owned = False
        else:
            options = _quiet_init_options()
            try:
                if self.address:
                    ray.init(address=self.address, **options)
                else:
                    ray.init(num_cpus=(self.workers or os.cpu_count() or 1) * self.threads_per_unit, **options)
            except Exception as exc:
                where = f"Ray cluster at {self.address}" if self.address else "a local Ray cluster"
                raise ExecutorError(f"cannot start or reach {where}: {one_line(exc)}") from None
            self._owned = True
        env = {name: str(self.threads_per_unit) for name in THREAD_VARIABLES}
        self._task = ray.remote(_ray_task).options(
            num_cpus=self.threads_per_unit,
            max_retries=self.max_retries,
            retry_exceptions=False,
            runtime_env={"env_vars": env},
        )

    def close(self) -> None:
        if self._owned:
            _import_ray().shutdown()
            self._owned = False
        self._task = None

    def describe(self) -> dict[str, Any]:
        return {
            "executor": self.name,
            "workers": self.workers,
            "threads_per_unit": self.threads_per_unit,
            "address": self.address,
            "max_retries": self.max_retries,
        }

    def _capacity(self) -> int:
        if self.workers is not None:
            return self.workers
        cpus = _import_ray().cluster_resources().get("CPU", 1)
        return max(1, int(cpus) // self.threads_per_unit)

    # -- running ------------------------------------------------------------------------------------------------
    def outcomes(self, units: Iterable[Unit]) -> Generator[Outcome]:
        if self._task is None:
            raise ExecutorError("RayExecutor.start() (or `with executor:`) must come before running units")
        ray = _import_ray()
        pending = iter(units)
        in_flight: dict[Any, Key] = {}
        capacity = self._capacity()
        try:
            while True:
                while len(in_flight) < capacity and (unit := next(pending, None)) is not None:
                    in_flight[self._task.remote(unit, self.threads_per_unit, self.fingerprint)] = unit.key
                self._running(len(in_flight))
                if not in_flight:
                    return
                done, _ = ray.wait(list(in_flight), num_returns=1)
                key = in_flight.pop(done[0])
                try:
                    record, artifacts = ray.get(done[0])
                except Exception as exc:
                    yield Outcome(key, error=self._reason(exc))
                else:
                    yield Outcome(key, record, artifacts)
        finally:
            for ref in in_flight:  # a stopped run (callback error, Ctrl-C) leaves nothing running
                ray.cancel(ref, force=True)

    def _reason(self, exc: BaseException) -> str:
        ray = _import_ray()
        errors = ray.exceptions
        if isinstance(exc, errors.RayTaskError):
            cause = getattr(exc, "cause", None)
            return one_line(cause) if isinstance(cause, BaseException) else one_line(exc)
        if isinstance(exc, errors.OutOfMemoryError):
            return f"worker killed by Ray's memory monitor (out of memory), {self.max_retries + 1} attempt(s)"
        if isinstance(exc, errors.WorkerCrashedError | errors.NodeDiedError | errors.LocalRayletDiedError):
            return f"worker process died mid-unit (killed?) in each of {self.max_retries + 1} attempt(s)"
        return one_line(exc)


# -- Ray helpers ----------------------------------------------------------------------------------------------------


def ray_available() -> bool:
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # a broken or blocked installation
        return False


def _import_ray() -> Any:
    if not ray_available():
        raise ExecutorError(f"the ray executor needs Ray, which is not installed: {RAY_EXTRA}")
    import ray

    return ray


def _quiet_init_options() -> dict[str, Any]:
    """``ray.init`` options that keep Ray's own log lines out of the command's output."""
    import logging

    return {
        "include_dashboard": False,
        "log_to_driver": False,  # workers' stdout/stderr stay in Ray's session logs
        "logging_level": logging.ERROR,
        "configure_logging": True,
    }


def check_reachable(address: str, timeout_s: float) -> None:
    """An :class:`ExecutorError` unless ``host:port`` (or ``ray://host:port``) accepts a TCP connection in time."""
    target = address.removeprefix("ray://")
    host, sep, port_text = target.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ExecutorError(f"Ray address must be HOST:PORT (or ray://HOST:PORT, auto), got {address!r}")
    start = time.monotonic()
    try:
        with socket.create_connection((host.strip("[]"), int(port_text)), timeout=timeout_s):
            pass
    except OSError as exc:
        waited = time.monotonic() - start
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise ExecutorError(f"cannot reach the Ray cluster at {address}: {why} after {waited:.1f} s") from None


# -- command-line arguments (shared by every study command) ---------------------------------------------------------


# Torch threads of each unit unless --threads-per-unit says otherwise, on either executor and for every study:
# measured in docs/executor.md ("Threads"). Fixed rather than probed at start-up: the thread count changes how sums
# are split, so a fixed count gives the same numbers on every machine, at every load, on either executor.
DEFAULT_THREADS_PER_UNIT = 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def add_executor_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--executor``, ``--workers``, ``--threads-per-unit``, ``--ray-address`` in their own help group."""
    group = parser.add_argument_group("where units run")
    group.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="sequential",
        help="sequential: one unit after another in this process (default); ray: units as Ray tasks",
    )
    group.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help="ray: units at once on a local cluster started for the run (default: the number of cores)",
    )
    group.add_argument(
        "--threads-per-unit",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"torch/OpenMP threads of each unit (default {DEFAULT_THREADS_PER_UNIT}: docs/executor.md)",
    )
    group.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="ray: an existing cluster, HOST:PORT or auto (default: $RAY_ADDRESS, else a local cluster)",
    )
    return group


def executor_from_args(
    args: argparse.Namespace,
    error: type[Exception] = ExecutorError,
    fingerprint: Fingerprint | None = None,
    max_retries: int = 2,
) -> Executor:
    """The executor the arguments ask for, or ``error(one line)`` for a bad combination, before any work."""
    name = getattr(args, "executor", "sequential") or "sequential"
    workers = getattr(args, "workers", None)
    threads = getattr(args, "threads_per_unit", None)
    address = getattr(args, "ray_address", None)
    if name not in EXECUTORS:
        raise error(f"--executor: unknown executor {name!r} (choose from {', '.join(EXECUTORS)})")
    for flag, value in (("--workers", workers), ("--threads-per-unit", threads)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise error(f"{flag}: expected a whole number >= 1, got {value!r}")
    if name == "sequential":
        for flag, value in (("--workers", workers), ("--ray-address", address)):
            if value is not None:
                raise error(f"{flag} {value} needs --executor ray (the sequential executor runs in this process)")
        return SequentialExecutor(threads or DEFAULT_THREADS_PER_UNIT)
    if not ray_available():
        raise error(f"--executor ray needs Ray, which is not installed: {RAY_EXTRA}")
    # with --ray-address, --workers bounds the units in flight on the existing cluster
    if address is not None and not address.strip():
        raise error("--ray-address: empty address")
    try:
        return RayExecutor(
            workers, threads or DEFAULT_THREADS_PER_UNIT, address, max_retries=max_retries, fingerprint=fingerprint
        )
    except ExecutorError as exc:
        raise error(str(exc)) from None
