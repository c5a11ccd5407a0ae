"""``kradapter finetune`` runs as result files of PEFT's ``method_comparison`` benchmark.

PEFT's benchmark (``method_comparison/`` in huggingface/peft) writes one JSON file per run with ``run_info``,
``train_info`` and ``meta_info``, and its app reads a folder of them (``method_comparison/processing.py``,
``load_df(path, task_name)``). :func:`export_results` writes one such file per (method, seed) run of a finished
``finetune_results.json``, so PEFT's app can draw KRAdapter's runs beside its own. How each field is filled:

- ``run_info``: ``experiment_name`` ``<method>/<model>-bbc-k<shots>-seed<seed>`` (one experiment per seed, as the
  app keeps one run per experiment), ``created_at`` the invocation's start (UTC), ``total_time`` and
  ``train_time`` the run's training time, ``peft_config`` the saved adapter's config (None for head-only or full
  fine-tuning, which the app calls ``full-finetuning``), ``peft_branch`` ``"kradapter-<version>"``,
  ``peft_worktree_is_dirty`` whether kradapter's checkout differed from its commit (None from an installed wheel).
- ``train_info``: ``accelerator_memory_max`` is the run's peak minus the memory held before it (as PEFT's is);
  the study records only the peak, so ``accelerator_memory_reserved_avg`` and ``_99th`` hold the absolute peak
  (``memory_kind`` says whether that is GPU memory or CPU RSS). ``file_size`` is the saved adapter's bytes.
- ``metrics``: one final entry: ``test accuracy``, ``train loss`` (last epoch), ``train samples``, and
  ``train total tokens``, which the study does not record: the upper bound ``samples * max_length``
  (``train_info["notes"]`` says so). ``forgetting`` is ``null``: the BBC study does not measure it (PEFT's is the
  change of a Wikipedia loss), and the app reads ``null`` as missing.

Only the standard library is imported; ``python -m kradapter.method_comparison RESULTS_DIR OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .files import write_atomic
from .records import RESULTS_FILES, ResultsError, read_results

RESULTS_FILE = RESULTS_FILES["finetune"]
MB = 1024 * 1024


class ExportError(ValueError):
    """A results folder that cannot be exported; the message names it."""


def load_finetune(results_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The finished ``finetune_results.json`` of ``results_dir`` (:func:`kradapter.records.read_results`)."""
    try:
        return read_results(results_dir, "finetune")[1]
    except ResultsError as exc:
        raise ExportError(str(exc)) from None


