"""Training that fits: optimiser steps, the per-step loss curve, the fit verdict, validation checkpoints and the
restore of the best one (on a linear head over random features: fast, and every number recomputable)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import default_data_collator

from kradapter.finetune.metrics import classification_metrics
from kradapter.finetune.models import HeadProbe
from kradapter.finetune.protocol import (
    FIT_RULE,
    UNDERFIT_FRACTION,
    VAL_CHECKPOINTS,
    Recipe,
    SettingsError,
    final_loss,
    fit_verdict,
)
from kradapter.finetune.train import Examples, checkpoint_steps, fit, training_args


@pytest.mark.parametrize("total", [1, 2, 4, 5, 7, 10, 23, 100, 101])
def test_checkpoints_split_the_run_evenly_and_end_at_its_last_step(total: int) -> None:
    steps = checkpoint_steps(total)
    assert steps[-1] == total and len(steps) == min(VAL_CHECKPOINTS, total) and steps == sorted(set(steps))
    gaps = np.diff([0, *steps])
    assert gaps.max() - gaps.min() <= 1  # the same fraction of the run between checkpoints, up to rounding


def test_final_loss_and_the_fit_rule() -> None:
    curve = [0.7] * 10 + [0.5] * 8 + [0.01, 0.03]
    assert final_loss(curve) == pytest.approx(0.02)  # last 10%: 2 of 20 steps
    assert final_loss([0.4, 0.2, 0.3]) == pytest.approx(0.3)  # at least one step
    assert math.isnan(final_loss([]))
    assert fit_verdict(curve, 2) == "fit"
    chance = math.log(3)
    assert fit_verdict([1.2] * 9 + [UNDERFIT_FRACTION * chance * 1.01], 3) == "underfit"
    assert fit_verdict([1.2] * 9 + [UNDERFIT_FRACTION * chance * 0.99], 3) == "fit"
    assert fit_verdict([0.7, 0.3, float("nan"), 0.01], 2) == "diverged"
    assert fit_verdict([0.7, 0.3, float("inf")], 2) == "diverged"
    assert fit_verdict([0.69] * 9 + [0.9], 2) == "diverged"  # ended above where it began
    assert fit_verdict([], 2) == "diverged"
    assert "ln(num_classes)" in FIT_RULE and f"{UNDERFIT_FRACTION:g}" in FIT_RULE


def test_recipe_steps_and_head_input() -> None:
    assert Recipe().steps is None and Recipe().head_input == "native"  # finetune's old epochs unless --steps
    settings = Recipe(steps=40, head_input="pooler").spec_settings()
    assert settings["steps"] == 40 and settings["head_input"] == "pooler"
    with pytest.raises(SettingsError, match="--steps must be a positive integer, got 0"):
        Recipe(steps=0)
    with pytest.raises(SettingsError, match="unknown --head-input 'cls'"):
        Recipe(head_input="cls")


def make_data(generator: torch.Generator, n: int, width: int = 6, classes: int = 3) -> Examples:
    features = torch.randn(n, width, generator=generator)
    labels = (features[:, :classes].argmax(1)).tolist()  # separable: a linear head can fit it
    return Examples({"features": features.numpy(), "labels": labels})


def head(generator: torch.Generator, width: int = 6, classes: int = 3) -> HeadProbe:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    return HeadProbe(nn.Linear(width, classes))


def all_loss(model: HeadProbe, data: Examples) -> float:
    """Cross-entropy of the model on every example, recomputed in float64 (the reference for the curve)."""
    with torch.no_grad():
        logits = model.head(torch.as_tensor(np.asarray(data.columns["features"]))).double().numpy()
    return classification_metrics(logits, np.asarray(data.columns["labels"]), 3)["loss"]


@pytest.mark.slow
def test_steps_replace_epochs_and_the_curve_is_the_training_loss(generator: torch.Generator, tmp_path: Path) -> None:
    data = make_data(generator, 16)
    model = head(generator)
    start = all_loss(model, data)
    args = training_args(tmp_path, lr=0.1, batch_size=16, seed=0, device="cpu", steps=23, epochs=1)
    record = fit(model, data, default_data_collator, args)  # the old call, no validation
    assert record["steps"] == 23 and len(record["loss_curve"]) == 23
    # One batch is the whole set: step 1's loss is the untrained head's loss on all of it.
    assert record["loss_curve"][0] == pytest.approx(start, rel=1e-5)
    assert record["final_train_loss"] == pytest.approx(np.mean(record["loss_curve"][-3:]))  # last 10%: 3 steps
    # Without num_classes, chance is ln(the distinct training labels): 16 draws need not hold all 3 classes.
    assert record["fit"] == fit_verdict(record["loss_curve"], len(set(data.columns["labels"])))
    assert "val_curve" not in record and "selected_step" not in record
    # Without --steps the epochs decide: 3 passes over 16 examples in batches of 8.
    again = fit(head(generator), data, default_data_collator, training_args(tmp_path, epochs=3, device="cpu"))
    assert again["steps"] == 6 and len(again["loss_curve"]) == 6


def test_validation_restores_the_best_checkpoint(generator: torch.Generator, tmp_path: Path) -> None:
    data, val = make_data(generator, 24), make_data(generator, 30)
    model = head(generator)
    seen: dict[int, tuple[tuple[float, float, float], dict[str, torch.Tensor]]] = {}
    calls = []

    def score(m: nn.Module) -> dict[str, float]:
        assert m is model
        logits = m.head(torch.as_tensor(np.asarray(val.columns["features"]))).detach().double().numpy()
        scores = classification_metrics(logits, np.asarray(val.columns["labels"]), 3)
        # Scores of a noisy validation: a bonus to the second checkpoint, so the best one is not the last.
        scores["accuracy"] += 0.5 if len(calls) == 1 else 0.0
        calls.append(scores["accuracy"])
        step = len(calls)
        seen[step] = ((scores["accuracy"], scores["macro_f1"], -scores["loss"]),
                      {k: v.detach().clone() for k, v in m.state_dict().items()})  # fmt: skip
        return scores

    args = training_args(tmp_path, lr=0.2, batch_size=8, seed=1, device="cpu", steps=17)
    record = fit(model, data, default_data_collator, args, val=score)
    steps = checkpoint_steps(17)
    assert [s for s, _ in record["val_curve"]] == steps and len(calls) == len(steps)
    assert [a for _, a in record["val_curve"]] == pytest.approx(calls)
    best = max(range(len(steps)), key=lambda i: seen[i + 1][0])
    assert record["selected_step"] == steps[best] == steps[1]
    for name, value in model.state_dict().items():  # the model holds that checkpoint's weights again
        torch.testing.assert_close(value, seen[best + 1][1][name], rtol=0, atol=0)


@pytest.mark.slow
def test_validation_through_a_nested_prediction_trainer(generator: torch.Generator, tmp_path: Path) -> None:
    """The runner scores with ``predict`` (a second Trainer) inside the training loop: training carries on, in
    train mode, and the restored weights score what the curve says."""
    from kradapter.finetune.train import predict

    data, val = make_data(generator, 24), make_data(generator, 20)
    model = head(generator)
    modes = []

    def score(m: nn.Module) -> dict[str, float]:
        logits = predict(m, val, default_data_collator, training_args(tmp_path / "eval", device="cpu"))
        return classification_metrics(logits, np.asarray(val.columns["labels"]), 3)

    class Mode(nn.Module):  # records the mode of every training forward
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            modes.append(model.training)
            return x

    model.head = nn.Sequential(Mode(), model.head)
    args = training_args(tmp_path, lr=0.2, batch_size=8, seed=2, device="cpu", steps=10)
    record = fit(model, data, default_data_collator, args, val=score)
    assert record["steps"] == 10 and len(record["loss_curve"]) == 10
    assert [s for s, _ in record["val_curve"]] == checkpoint_steps(10)
    assert modes.count(True) == 10  # each optimiser step ran in train mode, scoring in between notwithstanding
    chosen = dict(map(tuple, record["val_curve"]))[record["selected_step"]]
    assert score(model)["accuracy"] == pytest.approx(chosen)
    assert chosen == max(a for _, a in record["val_curve"])


def test_default_step_count_follows_the_training_size() -> None:
    from kradapter.finetune.protocol import FIT_EPOCHS, MIN_FIT_STEPS, fit_steps

    assert [fit_steps(2 * k, 8) for k in (8, 32, 128)] == [MIN_FIT_STEPS, 64, 256]
    for size, batch in [(1, 1), (7, 3), (97, 8), (1000, 13)]:
        steps = fit_steps(size, batch)
        assert steps >= MIN_FIT_STEPS and steps * batch >= FIT_EPOCHS * size  # at least FIT_EPOCHS passes
        assert steps == MIN_FIT_STEPS or (steps - 1) * batch < FIT_EPOCHS * (size + batch)  # and not many more
    with pytest.raises(SettingsError, match="batch_size must be a positive integer, got 0"):
        fit_steps(10, 0)
