"""`kradapter compare` on an executor: bad input, same numbers sequential and on Ray, resume across executors,
a worker killed mid-cell, the driver killed mid-run, a quiet command.

The Ray tests share one local cluster of 2 CPUs (module fixture; the command uses a cluster that is already up);
two more start in fresh processes: the killed driver's, and the output check's.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kradapter.cli import main
from kradapter.compare import study
from kradapter.compare.config import StudyConfig
from kradapter.compare.results import columns
from kradapter.executor import RAY_EXTRA, RayExecutor, SequentialExecutor, Unit, _quiet_init_options
from tests import support

from . import executor_cells as cells

ROOT = Path(__file__).resolve().parents[2]
TIMING = {"seconds", "svd_seconds"}  # the only fields allowed to differ between two runs of one study
# a small study of odd shapes: prime rows, wide, every default method and the references beside them
SMALL = ["--size", "37x53", "--iterations", "12", "--no-plots", "--quiet", "--matrices", "random_noise,low_rank"]


def compare(out: Path, *extra: str) -> int:
    return main(["compare", *SMALL, "--out", str(out), *extra])


def records(folder: Path) -> dict[tuple, dict]:
    """Every record of a run folder by key, without its timing fields."""
    out = {}
    for line in (folder / "records.jsonl").read_text().splitlines():
        entry = json.loads(line)
        out[tuple(entry["key"])] = {k: v for k, v in entry["record"].items() if k not in TIMING}
    return out


def document(folder: Path) -> dict:
    """The results document without timing and environment fields."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in TIMING}
        return [strip(v) for v in x] if isinstance(x, list) else x

    data = json.loads((folder / "experimental_results.json").read_text())
    data.pop("environment")
    data["config"]["output"].pop("directory")
    return strip(data)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'kradapter[ray]')")
    ray.init(num_cpus=2, **_quiet_init_options())
    yield ray
    ray.shutdown()


