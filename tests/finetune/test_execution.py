"""The finetune execution on the executor layer: the tuning rule (pure, on fake scores), validation draws,
per-item predictions, and whole runs of ``kradapter finetune`` on MiniLM: sequential and Ray give the same
records bit for bit, ``--resume`` crosses executors, a failed unit exits 1 and is retried."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kradapter.cli import main
from kradapter.finetune import data as splits
from kradapter.finetune import runner
from kradapter.finetune.data import load_corpus, validation
from kradapter.finetune.plan import validation_draw
from kradapter.finetune.runner import (
    EXTRA_TRIALS,
    best_rate,
    grid_ratio,
    next_rate,
    on_edge,
    predictions_and_metrics,
    tuning_sequence,
    tuning_trials,
)

GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def peak(at: float, width: float = 1.0):
    """A fake validation score: a smooth bump in log-rate, highest at ``at``."""
    return lambda lr: (math.exp(-(((math.log10(lr) - math.log10(at)) / width) ** 2)), 0.0, 0.0)


# -- the schedule ---------------------------------------------------------------------------------------------------


class _Graph(runner.Execution):
    """An execution whose units are a dependency graph: ``early`` and ``late`` lists of ``(key, needs)``, a unit
    ready once every key it needs finished (as a method's runs need its trials)."""

    def __init__(self, early: list[tuple[str, set[str]]], late: list[tuple[str, set[str]]]) -> None:
        self.graph = {True: early, False: late}
        self.finished_keys: set[str] = set()
        self.failed = {}

    def units(self, early: bool):  # type: ignore[no-untyped-def, override]
        for key, needs in self.graph[early]:
            if key not in self.finished_keys and key not in self.failed and needs <= self.finished_keys:
                yield SimpleNamespace(key=key)


def _drive(execution: _Graph, slots: int) -> tuple[list[str], list[list[str]]]:
    """Run ``execution`` as the executors do (``slots`` units in flight, each finishing in hand-out order, a new
    stream whenever one ends with nothing in flight): the order units start, and what was in flight at each start."""
    started: list[str] = []
    in_flight: list[str] = []
    beside: list[list[str]] = []
    stream = execution.stream()
    while True:
        while len(in_flight) < slots and (unit := next(stream, None)) is not None:
            beside.append(list(in_flight))
            started.append(unit.key)
            in_flight.append(unit.key)
        if not in_flight:
            if execution.next_unit(()) is None:
                return started, beside
            stream = execution.stream()
            continue
        execution.finished_keys.add(in_flight.pop(0))


def _cells(*names: str) -> list[tuple[str, set[str]]]:
    """Per cell: two trials one after the other (the second's rate needs the first's score), then two runs."""
    out: list[tuple[str, set[str]]] = []
    for c in names:
        out += [(f"{c}.t1", set()), (f"{c}.t2", {f"{c}.t1"}), (f"{c}.r1", {f"{c}.t2"}), (f"{c}.r2", {f"{c}.t2"})]
    return out


def test_one_slot_completes_each_cell_in_priority_order_before_the_others_methods() -> None:
    """One unit at a time: a cell's next trial and its runs start as soon as their inputs are in, so the cells
    finish one after another in priority order (no wave of every cell), and the later methods come last."""
    started, _ = _drive(_Graph(_cells("a", "b"), [("a.c1", set()), ("b.c1", set())]), slots=1)
    assert started == ["a.t1", "a.t2", "a.r1", "a.r2", "b.t1", "b.t2", "b.r1", "b.r2", "a.c1", "b.c1"]


def test_two_slots_fill_from_the_next_cell_and_hold_the_others_until_the_first_are_done() -> None:
    """Two at once: while a cell's trial runs, the next cell's starts beside it (no idle slot); a later method's
    unit never starts while a first method's unit is left to run or running; every unit runs once."""
    late = [("a.c1", set()), ("a.c2", set())]
    started, beside = _drive(_Graph(_cells("a", "b", "c"), late), slots=2)
    assert sorted(started) == sorted(k for k, _ in _cells("a", "b", "c") + late) and len(set(started)) == len(started)
    assert started[:2] == ["a.t1", "b.t1"]
    for key, running in zip(started, beside, strict=True):
        if key.startswith("a.c"):
            assert all(k.startswith("a.c") for k in running), (key, running)
    first = [started.index(f"{c}.r2") for c in "abc"]
    assert first == sorted(first)  # the cells' last runs start in priority order


def test_a_failed_unit_is_not_handed_out_again_and_does_not_hold_the_others() -> None:
    execution = _Graph([("a.t1", set()), ("a.r1", {"a.t1"})], [("a.c1", set())])
    execution.failed = {"a.t1": "boom"}
    started, _ = _drive(execution, slots=2)
    assert started == ["a.c1"]


# -- the tuning rule ------------------------------------------------------------------------------------------------


def test_best_on_an_edge_extends_outward_by_the_grid_ratio() -> None:
    ratio = grid_ratio(GRID)
    rising = tuning_sequence(GRID, len(GRID) + EXTRA_TRIALS, lambda lr: (lr, 0.0, 0.0))
    assert rising[: len(GRID)] == list(GRID)
    assert rising[5] == pytest.approx(1e-2 * ratio, rel=1e-2) and rising[6] == pytest.approx(1e-2 * ratio**2, rel=1e-2)
    falling = tuning_sequence(GRID, len(GRID) + EXTRA_TRIALS, lambda lr: (-lr, 0.0, 0.0))
    assert falling[5] == pytest.approx(1e-4 / ratio, rel=1e-2) and falling[6] < falling[5]
    assert on_edge(rising, best_rate({lr: (lr, 0.0, 0.0) for lr in rising}))


def test_best_inside_refines_at_the_midpoint_towards_the_better_neighbour() -> None:
    rates = tuning_sequence(GRID, 7, peak(1.6e-3))  # best tried 1e-3; 3e-3 scores better than 3e-4
    assert rates[5] == pytest.approx(math.sqrt(1e-3 * 3e-3), rel=1e-2)
    scores = {lr: peak(1.6e-3)(lr) for lr in rates}
    assert rates[6] not in rates[:6] and not on_edge(rates, best_rate(scores))
    # the best is then a tried rate between the grid's edges
    assert 3e-4 < best_rate(scores) < 3e-3


def test_ties_go_to_accuracy_then_macro_f1_then_loss_then_the_lower_rate() -> None:
    scores = {1e-3: (0.8, 0.7, -0.5), 3e-3: (0.8, 0.75, -0.9), 1e-2: (0.8, 0.75, -0.4), 3e-2: (0.7, 0.9, -0.1)}
    assert best_rate(scores) == 1e-2
    assert best_rate({1e-3: (0.5, 0.5, -1.0), 1e-2: (0.5, 0.5, -1.0)}) == 1e-3


def test_every_method_gets_the_same_number_of_trials_and_never_a_rate_twice(rng: random.Random) -> None:
    grids = {"lora": GRID, "loha": (1e-3, 1e-2, 1e-1), "kradapter": (2e-4, 2e-3, 2e-2, 2e-1), "full": (1e-5,)}
    settings = SimpleNamespace(methods=tuple(grids), grid=grids.__getitem__)
    trials = tuning_trials(SimpleNamespace(settings=settings))
    assert trials == len(GRID) + EXTRA_TRIALS
    for method, grid in grids.items():
        if len(grid) == 1:
            continue  # one rate: nothing to tune
        rates = tuning_sequence(grid, trials, lambda lr: (round(rng.random(), 1), round(rng.random(), 1), 0.0))
        assert len(rates) == trials, method
        assert len({f"{lr:g}" for lr in rates}) == trials, (method, rates)


def test_next_rate_is_new_even_when_midpoints_round_onto_tried_rates() -> None:
    scores = {1e-3: (0.5, 0, 0), 1.001e-3: (0.9, 0, 0), 1.002e-3: (0.5, 0, 0)}
    lr = next_rate(scores, grid_ratio((1e-3, 1e-2)))
    assert f"{lr:g}" not in {f"{r:g}" for r in scores}


# -- validation draws and predictions -------------------------------------------------------------------------------


def test_validation_draw_is_finetunes_draw_when_there_is_room_and_all_spare_texts_otherwise(rng: random.Random) -> None:
    labels = np.array([rng.randrange(3) for _ in range(97)])
    pool, _ = splits.test_split(labels)
    train = np.sort(np.concatenate([np.flatnonzero(labels[pool] == c)[:4] for c in range(3)]))
    train = pool[train]
    assert np.array_equal(validation_draw(labels, pool, train, 3, 7), validation(labels, pool, train, 3, 7))
    capped = validation_draw(labels, pool, train, 10_000, 7)
    assert np.array_equal(capped, np.setdiff1d(pool, train))  # every spare text of every class
    assert not set(capped) & set(train)
    assert not np.array_equal(validation_draw(labels, pool, train, 3, 7), validation_draw(labels, pool, train, 3, 8))


def test_predictions_are_the_argmax_and_agree_with_accuracy(rng: random.Random) -> None:
    n, k = 53, 3
    logits = np.array([[rng.gauss(0, 1) for _ in range(k)] for _ in range(n)])
    labels = np.array([rng.randrange(k) for _ in range(n)])
    out = predictions_and_metrics(logits, labels, k)
    assert all(isinstance(p, int) for p in out["predictions"]) and len(out["predictions"]) == n
    assert out["predictions"] == [int(np.argmax(row)) for row in logits]
    assert out["accuracy"] == pytest.approx(np.mean(np.array(out["predictions"]) == labels))


# -- the commands' executor flags -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["finetune", "shift"])
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "2"], "--workers 2 needs --executor ray"),
        (["--ray-address", "127.0.0.1:1"], "--ray-address 127.0.0.1:1 needs --executor ray"),
        (["--executor", "ray", "--workers", "0"], "--workers: expected a whole number >= 1, got '0'"),
        (["--executor", "dask"], "invalid choice: 'dask'"),
        (["--threads-per-unit", "0"], "--threads-per-unit: expected a whole number >= 1"),
    ],
)
def test_bad_executor_flags_are_one_line_errors_before_any_work(command, flags, message, tmp_path: Path, capsys):
    out = tmp_path / "out"
    try:
        code = main([command, "--out", str(out), "--device", "cpu", *flags])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not out.exists()


