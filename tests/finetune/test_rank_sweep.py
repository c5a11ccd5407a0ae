"""The within-method rank sweep (``kradapter shift --preset ranks``): adapters at fixed sizes (``METHOD@KNOB=VALUE``)
parsed with one-line errors, built by PEFT at exactly the given rank or factorisation (adapter shapes and counts
against hand formulas), the report's within-method slope against an independent dummy-variable least-squares fit
on fresh random data, and a tiny study end to end."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats as sps
from torch import nn

from kradapter import registry
from kradapter.cli import main
from kradapter.finetune import shift_report as sr
from kradapter.finetune import shift_settings as ss
from kradapter.finetune.protocol import Recipe, SettingsError, parse_lr_grid, parse_methods
from kradapter.finetune.shift_cli import build_parser, settings_from

LORA, KR = registry.reference_adapter(), registry.anchor()

# -- spelling -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "canonical", "knobs"),
    [
        ("lora@r=4", "lora@r=4", {"r": 4}),
        (" LoRA@R=004 ", "lora@r=4", {"r": 4}),
        ("loha@r=32", "loha@r=32", {"r": 32}),
        ("kradapter@factorization=SQRT_MAX", "kradapter@factorization=sqrt_max", {"factorization": "sqrt_max"}),
        ("lokr@decompose_factor=4@r=2", "kronecker@r=2@decompose_factor=4", {"r": 2, "decompose_factor": 4}),
        ("kronecker@decompose_both=TRUE", "kronecker@decompose_both=true", {"decompose_both": True}),
    ],
)
def test_variants_parse_to_one_canonical_spelling(spelling: str, canonical: str, knobs: dict) -> None:
    v = registry.variant(spelling)
    assert v.name == canonical and v.knobs == knobs
    assert registry.variant(v.name).name == canonical  # canonical is a fixed point
    assert registry.family(canonical) == v.method.name and registry.entry(canonical) is v.method
    assert parse_methods([f"{KR},{spelling}", canonical]) == (KR, canonical)  # one entry, duplicates merged


@pytest.mark.parametrize(
    ("spelling", "message"),
    [
        ("dora@r=4", "unknown method 'dora'"),
        ("lora@rank=4", "lora@rank=4: unknown knob 'rank' of lora; its size knobs: r"),
        ("lora@lora_alpha=4", "unknown knob 'lora_alpha' of lora"),  # a setting, but not a size
        ("lora@r=0", "lora@r=0: r must be a positive integer, got 0"),
        ("lora@r=two", "lora@r=two: r must be a positive integer, got 'two'"),
        ("lora@r", "lora@r: 'r' is not KNOB=VALUE"),
        ("lora@", "lora@: '' is not KNOB=VALUE"),
        ("lora@r=2@r=4", "knob 'r' given twice"),
        ("kradapter@factorization=sqrt", "factorization must be one of sqrt_min, sqrt_max, got 'sqrt'"),
        ("head@r=2", "head@r=2: head has no size knobs"),
    ],
)
def test_bad_variants_are_one_line_errors_naming_the_part(spelling: str, message: str) -> None:
    with pytest.raises(registry.MethodError) as caught:
        registry.variant(spelling, ("adapter", "baseline"))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(SettingsError, match=r"^--methods: "):
        parse_methods([KR, spelling])


def test_compare_does_not_take_variants() -> None:
    """Only the fine-tuning studies size by a variant; the matrix study's own name parsing refuses one."""
    with pytest.raises(registry.MethodError, match="unknown method 'lora@r=4'"):
        registry.parse_names(["lora@r=4"])


def test_a_learning_rate_grid_names_a_variant_at_its_last_equals_sign() -> None:
    assert parse_lr_grid(["lora@r=4=1e-3,3e-3", "kradapter=0.01"]) == {"lora@r=4": (1e-3, 3e-3), KR: (0.01,)}
    with pytest.raises(SettingsError, match=r"^--lr-grid 'lora@r=4': lora@r: 'r' is not KNOB=VALUE"):
        parse_lr_grid(["lora@r=4"])  # no rate: the variant's own '=' is taken for the rates' one
    with pytest.raises(SettingsError, match=r"^--lr-grid 'lora@rank=2=1e-3': lora@rank=2: unknown knob 'rank'"):
        parse_lr_grid(["lora@rank=2=1e-3"])


