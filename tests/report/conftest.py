"""Results folders for the report tests: a real tiny ``compare`` run (made here, seconds), a real tiny
``finetune`` run and a real shift-study run (committed under ``data/``: minutes on CPU to make)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="session")
def compare_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "run"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "kradapter.cli",
            "compare",
            "--size",
            "23x17",
            "--iterations",
            "15",
            "--methods",
            "lora,kradapter,sinlora",
            "--matrices",
            "random_noise,low_rank",
            "--seeds",
            "1,2,3",
            "--out",
            str(out),
            "--threads",
            "1",
            "--quiet",
            "--no-plots",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    return out


@pytest.fixture
def finetune_dir(tmp_path: Path) -> Path:
    return Path(shutil.copytree(DATA / "finetune", tmp_path / "finetune"))


@pytest.fixture
def shift_dir(tmp_path: Path) -> Path:
    return Path(shutil.copytree(DATA / "shift", tmp_path / "shift"))
