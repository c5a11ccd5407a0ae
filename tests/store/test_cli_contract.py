"""`kradapter compare` as users run it: finished results never lost or mixed, one run per folder, every bad input
one line and exit code 2 before any work, help and errors without heavy imports, and a study killed at random
points that resumes to exactly the numbers of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kradapter.cli import main
from kradapter.files import TMP_SUFFIX
from tests import support

ENV = support.child_env()
TINY = [
    "--size",
    "24x16",
    "--iterations",
    "5",
    "--matrices",
    "random_noise,low_rank",
    "--methods",
    "lora,kradapter",
    "--no-plots",
    "--quiet",
    "--threads",
    "1",
]
RESULTS = "experimental_results.json"
HEAVY = ("torch", "peft", "transformers", "matplotlib")


@pytest.fixture(autouse=True)
def _restore_threads() -> Any:
    """``--threads`` sets torch's global thread count: put back the test session's."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def compare(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """``kradapter compare ARGS`` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    code = main(["compare", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``kradapter compare ARGS`` in a fresh interpreter, as the console script runs it."""
    return support.run_cli("compare", *args, timeout=timeout)


def error_line(err: str) -> str:
    """The one line an error prints (nothing else on stderr, no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kradapter compare: error: "), err
    return lines[0]


snapshot = support.snapshot  # every file's bytes (the lock file aside: it names the last holder)


def results(directory: Path) -> dict[str, Any]:
    return json.loads((directory / RESULTS).read_text())


def without_timing(value: Any) -> Any:
    """The results document less what differs between identical runs: timings and the environment."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in ("seconds", "svd_seconds", "environment")}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def cells(directory: Path) -> set[tuple[str, str]]:
    """(matrix, method) of every finished cell in the results document."""
    data = results(directory)["results"]
    return {
        (matrix, method)
        for matrix, entry in data.items()
        for method, record in entry["methods"].items()
        if record.get("seeds")
    }


# -- defect 1: results are never replaced without --overwrite --------------------------------------------------------


def test_a_second_run_into_the_same_folder_is_refused_and_keeps_the_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    code, _, _ = compare(capsys, *TINY, "--out", out)
    assert code == 0
    before = snapshot(out)
    assert RESULTS in before
    code, _, err = compare(capsys, *TINY, "--iterations", "6", "--out", out)
    line = error_line(err)
    assert code == 2 and "--resume" in line and "--overwrite" in line and str(out) in line
    assert snapshot(out) == before


def test_resume_twice_keeps_the_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What `make run` does: `--resume` starts a study in an empty folder, and a second one keeps every number."""
    out = tmp_path / "results"
    assert compare(capsys, *TINY, "--out", out, "--resume")[0] == 0
    first = results(out)
    assert {m for _, m in cells(out)} == {"lora", "kradapter", "svd", "kradapter_optimum", "zero"}
    assert compare(capsys, *TINY, "--out", out, "--resume")[0] == 0
    assert results(out)["results"] == first["results"]
    # --overwrite starts again and leaves files of the user's alone.
    (out / "my_notes.txt").write_text("mine")
    assert compare(capsys, *TINY, "--out", out, "--overwrite", "--methods", "lora")[0] == 0
    assert {m for _, m in cells(out)} == {"lora", "svd", "zero"}
    assert (out / "my_notes.txt").read_text() == "mine"


# -- defect 2: --resume only with the settings and inputs that made the results ----------------------------------------


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--dtype", "float64"], ["setting runtime.dtype: 'float32' -> 'float64'"]),
        (["--iterations", "7"], ["setting training.iterations: 5 -> 7"]),
        (
            ["--iterations", "7", "--dtype", "float64"],
            ["setting runtime.dtype: 'float32' -> 'float64'", "setting training.iterations: 5 -> 7"],
        ),
    ],
    ids=["dtype", "iterations", "both"],
)
def test_resume_with_changed_settings_is_refused_naming_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: list[str], named: list[str]
) -> None:
    out = tmp_path / "results"
    assert compare(capsys, *TINY, "--out", out)[0] == 0
    before = snapshot(out)
    code, _, err = compare(capsys, *TINY, *change, "--out", out, "--resume")
    line = error_line(err)
    assert code == 2
    for text in named:
        assert text in line
    assert snapshot(out) == before
    # Growing an independent axis is allowed: more seeds and methods, earlier cells kept.
    first = results(out)["results"]["low_rank"]["methods"]["lora"]["runs"]["42"]
    grown = [*TINY, "--seeds", "42,7", "--methods", "lora,kradapter,sinlora"]
    assert compare(capsys, *grown, "--out", out, "--resume")[0] == 0
    entry = results(out)["results"]["low_rank"]["methods"]
    assert entry["lora"]["runs"]["42"] == first and set(entry["lora"]["runs"]) == {"42", "7"}
    assert entry["sinlora"]["seeds"] == 2


