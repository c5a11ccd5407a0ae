"""Reference rows beside the fine-tuned methods: the majority class, and a linear probe on the frozen embedding.

Neither is a registry method (nothing is adapted or trained through the Trainer); each returns a record with one
entry per evaluation set, ``{"accuracy", "macro_f1", "loss", "predictions"}``, the same fields a fine-tuned run
records, so every table can show them beside the adapters.

- :func:`majority`: every text gets the most frequent training class (ties: the lowest class index); its
  probabilities, for the loss, are the training class frequencies with add-one smoothing (balanced k-shot data:
  uniform, loss ``ln(num_classes)``).
- :func:`linear_probe`: scikit-learn's ``LogisticRegression`` (L2, lbfgs, multinomial) on the frozen encoder's
  native embedding (:func:`kradapter.finetune.pooling.embed`), fitted on the training texts only, for each ``C`` of
  :data:`PROBE_C_GRID`; the ``C`` with the best validation accuracy is kept (ties: macro-F1, then lower loss,
  then the smaller ``C``). Deterministic: same inputs, same record.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..records import REFERENCE_ROWS
from .metrics import classification_metrics

MAJORITY, PROBE = REFERENCE_ROWS  # their names, as the results store validates their records
PROBE_C_GRID: tuple[float, ...] = tuple(float(10.0**e) for e in range(-3, 5))  # 1e-3 ... 1e4, 8 values
PROBE_MAX_ITER = 5000


def _labels(name: str, values: Any, num_classes: int) -> np.ndarray:
    labels = np.asarray(values)
    if labels.ndim != 1 or (not np.issubdtype(labels.dtype, np.integer) and len(labels)):
        raise ValueError(f"{name} must be a 1-D array of integer labels, got shape {labels.shape} {labels.dtype}")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name}: labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    return labels


def evaluation(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro-F1, loss and the per-item predictions (in the order of ``labels``)."""
    return {
        **classification_metrics(logits, labels, num_classes),
        "predictions": [int(p) for p in np.asarray(logits).argmax(axis=1)],
    }


def majority(train_labels: Any, eval_labels: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """The majority-class baseline: ``{"class": c, "priors": [...], NAME: evaluation, ...}`` per evaluation set."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    train = _labels("train_labels", train_labels, num_classes)
    if not len(train):
        raise ValueError("train_labels is empty: there is no majority class")
    counts = np.bincount(train, minlength=num_classes)
    priors = (counts + 1) / (counts.sum() + num_classes)
    chosen = int(np.argmax(counts))  # numpy's argmax: the first of equal counts, the lowest class index
    logits = np.log(priors)
    record: dict[str, Any] = {"class": chosen, "priors": [float(p) for p in priors]}
    for name, values in eval_labels.items():
        labels = _labels(f"eval_labels[{name!r}]", values, num_classes)
        record[name] = evaluation(np.tile(logits, (len(labels), 1)), labels, num_classes)
    return record


def _features(name: str, x: Any, n: int | None = None) -> np.ndarray:
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2 or (n is not None and len(array) != n):
        raise ValueError(f"{name} must be a 2-D array with one row per label, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has non-finite values")
    return array


def _logits(model: Any, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Log-probabilities over all ``num_classes`` (columns in class order)."""
    out = np.full((len(x), num_classes), -np.inf)
    out[:, model.classes_] = model.predict_log_proba(x)
    return out


def linear_probe(
    train_x: Any,
    train_y: Any,
    val_x: Any,
    val_y: Any,
    evals: Mapping[str, tuple[Any, Any]],
    num_classes: int,
    seed: int,
    *,
    c_grid: tuple[float, ...] = PROBE_C_GRID,
) -> dict[str, Any]:
    """Logistic regression on frozen features, ``C`` chosen on the validation set from ``c_grid``.

    Record: ``"C"`` (chosen), ``"trials"`` ``[{"C", "val_accuracy", "val_macro_f1", "val_loss"}, ...]`` in grid
    order, ``"val"`` (the chosen model's validation scores), ``"converged"``, and one evaluation per entry of
    ``evals`` (``NAME -> (x, y)``).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not c_grid or not all(np.isfinite(c) and c > 0 for c in c_grid) or len(set(c_grid)) != len(c_grid):
        raise ValueError(f"c_grid must be distinct positive numbers, got {list(c_grid)}")
    ty = _labels("train_y", train_y, num_classes)
    vy = _labels("val_y", val_y, num_classes)
    tx, vx = _features("train_x", train_x, len(ty)), _features("val_x", val_x, len(vy))
    if len(np.unique(ty)) < 2:
        raise ValueError("train_y has fewer than two classes: a probe cannot be fitted")
    if not len(vy):
        raise ValueError("val_y is empty: C cannot be chosen")
    if vx.shape[1] != tx.shape[1]:
        raise ValueError(f"val_x has {vx.shape[1]} features, train_x {tx.shape[1]}")
    trials, best = [], None
    for c in sorted(c_grid):
        model = LogisticRegression(C=c, max_iter=PROBE_MAX_ITER, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # recorded below instead
            model.fit(tx, ty)
        scores = classification_metrics(_logits(model, vx, num_classes), vy, num_classes)
        trials.append({"C": c, "val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"],
                       "val_loss": scores["loss"]})  # fmt: skip
        key = (scores["accuracy"], scores["macro_f1"], -scores["loss"])
        if best is None or key > best[0]:  # strict: the smaller C keeps a tie
            best = (key, c, model, scores)
    assert best is not None
    _, chosen, model, val = best
    record: dict[str, Any] = {
        "C": chosen,
        "trials": trials,
        "val": val,
        "converged": bool(np.all(model.n_iter_ < PROBE_MAX_ITER)),
        "features": int(tx.shape[1]),
    }
    for name, (x, y) in evals.items():
        labels = _labels(f"evals[{name!r}] labels", y, num_classes)
        record[name] = evaluation(_logits(model, _features(f"evals[{name!r}]", x, len(labels)), num_classes),
                                  labels, num_classes)  # fmt: skip
    return record
