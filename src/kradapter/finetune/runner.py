"""The execution of a comparison: per plan (one cell), each method's learning-rate trials, then one run per seed.

Every training is a *unit* (:mod:`kradapter.executor`): a module-level function (:func:`train_unit`,
:func:`evaluate_unit`) of picklable arguments, a :class:`Context` (the plan's texts, model and recipe) and a
:class:`Job` (method, size, seed, rate, which texts to train on, select with and evaluate on). A unit trains in a
temporary folder of the process that runs it and returns an :class:`~kradapter.executor.UnitResult`: its record
and the saved adapter's files. The driver alone writes: the files, then the record (``store.add``), in completion
order, and rebuilds the report after each. So a run on :class:`~kradapter.executor.SequentialExecutor` (the
default) and one on :class:`~kradapter.executor.RayExecutor` leave the same folder, and ``--resume`` works across
them. A unit that fails is recorded failed (``{"error": ...}``) and tried again by ``--resume``.

Records (``prefix`` = the plan's, e.g. ``(benchmark, cell)``):

- ``(*prefix, "sweep", METHOD, LR)``: one tuning trial on the sweep seed (the first), scored on that seed's
  validation draw (``"val"``).
- ``(*prefix, "chosen", METHOD)``: ``{"lr", "trials": [{"lr", "val_accuracy", "val_macro_f1", "val_loss"}],
  "on_edge", "val_texts"}``, trials by rate.
- ``(*prefix, "run", METHOD, SEED)``: the run at the chosen rate, one entry per evaluation set with per-item
  ``predictions``, and for methods that learn an update its ``update_norm`` and ``intruders``.

The tuning rule (:func:`next_rate`, :func:`best_rate`): every method of a plan gets the same number of trials,
its grid's rates (the longest grid of the plan sets the count) plus :data:`EXTRA_TRIALS`; each extra trial
extends the tried range outward by the grid's ratio while the best rate is an edge of it, else tries the
geometric midpoint next to the best on the side of the better neighbour. Best: validation accuracy, then
macro-F1, then lower loss (then the lower rate). The sweep seed's run at the chosen rate *is* that trial (same
data, initialisation, rate and validation draw): its saved adapter is evaluated instead of trained again.

Order: a method's grid trials are submitted together, then its adaptive trials one at a time, then its seeds'
runs; every method of every plan advances at once, so the units in flight come from all of them.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import shutil
import sys
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..executor import (
    Executor,
    Fingerprint,
    SequentialExecutor,
    Unit,
    UnitResult,
    collect_artifacts,
    executor_from_args,
)
from ..files import replace_dir, write_atomic
from ..registry import Plan as MethodPlan
from ..store import Key, Store, file_hash
from .metrics import classification_metrics
from .plan import Plan
from .protocol import EVAL_BATCH_SIZE, EXTRA_TRIALS, Recipe, SettingsError, lr_key

RELOAD_CHECK_EXAMPLES = 8
ADAPTERS_DIR = "adapters"
TRAINER_DIR = ".trainer"  # older versions' scratch folder in the run folder (units now train in a temporary one)
UPDATE_SPECTRUM = 32  # singular values of each learned update kept in a record (the metrics use all of them)
RATE_DIGITS = 3  # significant digits of an adaptive trial's rate
TOKEN_CACHE = 4  # tokenised plans a worker process keeps


__all__ = [
    "Context",
    "Execution",
    "Job",
    "Tokens",
    "best_rate",
    "evaluate_unit",
    "line",
    "lr_key",
    "next_rate",
    "train_unit",
    "tuning_sequence",
]


# -- what a unit receives -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What every unit of one plan shares, picklable: the texts any unit needs (only those), their labels, the
    model folder, the recipe. ``digest`` names it in a worker's tokenisation cache."""

    digest: str
    model_dir: str
    trust_remote_code: bool
    recipe: Recipe
    num_labels: int
    layers: tuple[str, ...]
    needed: np.ndarray  # corpus indices, sorted
    texts: tuple[str, ...]  # of ``needed``
    labels: np.ndarray  # of ``needed``

    @classmethod
    def of(cls, plan: Plan) -> Context:
        sets = [plan.val, *plan.evaluations.values(), *plan.train_sets.values()]
        sets += list(plan.val_sets.values()) if plan.val_sets is not None else []
        needed = np.unique(np.concatenate(sets)).astype(np.int64)
        texts = tuple(plan.corpus.texts[i] for i in needed)
        labels = np.asarray(plan.corpus.labels[needed], dtype=np.int64)
        h = hashlib.sha256()
        for part in (
            str(plan.model_dir),
            str(plan.trust_remote_code),
            repr(plan.settings.recipe),
            str(plan.num_labels),
        ):
            h.update(part.encode() + b"\0")
        h.update(needed.tobytes() + labels.tobytes())
        for text in texts:
            h.update(text.encode("utf-8", "surrogatepass") + b"\0")
        return cls(h.hexdigest(), str(plan.model_dir), plan.trust_remote_code, plan.settings.recipe, plan.num_labels,
                   tuple(plan.layers), needed, texts, labels)  # fmt: skip

    def label_of(self, indices: np.ndarray) -> np.ndarray:
        return self.labels[np.searchsorted(self.needed, indices)]


