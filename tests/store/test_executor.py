"""The executor layer: same numbers sequential vs Ray, completion order, one writer, faults, arguments, quiet logs.

Ray tests share one local cluster of 2 CPUs (module fixture); one more starts in a subprocess for the log check.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kradapter.executor import (
    DEFAULT_THREADS_PER_UNIT,
    RAY_EXTRA,
    ExecutorError,
    Fingerprint,
    RayExecutor,
    SequentialExecutor,
    Unit,
    _quiet_init_options,
    add_executor_arguments,
    executor_from_args,
    package_versions,
    write_artifacts,
)
from kradapter.store import RunSpec, Store

from . import executor_units as units

ROOT = Path(__file__).resolve().parents[2]


class CliError(ValueError):
    """Stands in for a study's own error type (e.g. ConfigError)."""


def collect(executor, todo):
    results, failures = [], []
    summary = executor.run(
        todo, lambda k, r, a: results.append((k, r, a)), lambda k, why: failures.append((k, why)), progress=False
    )
    return results, failures, summary


def lstsq_units():
    shapes = [(13, 7), (29, 13), (97, 5), (8, 8)]  # tall, odd, prime
    return [Unit(("fit", s, m), units.lstsq_unit, (s * 1009 + m, m, n)) for s, (m, n) in enumerate(shapes)]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'kradapter[ray]')")
    ray.init(num_cpus=2, **_quiet_init_options())
    yield ray
    ray.shutdown()


# -- units and the sequential executor ------------------------------------------------------------------------------


def test_unit_rejects_local_functions():
    def local():
        return 1

    with pytest.raises(TypeError, match="module-level"):
        Unit(("a",), local)
    with pytest.raises(TypeError, match="module-level"):
        Unit(("a",), lambda: 1)


def test_sequential_reports_failures_and_goes_on(tmp_path):
    counter = tmp_path / "attempts"
    todo = [Unit(("bad",), units.failing_unit, (str(counter),)), Unit(("ok",), units.sleep_unit, ("ok", 0.0))]
    results, failures, summary = collect(SequentialExecutor(), todo)
    assert [k for k, _, _ in results] == [("ok",)]
    assert failures == [(("bad",), "ValueError: bad value 7")]
    assert summary.failed == failures and summary.finished == [("ok",)]


def test_record_must_be_json(tmp_path):
    todo = [Unit(("x",), units.artifact_unit, (1,)), Unit(("y",), set)]  # set() is not a JSON-able record
    _, failures, _ = collect(SequentialExecutor(), todo)
    assert len(failures) == 1 and failures[0][0] == ("y",) and "not JSON-able" in failures[0][1]


def test_write_artifacts_refuses_escaping_paths(tmp_path):
    with pytest.raises(ValueError, match="relative"):
        write_artifacts(tmp_path, {"../evil": b"x"})
    with pytest.raises(ValueError, match="relative"):
        write_artifacts(tmp_path, {"/etc/evil": b"x"})


# -- Ray: numbers, order, the one-writer rule -----------------------------------------------------------------------


@pytest.mark.slow
def test_same_numbers_sequential_and_ray(ray_cluster):
    seq, seq_fail, _ = collect(SequentialExecutor(threads_per_unit=1), lstsq_units())
    with RayExecutor(workers=2, threads_per_unit=1) as ex:
        par, par_fail, _ = collect(ex, lstsq_units())
    assert not seq_fail and not par_fail
    assert dict((k, r) for k, r, _ in seq) == dict((k, r) for k, r, _ in par)  # every float bit for bit
    assert all(r["threads"] == 1 for _, r, _ in par)


@pytest.mark.slow
def test_threads_pinned_in_ray_tasks(ray_cluster):
    with RayExecutor(workers=2, threads_per_unit=1) as ex:
        results, _, _ = collect(ex, [Unit(("t", i), units.threads_unit) for i in range(2)])
    for _, r, _ in results:
        assert (r["torch"], r["omp"]) == (1, "1") and r["pools"] and all(n == 1 for _, n in r["pools"]), r


