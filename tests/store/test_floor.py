"""The floor both studies stand on: argument checks (``guards``) and files (``files``)."""

from __future__ import annotations

import argparse
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from kradapter import files, guards


class CallerError(ValueError):
    pass


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.int8(1), 10**30])
def test_positive_int_accepts_integers_and_returns_plain_ints(value: object) -> None:
    out = guards.positive_int("r", value)
    assert type(out) is int and out == int(value)  # type: ignore[call-overload]


@pytest.mark.parametrize("value", [0, -3, True, False, 2.0, "3", None, np.float64(2.0), np.bool_(True)])
def test_positive_int_refuses_the_rest_in_the_callers_error_naming_the_value(value: object) -> None:
    with pytest.raises(CallerError, match=rf"^r must be a positive integer, got {repr(value)[:8]}"):
        guards.positive_int("r", value, error=CallerError)


def test_positive_int_minimum_is_named() -> None:
    assert guards.positive_int("seed", 0, minimum=0) == 0
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer, got -1"):
        guards.positive_int("seed", -1, minimum=0)
    with pytest.raises(ValueError, match=r"k must be an integer >= 5, got 4"):
        guards.positive_int("k", 4, minimum=5)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "1", None])
def test_finite_number_refuses_non_numbers(value: object) -> None:
    with pytest.raises(CallerError, match=r"^scale must be a finite number, got "):
        guards.finite_number("scale", value, error=CallerError)


def test_finite_number_bounds() -> None:
    assert guards.finite_number("x", np.float32(0.5)) == 0.5 and guards.finite_number("x", -2) == -2.0
    with pytest.raises(ValueError, match=r"x must be a positive finite number, got 0"):
        guards.finite_number("x", 0, positive=True)
    with pytest.raises(ValueError, match=r"x must be a finite number >= 1, got 0.5"):
        guards.finite_number("x", 0.5, minimum=1)


def test_one_of_and_int_list() -> None:
    assert guards.one_of("mode", "b", ("a", "b")) == "b"
    with pytest.raises(CallerError, match=r"unknown mode 'c'; choose one of \('a', 'b'\)"):
        guards.one_of("mode", "c", ["a", "b"], error=CallerError)
    assert guards.int_list("--ranks", "1,2, 3 5") == (1, 2, 3, 5)
    with pytest.raises(ValueError, match=r"--ranks expects integers separated by commas, got '1,x'"):
        guards.int_list("--ranks", "1,x")
    with pytest.raises(ValueError, match=r"--ranks must be a positive integer, got 0"):
        guards.int_list("--ranks", "4,0")
    with pytest.raises(ValueError, match=r"--ranks needs at least one integer"):
        guards.int_list("--ranks", " , ")


def test_cli_int_is_a_usage_error_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--rounds", type=guards.cli_int())
    assert parser.parse_args(["--rounds", "3"]).rounds == 3
    for bad, said in (("0", "must be a positive integer, got 0"), ("x", "expected an integer, got 'x'")):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--rounds", bad])
        assert exit_.value.code == 2 and said in capsys.readouterr().err


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomic_replaces_whole_files_with_ordinary_modes(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "out.json"
    files.write_atomic(target, "first\n")
    files.write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    mask = os.umask(0)
    os.umask(mask)
    assert _mode(target) == 0o666 & ~mask
    files.write_atomic(target, "x", mode=0o600)
    assert _mode(target) == 0o600 and sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        files.write_atomic(target, 12345)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with files.atomic_path(target, mode=0o640) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and _mode(target) == 0o640


def test_replace_dir_swaps_a_whole_folder(tmp_path: Path) -> None:
    target, staging = tmp_path / "model", tmp_path / "model.tmp"
    files.replace_dir(_folder(staging, {"a.bin": b"1", "sub/b.bin": b"2"}), target)
    files.replace_dir(_folder(staging, {"c.bin": b"3"}), target)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["c.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _folder(path: Path, contents: dict[str, bytes]) -> Path:
    for name, data in contents.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def test_json_hash_and_sizes(tmp_path: Path) -> None:
    files.write_json(tmp_path / "a.json", {"x": [1, math.nan]})
    assert (tmp_path / "a.json").read_text() == '{"x":[1,NaN]}\n'
    assert files.file_hash(tmp_path / "a.json") == files.file_hash(tmp_path / "a.json")
    assert files.file_hash(tmp_path).startswith("sha256:") and files.directory_bytes(tmp_path) == 14
    sizes = {0: "0 B", 999: "999 B", 1000: "1.0 kB", 3_337_674: "3.3 MB", 13_301_486: "13.3 MB", 2.5e9: "2.5 GB"}
    assert {n: files.format_bytes(n) for n in sizes} == sizes


def test_schema_version_reads_the_old_key() -> None:
    assert files.schema_version({"schema_version": 2}) == 2
    assert files.schema_version({"format": 1, "kind": "shift"}) == 1
    assert files.schema_version({"kind": "x"}) is None


def test_the_store_keeps_its_file_names_and_imports_no_matplotlib() -> None:
    import subprocess
    import sys

    code = (
        "import sys, kradapter.store as s, kradapter.files as f;"
        "assert s.write_atomic is f.write_atomic and s.write_json is f.write_json;"
        "assert s.file_hash(s.__file__) == f.file_hash(s.__file__);"  # the store's skips run folders inside folders
        "assert 'matplotlib' not in sys.modules; from kradapter.store import write_figure;"
        "from kradapter.plotting import write_figure as w; assert write_figure is w"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    )