@dataclass(frozen=True)
class Job:
    """One training: ``method`` sized ``size`` on ``train`` at ``lr`` with ``seed``; checkpoint selection on
    ``val`` (the seed's validation draw); the record's evaluation entries on ``evals``; files under
    ``adapter_dir`` (relative to the run folder)."""

    method: str
    size: MethodPlan
    trainable: int
    seed: int
    lr: float
    train: np.ndarray
    val: np.ndarray
    evals: Mapping[str, np.ndarray]
    adapter_dir: str


class Tokens:
    """Every text a plan's units need, tokenised once per process, and the head's cached input features."""

    def __init__(self, context: Context) -> None:
        from transformers import DataCollatorWithPadding

        from .models import load_tokenizer

        tokenizer = load_tokenizer(Path(context.model_dir), trust_remote_code=context.trust_remote_code)
        encoded = tokenizer(list(context.texts), truncation=True, max_length=context.recipe.max_length)
        self.columns: dict[str, list[Any]] = {k: list(v) for k, v in encoded.items()}
        self.columns["labels"] = context.labels.tolist()
        self.needed = context.needed
        self.text_collator = DataCollatorWithPadding(tokenizer)
        self.context = context
        self.features: np.ndarray | None = None
        self.feature_seconds: float | None = None
        self.embedded: np.ndarray | None = None

    def head_features(self) -> np.ndarray:
        """The frozen model's input to its head for every needed text, computed once per process (eval mode)."""
        if self.features is None:
            import time

            from .models import FeatureTap, load_classifier
            from .train import Examples, predict

            start = time.perf_counter()
            c = self.context
            model, head = load_classifier(
                c.model_dir, c.num_labels, 0, trust_remote_code=c.trust_remote_code, head_input=c.recipe.head_input
            )
            tokens = {k: v for k, v in self.columns.items() if k != "labels"}
            with tempfile.TemporaryDirectory(prefix="kradapter-") as work:
                args = _training_args(Path(work), c.recipe)
                self.features = predict(FeatureTap(model, head[0]), Examples(tokens), self.text_collator, args)
            self.feature_seconds = time.perf_counter() - start
        return self.features

    def embeddings(self) -> np.ndarray:
        """The frozen encoder's native pooled embedding of every needed text (the linear probe's input), once."""
        if self.embedded is None:
            from .pooling import embed

            tokens = {k: v for k, v in self.columns.items() if k != "labels"}
            c = self.context
            self.embedded = embed(c.model_dir, tokens, trust_remote_code=c.trust_remote_code)
        return self.embedded

    def local(self, indices: np.ndarray) -> np.ndarray:
        """Positions in the tokenised columns of the corpus texts ``indices``."""
        indices = np.asarray(indices, dtype=np.int64)
        positions = np.searchsorted(self.needed, indices)
        if len(indices) and (positions.max() >= len(self.needed) or (self.needed[positions] != indices).any()):
            raise KeyError("a unit asked for texts its plan's context does not hold")
        return positions


_TOKENS: dict[str, Tokens] = {}  # per process: a worker runs many units of the same plans


def tokens_for(context: Context) -> Tokens:
    """The plan's tokenised texts, made once per process (the most recent :data:`TOKEN_CACHE` plans are kept)."""
    tokens = _TOKENS.pop(context.digest, None) or Tokens(context)
    _TOKENS[context.digest] = tokens  # most recently used last
    while len(_TOKENS) > TOKEN_CACHE:
        _TOKENS.pop(next(iter(_TOKENS)))
    return tokens


def _training_args(workdir: Path, recipe: Recipe, **values: Any) -> Any:
    from .train import training_args

    return training_args(workdir, device=recipe.device, **values)


# -- the units ------------------------------------------------------------------------------------------------------


def predictions_and_metrics(logits: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, Any]:
    """Accuracy, macro-F1, loss and the per-item predicted classes (ints, in the evaluation set's order)."""
    out: dict[str, Any] = dict(classification_metrics(logits, labels, num_labels))
    out["predictions"] = [int(p) for p in np.asarray(logits).argmax(axis=1)]
    return out