def test_sequential_pins_every_thread_pool_including_numpys_blas_already_started() -> None:
    """In the driver numpy's BLAS has started its threads before the unit runs (the variables come too late):
    each unit is still held to its threads, and the process gets its BLAS pool back afterwards (torch keeps the
    unit's count: the driver runs at it)."""
    import numpy as np
    from threadpoolctl import threadpool_info

    np.linalg.svd(np.ones((8, 8)))  # the pools are up
    before = sorted((i["internal_api"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas")
    for threads in (1, 2):
        (result,), failures, _ = collect(
            SequentialExecutor(threads_per_unit=threads), [Unit(("t",), units.threads_unit)]
        )
        assert not failures
        record = result[1]
        assert record["torch"] == threads and record["pools"] and all(n == threads for _, n in record["pools"])
    assert sorted((i["internal_api"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas") == before


@pytest.mark.slow
def test_completion_order(ray_cluster):
    # two at once: the long unit starts first and finishes last; the short ones (0.3 s apart) overtake it
    todo = [Unit(("long",), units.sleep_unit, ("long", 3.0))]
    todo += [Unit((f"short{i}",), units.sleep_unit, (f"short{i}", 0.3)) for i in range(3)]
    with RayExecutor(workers=2) as ex:
        collect(ex, [Unit(("warm", i), units.sleep_unit, ("warm", 0.5)) for i in range(2)])  # two live workers
        results, _, _ = collect(ex, todo)
    delivered = [k[0] for k, _, _ in results]
    assert delivered[-1] == "long"
    finish_times = [r["finished_at"] for _, r, _ in results]
    assert finish_times == sorted(finish_times)


@pytest.mark.slow
def test_ray_run_folder_matches_sequential(ray_cluster, tmp_path):
    """The driver writes records and artifacts; the two folders hold the same bytes."""
    todo = [Unit(("a", s), units.artifact_unit, (s,)) for s in (3, 5, 7)]

    def run(executor, folder):
        spec = RunSpec("executor-test", {"x": 1}, {"seeds": [3, 5, 7]})
        with Store.open(folder, spec) as store:

            def on_result(key, record, artifacts):
                store.add(key, record)
                write_artifacts(store.directory, artifacts)

            executor.run(todo, on_result, progress=False)
        lines = sorted((folder / "records.jsonl").read_text().splitlines())
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.bin")}
        files |= {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("config.json")}
        return lines, files

    seq = run(SequentialExecutor(), tmp_path / "seq")
    with RayExecutor(workers=2) as ex:
        par = run(ex, tmp_path / "ray")
    assert seq == par
    assert len(seq[0]) == 3 and len(seq[1]) == 6


# -- Ray: faults ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_worker_retried_then_failed(ray_cluster, tmp_path):
    counter = tmp_path / "attempts"
    todo = [Unit(("crash",), units.crash_unit, (str(counter),))]
    todo += [Unit(("ok", i), units.sleep_unit, (f"ok{i}", 0.05)) for i in range(3)]
    with RayExecutor(workers=2, max_retries=2) as ex:
        results, failures, summary = collect(ex, todo)
    assert sorted(k for k, _, _ in results) == [("ok", 0), ("ok", 1), ("ok", 2)]
    assert len(failures) == 1 and failures[0][0] == ("crash",)
    assert "died" in failures[0][1] and "\n" not in failures[0][1]
    pids = counter.read_text().split()
    assert len(pids) == 3 and len(set(pids)) == 3  # first attempt + max_retries, each in a fresh process
    assert summary.failed == failures


@pytest.mark.slow
def test_unit_exception_not_retried(ray_cluster, tmp_path):
    counter = tmp_path / "attempts"
    with RayExecutor(workers=2, max_retries=2) as ex:
        _, failures, _ = collect(ex, [Unit(("bad",), units.failing_unit, (str(counter),))])
    assert failures == [(("bad",), "ValueError: bad value 7")]
    assert len(counter.read_text().split()) == 1


@pytest.mark.slow
def test_fingerprint_mismatch_refused(ray_cluster):
    other_torch = Fingerprint({**package_versions(), "torch": "0.0.1"})
    with RayExecutor(workers=2, fingerprint=other_torch) as ex:
        results, failures, _ = collect(ex, lstsq_units()[:1])
    assert not results
    assert len(failures) == 1
    reason = failures[0][1]
    assert reason.startswith("EnvironmentMismatchError: worker on") and "torch" in reason and "0.0.1" in reason

    probe_other = functools.partial(units.inputs_probe, "sha256:" + "b" * 64)
    other_data = Fingerprint(package_versions(), {"data": "sha256:" + "a" * 64}, probe_other)
    with RayExecutor(workers=2, fingerprint=other_data) as ex:
        _, failures, _ = collect(ex, lstsq_units()[:2])
    assert len(failures) == 2 and all("input 'data'" in why for _, why in failures)

    probe_same = functools.partial(units.inputs_probe, "sha256:" + "a" * 64)
    same = Fingerprint(package_versions(), {"data": "sha256:" + "a" * 64}, probe_same)
    with RayExecutor(workers=2, fingerprint=same) as ex:
        results, failures, _ = collect(ex, lstsq_units()[:2])
    assert not failures and len(results) == 2


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_cluster_is_one_line_error_quickly():
    pytest.importorskip("ray")
    start = time.monotonic()
    ex = RayExecutor(address=f"127.0.0.1:{_closed_port()}", connect_timeout_s=1.0)
    with pytest.raises(ExecutorError) as info:
        ex.start()
    assert time.monotonic() - start < 3
    message = str(info.value)
    assert "\n" not in message and "cannot reach the Ray cluster at 127.0.0.1:" in message
    with pytest.raises(ExecutorError, match="HOST:PORT"):
        RayExecutor(address="nonsense").start()


# -- arguments -------------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kradapter study")
    add_executor_arguments(p)
    return p


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--executor", "dask"], "invalid choice: 'dask'"),
        (["--workers", "0"], "--workers: expected a whole number >= 1, got '0'"),
        (["--threads-per-unit", "0"], "--threads-per-unit: expected a whole number >= 1, got '0'"),
        (["--workers", "two"], "got 'two'"),
    ],
)
def test_parser_rejects(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert fragment in err[-1]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--workers", "2"], "--workers 2 needs --executor ray"),
        (["--ray-address", "head:6379"], "--ray-address head:6379 needs --executor ray"),
    ],
)
def test_sequential_rejects_ray_options(argv, fragment):
    with pytest.raises(CliError, match=re.escape(fragment)):
        executor_from_args(parser().parse_args(argv), CliError)


def test_values_checked_without_argparse():
    for name, value in (("workers", 0), ("threads_per_unit", 0)):
        ns = argparse.Namespace(executor="ray", workers=None, threads_per_unit=None, ray_address=None)
        setattr(ns, name, value)
        with pytest.raises(CliError, match="expected a whole number >= 1"):
            executor_from_args(ns, CliError)
    with pytest.raises(CliError, match="unknown executor 'dask'"):
        executor_from_args(argparse.Namespace(executor="dask"), CliError)


def test_ray_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray looks like to find_spec
    with pytest.raises(CliError) as info:
        executor_from_args(parser().parse_args(["--executor", "ray"]), CliError)
    assert RAY_EXTRA in str(info.value) and "\n" not in str(info.value)


def test_defaults(monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    seq = executor_from_args(parser().parse_args([]), CliError)
    assert isinstance(seq, SequentialExecutor) and seq.threads_per_unit == DEFAULT_THREADS_PER_UNIT == 1
    ray_ex = executor_from_args(parser().parse_args(["--executor", "ray"]), CliError)
    assert isinstance(ray_ex, RayExecutor)
    assert (ray_ex.workers, ray_ex.threads_per_unit, ray_ex.address) == (os.cpu_count(), 1, None)
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    remote = executor_from_args(parser().parse_args(["--executor", "ray", "--threads-per-unit", "2"]), CliError)
    assert (remote.address, remote.workers, remote.threads_per_unit) == ("head:6379", None, 2)
    # RAY_ADDRESS in the environment does not make a sequential run an error (only the flag does)
    assert isinstance(executor_from_args(parser().parse_args([]), CliError), SequentialExecutor)


# -- quiet output ----------------------------------------------------------------------------------------------------

SCRIPT = """
import json, sys
from kradapter.executor import RayExecutor, Unit
from tests.store import executor_units as units
todo = [Unit(("fit", i), units.lstsq_unit, (i, 11, 5)) for i in range(3)]
got = {}
with RayExecutor(workers=2) as ex:
    summary = ex.run(todo, lambda k, r, a: got.update({repr(k): r}), desc="units")
print(json.dumps({"n": len(got), "failed": len(summary.failed)}))
"""


@pytest.mark.slow
def test_no_ray_log_lines_in_a_command_run():
    pytest.importorskip("ray")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"n": 3, "failed": 0}
    noise = re.compile(r"\bINFO\b|\bWARNING\b|\(raylet\)|\(pid=|Started a local Ray|ray\.init|dashboard", re.I)
    lines = [line for line in re.split(r"[\r\n]", proc.stderr) if line.strip()]
    assert lines, "the progress bar should be on stderr"
    assert [line for line in lines if noise.search(line)] == []
    assert all("units" in line for line in lines), lines  # only the tqdm bar


@pytest.mark.slow
def test_callback_error_cancels_units_in_flight(ray_cluster):
    todo = [Unit(("long",), units.sleep_unit, ("long", 30.0)), Unit(("short",), units.sleep_unit, ("short", 0.1))]

    def on_result(key, record, artifacts):
        raise OSError("disk full")

    with RayExecutor(workers=2) as ex:
        start = time.monotonic()
        with pytest.raises(OSError, match="disk full"):
            ex.run(todo, on_result, progress=False)
        assert time.monotonic() - start < 25  # the 30 s unit was not waited for
        results, failures, _ = collect(ex, [Unit(("after",), units.sleep_unit, ("after", 0.0))])
    assert [k for k, _, _ in results] == [("after",)] and not failures  # the executor is still usable