def test_resume_refuses_a_changed_method_setting_but_takes_a_new_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``[methods.settings.lora]`` made LoRA's cells: changing it is refused; a new method brings its own."""
    study = tmp_path / "study.toml"
    study.write_text("[methods.settings.lora]\nr = 4\n")
    out = tmp_path / "results"
    assert compare(capsys, "--config", study, *TINY, "--out", out)[0] == 0
    assert results(out)["results"]["low_rank"]["methods"]["lora"]["settings"]["r"] == 4
    before = snapshot(out)
    study.write_text("[methods.settings.lora]\nr = 5\n")
    code, _, err = compare(capsys, "--config", study, *TINY, "--out", out, "--resume")
    assert code == 2 and "methods lora: r: 4 -> 5" in error_line(err)
    assert snapshot(out) == before
    study.write_text("[methods.settings.lora]\nr = 4\n[methods.settings.kronecker]\nr = 2\n")
    grown = [*TINY, "--methods", "lora,kradapter,kronecker"]
    assert compare(capsys, "--config", study, *grown, "--out", out, "--resume")[0] == 0
    entry = results(out)["results"]["low_rank"]["methods"]
    assert entry["kronecker"]["settings"]["r"] == 2 and entry["lora"]["settings"]["r"] == 4


def user_study(tmp_path: Path, matrix: np.ndarray) -> Path:
    """A study file with one user matrix ``mine`` stored in ``mine.npy``."""
    np.save(tmp_path / "mine.npy", matrix)
    study = tmp_path / "study.toml"
    study.write_text(f'[[matrices.user]]\nname = "mine"\npath = "{tmp_path / "mine.npy"}"\n')
    return study


def test_a_changed_user_matrix_under_the_same_name_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng()
    study = user_study(tmp_path, rng.standard_normal((11, 7)).astype(np.float32))
    out = tmp_path / "results"
    args = ["--config", study, *TINY, "--matrices", "random_noise", "--out", out]
    assert compare(capsys, *args)[0] == 0
    assert results(out)["results"]["mine"]["target"]["shape"] == [11, 7]
    before = snapshot(out)
    for shape in ((11, 7), (13, 5)):  # other values, then another shape (which crashed with zip() before)
        np.save(tmp_path / "mine.npy", rng.standard_normal(shape).astype(np.float32))
        code, _, err = compare(capsys, *args, "--resume", "--seeds", "42,43")
        line = error_line(err)
        assert code == 2 and "input matrix mine: content sha256:" in line and "--overwrite" in line
        assert snapshot(out) == before
    assert compare(capsys, *args, "--overwrite", "--seeds", "42,43")[0] == 0
    target = results(out)["results"]["mine"]["target"]
    assert target["shape"] == [13, 5] and set(target["runs"]) == {"42", "43"}


# -- defect 4: one run per folder at a time ---------------------------------------------------------------------------