@pytest.mark.parametrize(
    ("spelling", "shapes", "message"),
    [
        ("lora@r=8", [(7, 13), (29, 8)], "lora@r=8: r=8 is not a size lora can take on these layers (smallest 7 "
         "wide); r from 1 to 7"),
        ("gralora@r=3", [(8, 12), (16, 8)], "r=3 is not a size gralora can take"),  # its blocks must divide r
        ("kradapter@factorization=sqrt_max", [(0, 3)], "a layer shape must be two positive integers"),
    ],
)  # fmt: skip
def test_a_size_the_layers_cannot_honour_is_refused_when_sized(spelling: str, shapes: list, message: str) -> None:
    with pytest.raises(registry.MethodError) as caught:
        registry.plan(spelling, shapes, 1000)
    assert message in str(caught.value)


# -- what PEFT builds -------------------------------------------------------------------------------------------------


class Odd(nn.Module):
    """Two linear layers of odd, non-square shapes (prime sides)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(13, 31)  # weight (31, 13)
        self.down = nn.Linear(31, 17)  # weight (17, 31)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x))


SHAPES = {"up": (31, 13), "down": (17, 31)}  # (out_features, in_features)


def _built(spelling: str) -> tuple[registry.Plan, nn.Module]:
    from peft import get_peft_model

    sized = registry.plan(spelling, list(SHAPES.values()), 10_000)
    model = get_peft_model(Odd(), registry.entry(spelling).config(list(SHAPES), **sized.settings))
    return sized, model


def _trainable(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("r", [1, 5, 13])
def test_a_lora_variant_has_its_rank(r: int) -> None:
    sized, model = _built(f"lora@r={r}")
    shapes = _trainable(model)
    for layer, (out, inp) in SHAPES.items():
        assert shapes[f"base_model.model.{layer}.lora_A.default.weight"] == (r, inp)
        assert shapes[f"base_model.model.{layer}.lora_B.default.weight"] == (out, r)
    assert sized.count == sum(math.prod(s) for s in shapes.values()) == sum(r * (o + i) for o, i in SHAPES.values())
    assert sized.method == f"lora@r={r}" and sized.settings["r"] == r


@pytest.mark.parametrize("r", [2, 7])
def test_a_loha_variant_has_its_rank(r: int) -> None:
    sized, model = _built(f"loha@r={r}")
    shapes = _trainable(model)
    for layer, (out, inp) in SHAPES.items():
        for pair in ("1", "2"):
            assert shapes[f"base_model.model.{layer}.hada_w{pair}_a.default"] == (out, r)
            assert shapes[f"base_model.model.{layer}.hada_w{pair}_b.default"] == (r, inp)
    assert sized.count == sum(math.prod(s) for s in shapes.values()) == sum(2 * r * (o + i) for o, i in SHAPES.values())


@pytest.mark.parametrize("factorization", ["sqrt_min", "sqrt_max"])
def test_a_kradapter_variant_has_its_factorisation(factorization: str) -> None:
    sized, model = _built(f"kradapter@factorization={factorization}")
    shapes = _trainable(model)
    total = 0
    for layer, (out, inp) in SHAPES.items():
        m, big = min(out, inp), max(out, inp)
        r = math.isqrt(m if factorization == "sqrt_min" else big)  # the paper's two choices of the first width
        r2 = -(-big // r)  # the fewest columns with r * r2 >= M
        assert shapes[f"base_model.model.{layer}.kradapter_u.default"] == (m, r)
        assert shapes[f"base_model.model.{layer}.kradapter_v.default"] == (m, r2)
        total += m * (r + r2)
    assert sized.count == total == sum(math.prod(s) for s in shapes.values())


def test_variants_on_minilm_train_what_the_registry_counts(minilm_path: str) -> None:
    """The study's own path (probe, size, build): the built model's trainable count is the registry's plus the head."""
    from kradapter.finetune.models import count_params
    from kradapter.finetune.plan import probe_model, size_methods
    from kradapter.finetune.strategies import training_for

    probe = probe_model(Path(minilm_path), 2, None)
    names = ("lora@r=3", "kradapter@factorization=sqrt_max")
    sizes = size_methods(names, probe, registry.kradapter_budget(list(probe.layers.values())))
    lora = sizes["lora@r=3"]
    assert lora.count == sum(3 * (d + k) for d, k in probe.layers.values())
    model = training_for("lora@r=3").build(lora, list(probe.layers), Path(minilm_path), 2, 0)
    assert count_params(model) == lora.count + probe.head_params
    ranks = {p.shape[0] for n, p in model.named_parameters() if "lora_A" in n}
    assert ranks == {3}
    with pytest.raises(SettingsError, match=r"lora@r=385: r=385 is not a size lora can take .* r from 1 to 384"):
        size_methods(("lora@r=385",), probe, 1000)