# -- whole runs -----------------------------------------------------------------------------------------------------

WORDS = {
    "sport": "match goal team league player coach score win season cup striker keeper",
    "tech": "software chip phone internet computer data network code device robot server app",
}
FILLER = "the a of and to in on for with by at from"
TIMING = {"train_time_s", "peak_memory_mb", "resident_before_mb", "memory_kind", "head_feature_time_s"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random()
    for name, words in WORDS.items():
        (root / name).mkdir()
        for i in range(16):
            text = " ".join(rng.choice((words if rng.random() < 0.6 else FILLER).split()) for _ in range(20))
            (root / name / f"{i:03d}.txt").write_text(text)
    return root


def finetune(corpus: Path, model: str, out: Path, *extra: str) -> int:
    args = ["finetune", "--data", str(corpus), "--model", model, "--out", str(out), "--shots", "4", "--quiet"]
    args += ["--val-shots", "3", "--epochs", "2", "--batch-size", "4", "--max-length", "24", "--device", "cpu"]
    return main([*args, "--seeds", "0", "1", *extra])


def records(out: Path) -> dict[tuple, dict]:
    """The run folder's records by key, timing fields left out."""
    found = {}
    for line in (out / "records.jsonl").read_text().splitlines():
        entry = json.loads(line)
        record = entry["record"]
        found[tuple(entry["key"])] = (
            {k: v for k, v in record.items() if k not in TIMING} if isinstance(record, dict) else record
        )
    return found


def files(out: Path) -> dict[str, object]:
    """The saved adapters' files as bytes; PEFT's config as JSON with its target modules sorted (PEFT writes a
    set, in an order that varies from process to process with Python's string hashing)."""
    found: dict[str, object] = {}
    for p in sorted((out / "adapters").rglob("*")):
        if p.name == "adapter_config.json":
            config = json.loads(p.read_text())
            config["target_modules"] = sorted(config["target_modules"])
            found[p.relative_to(out).as_posix()] = config
        elif p.is_file():
            found[p.relative_to(out).as_posix()] = p.read_bytes()
    return found


@pytest.mark.slow
def test_sequential_and_ray_give_the_same_records_and_resume_crosses_executors(
    corpus: Path, minilm_path: str, tmp_path: Path
) -> None:
    pytest.importorskip("ray")
    grids = ["--lr-grid", "kradapter=1e-3,1e-2", "--methods", "kradapter"]  # one method: a Ray start is costly here
    seq, ray = tmp_path / "seq", tmp_path / "ray"
    assert finetune(corpus, minilm_path, seq, *grids, "--threads-per-unit", "1") == 0
    assert finetune(corpus, minilm_path, ray, *grids, "--executor", "ray", "--workers", "2") == 0
    mine, theirs = records(seq), records(ray)
    assert mine == theirs  # metrics, predictions, norms, every trial: bit for bit
    assert files(seq) == files(ray)  # the saved adapters too
    # four trials per method (2 rates + 2 adaptive), each recorded, and the choice with its trials
    for method in ("kradapter",):
        trials = [k for k in mine if k[:2] == ("sweep", method)]
        assert len(trials) == 2 + EXTRA_TRIALS
        chosen = mine[("chosen", method)]
        assert [t["lr"] for t in chosen["trials"]] == sorted(mine[k]["lr"] for k in trials)
        assert chosen["lr"] == best_rate(
            {t["lr"]: (t["val_accuracy"], t["val_macro_f1"], -t["val_loss"]) for t in chosen["trials"]}
        )
        assert chosen["on_edge"] == on_edge([t["lr"] for t in chosen["trials"]], chosen["lr"])
    # predictions agree with the recorded accuracy, against labels recomputed from the data
    corpus_data = load_corpus(corpus)
    _, test = splits.test_split(corpus_data.labels)
    for key, record in mine.items():
        if key[0] != "run":
            continue
        predictions = np.array(record["test"]["predictions"])
        assert len(predictions) == len(test)
        assert record["test"]["accuracy"] == pytest.approx(np.mean(predictions == corpus_data.labels[test]))
        # the update's norm is that of the per-layer updates; intruders are summed over layers
        norms = [row["frobenius_norm"] for row in record["updates"]]
        assert record["update_norm"] == pytest.approx(math.sqrt(sum(n * n for n in norms)), rel=1e-6)
        assert record["intruders"] == sum(row["intruders"] for row in record["updates"]) >= 0
    assert mine[("run", "kradapter", 0)]["from_sweep"] is True

    # resume across executors: drop the last records of the Ray run, finish it sequentially (and vice versa)
    for folder, executor in ((ray, ["--threads-per-unit", "1"]), (seq, ["--executor", "ray", "--workers", "2"])):
        lines = (folder / "records.jsonl").read_text().splitlines(keepends=True)
        (folder / "records.jsonl").write_text("".join(lines[:-3]))
        assert finetune(corpus, minilm_path, folder, *grids, "--resume", *executor) == 0
        assert records(folder) == mine


def flaky_train_unit(context, job):
    """A unit function (module level, as units must be) whose seed-1 runs fail."""
    if job.seed == 1:
        raise RuntimeError("disk on fire\nsecond line")
    return REAL_TRAIN_UNIT(context, job)


REAL_TRAIN_UNIT = runner.train_unit


@pytest.mark.slow
def test_a_failed_unit_exits_1_naming_it_and_resume_retries_it(
    corpus: Path, minilm_path: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    out = tmp_path / "out"
    flags = ["--methods", "head", "--lr-grid", "head=1e-1", "--threads-per-unit", "1"]
    real = runner.train_unit
    monkeypatch.setattr(runner, "train_unit", flaky_train_unit)
    assert finetune(corpus, minilm_path, out, *flags) == 1
    err = capsys.readouterr().err
    assert "unit run head 1 failed: RuntimeError: disk on fire" in err and "second line" not in err
    assert ("run", "head", 1) not in records(out)  # no record: --resume runs it again
    failed = json.loads((out / "run.json").read_text())["invocations"][-1]["failed_units"]
    assert failed == [{"key": ["run", "head", 1], "reason": "RuntimeError: disk on fire"}]
    monkeypatch.setattr(runner, "train_unit", real)
    first = records(out)[("run", "head", 0)]
    assert finetune(corpus, minilm_path, out, *flags, "--resume") == 0
    done = records(out)
    assert "error" not in done[("run", "head", 1)] and done[("run", "head", 1)]["test"]["predictions"]
    assert done[("run", "head", 0)] == first  # the finished unit is not run again


@pytest.mark.slow
def test_a_one_rate_choice_lost_to_a_kill_is_recorded_again_on_resume(
    corpus: Path, minilm_path: str, tmp_path: Path
) -> None:
    """A method with one rate records its choice right after its first run; a driver killed between the two
    appends leaves the run without it (one seed: no later run to add it): ``--resume`` records it again."""
    out = tmp_path / "out"
    flags = ["--methods", "head", "--lr-grid", "head=1e-1", "--seeds", "0", "--threads-per-unit", "1"]
    assert finetune(corpus, minilm_path, out, *flags) == 0
    whole = records(out)
    assert whole[("chosen", "head")] == {"lr": 0.1, "trials": [], "on_edge": False}
    lines = (out / "records.jsonl").read_text().splitlines(keepends=True)
    assert json.loads(lines[-1])["key"] == ["chosen", "head"]
    (out / "records.jsonl").write_text("".join(lines[:-1]))  # the kill: the run's record on disk, not the choice
    assert finetune(corpus, minilm_path, out, *flags, "--resume") == 0
    assert records(out) == whole