def test_a_run_into_a_folder_in_use_fails_at_once_naming_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kradapter.store import RunSpec, Store

    out = tmp_path / "results"
    with Store.open(out, RunSpec("compare", {})):
        code, _, err = compare(capsys, *TINY, "--out", out, "--resume")
    line = error_line(err)
    assert code == 2 and f"in use by another run (pid {os.getpid()} on " in line
    assert not (out / RESULTS).exists()


STUDY_SECONDS = "[early_stopping]\nenabled = false\n"  # every cell runs all its iterations: a study of seconds


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``kradapter`` runs forked from one interpreter that has imported the heavy libraries once."""
    server = support.ForkRunner(tmp_path_factory.mktemp("logs"))
    yield server
    server.close()


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--resume"], []], ids=["resume", "plain"])
def test_two_concurrent_runs_never_both_succeed_unless_both_results_are_kept(
    tmp_path: Path, runner: support.ForkRunner, flags: list[str]
) -> None:
    """Two studies started at once into one folder (other methods, so each adds its own cells): each that exits 0
    has all its cells in the results; one refused says why in one line (the folder in use, naming the holder)."""
    study = tmp_path / "study.toml"
    study.write_text(STUDY_SECONDS)
    out = tmp_path / "results"
    base = ["--config", study, *TINY, "--iterations", "100", "--seeds", "1,2", "--out", out, *flags]
    _, logs = runner.start(["compare", *base, "--methods", "lora"], ["compare", *base, "--methods", "kradapter"])
    codes = runner.exited(300)
    assert codes is not None
    finished = dict(zip(("lora", "kradapter"), zip(codes, [log.read_text() for log in logs], strict=True), strict=True))
    ok = [method for method, (code, _) in finished.items() if code == 0]
    assert ok, finished
    data = results(out)["results"]
    for method in ok:
        for matrix in ("random_noise", "low_rank"):
            assert set(data[matrix]["methods"][method]["runs"]) == {"1", "2"}, (finished, method)
    for code, log in finished.values():
        if code != 0:
            lines = [line for line in log.splitlines() if line.startswith("kradapter compare: error:")]
            assert code == 2 and len(lines) == 1 and "Traceback" not in log, log
            assert "in use by another run (pid " in lines[0] or "--resume" in lines[0], lines[0]


# -- defect 5: bad inputs are one line, exit 2, no traceback ----------------------------------------------------------


def test_bad_inputs_are_one_line_and_exit_2(tmp_path: Path) -> None:
    """Each in a fresh process, as a user meets it: no traceback, one line naming the bad value, nothing written."""
    not_utf8 = tmp_path / "latin1.toml"
    not_utf8.write_bytes("[training]\n# caf\xe9\niterations = 5\n".encode("latin-1"))
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("precious")
    huge_dpi = tmp_path / "dpi.toml"
    huge_dpi.write_text("[output]\ndpi = 100000\n")
    wide = tmp_path / "wide.toml"
    wide.write_text("[output]\ndpi = 1200\nfigure_size = [100, 100]\n")
    cases = [
        (["--config", not_utf8], "not a UTF-8 text file"),
        (["--out", a_file], "exists and is not a folder"),
        (["--config", huge_dpi], "output.dpi: 100000 is above 1200"),
        (["--config", wide], "output.dpi: figure_size [100.0, 100.0] at dpi 1200"),
    ]
    for args, expected in cases:
        done = cli(*TINY, "--out", tmp_path / "out", *args)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert expected in error_line(done.stderr), done.stderr
    assert a_file.read_text() == "precious" and not (tmp_path / "out").exists()


def test_a_results_folder_of_the_wrong_structure_is_refused_untouched(tmp_path: Path) -> None:
    """An old or damaged results file: refused with one line, never overwritten."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / RESULTS).write_text("[1, 2, 3]\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.json").write_text('{"schema_version": 1, "kind": "compare", "settings": [')
    (broken / "records.jsonl").write_text("")
    for out, expected in ((legacy, "older version of kradapter"), (broken, "cannot read")):
        before = snapshot(out)
        done = cli(*TINY, "--out", out, "--resume")
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert expected in error_line(done.stderr)
        assert snapshot(out) == before


