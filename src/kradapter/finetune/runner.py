"""The comparison loop: checks, data, one learning-rate sweep per method, then one run per method and seed.

Each finished unit (a sweep point or a run) is written to ``finetune_results.json`` at once (atomic replace), and
``--resume`` skips it. The sweep runs on the first seed's k-shot set; the run of the first seed at the chosen rate
*is* that sweep run (same data, initialisation and rate), so it is reloaded from its saved adapter and evaluated on
the test split instead of being trained twice.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DataCollatorWithPadding, default_data_collator

from ..records import environment, write_json_atomic
from .data import (
    SPLIT_SEED,
    TEST_FRACTION,
    Corpus,
    check_shots,
    kshot_train,
    load_corpus,
    test_split,
    validation,
)
from .metrics import classification_metrics
from .models import (
    FeatureTap,
    MethodPlan,
    build_model,
    check_model_dir,
    count_params,
    default_model_dir,
    load_classifier,
    load_trained,
    plan_methods,
    save_trained,
    target_layers,
)
from .protocol import Settings
from .train import Examples, barrier, fit, local_logits, predict, training_args, world

RESULTS_FILE = "finetune_results.json"
FORMAT = 1
RELOAD_CHECK_EXAMPLES = 8


def lr_key(lr: float) -> str:
    return f"{lr:g}"


class Comparison:
    """State of one ``kradapter finetune`` invocation. ``prepare`` does every check before any training."""

    def __init__(self, settings: Settings, out: Path | str, resume: bool = False, overwrite: bool = False) -> None:
        self.settings = settings
        self.out = Path(out)
        self.resume = resume
        self.overwrite = overwrite
        self.rank, self.world_size = world()
        self.results: dict[str, Any] = {}

    # -- setup ----------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        s = self.settings
        s.check()
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {str(self.out)!r} exists and is not a directory")
        self.results_path = self.out / RESULTS_FILE
        previous = self._previous_results()
        self.corpus: Corpus = load_corpus(s.data or None)
        self.model_dir = check_model_dir(s.model) if s.model else default_model_dir()
        labels = self.corpus.labels
        self.pool, self.test = test_split(labels)
        check_shots(self.corpus, self.pool, s.shots, s.val_shots)
        self.train_sets = {seed: kshot_train(labels, self.pool, s.shots, seed) for seed in s.seeds}
        self.sweep_seed = s.seeds[0]
        self.val = validation(labels, self.pool, self.train_sets[self.sweep_seed], s.val_shots, self.sweep_seed)
        # Probe the model once: head, target layers, budget and every method's config, before any training.
        self.num_labels = len(self.corpus.classes)
        probe, self.head = load_classifier(self.model_dir, self.num_labels, seed=0)
        self.layers = target_layers(probe, self.head, s.targets)
        self.budget, self.plans = plan_methods(s.methods, probe, self.head, self.layers)
        self.head_params = sum(count_params(probe.get_submodule(h), trainable_only=False) for h in self.head)
        del probe
        training_args(self.out / ".trainer", batch_size=s.batch_size, device=s.device)  # device and batch checks
        self._start_results(previous)

    def _previous_results(self) -> dict[str, Any] | None:
        if not self.results_path.exists():
            return None
        if self.overwrite:
            return None
        if not self.resume:
            raise ValueError(
                f"{self.results_path} exists: pass --resume to continue it, --overwrite to start again, "
                "or choose another --out"
            )
        try:
            previous = json.loads(self.results_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"cannot resume: {self.results_path} is not valid JSON ({exc})") from None
        protocol = json.loads(json.dumps(self.settings.protocol()))
        old = previous.get("protocol", {})
        changed = sorted(k for k in set(protocol) | set(old) if protocol.get(k) != old.get(k))
        if changed:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {protocol.get(k)!r}" for k in changed)
            raise ValueError(f"cannot resume {self.results_path}: the settings differ ({detail})")
        return previous

    def _start_results(self, previous: dict[str, Any] | None) -> None:
        s = self.settings
        r = previous or {"format": FORMAT, "protocol": s.protocol(), "sweep": {}, "chosen_lr": {}, "runs": {}}
        r["environment"] = {**environment(), "world_size": self.world_size}
        r["data"] = {
            "root": str(self.corpus.root),
            "classes": list(self.corpus.classes),
            "articles": len(self.corpus.texts),
            "test_articles": len(self.test),
            "pool_articles": len(self.pool),
            "test_fraction": TEST_FRACTION,
            "split_seed": SPLIT_SEED,
            "shots": s.shots,
            "val_shots": s.val_shots,
            "sweep_seed": self.sweep_seed,
        }
        r["model"] = {
            "name": Path(s.model).name if s.model else "all-MiniLM-L6-v2",
            "path": str(self.model_dir),
            "head_modules": self.head,
            "head_params": self.head_params,
            "target_modules": list(self.layers),
            "kradapter_budget": self.budget,
        }
        methods = r.setdefault("methods", {})
        for name, plan in self.plans.items():
            methods[name] = {
                "lr_grid": list(s.grid(name)),
                "knobs": plan.knobs,
                "adapter_params": plan.adapter_params,
                "trainable_params": plan.adapter_params + self.head_params,
                "budget_ratio": plan.adapter_params / self.budget if name not in ("head", "full") else None,
            }
        r.setdefault("invocations", []).append({"started": dt.datetime.now().isoformat(timespec="seconds")})
        self.results = r

    def save(self) -> None:
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.results_path, self.results, indent=1)

    # -- data -----------------------------------------------------------------------------------------------------
    def tokenize(self) -> None:
        """Tokenise, once, every article any run or split needs."""
        needed = np.unique(np.concatenate([self.test, self.val, *self.train_sets.values()]))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        encoded = self.tokenizer(
            [self.corpus.texts[i] for i in needed], truncation=True, max_length=self.settings.max_length
        )
        self.columns = {k: list(v) for k, v in encoded.items()}
        self.columns["labels"] = self.corpus.labels[needed].tolist()
        self.position = {int(g): i for i, g in enumerate(needed)}
        self.text_collator = DataCollatorWithPadding(self.tokenizer)
        self.features: np.ndarray | None = None

    def dataset(self, method: str, indices: np.ndarray) -> Examples:
        local = np.array([self.position[int(i)] for i in indices])
        if method == "head":
            return Examples({"features": self.head_features(), "labels": self.columns["labels"]}, local)
        return Examples(self.columns, local)

    def collator(self, method: str) -> Any:
        return default_data_collator if method == "head" else self.text_collator

    def head_features(self) -> np.ndarray:
        """The frozen model's input to its head for every needed article, computed once (eval mode)."""
        if self.features is None:
            start = time.perf_counter()
            model, head = load_classifier(self.model_dir, self.num_labels, seed=0)
            tokens = {k: v for k, v in self.columns.items() if k != "labels"}
            args = training_args(self.out / ".trainer", device=self.settings.device)
            self.features = predict(FeatureTap(model, head[0]), Examples(tokens), self.text_collator, args)
            self.results["head_feature_time_s"] = time.perf_counter() - start
        return self.features

    # -- units ----------------------------------------------------------------------------------------------------
    def adapter_dir(self, method: str, seed: int, lr: float) -> Path:
        return self.out / "adapters" / method / f"seed{seed}_lr{lr_key(lr)}"

    def train_unit(self, plan: MethodPlan, seed: int, lr: float, evals: dict[str, np.ndarray]) -> dict[str, Any]:
        """Train ``plan`` on the k-shot set of ``seed`` at ``lr``, evaluate on ``evals``, save and reload-check."""
        s, method = self.settings, plan.name
        model, _ = build_model(plan, self.model_dir, self.num_labels, seed)
        trainable = count_params(model)
        expected = (plan.adapter_params if method != "head" else 0) + self.head_params
        if trainable != expected:
            raise RuntimeError(f"{method} trains {trainable:,} parameters, expected {expected:,}")
        args = training_args(
            self.out / ".trainer", lr=lr, epochs=s.epochs, batch_size=s.batch_size, seed=seed, device=s.device
        )
        collator = self.collator(method)
        record: dict[str, Any] = {"seed": seed, "lr": lr, "trainable_params": trainable}
        record.update(fit(model, self.dataset(method, self.train_sets[seed]), collator, args))
        for name, indices in evals.items():
            logits = predict(model, self.dataset(method, indices), collator, args)
            record[name] = classification_metrics(logits, self.corpus.labels[indices], self.num_labels)
        directory = self.adapter_dir(method, seed, lr)
        record["adapter_dir"] = str(directory.relative_to(self.out))  # every process: test_from_sweep reads it
        if self.rank == 0:
            record["adapter_bytes"] = save_trained(method, model, directory)
            train = self.train_sets[seed]
            record["reload_max_abs_diff"] = self.reload_difference(method, model, directory, train)
        barrier()
        return record

    def reload_difference(self, method: str, model: torch.nn.Module, directory: Path, indices: np.ndarray) -> float:
        """Largest logit difference between the trained model and its saved copy reloaded from disk."""
        data = self.dataset(method, indices[:RELOAD_CHECK_EXAMPLES])
        batch = self.collator(method)([data[i] for i in range(len(data))])
        again = load_trained(method, directory, self.model_dir, self.num_labels)
        return float((local_logits(model, batch) - local_logits(again, batch)).abs().max())

    def test_from_sweep(self, plan: MethodPlan, lr: float) -> dict[str, Any] | None:
        """The first seed's run: its sweep run at the chosen ``lr``, reloaded and evaluated on the test split."""
        method = plan.name
        swept = self.results["sweep"][method][lr_key(lr)]
        directory = self.out / swept.get("adapter_dir", "-")
        if not directory.is_dir():
            return None
        model = load_trained(method, directory, self.model_dir, self.num_labels)
        args = training_args(self.out / ".trainer", device=self.settings.device)
        logits = predict(model, self.dataset(method, self.test), self.collator(method), args)
        record = {k: v for k, v in swept.items() if k != "val"}
        record["test"] = classification_metrics(logits, self.corpus.labels[self.test], self.num_labels)
        record["from_sweep"] = True
        return record

    # -- loop -----------------------------------------------------------------------------------------------------
    def units(self) -> int:
        return sum(len(self.settings.grid(m)) + len(self.settings.seeds) for m in self.settings.methods)

    def done(self) -> int:
        n = 0
        for m in self.settings.methods:
            n += sum(lr_key(lr) in self.results["sweep"].get(m, {}) for lr in self.settings.grid(m))
            n += sum(str(seed) in self.results["runs"].get(m, {}) for seed in self.settings.seeds)
        return n

    def run(self) -> dict[str, Any]:
        """Run every unit not already in the results; returns the results (also written to disk)."""
        s = self.settings
        self.save()
        self.tokenize()
        started = time.perf_counter()
        trained = 0
        bar = tqdm(total=self.units(), initial=self.done(), desc="finetune", unit="run", disable=self.rank != 0)
        for method in s.methods:
            plan = self.plans[method]
            sweep = self.results["sweep"].setdefault(method, {})
            runs = self.results["runs"].setdefault(method, {})
            grid = s.grid(method)
            for lr in grid:
                if lr_key(lr) in sweep:
                    continue
                bar.set_postfix_str(f"{method} sweep lr={lr_key(lr)}")
                evals = {"val": self.val} if len(grid) > 1 else {}  # one rate: nothing to choose
                sweep[lr_key(lr)] = self.train_unit(plan, self.sweep_seed, lr, evals)
                trained += 1
                self.save()
                bar.update()
            chosen = self.choose(method)
            self.results["chosen_lr"][method] = chosen
            for seed in s.seeds:
                if str(seed) in runs:
                    continue
                bar.set_postfix_str(f"{method} seed={seed} lr={lr_key(chosen)}")
                record = self.test_from_sweep(plan, chosen) if seed == self.sweep_seed else None
                if record is None:
                    record = self.train_unit(plan, seed, chosen, {"test": self.test})
                    trained += 1
                runs[str(seed)] = record
                self.save()
                bar.update()
                bar.write(self.line(method, seed, record))
            self.prune_sweep(method, chosen)
        bar.close()
        self.results["invocations"][-1].update(
            {"wall_s": time.perf_counter() - started, "trained": trained, "world_size": self.world_size}
        )
        from .report import summarize

        self.results["summary"] = summarize(self.results, s.methods, s.seeds)
        self.save()
        if self.rank == 0:
            shutil.rmtree(self.out / ".trainer", ignore_errors=True)
        return self.results

    def choose(self, method: str) -> float:
        """The grid's learning rate with the best validation accuracy (ties: macro-F1, then loss)."""
        grid = self.settings.grid(method)
        if len(grid) == 1:
            return grid[0]
        sweep = self.results["sweep"][method]

        def score(lr: float) -> tuple[float, float, float]:
            val = sweep[lr_key(lr)]["val"]
            return val["accuracy"], val["macro_f1"], -val["loss"]

        return max(grid, key=score)

    def prune_sweep(self, method: str, chosen: float) -> None:
        """Delete the saved adapters of the learning rates not chosen (full fine-tuning saves whole models)."""
        if self.rank != 0:
            return
        for lr in self.settings.grid(method):
            if lr != chosen:
                shutil.rmtree(self.adapter_dir(method, self.sweep_seed, lr), ignore_errors=True)

    @staticmethod
    def line(method: str, seed: int, record: dict[str, Any]) -> str:
        test = record["test"]
        return (
            f"{method:>10} seed {seed} lr {lr_key(record['lr']):>7}: acc {test['accuracy']:.4f} "
            f"macro-F1 {test['macro_f1']:.4f} train {record['train_time_s']:.1f}s "
            f"loss {record['loss_first_epoch']:.3f}->{record['loss_last_epoch']:.3f}"
        )
