"""Inputs ``kradapter finetune`` and ``kradapter shift`` refuse up front, with one line and exit status 2, and the
rule that a folder holds no results before its first finished unit (issue 23, items 3, 4 and 11)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kradapter.cli import main

WORDS = {"sport": "match goal team league player coach", "tech": "software chip phone internet computer data"}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Two classes of 10 short texts each (fresh random texts per run)."""
    root = tmp_path / "corpus"
    rng = random.Random()
    for name, words in WORDS.items():
        (root / name).mkdir(parents=True)
        for i in range(10):
            (root / name / f"{i}.txt").write_text(
                " ".join(rng.choice(words.split()) for _ in range(rng.randint(5, 12)))
            )
    return root


SMALL = ["--methods", "head", "--shots", "2", "--val-shots", "1", "--seeds", "0", "--epochs", "1"]
SMALL += ["--lr-grid", "head=0.01"]  # settings this corpus can supply, so only the input under test is wrong


def finetune(corpus: Path, model: str, out: Path, *extra: str) -> int:
    args = ["finetune", "--data", str(corpus), "--model", model, "--out", str(out), *SMALL]
    return main([*args, "--max-length", "16", *extra])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("command", ["finetune", "shift"])
def test_device_cuda_without_a_gpu_is_one_line_before_any_work(command, corpus, tmp_path: Path, capsys) -> None:
    extra = ["--data", str(corpus), *SMALL] if command == "finetune" else []
    assert main([command, *extra, "--device", "cuda", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"kradapter {command}: error: --device cuda: no CUDA GPU is available to "
                                        "torch on this machine"]  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["finetune", "shift"])
def test_max_length_beyond_the_models_positions_is_refused(
    command, corpus, minilm_path, tmp_path: Path, capsys
) -> None:
    limit = json.loads((Path(minilm_path) / "config.json").read_text())["max_position_embeddings"]
    extra = ["--data", str(corpus), *SMALL] if command == "finetune" else []
    argv = [command, *extra, "--model", minilm_path, "--max-length", str(2 * limit), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--max-length {2 * limit} is more tokens than the model takes (max_position_embeddings {limit}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def failing_unit(*args, **kwargs):
    """A unit function (module level, as units must be) that always fails."""
    raise RuntimeError("the first unit fails")


@pytest.mark.slow
def test_no_results_document_before_the_first_finished_unit(
    corpus, minilm_path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A run whose every unit fails exits 1 naming them and leaves no results document (a rerun is then not 'an
    earlier run')."""
    from kradapter.finetune import runner

    monkeypatch.setattr(runner, "train_unit", failing_unit)
    assert finetune(corpus, minilm_path, tmp_path / "out") == 1
    assert "failed: RuntimeError: the first unit fails" in capsys.readouterr().err
    assert not (tmp_path / "out" / "finetune_results.json").exists()


def _remote_code_model(minilm_path: str, folder: Path) -> Path:
    """MiniLM's files under a config that asks transformers for the folder's own code (an unknown model_type and
    an auto_map); the code, if ever run, leaves a marker file."""
    folder.mkdir()
    for item in Path(minilm_path).iterdir():
        if item.is_file() and item.name != "config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((Path(minilm_path) / "config.json").read_text())
    config |= {"model_type": "notbert", "auto_map": {"AutoConfig": "evil.EvilConfig",
               "AutoModelForSequenceClassification": "evil.EvilModel"}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    marker = folder.parent / "code_ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(("command", "stdin"), [("finetune", "y\n"), ("shift", None)], ids=["answers-y", "closed"])
def test_a_model_folder_that_needs_its_own_code_is_refused(command, stdin, corpus, minilm_path, tmp_path: Path) -> None:
    """Never run a model folder's code, never ask: one line naming --trust-remote-code, whatever stdin says."""
    model = _remote_code_model(minilm_path, tmp_path / "model")
    argv = [sys.executable, "-m", "kradapter.cli", command, "--model", str(model), "--out", str(tmp_path / "out")]
    argv += ["--data", str(corpus), *SMALL] if command == "finetune" else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, input=stdin, stdin=None if stdin else subprocess.DEVNULL, capture_output=True,
                          text=True, env=env, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "pass --trust-remote-code if you trust it" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "code_ran").exists()
    assert not (tmp_path / "out").exists()