def test_a_run_stopped_by_a_bad_input_leaves_the_folder_usable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user matrix found to be 1-D once the study starts: one line, exit 2, and a corrected rerun needs no flag."""
    study = user_study(tmp_path, np.zeros(5, dtype=np.float32))
    args = ["--config", study, *TINY, "--matrices", "random_noise", "--out", tmp_path / "out"]
    code, _, err = compare(capsys, *args)
    assert code == 2 and "has shape (5,); a target must be a 2-D matrix" in error_line(err)
    np.save(tmp_path / "mine.npy", np.random.default_rng().standard_normal((9, 4)).astype(np.float32))
    assert compare(capsys, *args)[0] == 0
    assert results(tmp_path / "out")["results"]["mine"]["target"]["shape"] == [9, 4]


# -- defect 7: method names and settings checked before any work ------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            "[methods.settings.lora]\nrr = 3\n",
            "methods.settings.lora.rr: unknown setting of lora; known: r, ",
        ),
        ("[methods.settings.lora]\nr = 0\n", "methods.settings.lora.r must be a positive integer, got 0"),
        ("[methods.settings.lokr]\nr = -2\n", "methods.settings.lokr.r must be a positive integer, got -2"),
    ],
)
def test_an_invalid_method_setting_stops_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, expected: str
) -> None:
    study = tmp_path / "study.toml"
    study.write_text(toml)
    code, out, err = compare(capsys, "--config", study, *TINY, "--out", tmp_path / "out")
    assert code == 2 and expected in error_line(err) and out == ""
    assert not (tmp_path / "out").exists()


def test_a_bad_method_in_a_list_is_named_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = compare(capsys, *TINY, "--methods", "lora,kradapter,bogus", "--out", tmp_path / "out")
    line = error_line(err)
    assert code == 2 and "unknown method 'bogus'; choose from lora, sinlora, kradapter" in line
    assert "lora,kradapter,bogus" not in line and not (tmp_path / "out").exists()


# -- answers at once: no heavy import for help and errors --------------------------------------------------------------

PROBE = textwrap.dedent(
    """
    import json, sys
    from kradapter.cli import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY})
    print(json.dumps({{"code": code, "heavy": heavy}}))
    """
).format(HEAVY=set(HEAVY))


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["--help"], 0),
        (["compare", "--help"], 0),
        (["compare", "--iterations", "0"], 2),
        (["compare", "--methods", "lora,bogus"], 2),
        (["compare", "--size", "big"], 2),
    ],
    ids=["help", "compare-help", "bad-value", "bad-method", "unparseable"],
)
def test_help_and_errors_import_no_heavy_library(tmp_path: Path, argv: list[str], code: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv, *(["--out", str(tmp_path / "o")] if len(argv) > 2 else [])],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"code": code, "heavy": []}, done.stderr


def test_the_console_script_answers_help_without_heavy_imports() -> None:
    """The installed ``kradapter`` command itself, its imports listed by ``-X importtime``."""
    script = Path(sys.executable).parent / "kradapter"
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable}")
    for argv in (["--help"], ["compare", "--help"]):
        done = subprocess.run(
            [str(script), *argv], capture_output=True, text=True, env={**ENV, "PYTHONPROFILEIMPORTTIME": "1"}
        )
        assert done.returncode == 0 and "usage: kradapter" in done.stdout
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
        assert "kradapter.cli" in imported
        assert not {m for m in imported if m.split(".")[0] in HEAVY}, sorted(imported)


IMPORT_PROBE = textwrap.dedent(
    """
    import json, sys
    {first}
    {second}
    from peft.config import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    known = {{}}
    for name in ("KRADAPTER", "SINLORA"):
        config = PeftConfig.from_peft_type(peft_type=name, target_modules=["q"])
        known[name] = [type(config).__name__, PEFT_TYPE_TO_TUNER_MAPPING[name].__name__]
    print(json.dumps(known))
    """
)


def test_import_kradapter_is_light() -> None:
    probe = "import json, sys, kradapter; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, timeout=120)
    modules = set(json.loads(done.stdout))
    assert "kradapter" in modules
    heavy = {m for m in modules if m.split(".")[0] in (*HEAVY, "tqdm")}
    studies = {m for m in modules if m.startswith(("kradapter.compare", "kradapter.finetune"))}
    assert not heavy and not studies, (heavy, studies)


@pytest.mark.slow  # two fresh interpreters importing PEFT at once: 16 s (busy 2-core machine)
def test_peft_knows_the_methods_whatever_the_import_order() -> None:
    """After ``import kradapter; import peft`` and after ``import peft; import kradapter`` (both at once)."""
    orders = {"kradapter-first": ("import kradapter", "import peft"), "peft-first": ("import peft", "import kradapter")}
    probes = {
        order: subprocess.Popen(
            [sys.executable, "-c", IMPORT_PROBE.format(first=first, second=second)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for order, (first, second) in orders.items()
    }
    expected = {"KRADAPTER": ["KRAdapterConfig", "KRAdapterModel"], "SINLORA": ["SinLoRAConfig", "SinLoRAModel"]}
    for order, probe in probes.items():
        out, err = probe.communicate(timeout=300)
        assert probe.returncode == 0, (order, err)
        assert json.loads(out.strip().splitlines()[-1]) == expected, order


# -- a study killed at random points resumes to the numbers of an uninterrupted run ------------------------------------


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_numbers(
    tmp_path: Path, runner: support.ForkRunner, capsys: pytest.CaptureFixture[str], rng: random.Random
) -> None:
    """2 matrices x 3 methods x 2 seeds (2,000 steps a cell, long enough to be killed on a quiet machine), killed
    (SIGKILL) at least 3 times at random moments, resumed each time until it finishes: its results equal an
    uninterrupted run's on every number but the timings."""
    study = tmp_path / "study.toml"
    study.write_text(STUDY_SECONDS)
    args = ["--config", study, *TINY, "--iterations", "2000", "--methods", "lora,kradapter,sinlora", "--seeds", "3,4"]
    out = tmp_path / "killed"
    records = out / "records.jsonl"
    kills: list[str] = []
    for _ in range(12):
        seen = _lines(records)
        (pid,), logs = runner.start(["compare", *args, "--out", out, "--resume"])
        if len(kills) < 3:
            if rng.random() < 0.25:  # anywhere, start-up included
                codes = runner.exited(rng.uniform(0.0, 1.5))
            else:  # once this run has finished a unit of its own, then a little later
                codes = None
                for _ in range(12_000):
                    if _lines(records) > seen or (codes := runner.exited(0.01)) is not None:
                        break
                codes = codes or runner.exited(rng.uniform(0.0, 0.3))
            if codes is None:
                os.kill(pid, signal.SIGKILL)
                codes = runner.exited(60)
                assert codes == [-signal.SIGKILL], logs[0].read_text()
                kills.append(f"after {_lines(records)} records")
                continue
            assert codes == [0], logs[0].read_text()
            pytest.fail(f"the study finished before 3 kills ({kills}): make it longer")
        codes = runner.exited(300)
        assert codes == [0], logs[0].read_text()
        break
    assert len(kills) >= 3
    resumed = results(out)
    reference = tmp_path / "whole"
    assert compare(capsys, *args, "--out", reference)[0] == 0
    whole = results(reference)
    assert cells(out) == cells(reference) and len(cells(out)) == 2 * 6  # 5 columns and the KRAdapter optimum
    assert resumed["config"].pop("output") != whole["config"].pop("output")  # the folders differ, as they must
    assert without_timing(resumed) == without_timing(whole), kills
    assert [p.name for p in out.rglob("*") if p.name.endswith((".tmp", TMP_SUFFIX))] == []  # no temporary left