# -- bad input: one line, exit 2, before any work -------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--executor", "dask"], "invalid choice: 'dask'"),
        (["--workers", "0"], "--workers: expected a whole number >= 1, got '0'"),
        (["--workers", "2"], "--workers 2 needs --executor ray"),
        (["--ray-address", "head:6379"], "--ray-address head:6379 needs --executor ray"),
        (["--threads", "1", "--threads-per-unit", "2"], "--threads-per-unit 2 disagrees with --threads"),
        (["--executor", "ray", "--device", "cuda"], "--device cuda needs the sequential executor"),
    ],
)
def test_bad_executor_options_are_one_line_errors(tmp_path, capsys, argv, fragment):
    out = tmp_path / "out"
    try:
        code = compare(out, *argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert fragment in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_ray_missing_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray looks like to find_spec
    out = tmp_path / "out"
    assert compare(out, "--executor", "ray") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and RAY_EXTRA in err[0] and "--executor ray" in err[0]
    assert not out.exists()


def test_threads_default_and_flag(tmp_path):
    """Each cell runs at one torch thread unless asked (docs/executor.md), and --threads-per-unit is --threads."""
    assert compare(tmp_path / "a", "--methods", "lora") == 0
    run = json.loads((tmp_path / "a" / "run.json").read_text())["invocations"][-1]["environment"]
    assert (run["executor"], run["threads_per_unit"], run["torch_threads"]) == ("sequential", 1, 1)
    assert compare(tmp_path / "b", "--methods", "lora", "--threads-per-unit", "1") == 0
    assert records(tmp_path / "a") == records(tmp_path / "b")


# -- same numbers, one writer, resume across executors ---------------------------------------------------------------


@pytest.mark.slow
def test_unit_bits_same_sequential_and_ray(ray_cluster):
    """A fitted update is bit for bit the same in this process and in a Ray worker (one thread each): odd shapes."""
    todo = [
        Unit(("fit", m, shape), cells.fit_bits, (m, shape, 1000 + i, 15))
        for i, (m, shape) in enumerate([("kradapter", (37, 53)), ("lora", (61, 29)), ("randlora", (41, 41))])
    ]

    def collect(executor):
        got = {}
        with executor:
            summary = executor.run(todo, lambda k, r, a: got.update({k: r}), progress=False)
        assert not summary.failed, summary.failed
        return got

    seq = collect(SequentialExecutor(threads_per_unit=1))
    par = collect(RayExecutor(workers=2, threads_per_unit=1))
    assert seq == par and all(r["threads"] == 1 for r in par.values())


@pytest.mark.slow
def test_same_records_sequential_and_ray(ray_cluster, tmp_path):
    """The run folder of a Ray run holds what the sequential run wrote, apart from timing and environment."""
    seeds = ["--seeds", "3,11"]
    assert compare(tmp_path / "seq", *seeds) == 0
    assert compare(tmp_path / "ray", *seeds, "--executor", "ray", "--workers", "2") == 0
    seq, ray = records(tmp_path / "seq"), records(tmp_path / "ray")
    assert seq == ray
    assert len([k for k in seq if k[0] == "cell"]) == 2 * 2 * len(columns(StudyConfig().methods.names))
    assert document(tmp_path / "seq") == document(tmp_path / "ray")
    env = json.loads((tmp_path / "ray" / "run.json").read_text())["invocations"][-1]["environment"]
    assert (env["executor"], env["workers"], env["threads_per_unit"]) == ("ray", 2, 1)


@pytest.mark.slow
def test_resume_across_executors_both_ways(ray_cluster, tmp_path):
    """Sequential, resumed on Ray with a new matrix, resumed sequentially with a new seed: the study in one go."""
    out = tmp_path / "mixed"
    assert main(["compare", *SMALL[:-1], "random_noise", "--out", str(out)]) == 0
    assert compare(out, "--resume", "--executor", "ray", "--workers", "2") == 0
    assert compare(out, "--resume", "--seeds", "42,5") == 0
    assert compare(tmp_path / "once", "--seeds", "42,5") == 0
    assert records(out) == records(tmp_path / "once")
    assert document(out)["results"] == document(tmp_path / "once")["results"]
    modes = [i["environment"]["executor"] for i in json.loads((out / "run.json").read_text())["invocations"]]
    assert modes == ["sequential", "ray", "sequential"]


# -- faults ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_worker_retried_then_failed_then_resumed(ray_cluster, tmp_path, monkeypatch, capsys):
    """A worker SIGKILLed in LoRA's cell: three attempts in fresh processes, recorded failed, exit 1 naming it;
    the other cells finish; --resume (sequential here) runs only that cell."""
    counter = tmp_path / "attempts"
    monkeypatch.setattr(study, "cell_unit", functools.partial(cells.crash_on, "lora", str(counter)))
    out = tmp_path / "out"
    argv = ["--matrices", "random_noise", "--methods", "lora,kradapter"]
    assert main(["compare", *SMALL[:-2], *argv, "--out", str(out), "--executor", "ray", "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert "1 cell(s) failed" in err and re.search(r"random_noise / lora \(seed 42\): worker process died", err)
    assert "Traceback" not in err
    assert len(set(counter.read_text().split())) == 3  # first attempt + 2 retries, each in a fresh process
    saved = records(out)
    assert "died" in saved[("cell", "random_noise", "lora", 42)]["error"]
    assert "error" not in saved[("cell", "random_noise", "kradapter", 42)]
    monkeypatch.setattr(study, "cell_unit", cells.CELL)
    calls = []
    real = study.fit_method
    monkeypatch.setattr(study, "fit_method", lambda plan, *a, **k: calls.append(plan.method) or real(plan, *a, **k))
    assert main(["compare", *SMALL[:-2], *argv, "--out", str(out), "--resume"]) == 0
    assert calls == ["lora"]
    assert "error" not in records(out)[("cell", "random_noise", "lora", 42)]


def _fitted(path: Path) -> bool:
    """Whether ``records.jsonl`` holds a whole record of a fit (LoRA or KRAdapter; the reference cells are quick)."""
    text = path.read_text() if path.exists() else ""
    keys = [json.loads(line)["key"] for line in text.splitlines(keepends=True) if line.endswith("\n")]
    return any(key[0] == "cell" and key[2] in ("lora", "kradapter") for key in keys)


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (one started with ``start_new_session``) until none is left."""
    for _ in range(100):
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:  # ended meanwhile
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # session id; zombies are gone already
                alive.append(int(stat.parent.name))
        if not alive:
            return
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise AssertionError(f"processes of session {sid} still running: {alive}")


@pytest.mark.slow
def test_driver_killed_mid_run_on_ray_then_resume_gives_the_uninterrupted_numbers(tmp_path, rng: random.Random):
    """`kradapter compare --executor ray` SIGKILLed (the driver, the one writer) once a fit has been recorded: every
    record on disk is whole, and `--resume` (sequential) keeps them, runs only the rest, and ends with the records
    and results document of an uninterrupted run."""
    pytest.importorskip("ray", reason="ray is not installed (pip install 'kradapter[ray]')")
    study_file = tmp_path / "study.toml"
    study_file.write_text("[early_stopping]\nenabled = false\n")  # every fit runs all its iterations
    args = [*SMALL, "--config", str(study_file), "--iterations", "1500", "--methods", "lora,kradapter"]
    args += ["--seeds", "3,4"]  # 2 matrices x 2 seeds: 8 fits of about 0.7 s and 12 quick cells
    out = tmp_path / "killed"
    log = tmp_path / "driver.log"
    env = support.child_env()
    env.pop("RAY_ADDRESS", None)  # a local cluster of its own, started (and orphaned) by the driver
    command = [sys.executable, "-m", "kradapter.cli", "compare", *args, "--out", str(out)]
    command += ["--executor", "ray", "--workers", "2"]
    with log.open("w") as sink:
        driver = subprocess.Popen(
            command,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the driver and the cluster it starts: one session to clean up
        )
    path = out / "records.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not _fitted(path):
            assert driver.poll() is None, f"exit {driver.returncode} before any fit was recorded\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no fit recorded after 300 s\n{log.read_text()}"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))  # anywhere after that: mid-fit, mid-append, between two records
        if driver.poll() is not None:
            pytest.fail(f"exit {driver.returncode} before the kill: make the study longer\n{log.read_text()}")
        driver.send_signal(signal.SIGKILL)
        assert driver.wait(timeout=60) == -signal.SIGKILL, log.read_text()
    finally:
        driver.kill()
        driver.wait(timeout=60)
        _kill_session(driver.pid)  # Ray's agents outlive a killed driver (its workers and raylet do not)
    raw = path.read_bytes()
    lines = raw.splitlines(keepends=True)
    assert lines and raw.endswith(b"\n"), raw[-200:]  # no torn last line
    kept = [json.loads(line) for line in lines]  # each a whole record
    assert all(set(entry) == {"key", "record"} for entry in kept)
    assert any(entry["key"][0] == "cell" for entry in kept)

    assert main(["compare", *args, "--out", str(out), "--resume"]) == 0
    assert main(["compare", *args, "--out", str(tmp_path / "whole")]) == 0
    after = (out / "records.jsonl").read_bytes().splitlines(keepends=True)
    assert after[: len(lines)] == lines  # the records made before the kill, untouched
    keys = [tuple(json.loads(line)["key"]) for line in after]
    whole = records(tmp_path / "whole")
    assert len(keys) == len(set(keys)) == len(whole) > len(lines)  # nothing run twice, nothing missing
    assert records(out) == whole
    assert document(out) == document(tmp_path / "whole")
    assert [p.name for p in out.rglob("*") if p.name.endswith((".tmp", ".kratmp"))] == []
    modes = [i["environment"]["executor"] for i in json.loads((out / "run.json").read_text())["invocations"]]
    assert modes == ["ray", "sequential"]


# -- quiet output ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_command_output_is_the_bar_and_the_table(tmp_path):
    """A fresh `kradapter compare --executor ray` process: no Ray log lines on stderr, only the progress bar."""
    pytest.importorskip("ray")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    argv = [a for a in SMALL if a != "--quiet"] + ["--methods", "lora", "--out", str(tmp_path / "r")]
    proc = subprocess.run(
        [sys.executable, "-m", "kradapter.cli", "compare", *argv, "--executor", "ray", "--workers", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    noise = re.compile(r"\bINFO\b|\bWARNING\b|\(raylet\)|\(pid=|Started a local Ray|ray\.init|dashboard", re.I)
    lines = [line for line in re.split(r"[\r\n]", proc.stderr) if line.strip()]
    assert lines and all(line.startswith("cells:") and not noise.search(line) for line in lines), lines
    assert "finished=" in lines[-1] and "failed=0" in lines[-1]
    assert "wrote" in proc.stdout
