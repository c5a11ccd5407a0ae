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


@pytest.fixture
def shift_v2_dir(tmp_path: Path) -> Path:
    """A folder holding the current shift document (``shift_report.document``): the synthetic store of
    ``tests/finetune/test_shift_report.py`` with one primary endpoint's last run still to come (an interim look)."""
    import json

    import numpy as np

    from kradapter.finetune import shift_report
    from tests.finetune import test_shift_report as synthetic

    records = synthetic.synthetic_records(np.random.default_rng(7))
    del records[("sent", "k8_x1", "run", "lora", 5)]
    folder = tmp_path / "shift_v2"
    results = synthetic._document(records, synthetic.PlannedStudy(synthetic.SEEDS), folder)
    (folder / shift_report.RESULTS_FILE).write_text(json.dumps(results))
    return folder
