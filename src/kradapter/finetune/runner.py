"""The execution of a comparison: one learning-rate sweep per method, then one run per method and seed.

Each finished unit is a record in the results store (:mod:`kradapter.store`): ``("sweep", METHOD, LR)`` and
``("run", METHOD, SEED)``; a resumed comparison skips them. Once a method's sweep is complete, the rate it chose is
recorded too, ``("chosen", METHOD)`` -> ``{"lr": LR}``, and reports read it from there. The sweep runs on the first
seed's k-shot set; the run of the first seed at the chosen rate *is* that sweep run (same data, initialisation and
rate), so it is reloaded from its saved adapter and evaluated on the test split instead of being trained twice.
The command that runs an execution gives it its report writer, called after every finished unit.

How a method trains (head only, every weight, an adapter) is its strategy's business
(:mod:`kradapter.finetune.strategies`); this module never asks.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding

from ..analysis import analyse_updates
from ..store import Store
from .metrics import classification_metrics
from .models import FeatureTap, count_params, load_classifier, load_tokenizer
from .plan import Plan
from .protocol import lr_key
from .train import Examples, barrier, fit, local_logits, predict, training_args

RELOAD_CHECK_EXAMPLES = 8
ADAPTERS_DIR = "adapters"
TRAINER_DIR = ".trainer"
UPDATE_SPECTRUM = 32  # singular values of each learned update kept in a record (the metrics use all of them)


__all__ = ["Execution", "Tokens", "choose", "line", "lr_key"]


class Tokens:
    """Every article any run or split needs, tokenised once, and the head's cached input features."""

    def __init__(self, plan: Plan, device: str, workdir: Path) -> None:
        self.needed = np.unique(np.concatenate([plan.val, *plan.evaluations.values(), *plan.train_sets.values()]))
        tokenizer = load_tokenizer(plan.model_dir, trust_remote_code=plan.trust_remote_code)
        encoded = tokenizer(
            [plan.corpus.texts[i] for i in self.needed], truncation=True, max_length=plan.settings.recipe.max_length
        )
        self.columns: dict[str, list[Any]] = {k: list(v) for k, v in encoded.items()}
        self.columns["labels"] = plan.corpus.labels[self.needed].tolist()
        self.position = {int(g): i for i, g in enumerate(self.needed)}
        self.text_collator = DataCollatorWithPadding(tokenizer)
        self.plan, self.device, self.workdir = plan, device, workdir
        self.features: np.ndarray | None = None
        self.feature_seconds: float | None = None

    def head_features(self) -> np.ndarray:
        """The frozen model's input to its head for every needed article, computed once (eval mode)."""
        if self.features is None:
            start = time.perf_counter()
            plan = self.plan
            model, head = load_classifier(plan.model_dir, plan.num_labels, 0, trust_remote_code=plan.trust_remote_code)
            tokens = {k: v for k, v in self.columns.items() if k != "labels"}
            args = training_args(self.workdir, device=self.device)
            self.features = predict(FeatureTap(model, head[0]), Examples(tokens), self.text_collator, args)
            self.feature_seconds = time.perf_counter() - start
        return self.features

    def local(self, indices: np.ndarray) -> np.ndarray:
        """Positions in the tokenised columns of the corpus articles ``indices``."""
        return np.array([self.position[int(i)] for i in indices])