def result_rows(results_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One method_comparison result (a dict) per finished (method, seed) run of ``results_dir``."""
    from . import __version__

    folder = Path(results_dir)
    data = load_finetune(folder)
    settings, env, model = data.get("settings", {}), data.get("environment", {}), data.get("model", {})
    invocations = data.get("invocations") or [{}]
    created = _utc(invocations[0].get("started"))
    classes = len(data.get("data", {}).get("classes", [])) or None
    rows = []
    for method, runs in sorted(data["runs"].items()):
        for seed, run in sorted(runs.items(), key=lambda item: int(item[0])):
            if not isinstance(run, dict) or "test" not in run:
                continue
            shots = settings.get("shots")
            samples = shots * classes * settings.get("epochs", 1) if shots and classes else None
            peak = run.get("peak_memory_mb")
            before = run.get("resident_before_mb") or 0.0
            final = {
                "step": run.get("steps"),
                "test accuracy": run["test"].get("accuracy"),
                "test macro f1": run["test"].get("macro_f1"),
                "train loss": run.get("loss_last_epoch"),
                "train samples": samples,
                "train total tokens": samples * settings["max_length"] if samples and settings.get("max_length") else 0,
                "forgetting": None,
            }
            rows.append(
                {
                    "run_info": {
                        "created_at": created,
                        "total_time": run.get("train_time_s"),
                        "experiment_name": f"{method}/{model.get('name', 'model')}-bbc-k{shots}-seed{seed}",
                        "peft_branch": f"kradapter-{__version__}",
                        "peft_worktree_is_dirty": (env.get("code") or {}).get("dirty"),
                        "train_config": {
                            "model_id": model.get("name"),
                            "model_path": model.get("path"),
                            "dtype": "float32",
                            "max_seq_length": settings.get("max_length"),
                            "batch_size": settings.get("batch_size"),
                            "max_steps": run.get("steps"),
                            "epochs": settings.get("epochs"),
                            "shots": shots,
                            "seed": int(seed),
                            "optimizer_type": "AdamW",
                            "optimizer_kwargs": {"lr": run.get("lr")},
                            "device": settings.get("device"),
                        },
                        "peft_config": _adapter_config(folder, run),
                        "error_msg": "",
                    },
                    "train_info": {
                        "accelerator_memory_reserved_avg": _bytes(peak),
                        "accelerator_memory_max": _bytes(peak - before if peak is not None else None),
                        "accelerator_memory_reserved_99th": _bytes(peak),
                        "memory_kind": run.get("memory_kind"),
                        "train_time": run.get("train_time_s"),
                        "file_size": int(run.get("adapter_bytes") or 0),
                        "num_trainable_params": int(run.get("trainable_params") or 0),
                        "num_total_params": None,
                        "status": "success",
                        "metrics": [final],
                        "notes": "train total tokens: upper bound samples * max_length; forgetting: not measured",
                    },
                    "meta_info": {
                        "model_info": {"sha": None, "created_at": None},
                        "dataset_info": {"bbc_news": {"sha": data.get("data", {}).get("root"), "created_at": None}},
                        "package_info": {
                            "transformers-version": env.get("transformers"),
                            "peft-version": env.get("peft"),
                            "datasets-version": None,
                            "bitsandbytes-version": None,
                            "torch-version": env.get("torch"),
                            "kradapter-version": env.get("kradapter"),
                        },
                        "system_info": {
                            "system": env.get("platform"),
                            "processor": env.get("cpu"),
                            "accelerator": env.get("gpu") or "cpu",
                        },
                        "pytorch_info": None,
                    },
                }
            )
    if not rows:
        raise ExportError(f"{str(folder)!r} has no finished runs with a test score")
    return rows


def export_results(
    results_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> list[Path]:
    """Write :func:`result_rows` of ``results_dir`` as ``<method>--<experiment>.json`` files into ``out_dir`` (the
    layout of PEFT's ``results/``); an existing file is replaced only with ``overwrite``."""
    rows = result_rows(results_dir)
    out = Path(out_dir)
    names = [out / (row["run_info"]["experiment_name"].replace("/", "--") + ".json") for row in rows]
    clash = [p for p in names if p.exists()]
    if clash and not overwrite:
        raise ExportError(f"{str(clash[0])!r} exists; pass overwrite (--overwrite) to replace it")
    out.mkdir(parents=True, exist_ok=True)
    for path, row in zip(names, rows, strict=True):
        write_atomic(path, json.dumps(row, indent=2) + "\n")
    return names


def _adapter_config(folder: Path, run: dict[str, Any]) -> dict[str, Any] | None:
    adapter = run.get("adapter_dir")
    path = folder / adapter / "adapter_config.json" if adapter else None
    if path is None or not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config if isinstance(config, dict) and config.get("peft_type") else None


def _bytes(mb: float | None) -> int:
    return round(mb * MB) if mb is not None else 0


def _utc(stamp: str | None) -> str | None:
    """An ISO time with its offset, as PEFT writes ``created_at`` (a naive stamp is taken as UTC)."""
    if not stamp:
        return None
    return stamp if "+" in stamp[10:] or stamp.endswith("Z") else f"{stamp}+00:00"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kradapter.method_comparison", description=__doc__.split("\n")[0])
    parser.add_argument("results_dir", help="a finished `kradapter finetune` folder")
    parser.add_argument("out_dir", help="where to write the result JSON files (PEFT's results/ layout)")
    parser.add_argument("--overwrite", action="store_true", help="replace result files that exist")
    args = parser.parse_args(argv)
    try:
        paths = export_results(args.results_dir, args.out_dir, overwrite=args.overwrite)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
