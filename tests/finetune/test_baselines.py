"""The reference rows: majority class and the linear probe, against hand-made and independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kradapter.finetune.baselines import MAJORITY, PROBE, PROBE_C_GRID, linear_probe, majority


def test_names_and_grid() -> None:
    assert (MAJORITY, PROBE) == ("majority", "linear_probe")
    assert len(PROBE_C_GRID) >= 7
    ratios = np.diff(np.log10(PROBE_C_GRID))
    assert np.allclose(ratios, ratios[0]) and ratios[0] > 0  # a log grid


def test_majority_on_a_hand_made_label_vector() -> None:
    train = np.array([2, 0, 2, 1, 2, 0])  # class 2 three times
    evals = {"test": np.array([2, 2, 0, 1]), "shifted": np.array([0, 1, 1])}
    record = majority(train, evals, 4)
    assert record["class"] == 2
    assert record["test"]["predictions"] == [2, 2, 2, 2] and record["shifted"]["predictions"] == [2, 2, 2]
    assert record["test"]["accuracy"] == 0.5 and record["shifted"]["accuracy"] == 0.0
    # macro-F1 by hand: test has class 2 with TP 2, FP 2 -> F1 2/3; other classes 0; four classes -> (2/3) / 4.
    assert record["test"]["macro_f1"] == pytest.approx((2 / 3) / 4)
    # Loss: training frequencies with add-one smoothing, (3+1)/(6+4) for class 2, (2+1)/10 for 0, (1+1)/10 for 1.
    expected = -np.mean(np.log([0.4, 0.4, 0.3, 0.2]))
    assert record["test"]["loss"] == pytest.approx(expected)


def test_majority_ties_take_the_lowest_class_and_bad_labels_are_named() -> None:
    record = majority(np.array([1, 0, 1, 0]), {"test": np.array([0, 1])}, 2)
    assert record["class"] == 0 and record["test"]["loss"] == pytest.approx(math.log(2))  # balanced: chance loss
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1, got 0\.\.2"):
        majority(np.array([0, 2]), {}, 2)
    with pytest.raises(ValueError, match="train_labels is empty"):
        majority(np.array([], dtype=int), {}, 2)


def blobs(rng: np.random.Generator, n: int, width: int, classes: int, separation: float):
    centres = rng.normal(size=(classes, width)) * separation
    y = np.arange(n) % classes
    return centres[y] + rng.normal(size=(n, width)), y


def test_probe_separates_separable_data(generator) -> None:
    rng = np.random.default_rng(int(generator.initial_seed()) % 2**32)
    x, y = blobs(rng, 300, 17, 3, separation=12.0)  # far-apart clusters: linearly separable with a wide margin
    record = linear_probe(x[:90], y[:90], x[90:150], y[90:150], {"test": (x[150:], y[150:])}, 3, seed=0)
    assert record["test"]["accuracy"] == 1.0 and record["val"]["accuracy"] == 1.0
    assert record["test"]["predictions"] == y[150:].tolist()
    assert [t["C"] for t in record["trials"]] == sorted(PROBE_C_GRID)


def test_probe_on_random_labels_is_near_chance(generator) -> None:
    rng = np.random.default_rng(int(generator.initial_seed()) % 2**32)
    x = rng.normal(size=(2600, 9))
    y = rng.integers(0, 2, 2600)
    record = linear_probe(x[:300], y[:300], x[300:600], y[300:600], {"test": (x[600:], y[600:])}, 2, seed=0)
    # 2000 test items: a chance classifier's accuracy has sd 0.011; 0.05 is over four of them.
    assert abs(record["test"]["accuracy"] - 0.5) < 0.05


def test_the_chosen_c_is_the_grids_best_on_validation_and_deterministic(generator) -> None:
    rng = np.random.default_rng(int(generator.initial_seed()) % 2**32)
    x, y = blobs(rng, 160, 40, 4, separation=0.35)  # overlapping classes: C matters
    flip = rng.random(160) < 0.2
    y = np.where(flip, rng.integers(0, 4, 160), y)
    args = (x[:40], y[:40], x[40:100], y[40:100], {"test": (x[100:], y[100:])}, 4)
    record = linear_probe(*args, seed=3)
    assert record == linear_probe(*args, seed=3)
    # Independently: refit each C with scikit-learn and score on validation; the record's choice is the best
    # (accuracy, then macro-F1, then lower loss; the smaller C of exact ties).
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    keys = []
    for c in sorted(PROBE_C_GRID):
        model = LogisticRegression(C=c, max_iter=5000, random_state=3).fit(x[:40], y[:40])
        predicted = model.predict(x[40:100])
        accuracy = accuracy_score(y[40:100], predicted)
        f1 = f1_score(y[40:100], predicted, average="macro", labels=range(4), zero_division=0)
        loss = log_loss(y[40:100], model.predict_proba(x[40:100]), labels=range(4))
        keys.append(((round(accuracy, 9), round(f1, 9), -loss), c))
    best = max(keys, key=lambda k: k[0])[0]
    expected = min(c for key, c in keys if key == best)
    assert record["C"] == expected
    assert [t["val_accuracy"] for t in record["trials"]] == pytest.approx([k[0][0] for k in keys])


def test_probe_refuses_bad_input() -> None:
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match="fewer than two classes"):
        linear_probe(x, [1, 1, 1, 1], x, [0, 1, 0, 1], {}, 2, 0)
    with pytest.raises(ValueError, match="val_x has 2 features"):
        linear_probe(x, [0, 1, 0, 1], np.zeros((4, 2)), [0, 1, 0, 1], {}, 2, 0)
    with pytest.raises(ValueError, match="c_grid must be distinct positive"):
        linear_probe(x, [0, 1, 0, 1], x, [0, 1, 0, 1], {}, 2, 0, c_grid=(1.0, -1.0))