# -- settings and the preset ---------------------------------------------------------------------------------------


def test_the_ranks_preset_is_one_cell_of_every_registry_sweep() -> None:
    s = settings_from(build_parser().parse_args(["--preset", "ranks"]))
    sweep = registry.sweep_variants()
    assert s.methods == (KR, *sweep) and s.preset == "ranks"
    assert {f"lora@r={2**i}" for i in range(9)} <= set(sweep)  # LoRA from 1 to 256
    assert "kradapter@factorization=sqrt_max" in sweep and sum(v.startswith("loha@") for v in sweep) >= 3
    (cell,) = s.cells("sentiment")
    assert (cell.shots, cell.budget, cell.methods) == (32, 1, s.methods)
    assert all(s.grid(v) == registry.entry(v).lr_grid for v in sweep)  # tuned as their method is
    assert s.estimate() > 0 and s.workload()["sentiment"]["trainings"] == len(s.methods) * (7 + len(s.seeds))


def test_variants_run_only_where_sizes_are_fixed() -> None:
    """Above 1x the budget scales the adapters; a variant has one size, so it runs in the 1x cells only."""
    s = ss.StudySettings(Recipe(val_shots=2), methods=(KR, LORA, "lora@r=2"), shots=(4, 8), budgets=(1, 4))
    assert [(c.id, c.methods) for c in s.cells("sentiment")] == [
        ("k8_x1", (KR, LORA, "lora@r=2")),
        ("k4_x1", (KR, LORA, "lora@r=2")),
        ("k8_x4", (LORA,)),
    ]
    assert s.run_spec({}).per_value["methods"]["lora@r=2"] == {"lr_grid": list(registry.METHODS[LORA].lr_grid)}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", KR, "lora@rank=2"], "--methods: lora@rank=2: unknown knob 'rank' of lora"),
        (["--methods", KR, "lora@r=-1"], "--methods: lora@r=-1: r must be a positive integer"),
        (["--preset", "ranks", "--lr-grid", "lora@r=2=1e-3"], "--lr-grid gives lora@r=2 one rate while"),
    ],
)
def test_command_line_errors_before_any_work(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main(["shift", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# -- the report's within-method slope ---------------------------------------------------------------------------------


def sweep_benchmarks(rng: np.random.Generator, within: float, seeds: int = 4) -> dict[str, Any]:
    """A benchmarks document of one cell: KRAdapter (two factorisations) and LoRA (plain and three ranks), runs with
    random effective ranks; OOD = family intercept + ``within`` x log(rank) + noise, the KRAdapter family's
    intercept far below LoRA's although its ranks are far higher (a between-family slope of the other sign)."""
    methods = {KR: (KR, 250.0), f"{KR}@factorization=sqrt_max": (KR, 350.0), LORA: (LORA, 7.0),
               "lora@r=1": (LORA, 1.0), "lora@r=16": (LORA, 14.0), "lora@r=64": (LORA, 50.0)}  # fmt: skip
    intercept = {KR: 0.2, LORA: 0.6}
    runs: dict[str, dict[str, Any]] = {}
    for method, (family, rank) in methods.items():
        runs[method] = {}
        for seed in range(seeds):
            erank = rank * float(np.exp(rng.normal(0, 0.1)))
            ood = intercept[family] + within * math.log(erank) / 100 + rng.normal(0, 0.01)
            fit = "underfit" if seed == 3 else "fit"
            runs[method][str(seed)] = {
                "scores": {"id": ood + 0.1, "ood": ood},
                "fit": fit,
                "effective_rank": erank,
                "update_norm": float(rng.uniform(1, 3)),
                "intruders": int(rng.integers(4)),
            }
    runs["majority"] = {str(s): {"scores": {"id": 0.5, "ood": 0.5}, "fit": "unknown"} for s in range(seeds)}
    sizes = {m: {"knobs": registry.variant(m).knobs if registry.is_variant(m) else {}, "adapter_params": 100}
             for m in methods}  # fmt: skip
    cell = {"shots": 32, "budget": 1, "runs": runs, "methods": sizes, "chosen": {}}
    return {"sentiment": {"cells": {"k32_x1": cell}, "domains": ["a"]}}


def dummy_least_squares(y: np.ndarray, x: np.ndarray, families: list[str]) -> tuple[float, float, float, float]:
    """Slope of ``y`` on ``x`` with one dummy per family (no common intercept), by numpy's lstsq; its t interval and
    two-sided p."""
    names = sorted(set(families))
    design = np.column_stack([x] + [[f == n for f in families] for n in names]).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ coef
    df = len(y) - design.shape[1]
    cov = residual @ residual / df * np.linalg.inv(design.T @ design)
    se = math.sqrt(cov[0, 0])
    q = sps.t.ppf(0.975, df)
    return float(coef[0]), float(coef[0] - q * se), float(coef[0] + q * se), float(2 * sps.t.sf(abs(coef[0]) / se, df))


@pytest.mark.parametrize("within", [4.0, 0.0, -3.0])
def test_the_within_method_slope_is_a_dummy_variable_fit(within: float, rng) -> None:
    benchmarks = sweep_benchmarks(np.random.default_rng(rng.getrandbits(64)), within)
    sweep = sr.rank_sweep(benchmarks)
    assert sweep is not None
    runs = benchmarks["sentiment"]["cells"]["k32_x1"]["runs"]
    rows = [(m, r) for m, by_seed in runs.items() if m != "majority" for r in by_seed.values()]
    y = np.array([100 * r["scores"]["ood"] for _, r in rows])
    x = np.log([r["effective_rank"] for _, r in rows])
    families = [registry.family(m) for m, _ in rows]
    slope, low, high, p = dummy_least_squares(y, x, families)
    got = sweep["regression"]
    assert (got["n"], got["groups"], got["df"]) == (len(rows), 2, len(rows) - 3)
    assert got["slope"] == pytest.approx(slope, rel=1e-9, abs=1e-9)
    assert (got["low"], got["high"], got["p"]) == pytest.approx((low, high, p), rel=1e-7, abs=1e-12)
    pooled = np.polyfit(x, y, 1)[0]  # across families the relation has the other sign: the dummies matter
    assert pooled < 0
    expected = "supported" if within > 0 else "contradicted" if within < 0 else "not detected"
    assert sweep["verdict"].startswith(expected) or (within == 0 and got["p"] <= 0.05)
    if sweep["verdict"].startswith("not detected"):
        assert sweep["verdict"] == f"not detected (MDE {got['mde_per_sd']:.1f} points)"
    # without the flagged runs (seed 3): the same fit on the rest
    keep = [i for i, (_, r) in enumerate(rows) if r["fit"] == "fit"]
    assert sweep["without_flagged"]["slope"] == pytest.approx(
        dummy_least_squares(y[keep], x[keep], [families[i] for i in keep])[0], rel=1e-9, abs=1e-9
    )


@pytest.mark.parametrize(("within", "seeds"), [(4.0, 8), (0.0, 8), (-3.0, 4)])
def test_the_per_draw_slopes_are_dummy_variable_fits_and_their_t_interval_is_scipys(within, seeds, rng) -> None:
    """Each seed's slope is the dummy-variable fit on that seed's runs alone; the interval, p and sign-flip p over
    the draws are scipy's one-sample t and a brute-force enumeration of the 2^n sign patterns."""
    benchmarks = sweep_benchmarks(np.random.default_rng(rng.getrandbits(64)), within, seeds=seeds)
    sweep = sr.rank_sweep(benchmarks)
    assert sweep is not None
    runs = benchmarks["sentiment"]["cells"]["k32_x1"]["runs"]
    slopes = []
    for seed in range(seeds):
        rows = [(m, by_seed[str(seed)]) for m, by_seed in runs.items() if m != "majority"]
        y = np.array([100 * r["scores"]["ood"] for _, r in rows])
        x = np.log([r["effective_rank"] for _, r in rows])
        slopes.append(dummy_least_squares(y, x, [registry.family(m) for m, _ in rows])[0])
    got = sweep["by_seed"]
    assert [d["seed"] for d in got["slopes"]] == list(range(seeds)) and got["n"] == got["draws"] == seeds
    assert [d["slope"] for d in got["slopes"]] == pytest.approx(slopes, rel=1e-9, abs=1e-9)
    test = sps.ttest_1samp(slopes, 0.0)
    low, high = test.confidence_interval(0.95)
    assert (got["slope"], got["low"], got["high"], got["p"]) == pytest.approx(
        (np.mean(slopes), low, high, test.pvalue), rel=1e-7, abs=1e-12
    )
    centred = np.array(slopes)
    flips = [abs(np.dot(signs, centred)) >= abs(centred.sum()) - 1e-12
             for signs in itertools.product((1, -1), repeat=seeds)]  # fmt: skip
    assert got["sign_flip_p"] == pytest.approx(np.mean(flips))
    if seeds < 6:
        assert got["verdict"] == f"no verdict (n = {seeds} < 6 seeds)"
    elif within > 0:
        assert got["verdict"] == "supported"
    else:
        assert got["verdict"].startswith("not detected") or test.pvalue <= 0.05
    # every run of seed 3 is flagged: without them, that draw is gone and the others are unchanged
    kept = sweep["by_seed_without_flagged"]
    assert [d["seed"] for d in kept["slopes"]] == [s for s in range(seeds) if s != 3]
    assert [d["slope"] for d in kept["slopes"]] == pytest.approx(slopes[:3] + slopes[4:], rel=1e-9, abs=1e-9)
    text = "\n".join(sr._rank_sweep_lines(sweep))
    assert f"**{got['verdict']}**" in text and f"{got['slope']:+.3g}" in text


def test_the_sweep_table_has_every_variant_and_no_baseline(rng) -> None:
    benchmarks = sweep_benchmarks(np.random.default_rng(rng.getrandbits(64)), 4.0)
    sweep = sr.rank_sweep(benchmarks)
    assert sweep is not None
    names = [row["method"] for row in sweep["variants"]]
    assert names == [KR, LORA, "lora@r=1", "lora@r=16", "lora@r=64", f"{KR}@factorization=sqrt_max"]
    runs = benchmarks["sentiment"]["cells"]["k32_x1"]["runs"]
    for row in sweep["variants"]:
        ood = [r["scores"]["ood"] for r in runs[row["method"]].values()]
        ranks = [r["effective_rank"] for r in runs[row["method"]].values()]
        assert row["ood"]["mean"] == pytest.approx(np.mean(ood)) and row["ood"]["std"] == pytest.approx(
            np.std(ood, ddof=1)
        )
        assert row["effective_rank"]["mean"] == pytest.approx(np.mean(ranks)) and row["flagged"] == 1
        assert row["family"] == registry.family(row["method"])
    text = "\n".join(sr._rank_sweep_lines(sweep))
    assert "## Rank sweep (exploratory)" in text and f"**{sweep['verdict']}**" in text
    assert all(f"| {n} |" in text for n in names[2:]) and "majority" not in text
    assert sr.rank_sweep({"sentiment": {"cells": {"k32_x1": {**benchmarks["sentiment"]["cells"]["k32_x1"],
                                                             "runs": {KR: runs[KR]}}}}}) is None  # fmt: skip


def test_the_sweep_plot_draws_each_family_at_its_variants_means(rng, tmp_path: Path, monkeypatch) -> None:
    """One line per family and panel, through each variant's (mean effective rank, mean accuracy), in rank order."""
    benchmarks = sweep_benchmarks(np.random.default_rng(rng.getrandbits(64)), 4.0)
    sweep = sr.rank_sweep(benchmarks)
    drawn: list[Any] = []
    real = sr.write_figure
    monkeypatch.setattr(sr, "write_figure", lambda fig, path, **kw: (drawn.append(fig), real(fig, path, **kw))[1])
    assert sr.plot_rank_sweep({"rank_sweep": sweep}, tmp_path / "sweep.png") is not None
    assert (tmp_path / "sweep.png").stat().st_size > 0
    (fig,) = drawn
    for ax, key in zip(fig.axes, ("ood", "id"), strict=True):
        assert ax.get_xscale() == "log"
        lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
        for family in (KR, LORA):
            rows = sorted((r for r in sweep["variants"] if r["family"] == family),
                          key=lambda r: r["effective_rank"]["mean"])  # fmt: skip
            line = ax.containers[[c.get_label() for c in ax.containers].index(registry.label(family))].lines[0]
            assert np.allclose(line.get_xdata(), [r["effective_rank"]["mean"] for r in rows])
            assert np.allclose(line.get_ydata(), [100 * r[key]["mean"] for r in rows])
        assert not lines or set(lines) <= {registry.label(KR), registry.label(LORA)}
    assert sr.plot_rank_sweep({"rank_sweep": None}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_the_mechanism_regression_groups_variants_with_their_method() -> None:
    row = {"benchmark": "sentiment", "shots": 32}
    assert sr.fixed_effect(row | {"method": "lora@r=4"}) == sr.fixed_effect(row | {"method": LORA})
    assert sr.fixed_effect(row | {"method": "loha@r=4"}) != sr.fixed_effect(row | {"method": LORA})


# -- a tiny study end to end ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_rank_sweep_end_to_end(minilm_path: str, tmp_path: Path) -> None:
    from kradapter.finetune.shift import Study
    from kradapter.finetune.shift_data import benchmark_data, data_hash
    from kradapter.finetune.shift_report import document, markdown
    from kradapter.store import Store
    from tests.finetune.test_shift_study import BASE, synthetic

    variants = ("lora@r=2", "kradapter@factorization=sqrt_max")
    recipe = replace(BASE, steps=4, targets=("query", "intermediate.dense"))  # 12 layers: square and 1536 x 384
    settings = ss.StudySettings(recipe, benchmarks=("sentiment",), methods=(KR, *variants),
                                seeds=(0, 1), shots=(4,), eval_per_class=4, preset="ranks",
                                lr_grids={KR: (1e-2,), variants[0]: (3e-3,), variants[1]: (1e-2,)})  # fmt: skip
    data = {"sentiment": benchmark_data(synthetic(), settings.eval_per_class)}
    spec = settings.run_spec({"data.sentiment": data_hash(data["sentiment"])})
    model = Path(minilm_path)
    with Store.open(tmp_path / "out", spec, "new") as store:
        study = Study(settings, model, "minilm", data)
        assert study.run(store, lambda execution: None, progress=False) == []
        results = document(store, study)
        finished = dict(store.records)
    probe = study.probes["sentiment"]
    shapes = list(probe.layers.values())
    counts = {variants[0]: sum(2 * (d + k) for d, k in shapes), KR: registry.kradapter_budget(shapes),
              variants[1]: registry.kradapter_budget(shapes, "sqrt_max")}  # fmt: skip
    assert len(shapes) == 12 and counts[KR] != counts[variants[1]]  # the two factorisations differ on these layers
    for method, count in counts.items():
        for seed in (0, 1):
            record = finished[("sentiment", "k4_x1", "run", method, seed)]  # the key as given
            assert record["trainable_params"] == count + probe.head_params
        assert finished[("sentiment", "k4_x1", "chosen", method)]["lr"] == settings.grid(method)[0]
    lora_ranks = [row["effective_rank"] for s in (0, 1) for row in
                  finished[("sentiment", "k4_x1", "run", variants[0], s)]["updates"]]  # fmt: skip
    assert max(lora_ranks) <= 2 + 1e-3
    sweep = results["rank_sweep"]
    assert [row["method"] for row in sweep["variants"]] == [KR, variants[0], variants[1]]
    assert sweep["regression"]["n"] == 6 and sweep["regression"]["groups"] == 2
    assert "## Rank sweep (exploratory)" in markdown(results)
    with Store.open(tmp_path / "out", spec, "resume") as store:  # resumed: nothing trained again
        Study(settings, model, "minilm", data).run(store, lambda execution: None, progress=False)
        assert store.records == finished