def evaluate(context: Context, training: Any, tokens: Tokens, model: torch.nn.Module,
             evals: Mapping[str, np.ndarray], args: Any) -> dict[str, Any]:  # fmt: skip
    """Each evaluation set's metrics and predictions."""
    from .train import predict

    collator = training.collator(tokens)
    out = {}
    for name, indices in evals.items():
        logits = predict(model, training.dataset(tokens, indices), collator, args)
        out[name] = predictions_and_metrics(logits, context.label_of(indices), context.num_labels)
    return out


def scorer(context: Context, training: Any, tokens: Tokens, indices: np.ndarray) -> Callable[[torch.nn.Module], dict]:
    """``score(model) -> {accuracy, macro_f1, loss}`` on ``indices`` (train.fit's checkpoint selection): this
    process only, eval mode for the pass, the model's mode restored after; no random numbers drawn."""
    from .train import local_logits

    data, collator = training.dataset(tokens, indices), training.collator(tokens)
    labels = context.label_of(indices)

    def score(model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        try:
            chunks = []
            for start in range(0, len(data), EVAL_BATCH_SIZE):
                batch = collator([data[i] for i in range(start, min(start + EVAL_BATCH_SIZE, len(data)))])
                chunks.append(local_logits(model, batch).numpy())
        finally:
            model.train(was_training)
        return classification_metrics(np.concatenate(chunks), labels, context.num_labels)

    return score


def train_unit(context: Context, job: Job) -> UnitResult:
    """Train ``job.method`` on its seed's k-shot set at its rate, evaluate, save to a temporary folder and check
    the saved copy reloads to the same logits; the record and the saved files (under ``job.adapter_dir``)."""
    from .models import count_params
    from .strategies import training_for
    from .train import fit

    training = training_for(job.method, context.recipe.head_input)
    tokens = tokens_for(context)
    model = training.build(job.size, list(context.layers), Path(context.model_dir), context.num_labels, job.seed,
                           context.trust_remote_code)  # fmt: skip
    trainable = count_params(model)
    if trainable != job.trainable:
        raise RuntimeError(f"{job.method} trains {trainable:,} parameters, expected {job.trainable:,}")
    r = context.recipe
    record: dict[str, Any] = {"seed": job.seed, "lr": job.lr, "trainable_params": trainable}
    with tempfile.TemporaryDirectory(prefix="kradapter-unit-") as work:
        workdir = Path(work)
        args = _training_args(workdir / "trainer", r, lr=job.lr, epochs=r.epochs, batch_size=r.batch_size,
                              seed=job.seed, steps=r.steps)  # fmt: skip
        data = training.dataset(tokens, job.train)
        val = scorer(context, training, tokens, job.val) if len(job.val) else None
        record.update(fit(model, data, training.collator(tokens), args, val=val, num_classes=context.num_labels))
        record["val_texts"] = len(job.val)
        record.update(update_measures(context, training, model))
        record.update(evaluate(context, training, tokens, model, job.evals, args))
        saved = workdir / "adapter"
        record["adapter_dir"] = job.adapter_dir
        record["adapter_bytes"] = training.save(model, saved)
        record["reload_max_abs_diff"] = reload_difference(context, training, tokens, model, saved, job.train)
        if tokens.feature_seconds is not None:
            record["head_feature_time_s"] = tokens.feature_seconds
        return UnitResult(record, collect_artifacts(saved, prefix=job.adapter_dir))


def baseline_unit(context: Context, job: Job) -> dict[str, Any]:
    """A reference row for ``job.seed``: the majority class of its k-shot set, or the linear probe (logistic
    regression, C chosen on the seed's validation draw) on the frozen encoder's native embedding."""
    import time

    from . import baselines

    start = time.perf_counter()
    train_y = context.label_of(job.train)
    evals_y = {name: context.label_of(indices) for name, indices in job.evals.items()}
    if job.method == baselines.MAJORITY:
        record = baselines.majority(train_y, evals_y, context.num_labels)
    elif job.method == baselines.PROBE:
        tokens = tokens_for(context)
        x = tokens.embeddings()

        def rows(indices: np.ndarray) -> np.ndarray:
            return x[tokens.local(indices)]

        evals = {name: (rows(indices), evals_y[name]) for name, indices in job.evals.items()}
        record = baselines.linear_probe(rows(job.train), train_y, rows(job.val), context.label_of(job.val), evals,
                                        context.num_labels, job.seed)  # fmt: skip
    else:
        raise ValueError(f"unknown reference row {job.method!r}")
    return {"seed": job.seed, **record, "val_texts": len(job.val), "train_time_s": time.perf_counter() - start}


def evaluate_unit(context: Context, job: Job, trial: Mapping[str, Any], files: Mapping[str, bytes]) -> dict:
    """The sweep seed's run at the chosen rate: the trial ``trial`` (its saved files ``files``, relative to the
    adapter folder) evaluated on ``job.evals``; training fields as the trial recorded them."""
    from .strategies import training_for

    training = training_for(job.method, context.recipe.head_input)
    tokens = tokens_for(context)
    with tempfile.TemporaryDirectory(prefix="kradapter-unit-") as work:
        folder = Path(work) / "adapter"
        for name, data in files.items():
            write_atomic(folder / name, data)
        model = training.load(folder, context.model_dir, context.num_labels, context.trust_remote_code)
        record = {k: v for k, v in trial.items() if k != "val"}
        record.update(evaluate(context, training, tokens, model, job.evals, _training_args(Path(work), context.recipe)))
    record["from_sweep"] = True
    return record


def reload_difference(context: Context, training: Any, tokens: Tokens, model: torch.nn.Module, directory: Path,
                      indices: np.ndarray) -> float:  # fmt: skip
    """Largest logit difference between the trained model and its saved copy reloaded from disk."""
    from .train import local_logits

    data = training.dataset(tokens, indices[:RELOAD_CHECK_EXAMPLES])
    batch = training.collator(tokens)([data[i] for i in range(len(data))])
    again = training.load(directory, context.model_dir, context.num_labels, context.trust_remote_code)
    return float((local_logits(model, batch) - local_logits(again, batch)).abs().max())


# -- what a run learned ---------------------------------------------------------------------------------------------


@functools.cache
def _pretrained_weights(model_dir: str, num_labels: int, layers: tuple[str, ...], trust: bool) -> dict:
    """The pretrained weight of each target layer (float64), loaded once per process (full fine-tuning's dW)."""
    from .models import load_classifier

    model, _ = load_classifier(model_dir, num_labels, 0, trust_remote_code=trust)
    return {name: _weight(model, name).to(torch.float64).clone() for name in layers}


def _weight_trains(model: torch.nn.Module, name: str) -> bool:
    """Whether the target layer's own weight is trained (full fine-tuning), as the built model says."""
    try:
        return bool(model.get_submodule(name).weight.requires_grad)
    except AttributeError:  # not a layer of this model (the head alone is trained on features)
        return False


def _weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    weight = model.get_submodule(name).weight
    assert isinstance(weight, torch.Tensor), name
    return weight.detach()


@torch.no_grad()
def update_measures(context: Context, training: Any, model: torch.nn.Module) -> dict[str, Any]:
    """For a method that learns an update of the target layers: ``updates`` (adapters: spectrum and effective rank
    per layer), ``update_norm`` (sqrt of the sum over layers of ||dW||_F^2) and ``intruders`` (intruder
    dimensions summed over layers, :func:`kradapter.intruders.update_intruder_dimensions`). The head alone: {}."""
    from ..analysis import adapted_layers, analyse_updates, layer_update
    from ..intruders import update_intruder_dimensions

    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    out: dict[str, Any] = {}
    if training.learns_update:  # an adapter: dW as its merge would add it, against its frozen base weight
        rows = analyse_updates(model, top=UPDATE_SPECTRUM)
        for _, layer, active in adapted_layers(model):  # the same layers, in the same order, as ``rows``
            pairs.append((layer.get_base_layer().weight.detach(), layer_update(layer, active).detach()))
        out["updates"] = rows
    elif context.layers and all(_weight_trains(model, name) for name in context.layers):  # dW = trained - pretrained
        base = _pretrained_weights(context.model_dir, context.num_labels, context.layers, context.trust_remote_code)
        for name, w0 in base.items():
            pairs.append((w0, _weight(model, name).to(torch.float64) - w0))
    else:
        return out
    squares, intruders = 0.0, []
    for w0, delta in pairs:
        w0, delta = w0.to(torch.float64).cpu(), delta.to(torch.float64).cpu()
        squares += float((delta**2).sum())
        intruders.append(update_intruder_dimensions(w0, delta).count)
    if "updates" in out:
        for row, count in zip(out["updates"], intruders, strict=True):
            row["intruders"] = count
    out["update_norm"] = math.sqrt(squares)
    out["intruders"] = int(sum(intruders))
    return out


# -- the tuning rule (pure) -----------------------------------------------------------------------------------------

Score = tuple[float, float, float]  # (val accuracy, val macro-F1, -val loss): larger is better


def best_rate(scores: Mapping[float, Score]) -> float:
    """The rate with the best score (accuracy, then macro-F1, then lower loss; the lower rate on a full tie)."""
    rates = sorted(scores)
    return max(rates, key=lambda lr: scores[lr])  # max keeps the first (lowest) of equals


def grid_ratio(grid: Sequence[float]) -> float:
    """The grid's step as a factor: ``(max / min) ** (1 / (n - 1))`` (a log-spaced grid's ratio)."""
    lo, hi = min(grid), max(grid)
    if len(grid) < 2 or not hi > lo:
        raise ValueError(f"a tuning grid needs two different rates, got {list(grid)}")
    return float((hi / lo) ** (1 / (len(grid) - 1)))


def _rounded(lr: float) -> float:
    return float(f"{lr:.{RATE_DIGITS}g}")


def next_rate(scores: Mapping[float, Score], ratio: float) -> float:
    """The next adaptive trial after those scored in ``scores``: while the best rate is an edge of the tried
    rates, one grid step (``ratio``) beyond it; otherwise the geometric midpoint between the best and its better
    neighbour (ties: the lower one), then the other side. Rates are rounded to :data:`RATE_DIGITS` digits; a rate
    already tried (by its key) is skipped for the next candidate, extension outward last."""
    rates = sorted(scores)
    best = best_rate(scores)
    i = rates.index(best)
    low_edge, high_edge = rates[0] / ratio, rates[-1] * ratio
    if i == 0:
        candidates = [low_edge, high_edge]
    elif i == len(rates) - 1:
        candidates = [high_edge, low_edge]
    else:
        below, above = rates[i - 1], rates[i + 1]
        sides = [math.sqrt(below * best), math.sqrt(best * above)]
        if scores[above] > scores[below]:
            sides.reverse()
        candidates = [*sides, low_edge, high_edge]
    tried = {lr_key(lr) for lr in rates}
    for lr in candidates:
        if lr_key(_rounded(lr)) not in tried:
            return _rounded(lr)
    return _rounded(high_edge * ratio)  # unreachable in practice: both extensions are new rates


def on_edge(rates: Sequence[float], chosen: float) -> bool:
    """Whether ``chosen`` is still the lowest or the highest rate tried."""
    return chosen in (min(rates), max(rates))


def tuning_sequence(grid: Sequence[float], trials: int, score: Callable[[float], Score]) -> list[float]:
    """The rates the rule tries, in order, for a method with ``grid`` given ``trials`` trials in all (what the
    execution does one trial at a time; for tests and planning)."""
    if trials < len(grid):
        raise ValueError(f"{trials} trials cannot cover a grid of {len(grid)} rates")
    scores = {float(lr): score(float(lr)) for lr in grid}
    order = [float(lr) for lr in grid]
    ratio = grid_ratio(grid)
    while len(order) < trials:
        lr = next_rate(scores, ratio)
        scores[lr] = score(lr)
        order.append(lr)
    return order


# -- the driver -----------------------------------------------------------------------------------------------------


@dataclass
class Part:
    """One plan of an execution: its key prefix, plan, context and the number of trials of its sweeps."""

    prefix: tuple[str, ...]
    plan: Plan
    context: Context

    @property
    def trials(self) -> int:
        return tuning_trials(self.plan)

    def sweeps(self, method: str) -> bool:
        return len(self.plan.settings.grid(method)) > 1


def tuning_trials(plan: Plan) -> int:
    """Trials of each tuned method of ``plan``: its longest grid plus :data:`EXTRA_TRIALS` (0: nothing to tune)."""
    s = plan.settings
    grids = [len(s.grid(m)) for m in s.methods if len(s.grid(m)) > 1]
    return max(grids) + EXTRA_TRIALS if grids else 0


def plan_units(plan: Plan) -> int:
    """Trials, runs and reference rows of ``plan``."""
    s, trials = plan.settings, tuning_trials(plan)
    runs = sum((trials if len(s.grid(m)) > 1 else 0) + len(s.seeds) for m in s.methods)
    return runs + len(plan.baselines) * len(s.seeds)


def model_inputs(model_dir: str) -> dict[str, str]:
    """The model folder's hash where this runs (a worker's environment check, :class:`executor.Fingerprint`)."""
    return {"model": file_hash(model_dir)}


class Execution:
    """Runs every unit of ``plans`` not yet in ``store`` on ``executor`` (default: sequential, in this process).

    ``plans``: one :class:`Plan` (keys without prefix) or ``(prefix, plan)`` pairs (a study of several plans in
    one store). ``report`` rebuilds the results document from the store; it is called after each finished unit,
    never before the first. ``rank``/``world_size`` as torchrun sets them: every process runs every unit (the
    trainer is data-parallel) and rank 0 alone writes.
    """

    def __init__(
        self, plans: Plan | Sequence[tuple[tuple[str, ...], Plan]], store: Store, report: Callable[[Execution], Any],
        rank: int = 0, world_size: int = 1, progress: bool = True, *, executor: Executor | None = None,
        desc: str = "finetune", first: Collection[str] = (),
    ) -> None:  # fmt: skip
        pairs: list[tuple[tuple[str, ...], Plan]] = [((), plans)] if isinstance(plans, Plan) else list(plans)
        self.parts = [Part(tuple(prefix), plan, Context.of(plan)) for prefix, plan in pairs]
        self.store = store
        self.report = report
        self.rank = rank
        self.world_size = world_size
        self.progress = progress and rank == 0
        self.executor = executor if executor is not None else SequentialExecutor()
        self.desc = desc
        self.first = frozenset(first)
        self.trained = 0
        self.failed: dict[Key, str] = {}

    @property
    def plan(self) -> Plan:
        return self.parts[0].plan

    # -- keys and counts ------------------------------------------------------------------------------------------
    def total(self) -> int:
        """Every unit of the execution (trials, runs and reference rows)."""
        return sum(plan_units(p.plan) for p in self.parts)

    def finished(self) -> int:
        done = 0
        for p in self.parts:
            for m in p.plan.settings.methods:
                done += len(self.trials(p, m)) + sum(
                    self.store.done((*p.prefix, "run", m, s)) for s in p.plan.settings.seeds
                )
            done += sum(
                self.store.done((*p.prefix, "run", b, s)) for b in p.plan.baselines for s in p.plan.settings.seeds
            )
        return done

    def trials(self, part: Part, method: str) -> list[dict[str, Any]]:
        """The method's finished trials in the order they finished."""
        head = (*part.prefix, "sweep", method)
        return [r for k, r in self.store.matching(*head) if len(k) == len(head) + 1 and self.store.done(k)]

    def adapter_dir(self, part: Part, method: str, seed: int, lr: float) -> str:
        return str(Path(ADAPTERS_DIR, *part.prefix, method, f"seed{seed}_lr{lr_key(lr)}").as_posix())

    def job(self, part: Part, method: str, seed: int, lr: float, evals: Mapping[str, np.ndarray]) -> Job:
        plan = part.plan
        return Job(method, plan.methods[method], plan.trainable(method), seed, float(lr),
                   np.asarray(plan.train_sets[seed]), np.asarray(plan.validation(seed)), dict(evals),
                   self.adapter_dir(part, method, seed, lr))  # fmt: skip

    # -- what can run now -----------------------------------------------------------------------------------------
    def units(self, early: bool) -> Iterator[Unit]:
        """Lazily, in priority order (plan by plan, as given), the units whose inputs are known and that are neither
        finished nor failed in this invocation: ``early``, the reference rows and the ``first`` methods' (every
        method's without ``first``); else the other methods'."""
        for part in self.parts:
            if early:
                yield from (u for u in self.baseline_units(part) if u.key not in self.failed)
            for method in part.plan.settings.methods:
                if early == (not self.first or method in self.first):
                    yield from (u for u in self.method_units(part, method) if u.key not in self.failed)

    def next_unit(self, handed: Collection[Key]) -> Unit | None:
        """The highest-priority unit that can run now and is not in ``handed`` (in flight); the others' units
        (not ``first``) only once no ``first`` unit is left to run or running, so a study run in chunks finishes
        its primary methods before it starts the others. None: nothing to start now."""
        running_early = False
        for unit in self.units(early=True):
            if unit.key not in handed:
                return unit
            running_early = True
        if running_early:
            return None
        return next((u for u in self.units(early=False) if u.key not in handed), None)

    def stream(self) -> Iterator[Unit]:
        """The units one at a time, each chosen when the executor has a free slot (:meth:`next_unit`, re-read from
        the store): a finished trial makes its method's next trial, or its seeds' runs, ready at once, so plans
        complete in priority order instead of every plan waiting for a wave of all plans. Ends when nothing can
        start (the executor lets the units in flight finish, and :meth:`run` asks again)."""
        handed: set[Key] = set()
        while (unit := self.next_unit(handed)) is not None:
            handed.add(unit.key)
            yield unit

    def baseline_units(self, part: Part) -> list[Unit]:
        """The plan's reference rows not yet run, one per seed (cheap: run first)."""
        plan, units = part.plan, []
        for name in plan.baselines:
            for seed in plan.settings.seeds:
                key: Key = (*part.prefix, "run", name, seed)
                if not self.store.done(key):
                    job = Job(name, MethodPlan(name, {}, 0, None), 0, seed, 0.0, np.asarray(plan.train_sets[seed]),
                              np.asarray(plan.validation(seed)), dict(plan.evaluations), "")  # fmt: skip
                    units.append(Unit(key, baseline_unit, (part.context, job)))
        return units

    def method_units(self, part: Part, method: str) -> list[Unit]:
        s, prefix = part.plan.settings, part.prefix
        seed0 = s.sweep_seed
        if part.sweeps(method):
            grid = s.grid(method)
            done = {lr_key(r["lr"]) for r in self.trials(part, method)}
            todo = [lr for lr in grid if lr_key(lr) not in done]
            if not todo and len(done) < part.trials:
                todo = [next_rate(self.scores(part, method), grid_ratio(grid))]
            if todo:
                val = {"val": part.plan.validation(seed0)}
                keys: list[Key] = [(*prefix, "sweep", method, lr_key(lr)) for lr in todo]
                return [Unit(key, train_unit, (part.context, self.job(part, method, seed0, lr, val)))
                        for key, lr in zip(keys, todo, strict=True)]  # fmt: skip
        chosen = self.choose(part, method)
        units = []
        for seed in s.seeds:
            key: Key = (*prefix, "run", method, seed)
            if self.store.done(key):
                continue
            job = self.job(part, method, seed, chosen, part.plan.evaluations)
            reuse = self.reusable(part, method, chosen) if seed == seed0 else None
            if reuse is not None:
                units.append(Unit(key, evaluate_unit, (part.context, job, *reuse)))
            else:
                units.append(Unit(key, train_unit, (part.context, job)))
        return units

    def scores(self, part: Part, method: str) -> dict[float, Score]:
        out = {}
        for r in self.trials(part, method):
            val = r["val"]
            out[float(r["lr"])] = (float(val["accuracy"]), float(val["macro_f1"]), -float(val["loss"]))
        return out

    def choose(self, part: Part, method: str) -> float:
        """The method's chosen rate, recorded once its trials are complete (pruning the other trials' files)."""
        key = (*part.prefix, "chosen", method)
        recorded = self.store.records.get(key)
        if recorded is not None:
            return float(recorded["lr"])
        if not part.sweeps(method):  # one rate: recorded with the method's first finished run (on_result)
            (lr,) = part.plan.settings.grid(method)
            if any(self.store.done((*part.prefix, "run", method, s)) for s in part.plan.settings.seeds):
                # a run is on disk without it: the driver was killed between the two appends
                self.store.add(key, {"lr": float(lr), "trials": [], "on_edge": False})
            return float(lr)
        trials = sorted(self.trials(part, method), key=lambda t: float(t["lr"]))  # by rate: the same on any executor
        scores = self.scores(part, method)
        chosen = best_rate(scores)
        fields = {"accuracy": "val_accuracy", "macro_f1": "val_macro_f1", "loss": "val_loss"}
        record: dict[str, Any] = {
            "lr": chosen,
            "trials": [{"lr": float(t["lr"]), **{new: t["val"][old] for old, new in fields.items()}} for t in trials],
            "on_edge": on_edge(list(scores), chosen),
            "val_texts": len(part.plan.validation(part.plan.settings.sweep_seed)),
        }
        self.store.add(key, record)
        self.prune(part, method, chosen)
        return chosen

    def reusable(self, part: Part, method: str, lr: float) -> tuple[dict, dict[str, bytes]] | None:
        """The sweep seed's trial at ``lr`` and its saved files, if they are in the run folder."""
        trial = self.store.records.get((*part.prefix, "sweep", method, lr_key(lr)))
        if not isinstance(trial, dict) or "adapter_dir" not in trial:
            return None
        folder = self.store.directory / trial["adapter_dir"]
        if not folder.is_dir():
            return None
        return trial, collect_artifacts(folder)

    def prune(self, part: Part, method: str, chosen: float) -> None:
        """Delete the saved adapters of the trials not chosen (full fine-tuning saves whole models)."""
        if self.rank != 0:
            return
        for trial in self.trials(part, method):
            if lr_key(trial["lr"]) != lr_key(chosen) and "adapter_dir" in trial:
                shutil.rmtree(self.store.directory / trial["adapter_dir"], ignore_errors=True)

    # -- the driver's side: the one writer ------------------------------------------------------------------------
    def on_result(self, key: Key, record: Any, artifacts: dict[str, bytes]) -> None:
        if artifacts and self.rank == 0:
            self.write_folder(record["adapter_dir"], artifacts)
        self.store.add(key, record)
        if len(key) >= 3 and key[-3] == "run" and "lr" in record:
            part = next(p for p in self.parts if key[: len(p.prefix)] == p.prefix and len(key) == len(p.prefix) + 3)
            chosen = (*part.prefix, "chosen", str(key[-2]))
            if chosen not in self.store.records:  # a method with one rate: nothing was tuned
                self.store.add(chosen, {"lr": float(record["lr"]), "trials": [], "on_edge": False})
        self.trained += not record.get("from_sweep", False)
        self.save()
        if self.progress and len(key) >= 3 and key[-3] == "run" and "lr" in record:
            from tqdm.auto import tqdm

            tqdm.write(line(str(key[-2]), int(key[-1]), record))

    def write_folder(self, folder: str, artifacts: Mapping[str, bytes]) -> None:
        """A unit's files, written as one folder: staged beside it, then renamed into place."""
        self.store.make_dir(Path(folder).parent)
        target = self.store.directory / folder
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        prefix = folder.rstrip("/") + "/"
        for name, data in artifacts.items():
            if not name.startswith(prefix):
                raise ValueError(f"unit file {name!r} is outside its folder {folder!r}")
            write_atomic(staging / name[len(prefix) :], data)
        replace_dir(staging, target)

    def on_failure(self, key: Key, reason: str) -> None:
        """A failed unit is recorded in this invocation's entry of ``run.json`` (not as a record: a resumed run
        finds no record and tries it again), and named when the run ends."""
        self.failed[tuple(key)] = reason
        if self.rank == 0:
            invocation = self.store.meta["invocations"][-1]
            invocation.setdefault("failed_units", []).append({"key": list(key), "reason": reason})
            self.store.save_meta()

    def save(self) -> None:
        if self.rank == 0:
            self.report(self)

    def run(self) -> list[tuple[Key, str]]:
        """Run every unit not already in the store, streamed in priority order (:meth:`stream`), rebuilding the
        results document after each unit; returns the failed units ``(key, reason)`` (a resumed run tries them
        again). Choosing a rate is the driver's, as the units are handed out."""
        if self.store.records:
            self.save()  # a resumed plan: its document is rebuilt at once
        total = self.total()
        while self.next_unit(()) is not None:
            self.executor.run(self.stream(), self.on_result, self.on_failure, progress=self.progress, desc=self.desc,
                              initial=self.finished(), total=total)  # fmt: skip
        self.save()
        return sorted(self.failed.items(), key=lambda item: str(item[0]))


def check_executor(args: argparse.Namespace, world_size: int) -> Executor:
    """The executor the flags ask for; a SettingsError (one line) for a bad combination, before any work."""
    executor = executor_from_args(args, SettingsError)
    if world_size > 1 and executor.name != "sequential":
        raise SettingsError(
            f"--executor {executor.name} under torchrun ({world_size} processes): torchrun's processes train each "
            "unit together; run one process with --executor ray to train several units at once"
        )
    return executor


def with_fingerprint(executor: Executor, model_dir: Path) -> Executor:
    """A Ray worker refuses units unless its packages and its copy of the model folder are the driver's."""
    if hasattr(executor, "fingerprint"):
        probe = functools.partial(model_inputs, str(model_dir))
        executor.fingerprint = Fingerprint.here(probe(), probe)
    return executor


def report_failures(command: str, failed: list[tuple[tuple[Any, ...], str]], rank: int) -> int:
    """Name every failed unit on stderr; exit status 1 if any (``--resume`` tries them again), else 0."""
    if not failed:
        return 0
    if rank == 0:
        for key, reason in failed:
            print(f"kradapter {command}: unit {' '.join(map(str, key))} failed: {reason}", file=sys.stderr)
        print(f"kradapter {command}: {len(failed)} unit(s) failed; --resume tries them again", file=sys.stderr)
    return 1


def line(method: str, seed: int, record: dict[str, Any]) -> str:
    test = record["test"]
    extra = (
        f" loss {record['loss_first_epoch']:.3f}->{record['loss_last_epoch']:.3f}"
        if "loss_first_epoch" in record
        else ""
    )
    return (
        f"{method:>10} seed {seed} lr {lr_key(record['lr']):>7}: acc {test['accuracy']:.4f} "
        f"macro-F1 {test['macro_f1']:.4f} train {record.get('train_time_s', 0.0):.1f}s{extra}"
    )
