"""``kradapter finetune`` results as PEFT method_comparison result files, and PEFT's own loader reading them."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

from kradapter import registry
from kradapter.method_comparison import ExportError, export_results, main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "method_comparison" / "kradapter"


def finetune_folder(tmp_path: Path, rng: random.Random) -> tuple[Path, dict]:
    """A finetune results folder as the study writes it (the fields the export reads), random numbers."""
    folder = tmp_path / "ft"
    runs: dict = {}
    for method in ("lora", "kradapter", "head"):
        runs[method] = {}
        for seed in (0, 3):
            adapter = f"adapters/{method}/seed{seed}"
            if method != "head":
                (folder / adapter).mkdir(parents=True)
                (folder / adapter / "adapter_config.json").write_text(json.dumps({"peft_type": method.upper()}))
            runs[method][str(seed)] = {
                "seed": seed,
                "lr": rng.choice([1e-3, 3e-3]),
                "trainable_params": rng.randrange(10**5, 10**6),
                "train_time_s": rng.uniform(1, 50),
                "memory_kind": "cpu_rss_peak",
                "resident_before_mb": 500.0,
                "peak_memory_mb": rng.uniform(600, 900),
                "steps": 7,
                "loss_last_epoch": rng.uniform(0.1, 2),
                "adapter_dir": adapter if method != "head" else None,
                "adapter_bytes": rng.randrange(10**6, 10**7),
                "test": {"accuracy": rng.random(), "macro_f1": rng.random(), "loss": 1.0},
            }
    data = {
        "settings": {"shots": 4, "epochs": 2, "batch_size": 8, "max_length": 64, "device": "cpu"},
        "environment": {"torch": "2.13", "peft": "0.21.2", "transformers": "5.23", "kradapter": "0.1.0"},
        "data": {"classes": ["a", "b", "c", "d", "e"], "root": "/data"},
        "model": {"name": "tiny", "path": "/m"},
        "invocations": [{"started": "2026-12-02T10:26:18"}],
        "runs": runs,
        "extra_field_from_a_later_version": {"ignored": True},
    }
    (folder / "finetune_results.json").write_text(json.dumps(data))
    return folder, data


def test_export_maps_every_run(tmp_path: Path) -> None:
    rng = random.Random()
    folder, data = finetune_folder(tmp_path, rng)
    paths = export_results(folder, tmp_path / "out")
    assert len(paths) == 6
    for path in paths:
        row = json.loads(path.read_text())
        method, _, rest = row["run_info"]["experiment_name"].partition("/")
        seed = rest.rsplit("seed", 1)[1]
        run = data["runs"][method][seed]
        info = row["train_info"]
        final = info["metrics"][-1]
        assert path.name == f"{method}--{rest}.json"
        assert final["test accuracy"] == run["test"]["accuracy"] and final["forgetting"] is None
        assert final["train samples"] == 4 * 5 * 2 and final["train total tokens"] == 40 * 64
        assert info["num_trainable_params"] == run["trainable_params"] and info["file_size"] == run["adapter_bytes"]
        assert info["accelerator_memory_max"] == round((run["peak_memory_mb"] - 500) * 2**20)
        assert row["run_info"]["peft_config"] == (None if method == "head" else {"peft_type": method.upper()})
        assert row["run_info"]["created_at"] == "2026-12-02T10:26:18+00:00"
    with pytest.raises(ExportError, match="exists; pass overwrite"):
        export_results(folder, tmp_path / "out")
    assert len(export_results(folder, tmp_path / "out", overwrite=True)) == 6


def test_export_refuses_a_folder_without_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no finetune_results.json" in err
    assert not (tmp_path / "out").exists()


def test_peft_processing_loads_the_export(tmp_path: Path) -> None:
    """PEFT's ``method_comparison/processing.py`` (not vendored: point KRADAPTER_PEFT_METHOD_COMPARISON at a
    checkout's ``method_comparison`` folder) reads every exported file unchanged."""
    where = os.environ.get("KRADAPTER_PEFT_METHOD_COMPARISON")
    if not where or not (Path(where) / "processing.py").is_file():
        pytest.skip("PEFT's method_comparison/processing.py is not vendored; set KRADAPTER_PEFT_METHOD_COMPARISON")
    pytest.importorskip("pandas", reason="PEFT's processing.py needs pandas")
    folder, data = finetune_folder(tmp_path, random.Random())
    export_results(folder, tmp_path / "out")
    sys.path.insert(0, where)
    try:
        import processing  # type: ignore[import-not-found]
    finally:
        sys.path.remove(where)
    df = processing.load_df(str(tmp_path / "out"), "MetaMathQA")
    assert len(df) == 6 and set(df["peft_type"]) == {"LORA", "KRADAPTER", "full-finetuning"}
    for _, row in df.iterrows():
        method, _, rest = row["experiment_name"].partition("/")
        assert row["test_accuracy"] == pytest.approx(
            data["runs"][method][rest.rsplit("seed", 1)[1]]["test"]["accuracy"]
        )
    assert df["forgetting*"].isna().all()


def test_llama_experiment_count() -> None:
    """The experiment folder targets LoRA r32's modules (q_proj, v_proj); the documented count is the registry's on
    Llama-3.2-3B's shapes (28 layers; q 3072x3072, v 1024x3072 with 8 of 24 heads for keys and values)."""
    config = json.loads((EXAMPLE / "llama-3.2-3B-default" / "adapter_config.json").read_text())
    assert config["peft_type"] == "KRADAPTER" and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    shapes = [(3072, 3072), (8 * 128, 3072)] * 28
    assert registry.get("lora").count(shapes, r=32) == 9_175_040  # PEFT's result file for LoRA r32
    assert registry.get("kradapter").count(shapes) == 13_217_792
