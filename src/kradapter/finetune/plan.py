"""The plan of a comparison: the data and its splits, the model's head and target layers, each method sized to the
budget. Built once, before any training, so every data-, model- and method-dependent error stops the run here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import registry
from ..registry import Plan as MethodPlan
from .data import Corpus, check_shots, kshot_train, test_split, validation
from .protocol import Settings, SettingsError


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

    @property
    def num_labels(self) -> int:
        return len(self.corpus.classes)

    def trainable(self, method: str) -> int:
        """Parameters ``method`` trains: its adapter (or the whole model, for full fine-tuning) plus the head."""
        return self.methods[method].count + self.head_params


def make_plan(settings: Settings, model_dir: Path, corpus: Corpus, model_name: str) -> Plan:
    """Split the data, probe the model and size every method; errors name the bad input."""
    from .models import count_params, load_classifier, load_tokenizer, target_layers

    pool, test = test_split(corpus.labels)
    check_shots(corpus, pool, settings.shots, settings.val_shots)
    train_sets = {seed: kshot_train(corpus.labels, pool, settings.shots, seed) for seed in settings.seeds}
    val = validation(corpus.labels, pool, train_sets[settings.sweep_seed], settings.val_shots, settings.sweep_seed)
    load_tokenizer(model_dir)  # a folder whose tokenizer does not load stops here, not mid-run
    probe, head = load_classifier(model_dir, len(corpus.classes), seed=0)
    layers = target_layers(probe, head, settings.targets)
    shapes = list(layers.values())
    budget = registry.kradapter_budget(shapes)
    head_params = sum(count_params(probe.get_submodule(h), trainable_only=False) for h in head)
    methods: dict[str, MethodPlan] = {}
    for name in settings.methods:
        method = registry.METHODS[name]
        if method.is_adapter:
            try:
                methods[name] = registry.plan(name, shapes, budget)
                method.config(list(layers), **methods[name].settings, modules_to_save=head)  # PEFT's own checks
            except registry.MethodError as exc:
                raise SettingsError(str(exc)) from None
        else:
            count = count_params(probe, trainable_only=False) - head_params if method.trains_base else 0
            methods[name] = MethodPlan(name, {}, count, None)
    return Plan(
        settings, corpus, pool, test, train_sets, val, model_dir, model_name, head, head_params, layers, budget, methods
    )
