"""The shift study's settings: learning-rate grids, benchmarks and groups, methods per cell, presets, and the
one-line errors every bad input gets before any work."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from kradapter import registry
from kradapter.cli import main
from kradapter.finetune import shift_settings as ss
from kradapter.finetune.protocol import Recipe, SettingsError
from kradapter.finetune.shift_cli import build_parser, settings_from

ROOT = Path(__file__).resolve().parents[2]
RECIPE = Recipe(val_shots=100, device="cpu")
# The three-rate grids every method had before the tuning redesign; each new grid must bracket its old one.
OLD_GRIDS = {
    "lora": (1e-3, 3e-3, 1e-2),
    "sinlora": (3e-4, 1e-3, 3e-3),
    "kradapter": (1e-3, 3e-3, 1e-2),
    "randlora": (3e-4, 1e-3, 3e-3),
    "kronecker": (1e-3, 3e-3, 1e-2),
    "loha": (1e-3, 3e-3, 1e-2),
    "shira": (1e-3, 3e-3, 1e-2),
    "hira": (3e-3, 1e-2, 3e-2),
    "gralora": (1e-3, 3e-3, 1e-2),
    "c3a": (1e-2, 3e-2, 1e-1),
    "head": (1e-2, 3e-2, 1e-1),
    "full": (1e-4, 3e-4, 1e-3),
}


def settings(**overrides) -> ss.StudySettings:
    return ss.StudySettings(RECIPE, **({"benchmarks": ("sentiment",), "methods": ("lora", "kradapter")} | overrides))


# -- grids --------------------------------------------------------------------------------------------------------


def test_every_grid_has_five_half_decade_rates_bracketing_the_old_three() -> None:
    trained = [m for m in registry.METHODS.values() if m.kind in ("adapter", "baseline")]
    assert {m.name for m in trained} == set(OLD_GRIDS)  # a new method needs its old grid added here (none: its own)
    for m in trained:
        grid = np.asarray(m.lr_grid, dtype=np.float64)
        assert grid.size >= ss.MIN_GRID_RATES >= 5, m.name
        assert np.allclose(np.diff(np.log10(grid)), 0.5, rtol=0, atol=1e-12), m.name  # log-spaced, half decades
        old = OLD_GRIDS[m.name]
        assert grid.min() < min(old) and max(old) < grid.max(), m.name  # at least one rate beyond each old edge
        assert ss.is_log_spaced(m.lr_grid)


@pytest.mark.parametrize("centre", [-4.5, -3.0, -2.5, -1.0])
def test_half_decades_against_powers_of_ten(centre: float) -> None:
    for rates in (5, 6, 7):
        grid = registry.half_decades(centre, rates)
        exponents = np.log10(np.asarray(grid))
        assert len(grid) == rates and np.allclose(np.diff(exponents), 0.5)
        assert math.isclose(exponents[rates // 2], centre, abs_tol=1e-12)  # centred (the upper middle)
    with pytest.raises(registry.MethodError, match=r"whole or half decade, got 10\^-2\.3"):
        registry.half_decades(-2.3)


def test_compare_does_not_read_learning_rate_grids() -> None:
    """``kradapter compare`` fits matrices, not classifiers: changing the grids cannot change its results."""
    for path in sorted((ROOT / "src" / "kradapter" / "compare").rglob("*.py")):
        names = {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)}
        names |= {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)}
        assert not names & {"lr_grid", "half_decades", "LearningRates"}, path


@pytest.mark.parametrize(
    ("grids", "message"),
    [
        ({"lora": (1e-3, 1e-2, 1e-1, 1.0)}, "--lr-grid lora: 4 rates; the study's tuning rule needs at least 5"),
        ({"lora": (1e-4, 1e-3, 2e-3, 1e-2, 1e-1)}, "are not log-spaced"),
        ({"lora": (1e-3,)}, "--lr-grid gives lora one rate while kradapter are tuned"),
        ({"lora": tuple(10.0 ** (-k / 2) for k in range(4, 10))}, "grids of different lengths (lora 6, kradapter 5)"),
        ({"loha": registry.half_decades(-3)}, "--lr-grid names 'loha', which is not in --methods"),
    ],
)
def test_grids_the_tuning_rule_cannot_honour_are_refused(grids, message) -> None:
    with pytest.raises(SettingsError) as caught:
        settings(lr_grids=grids)
    assert message in str(caught.value)


def test_grids_the_tuning_rule_accepts() -> None:
    one_three = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # the usual 1-3-10 spelling of half decades
    s = settings(lr_grids={"lora": tuple(reversed(one_three))})
    assert s.grid("lora") == one_three and s.tuned  # kept ascending
    assert s.trials("lora") == s.trials("kradapter") == 5 + ss.EXTRA_TRIALS
    fixed = settings(lr_grids={"lora": (1e-3,), "kradapter": (3e-3,)})  # one rate each: no tuning, no trials
    assert not fixed.tuned and fixed.trials("lora") == 0


# -- benchmarks ---------------------------------------------------------------------------------------------------


def test_the_newsgroups_group_expands_to_the_six_tasks_in_place() -> None:
    s = settings(benchmarks=("topic", "newsgroups", "sentiment"))
    assert s.benchmarks == ("topic", *ss.NEWSGROUP_TASKS, "sentiment")
    assert len(ss.NEWSGROUP_TASKS) == 6 and all(b in ss.BENCHMARKS for b in ss.NEWSGROUP_TASKS)


@pytest.mark.parametrize(
    ("benchmarks", "message"),
    [
        (("sentiment", "images"), "--benchmarks: unknown ['images']; choose from sentiment, topic, ng_comp_rec"),
        (("news",), "or a group (newsgroups = 6 tasks)"),
        ((), "--benchmarks: unknown none given"),
        (("newsgroups", "ng_rec_sci"), "--benchmarks names ng_rec_sci twice (directly or through a group)"),
    ],
)
def test_bad_benchmarks_are_named(benchmarks, message) -> None:
    with pytest.raises(SettingsError) as caught:
        settings(benchmarks=benchmarks)
    assert message in str(caught.value)


# -- methods and cells --------------------------------------------------------------------------------------------


def test_head_and_full_are_accepted_and_full_runs_in_the_anchor_cell_only() -> None:
    (full,) = registry.tagged("shift-anchor-cell")
    s = settings(methods=("lora", "kradapter", "head", full), contenders=("loha",), shots=(8, 32, 128), budgets=(1, 4))
    cells = [(c.id, c.methods) for c in s.cells("ng_comp_sci")]
    assert cells == [
        ("k32_x1", ("lora", "kradapter", "head", full, "loha")),
        ("k8_x1", ("lora", "kradapter", "head")),
        ("k128_x1", ("lora", "kradapter", "head")),
        ("k32_x4", ("lora",)),  # only adapters scale; the anchor cannot
    ]
    assert all(c.baselines == ss.BASELINES == ("majority", "linear_probe") for c in s.cells("sentiment"))
    assert not set(ss.BASELINES) & set(registry.METHODS)  # reference rows, never methods or flags


def test_bad_methods_and_seeds_are_named() -> None:
    cases = [
        ({"methods": ("lora", "loha")}, "--methods lora loha must include kradapter"),
        ({"methods": ("kradapter",)}, "at least one other method"),
        ({"methods": ("kradapter", "majority")}, "unknown method 'majority'"),
        ({"seeds": (3,)}, "paired intervals need at least 2 seeds, got [3]"),
        ({"seeds": tuple(range(5)), "preset": "powered"}, "powered preset's verdicts need at least 6 seeds"),
        ({"preset": "huge"}, "--preset: unknown 'huge'"),
    ]
    for overrides, message in cases:
        with pytest.raises(SettingsError) as caught:
            settings(**overrides)
        assert message in str(caught.value), overrides


# -- presets ------------------------------------------------------------------------------------------------------


def preset_settings(name: str, *extra: str) -> tuple[ss.StudySettings, object]:
    args = build_parser().parse_args(["--preset", name, *extra])
    return settings_from(args), args


@pytest.mark.parametrize("name", list(ss.PRESETS))
def test_every_preset_is_valid_and_records_its_name(name: str) -> None:
    s, args = preset_settings(name)
    p = ss.PRESETS[name]
    assert s.preset == name and s.run_spec({}).settings["preset"] == name
    assert s.recipe.val_shots == p["val_shots"] == args.val_shots and args.steps == p["steps"]
    assert p["steps"] is None and s.recipe.steps is None  # each cell's fit_steps (protocol.fit_steps)
    assert s.tuned and all(s.trials(m) == ss.MIN_GRID_RATES + ss.EXTRA_TRIALS for m in s.every_method)
    assert ss.ANCHOR in s.methods and s.estimate() > 0


def test_powered_is_the_pre_registered_study() -> None:
    s, _ = preset_settings("powered")
    assert set(s.methods) == {ss.ANCHOR, registry.reference_adapter()} == set(registry.tagged("shift-primary"))
    assert s.shots == (8, 32, 128) and s.budgets == (1,) and s.recipe.val_shots == 100
    assert s.benchmarks == ("sentiment", "topic", *ss.GROUPS["newsgroups"])
    assert s.seeds == tuple(range(20))  # the planning table's seeds, capped at 20
    everything_else = {*registry.tagged("shift-full"), *registry.tagged("shift-contender")} - set(s.methods)
    assert set(s.contenders) == everything_else and {"head", "full"} <= everything_else  # exploratory, anchor only
    assert all(set(c.methods) == set(s.methods) for b in s.benchmarks for c in s.cells(b)[1:])


def test_reduced_is_the_default_and_fits_twenty_minutes() -> None:
    s, args = preset_settings("reduced")
    assert build_parser().parse_args([]).preset == "reduced" == ss.DEFAULT_PRESET
    assert s.estimate(args.steps) <= 20 * 60
    work = s.workload(args.steps)
    assert sum(w["trainings"] for w in work.values()) == len(s.methods) * (7 + len(s.seeds)) * len(s.shots)


def test_the_workload_counts_by_hand() -> None:
    s = settings(benchmarks=("ng_rec_sci",), shots=(4, 8), budgets=(1, 2), seeds=(0, 1, 2), eval_per_class=10,
                 methods=("lora", "kradapter", "head"))  # fmt: skip
    # cells: k8_x1 (3 methods), k4_x1 (3 methods), k8_x2 (lora) -> 7 method-cells, 3 cells
    (work,) = s.workload(steps=50).values()
    trials = 5 + ss.EXTRA_TRIALS
    assert work["trainings"] == 7 * (trials + 3) and work["steps"] == 50 * work["trainings"]
    assert work["val_texts"] == work["trainings"] * ss.VAL_CHECKPOINTS * 100 * 2
    per_eval = 10 * 2 * 2  # 10 per class, 2 classes, ID test and target
    assert work["eval_texts"] == 7 * 3 * per_eval + 3 * 3 * (per_eval + 200)
    assert work["baseline_runs"] == 3 * 3 * 2


# -- the command line: one line, exit 2, nothing written ----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--benchmarks", "newsgroup"], "--benchmarks: unknown ['newsgroup']"),
        (["--lr-grid", "lora=1e-3,1e-2"], "--lr-grid lora: 2 rates; the study's tuning rule needs at least 5"),
        (["--steps", "0"], "--steps must be a positive integer, got 0"),
        (["--preset", "powered", "--seeds", "0", "1", "2"], "powered preset's verdicts need at least 6 seeds"),
        (["--methods", "kradapter", "head", "--val-shots", "-1"], "--val-shots must be a non-negative integer"),
    ],
)
def test_command_line_errors_before_any_work(argv, message, tmp_path: Path, capsys) -> None:
    assert main(["shift", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
