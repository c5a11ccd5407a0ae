"""The plan of a comparison: the data and its splits, the model's head and target layers, each method sized to the
budget. Built once, before any training, so every data-, model- and method-dependent error stops the run here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import registry
from ..registry import Plan as MethodPlan
from .data import SPLIT_SEED, Corpus, check_shots, kshot_train, test_split
from .protocol import Settings

if TYPE_CHECKING:
    from .strategies import Training


@dataclass(frozen=True)
class Plan:
    """Everything the runs share, fixed before the first one."""

    settings: Settings
    corpus: Corpus
    pool: np.ndarray
    test: np.ndarray
    train_sets: dict[int, np.ndarray]
    val: np.ndarray
    model_dir: Path
    model_name: str
    head: list[str]
    head_params: int
    layers: dict[str, tuple[int, int]]
    budget: int
    methods: dict[str, MethodPlan]
    evals: Mapping[str, np.ndarray] | None = None  # what each run is evaluated on (default: the test split)
    trust_remote_code: bool = False  # the user's --trust-remote-code: load the model folder's own code
    baselines: tuple[str, ...] = ()  # reference rows run for every seed (kradapter.finetune.baselines)
    val_sets: Mapping[int, np.ndarray] | None = None  # each seed's own validation draw (default: ``val`` for all)
    training: Mapping[str, Training] = field(init=False)  # each method's strategy, chosen once

    def __post_init__(self) -> None:
        from .strategies import training_for

        head_input = self.settings.recipe.head_input
        object.__setattr__(self, "training", {m: training_for(m, head_input) for m in self.methods})

    @property
    def evaluations(self) -> Mapping[str, np.ndarray]:
        return self.evals if self.evals is not None else {"test": self.test}

    def validation(self, seed: int) -> np.ndarray:
        """The validation draw of ``seed``: its checkpoint selection and, for the sweep seed, its tuning trials."""
        return self.val_sets[seed] if self.val_sets is not None else self.val

    @property
    def num_labels(self) -> int:
        return len(self.corpus.classes)

    def trainable(self, method: str) -> int:
        """Parameters ``method`` trains: its adapter (or the whole model, for full fine-tuning) plus the head."""
        return self.methods[method].count + self.head_params


@dataclass(frozen=True)
class ModelProbe:
    """What the plan needs to know of the model: its head, the layers to adapt and the head's size."""

    head: list[str]
    head_params: int
    layers: dict[str, tuple[int, int]]
    base_params: int  # everything but the head (what full fine-tuning trains besides it)


def probe_model(
    model_dir: Path,
    num_labels: int,
    targets: tuple[str, ...] | None,
    trust_remote_code: bool = False,
    head_input: str = "native",
) -> ModelProbe:
    """Load the tokenizer and the classifier once, so a folder that does not load stops the run here."""
    from .models import count_params, load_classifier, load_tokenizer, target_layers

    load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    probe, head = load_classifier(
        model_dir, num_labels, seed=0, trust_remote_code=trust_remote_code, head_input=head_input
    )
    layers = target_layers(probe, head, targets)
    head_params = sum(count_params(probe.get_submodule(h), trainable_only=False) for h in head)
    return ModelProbe(head, head_params, layers, count_params(probe, trainable_only=False) - head_params)


def size_methods(methods: tuple[str, ...], probe: ModelProbe, budget: int, **options: Any) -> dict[str, MethodPlan]:
    """Each method sized to ``budget`` on the probed layers by its training strategy (adapters: checked by PEFT's
    own config); a SettingsError naming the method that cannot be."""
    from .strategies import training_for

    return {name: training_for(name).size(probe, budget, **options) for name in methods}


def make_plan(
    settings: Settings, model_dir: Path, corpus: Corpus, model_name: str, trust_remote_code: bool = False
) -> Plan:
    """Split the data, probe the model and size every method; errors name the bad input."""
    val_shots = settings.recipe.val_shots
    pool, test = test_split(corpus.labels)
    check_shots(corpus, pool, settings.shots, val_shots)
    train_sets = {seed: kshot_train(corpus.labels, pool, settings.shots, seed) for seed in settings.seeds}
    val_sets = validation_sets(corpus.labels, pool, train_sets, val_shots)
    probe = probe_model(
        model_dir, len(corpus.classes), settings.recipe.targets, trust_remote_code, settings.recipe.head_input
    )
    budget = registry.kradapter_budget(list(probe.layers.values()))
    methods = size_methods(settings.methods, probe, budget)
    return Plan(settings, corpus, pool, test, train_sets, val_sets[settings.sweep_seed], model_dir, model_name,
                probe.head, probe.head_params, probe.layers, budget, methods, trust_remote_code=trust_remote_code,
                val_sets=val_sets)  # fmt: skip


def validation_draw(labels: np.ndarray, pool: np.ndarray, train: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """``per_class`` pool texts of each class outside ``train`` (all of a class's spare texts when it has fewer).

    Where every class has enough this is :func:`kradapter.finetune.data.validation`'s draw (same random stream)."""
    candidates = np.setdiff1d(pool, train)
    rng = np.random.default_rng([SPLIT_SEED, 2, seed])
    chosen = []
    for c in np.unique(labels):
        members = candidates[labels[candidates] == c]
        chosen.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def validation_sets(
    labels: np.ndarray, pool: np.ndarray, train_sets: Mapping[int, np.ndarray], per_class: int
) -> dict[int, np.ndarray]:
    """Each seed's own validation draw (checkpoint selection for every run; the sweep seed's also tunes)."""
    return {seed: validation_draw(labels, pool, train, per_class, seed) for seed, train in train_sets.items()}