class Execution:
    """Runs every unit of ``plan`` not yet in ``store``; ``rank``/``world_size`` as torchrun sets them.

    ``report`` (the command's) rebuilds the results document from the store; it is called after each finished
    unit, never before the first (a folder with no finished unit holds no results). ``prefix`` starts every
    record key and adapter folder (a study of several plans in one store).
    """

    def __init__(
        self, plan: Plan, store: Store, report: Callable[[Execution], Any], rank: int = 0, world_size: int = 1,
        progress: bool = True, *, prefix: tuple[str, ...] = (), desc: str = "finetune", tokens: Tokens | None = None,
    ) -> None:  # fmt: skip
        self.plan = plan
        self.prefix = prefix
        self.report = report
        self.desc = desc
        self.settings = plan.settings
        self.recipe = plan.settings.recipe
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.progress = progress and rank == 0
        self.workdir = store.directory / TRAINER_DIR
        store.written(TRAINER_DIR)  # the Trainer's scratch folder: a killed run leaves it, --overwrite removes it
        self.tokens = tokens if tokens is not None else Tokens(plan, self.recipe.device, self.workdir)
        self.trained = 0

    # -- units ----------------------------------------------------------------------------------------------------
    def key(self, *parts: Any) -> tuple[Any, ...]:
        return (*self.prefix, *parts)

    def adapter_dir(self, method: str, seed: int, lr: float) -> Path:
        return self.store.directory.joinpath(ADAPTERS_DIR, *self.prefix, method, f"seed{seed}_lr{lr_key(lr)}")

    def args(self, **recipe: Any) -> Any:
        return training_args(self.workdir, device=self.recipe.device, **recipe)

    def evaluate(
        self, method: str, model: torch.nn.Module, evals: dict[str, np.ndarray], args: Any = None
    ) -> dict[str, Any]:
        """Accuracy, macro-F1 and loss of ``model`` on each evaluation set."""
        plan, training = self.plan, self.plan.training[method]
        args, collator = args or self.args(), training.collator(self.tokens)
        out = {}
        for name, indices in evals.items():
            logits = predict(model, training.dataset(self.tokens, indices), collator, args)
            out[name] = classification_metrics(logits, plan.corpus.labels[indices], plan.num_labels)
        return out

    def train_unit(self, method: str, seed: int, lr: float, evals: dict[str, np.ndarray]) -> dict[str, Any]:
        """Train ``method`` on the k-shot set of ``seed`` at ``lr``, evaluate on ``evals``, save and reload-check."""
        plan, r, training = self.plan, self.recipe, self.plan.training[method]
        model = training.build(plan.methods[method], list(plan.layers), plan.model_dir, plan.num_labels, seed,
                               plan.trust_remote_code)  # fmt: skip
        trainable = count_params(model)
        if trainable != plan.trainable(method):
            raise RuntimeError(f"{method} trains {trainable:,} parameters, expected {plan.trainable(method):,}")
        args = self.args(lr=lr, epochs=r.epochs, batch_size=r.batch_size, seed=seed)
        data = training.dataset(self.tokens, plan.train_sets[seed])
        record: dict[str, Any] = {"seed": seed, "lr": lr, "trainable_params": trainable}
        record.update(fit(model, data, training.collator(self.tokens), args))
        if training.learns_update:  # what it learned: spectrum and effective rank per layer
            record["updates"] = analyse_updates(model, top=UPDATE_SPECTRUM)
        record.update(self.evaluate(method, model, evals, args))
        directory = self.adapter_dir(method, seed, lr)
        record["adapter_dir"] = str(directory.relative_to(self.store.directory))
        if self.rank == 0:
            self.store.make_dir(directory.relative_to(self.store.directory))  # records only folders it creates
            record["adapter_bytes"] = training.save(model, directory)
            record["reload_max_abs_diff"] = self.reload_difference(method, model, directory, plan.train_sets[seed])
        barrier()
        self.trained += 1
        return record

    def load(self, method: str, directory: Path) -> torch.nn.Module:
        plan = self.plan
        return plan.training[method].load(directory, plan.model_dir, plan.num_labels, plan.trust_remote_code)

    def reload_difference(self, method: str, model: torch.nn.Module, directory: Path, indices: np.ndarray) -> float:
        """Largest logit difference between the trained model and its saved copy reloaded from disk."""
        training = self.plan.training[method]
        data = training.dataset(self.tokens, indices[:RELOAD_CHECK_EXAMPLES])
        batch = training.collator(self.tokens)([data[i] for i in range(len(data))])
        again = self.load(method, directory)
        return float((local_logits(model, batch) - local_logits(again, batch)).abs().max())

    def test_from_sweep(self, method: str, lr: float) -> dict[str, Any] | None:
        """The first seed's run: its sweep run at the chosen ``lr``, reloaded and evaluated on the test split."""
        swept = self.store.records[self.key("sweep", method, lr_key(lr))]
        directory = self.store.directory / swept.get("adapter_dir", "-")
        if not directory.is_dir():
            return None
        record = {k: v for k, v in swept.items() if k != "val"}
        record.update(self.evaluate(method, self.load(method, directory), dict(self.plan.evaluations)))
        record["from_sweep"] = True
        return record

    # -- loop -----------------------------------------------------------------------------------------------------
    def units(self) -> list[tuple[str, str, Any]]:
        s = self.settings
        out: list[tuple[str, str, Any]] = []
        for method in s.methods:
            out += [self.key("sweep", method, lr_key(lr)) for lr in s.grid(method)]
            out += [self.key("run", method, seed) for seed in s.seeds]
        return out

    def save(self) -> None:
        self.report(self)

    def run(self) -> None:
        """Run every unit not already in the store, rebuilding the results document after each."""
        units = self.units()
        done = sum(self.store.done(u) for u in units)
        if done:
            self.save()  # a resumed plan: its document is rebuilt at once
        bar = tqdm(total=len(units), initial=done, desc=self.desc, unit="run", disable=not self.progress)
        for method in self.settings.methods:
            chosen = self.sweep(method, bar)
            self.runs(method, chosen, bar)
            self.prune_sweep(method, chosen)
        bar.close()
        self.save()
        if self.rank == 0:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def sweep(self, method: str, bar: Any) -> float:
        """Train ``method`` at each rate of its grid not yet swept; record and return the chosen rate."""
        s = self.settings
        grid = s.grid(method)
        for lr in grid:
            if self.store.done(self.key("sweep", method, lr_key(lr))):
                continue
            bar.set_postfix_str(f"{method} sweep lr={lr_key(lr)}")
            evals = {"val": self.plan.val} if len(grid) > 1 else {}  # one rate: nothing to choose
            self.store.add(self.key("sweep", method, lr_key(lr)), self.train_unit(method, s.sweep_seed, lr, evals))
            self.save()
            bar.update()
        recorded = self.store.records.get(self.key("chosen", method))
        if recorded is not None:
            return float(recorded["lr"])
        chosen = choose(self.store, method, grid, self.prefix)
        self.store.add(self.key("chosen", method), {"lr": chosen})
        return chosen

    def runs(self, method: str, chosen: float, bar: Any) -> None:
        """Run ``method`` at ``chosen`` for every seed not yet run (the first seed: its sweep run, reloaded)."""
        s = self.settings
        for seed in s.seeds:
            if self.store.done(self.key("run", method, seed)):
                continue
            bar.set_postfix_str(f"{method} seed={seed} lr={lr_key(chosen)}")
            record = self.test_from_sweep(method, chosen) if seed == s.sweep_seed else None
            if record is None:
                record = self.train_unit(method, seed, chosen, dict(self.plan.evaluations))
            self.store.add(self.key("run", method, seed), record)
            self.save()
            bar.update()
            if self.progress:
                bar.write(line(method, seed, record))

    def prune_sweep(self, method: str, chosen: float) -> None:
        """Delete the saved adapters of the learning rates not chosen (full fine-tuning saves whole models)."""
        if self.rank != 0:
            return
        for lr in self.settings.grid(method):
            if lr != chosen:
                shutil.rmtree(self.adapter_dir(method, self.settings.sweep_seed, lr), ignore_errors=True)


def choose(store: Store, method: str, grid: tuple[float, ...], prefix: tuple[Any, ...] = ()) -> float:
    """The grid's learning rate with the best validation accuracy (ties: macro-F1, then loss)."""
    if len(grid) == 1:
        return grid[0]

    def score(lr: float) -> tuple[float, float, float]:
        val = store.records[(*prefix, "sweep", method, lr_key(lr))]["val"]
        return val["accuracy"], val["macro_f1"], -val["loss"]

    return max(grid, key=score)


def line(method: str, seed: int, record: dict[str, Any]) -> str:
    test = record["test"]
    return (
        f"{method:>10} seed {seed} lr {lr_key(record['lr']):>7}: acc {test['accuracy']:.4f} "
        f"macro-F1 {test['macro_f1']:.4f} train {record['train_time_s']:.1f}s "
        f"loss {record['loss_first_epoch']:.3f}->{record['loss_last_epoch']:.3f}"
    )
