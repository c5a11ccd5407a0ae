"""The shift study's results document on a synthetic store with known effects: every primary number against an
independent computation (scipy's paired t-test, a hand Holm, enumerated sign flips, the noncentral t power), the
verdict words, the fit flags, the baselines in every table, the two-way interval, McNemar and the mechanism
regression (against a dummy-variable least-squares fit)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as sps

from kradapter import stats
from kradapter.finetune import shift_report as sr
from kradapter.finetune import shift_settings
from kradapter.finetune.shift_settings import Cell
from kradapter.store import RunSpec, Store

SEEDS = tuple(range(6))
ITEMS = 60  # per evaluation set (30 per class)
GROUP = {"news": ("g1", "g2")}
METHODS = ("kradapter", "lora", "loha", "majority", "linear_probe")
# KRAdapter's true OOD advantage over LoRA (accuracy fraction) per benchmark and cell
EFFECT = {("sent", "k4_x1"): 0.15, ("sent", "k8_x1"): 0.0, ("g1", "k4_x1"): -0.12, ("g2", "k4_x1"): -0.12,
          ("g1", "k8_x1"): 0.0, ("g2", "k8_x1"): 0.0}  # fmt: skip
DOMAINS = {"sent": ["a", "b"], "g1": ["target"], "g2": ["target"]}
UNDERFIT = ("sent", "k4_x1", "lora", 2)  # one flagged run


def _labels(b: str, name: str) -> np.ndarray:
    rng = np.random.default_rng(abs(hash((b, name))) % 2**32)
    return rng.permutation(np.repeat([0, 1], ITEMS // 2))


def _predictions(labels: np.ndarray, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    right = round(float(np.clip(accuracy, 0.0, 1.0)) * labels.size)
    wrong = rng.permutation(labels.size)[right:]
    out = labels.copy()
    out[wrong] = 1 - out[wrong]
    return out


def synthetic_records(rng: np.random.Generator) -> dict[tuple, Any]:
    """Records as the study writes them: runs (every method, baselines included), chosen rates."""
    records: dict[tuple, Any] = {}
    for b, domains in DOMAINS.items():
        for cid in ("k4_x1", "k8_x1"):
            methods = METHODS if cid == "k4_x1" else ("kradapter", "lora", "majority", "linear_probe")
            for seed in SEEDS:
                base = rng.uniform(0.55, 0.7)
                for method in methods:
                    shift = {"kradapter": EFFECT[(b, cid)], "lora": 0.0, "loha": 0.02}.get(method, -0.05)
                    record: dict[str, Any] = {"seed": seed, "lr": 1e-3, "fit": "fit", "train_time_s": 1.0}
                    if method == "majority":
                        record.pop("fit")
                    for name in ["test", *domains]:
                        acc = base + (0.2 if name == "test" else shift) + rng.normal(0, 0.03)
                        pred = _predictions(_labels(b, name), acc, rng)
                        record[name] = {"accuracy": float((pred == _labels(b, name)).mean()), "macro_f1": 0.5,
                                        "loss": 0.6, "predictions": pred.tolist()}  # fmt: skip
                    if method in ("kradapter", "lora", "loha"):
                        ood = np.mean([record[d]["accuracy"] for d in domains])
                        erank = {"kradapter": 300.0, "lora": 12.0, "loha": 60.0}[method] + 40 * ood
                        record["updates"] = [
                            {"layer": f"l{i}", "shape": [384, 384], "effective_rank": erank + rng.normal(0, 0.5),
                             "singular_values": [3.0, 2.0, 1.0]}
                            for i in range(2)
                        ]  # fmt: skip
                        record["update_norm"] = float(2.0 - ood + rng.normal(0, 0.05))
                        record["intruders"] = int(rng.integers(0, 5))
                        record["loss_curve"] = [0.7, 0.3, 0.1]
                    if method == "linear_probe":
                        record["C"], record["trials"] = 1.0, [{"C": 1.0, "val_accuracy": 0.7}]
                    if (b, cid, method, seed) == UNDERFIT:
                        record["fit"] = "underfit"
                    records[(b, cid, "run", method, seed)] = record
            for method in methods:
                if method in ("kradapter", "lora", "loha"):
                    trials = [
                        {"lr": lr, "val_accuracy": 0.6, "val_macro_f1": 0.6, "val_loss": 0.6} for lr in (1e-4, 1e-3)
                    ]
                    records[(b, cid, "chosen", method)] = {"lr": 1e-3, "trials": trials, "on_edge": method == "loha"}
    # a 4x cell (no KRAdapter: its 1x runs are the reference) where LoHa ran one seed only
    for seed in (0,):
        labels = {name: _labels("sent", name) for name in ["test", "a", "b"]}
        record = {"seed": seed, "fit": "fit", "lr": 1e-3}
        for name, lab in labels.items():
            pred = _predictions(lab, 0.6, rng)
            record[name] = {"accuracy": float((pred == lab).mean()), "predictions": pred.tolist()}
        records[("sent", "k4_x4", "run", "loha", seed)] = record
    return records


class FakeStudy:
    """What the report reads from a study: settings, cells, data (labels of every evaluation set), budgets."""

    def __init__(self) -> None:
        self.model_name, self.model_dir = "tiny", Path("tiny")
        self.settings = SimpleNamespace(benchmarks=tuple(DOMAINS))
        cells = [("k4_x1", 4, 1), ("k8_x1", 8, 1)]
        self.cells = [Cell(b, k, x, ()) for b in DOMAINS for _, k, x in cells] + [Cell("sent", 4, 4, ())]
        self.data = {}
        for b, domains in DOMAINS.items():
            labels = np.concatenate([np.zeros(10, int), *[_labels(b, n) for n in ["test", *domains]]])
            evals, start = {}, 10
            for name in ["test", *domains]:
                evals[name] = np.arange(start, start + ITEMS)
                start += ITEMS
            corpus = SimpleNamespace(labels=labels, classes=("neg", "pos"))
            self.data[b] = SimpleNamespace(corpus=corpus, pool=np.arange(10), evals=evals, domains=domains)
        self.probes: dict = {}
        self.budgets = dict.fromkeys(DOMAINS, 1000)
        self.sizes: dict = {}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[dict[str, Any], dict[tuple, Any], Path]:
    """The document of the synthetic store, written as the command writes it, and its markdown tables."""
    records = synthetic_records(np.random.default_rng(7))
    folder = tmp_path_factory.mktemp("shift")
    with Store.open(folder, RunSpec("shift", {"anchor_shots": 4}), "new") as store:
        for key, record in records.items():
            store.add(key, record)
        patch = pytest.MonkeyPatch()
        patch.setattr(shift_settings, "GROUPS", GROUP, raising=False)
        patch.setattr(stats, "paired_difference", _forbidden)  # the percentile bootstrap is never used here
        try:
            results = sr.document(store, FakeStudy())  # type: ignore[arg-type]
            store.write_json(sr.RESULTS_FILE, results, indent=1)
            store.write_text(sr.TABLE_FILE, sr.markdown(results))
        finally:
            patch.undo()
    return json.loads((folder / sr.RESULTS_FILE).read_text()), records, folder


def _forbidden(*args, **kwargs):
    raise AssertionError("the percentile bootstrap was used")


def accuracy(records, b, cid, method, seed, name) -> float:
    pred = np.array(records[(b, cid, "run", method, seed)][name]["predictions"])
    return float((pred == _labels(b, name)).mean())


def ood(records, b, cid, method, seed) -> float:
    return float(np.mean([accuracy(records, b, cid, method, seed, d) for d in DOMAINS[b]]))


def hand_holm(p: list[float]) -> list[float]:
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out


def test_primary_endpoints_against_scipy_and_a_hand_holm(built) -> None:
    results, records, _ = built
    endpoints = results["primary"]["endpoints"]
    assert [e["name"] for e in endpoints] == ["sent/k4_x1", "sent/k8_x1", "news/k4_x1", "news/k8_x1"]
    raw = []
    for e in endpoints:
        b, cid = e["benchmark"], e["cell"]
        members = GROUP.get(b, (b,))
        kr = [100 * np.mean([ood(records, m, cid, "kradapter", s) for m in members]) for s in SEEDS]
        lo = [100 * np.mean([ood(records, m, cid, "lora", s) for m in members]) for s in SEEDS]
        d = np.subtract(kr, lo)
        assert e["differences"] == pytest.approx(d.tolist()) and e["n"] == len(SEEDS)
        assert e["mean"] == pytest.approx(d.mean()) and e["sd"] == pytest.approx(d.std(ddof=1))
        test = sps.ttest_rel(kr, lo)
        low, high = sps.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=sps.sem(d))
        assert e["t"]["p"] == pytest.approx(test.pvalue) and (e["t"]["low"], e["t"]["high"]) == pytest.approx(
            (low, high)
        )
        flips = [
            abs(sum(s * x for s, x in zip(signs, d, strict=True))) for signs in itertools.product((1, -1), repeat=6)
        ]
        assert e["sign_flip"]["p"] == pytest.approx(np.mean([f >= abs(d.sum()) - 1e-9 for f in flips]))
        power = sps.nct.sf(sps.t.ppf(0.975, 5), 5, e["mde"] * np.sqrt(6) / e["sd"]) + sps.nct.cdf(
            -sps.t.ppf(0.975, 5), 5, e["mde"] * np.sqrt(6) / e["sd"]
        )
        assert power == pytest.approx(0.80, abs=1e-6)  # the MDE is the difference detected with 80% power
        assert e["studentized"]["low"] < e["mean"] < e["studentized"]["high"]
        raw.append(test.pvalue)
    assert [e["holm_p"] for e in endpoints] == pytest.approx(hand_holm(raw))
    assert results["primary"]["family"]["size"] == 4


def test_verdict_words(built) -> None:
    results, _, _ = built
    by_name = {e["name"]: e for e in results["primary"]["endpoints"]}
    assert by_name["sent/k4_x1"]["verdict"] == "supported"
    assert by_name["news/k4_x1"]["verdict"] == "contradicted"
    for name in ("sent/k8_x1", "news/k8_x1"):
        e = by_name[name]
        if e["holm_p"] > 0.05:
            assert e["verdict"] == f"not detected (MDE {e['mde']:.1f} points)"
    for e in results["primary"]["endpoints"] + results["primary"]["sensitivity"]:
        if e["n"] < 6:  # an exact sign-flip test cannot reach 5% below 6 pairs: no verdict from the t-test alone
            assert e["verdict"] == f"no verdict (n = {e['n']} < 6 seeds)"
        else:
            assert e["verdict"].split(" (")[0] in ("supported", "contradicted", "not detected")


def test_sensitivity_drops_the_flagged_seed(built) -> None:
    results, records, _ = built
    full = results["primary"]["endpoints"][0]
    clean = results["primary"]["sensitivity"][0]
    assert full["flagged"] == {"2": ["sent"]} and clean["excluded_seeds"] == [2]
    keep = [s for s in SEEDS if s != 2]
    kr = [100 * ood(records, "sent", "k4_x1", "kradapter", s) for s in keep]
    lo = [100 * ood(records, "sent", "k4_x1", "lora", s) for s in keep]
    assert clean["n"] == 5 and clean["t"]["p"] == pytest.approx(sps.ttest_rel(kr, lo).pvalue)
    raw = [e["t"]["p"] for e in results["primary"]["sensitivity"]]
    assert [e["holm_p"] for e in results["primary"]["sensitivity"]] == pytest.approx(hand_holm(raw))
    unflagged = results["primary"]["endpoints"][1]
    assert unflagged["flagged"] == {} and results["primary"]["sensitivity"][1]["excluded_seeds"] == []


def test_two_way_interval_is_the_endpoint_estimate_with_items_resampled(built) -> None:
    results, _, _ = built
    for e in results["primary"]["endpoints"]:
        tw = e["two_way"]
        assert tw["estimate"] == pytest.approx(e["mean"])  # weighting reproduces the mean over domains and tasks
        assert tw["low"] < tw["estimate"] < tw["high"] and tw["items"] >= ITEMS and tw["seeds"] == len(SEEDS)
        assert "percentile_low" not in tw  # never the percentile interval below 20 seeds
        assert tw["high"] - tw["low"] > e["t"]["high"] - e["t"]["low"] - 1e-9 or tw["se"] > 0


def test_tables_carry_every_method_baselines_flags_and_rates(built) -> None:
    results, records, folder = built
    tables = results["tables"]
    assert set(tables) == {f"{b}/{c}" for b in ("sent", "g1", "g2", "news") for c in ("k4_x1", "k8_x1")} | {
        "sent/k4_x4"
    }
    for key, tab in tables.items():
        if key != "sent/k4_x4":
            assert {"majority", "linear_probe", "kradapter", "lora"} <= set(tab["rows"]), key
    row = tables["sent/k4_x1"]["rows"]["lora"]
    assert row["fit"] == {"fit": 5, "underfit": 1} and row["flagged_seeds"] == [2]
    assert tables["sent/k4_x1"]["rows"]["loha"]["on_edge"] is True
    assert tables["sent/k4_x1"]["rows"]["linear_probe"]["C"] == [1.0] * len(SEEDS)
    assert tables["news/k4_x1"]["rows"]["lora"]["flagged_seeds"] == []
    mean = np.mean([accuracy(records, "sent", "k4_x1", "majority", s, "a") for s in SEEDS])
    assert tables["sent/k4_x1"]["rows"]["majority"]["a"]["mean"] == pytest.approx(mean)
    assert tables["sent/k4_x4"]["rows"]["kradapter"]["from_cell"] == "k4_x1"
    text = (folder / sr.TABLE_FILE).read_text()
    assert text.index("Primary endpoints") < text.index("exploratory")
    sections = text.split("\n### ")[1:]
    for section in sections:
        if section.startswith(("sent,", "g1,", "g2,", "news")) and "4x" not in section.split("\n")[0]:
            assert "(baseline)" in section, section.split("\n")[0]
    assert "⚠ 1 underfit" in text and "(edge)" in text and "supported" in text and "contradicted" in text
    news = next(s for s in sections if s.startswith("news (mean of g1, g2), 4 shots"))
    fit_column = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[6] for line in news.splitlines()[4:]}
    assert fit_column == {"KRAdapter": "fit", "LoRA": "fit", "LoHa": "fit", "majority (baseline)": "-",
                          "linear_probe (baseline)": "-"}  # fmt: skip
    # the document carries the labels (to recompute the two-way interval) but no predictions
    raw = (folder / sr.RESULTS_FILE).read_text()
    assert "predictions" not in raw and "loss_curve" not in raw
    assert results["benchmarks"]["sent"]["evaluation_sets"]["a"]["labels"] == _labels("sent", "a").tolist()


def test_exploratory_contrasts_and_mcnemar(built) -> None:
    results, records, _ = built
    expl = results["exploratory"]
    assert expl["label"] == "exploratory"
    ood_family = expl["contrasts"]["ood"]
    assert not any(e["unit"] == "sent/k4_x1" and e["against"] == "lora" for e in ood_family)  # primary, not here
    entry = next(e for e in ood_family if e["unit"] == "g1/k4_x1" and e["against"] == "lora")
    kr = [100 * ood(records, "g1", "k4_x1", "kradapter", s) for s in SEEDS]
    lo = [100 * ood(records, "g1", "k4_x1", "lora", s) for s in SEEDS]
    assert entry["t"]["p"] == pytest.approx(sps.ttest_rel(kr, lo).pvalue)
    tested = [e for e in ood_family if "t" in e]
    assert [e["holm_p"] for e in tested] == pytest.approx(hand_holm([e["t"]["p"] for e in tested]))
    assert expl["families"]["ood"]["size"] == len(tested)
    against = {e["against"] for e in ood_family}
    assert {"majority", "linear_probe", "loha", "lora"} <= against
    # LoHa ran one seed at 4x: McNemar on the items, against KRAdapter's 1x run of that seed
    (single,) = [m for m in expl["mcnemar"] if m["unit"] == "sent/k4_x4"]
    a = np.array(records[("sent", "k4_x1", "run", "kradapter", 0)]["test"]["predictions"]) == _labels("sent", "test")
    b = np.array(records[("sent", "k4_x4", "run", "loha", 0)]["test"]["predictions"]) == _labels("sent", "test")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    assert (single["id"]["a_only"], single["id"]["b_only"]) == (only_a, only_b)
    assert single["id"]["p_value"] == pytest.approx(sps.binomtest(only_a, only_a + only_b).pvalue)


def test_mechanism_regression_against_dummy_least_squares(built) -> None:
    results, _, _ = built
    mech = results["mechanism"]
    rows = [r for r in mech["rows"] if r["effective_rank"] is not None]
    groups = sorted({(r["benchmark"], r["shots"], r["method"]) for r in rows})
    x = np.array([r["effective_rank"] for r in rows])
    y = np.array([r["ood"] for r in rows])
    design = np.column_stack(
        [x, *[[float((r["benchmark"], r["shots"], r["method"]) == g) for r in rows] for g in groups]]
    )
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ beta
    df = len(y) - design.shape[1]
    cov = residual @ residual / df * np.linalg.inv(design.T @ design)
    pooled = mech["regressions"]["effective_rank"]["pooled"]
    assert pooled["slope"] == pytest.approx(beta[0]) and pooled["se"] == pytest.approx(np.sqrt(cov[0, 0]))
    assert pooled["df"] == df and pooled["n"] == len(rows) == (3 * 3 + 2 * 3) * len(SEEDS)
    assert pooled["p"] == pytest.approx(2 * sps.t.sf(abs(beta[0]) / np.sqrt(cov[0, 0]), df))
    assert pooled["slope"] > 0  # built in: effective rank = 40 x OOD fraction + noise within a method
    assert mech["verdicts"]["effective_rank"]["verdict"] == "supported"
    assert mech["verdicts"]["update_norm"]["verdict"] == "supported"  # norm = 2 - OOD + noise: the claimed sign
    assert mech["regressions"]["intruders"]["pooled"]["estimable"]


def test_paired_entry_flags_a_t_and_sign_flip_disagreement() -> None:
    d = {str(i): v for i, v in enumerate([1.0, 1.0, 1.0, 1.0, 1.0, -0.2])}
    entry = sr.paired_entry(d)
    assert entry["t"]["p"] < 0.05 and entry["sign_flip"]["p"] == pytest.approx(4 / 64)
    assert entry["tests_disagree"] is True
    assert sr.paired_entry({"0": 1.0})["verdict"] == sr.NO_VERDICT


def test_fixed_effects_slope_refuses_what_it_cannot_estimate() -> None:
    assert not sr.fixed_effects_slope([1.0, 2.0], [1.0, 2.0], ["a", "b"])["estimable"]
    out = sr.fixed_effects_slope([1.0, 2.0, 3.0, 5.0], [1.0, 1.0, 1.0, 1.0], ["a", "a", "b", "b"])
    assert not out["estimable"] and "does not vary" in out["why"]


@pytest.mark.parametrize(("sd", "n"), [(0.7, 2), (1.41, 5), (4.47, 17)])
def test_mde_by_scaling_is_the_solved_mde(sd: float, n: int) -> None:
    assert sr.mde(sd, n) == pytest.approx(stats.minimum_detectable_difference(sd, n), rel=1e-9)


@pytest.mark.parametrize("sd", [1.41, 4.47])
def test_seeds_for_target_is_seeds_needed(sd: float) -> None:
    assert sr.seeds_for(sd) == stats.seeds_needed(sd, sr.MDE_TARGET)


@pytest.mark.slow
def test_write_reports_draws_every_plot(built, tmp_path: Path) -> None:
    results, records, _ = built
    with Store.open(tmp_path / "out", RunSpec("shift", {"anchor_shots": 4}), "new") as store:
        for key, record in records.items():
            store.add(key, record)
        text = sr.write_reports(results, store)
    assert (tmp_path / "out" / sr.TABLE_FILE).read_text() == text + "\n"
    for name in (sr.MECHANISM_PLOT, "shift_sent_kshot.png", "shift_news_kshot.png", "shift_sent_rank.png",
                 "shift_g1_spectra.png"):  # fmt: skip
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert set(sr.report_outputs(DOMAINS, GROUP)) >= {p.name for p in (tmp_path / "out").glob("*.png")}


def test_an_incomplete_group_leaves_its_members_as_endpoints(built) -> None:
    results, records, _ = built
    benchmarks = {b: v for b, v in results["benchmarks"].items() if b != "g2"}
    predictions = {
        (k[0], k[1], k[3], str(k[4]), name): np.array(r[name]["predictions"])
        for k, r in records.items()
        if k[2] == "run" and k[0] != "g2"
        for name in ["test", *DOMAINS[k[0]]]
    }
    out = sr.analyse(benchmarks, predictions, GROUP)
    assert out["groups"]["news"] == {"members": ["g1", "g2"], "scored": False, "missing": ["g2"]}
    names = [e["name"] for e in out["primary"]["endpoints"]]
    assert names == ["sent/k4_x1", "sent/k8_x1", "g1/k4_x1", "g1/k8_x1"]
    g1 = out["primary"]["endpoints"][2]
    assert g1["two_way"]["estimate"] == pytest.approx(g1["mean"])


# -- an interim look: the design's runs not all in ------------------------------------------------------------------


class PlannedStudy(FakeStudy):
    """The fake study with its design recorded: the methods of each cell and the seeds every cell will run."""

    def __init__(self, seeds: tuple[int, ...]) -> None:
        super().__init__()
        self.settings = SimpleNamespace(benchmarks=tuple(DOMAINS), seeds=seeds)
        kinds = {(4, 1): ("kradapter", "lora", "loha"), (8, 1): ("kradapter", "lora"), (4, 4): ("loha",)}
        self.cells = [Cell(c.benchmark, c.shots, c.budget, kinds[(c.shots, c.budget)]) for c in self.cells]


def _document(records: dict[tuple, Any], study: FakeStudy, folder: Path) -> dict[str, Any]:
    with Store.open(folder, RunSpec("shift", {"anchor_shots": 4}), "new") as store:
        for key, record in records.items():
            store.add(key, record)
        patch = pytest.MonkeyPatch()
        patch.setattr(shift_settings, "GROUPS", GROUP, raising=False)
        try:
            return json.loads(json.dumps(sr.document(store, study)))  # type: ignore[arg-type]
        finally:
            patch.undo()


def test_a_complete_design_gives_the_same_primary_family(built, tmp_path: Path) -> None:
    results, records, _ = built
    planned = _document(records, PlannedStudy(SEEDS), tmp_path / "planned")
    for key in ("endpoints", "sensitivity"):
        for got, want in zip(planned["primary"][key], results["primary"][key], strict=True):
            assert "pending" not in got and got["verdict"] == want["verdict"]
            assert got["holm_p"] == pytest.approx(want["holm_p"])
    assert planned["primary"]["family"] | {"tested": 4, "pending": 0} == planned["primary"]["family"]
    assert planned["primary"]["family"]["size"] == 4


def test_pending_endpoints_enter_holm_at_one_and_get_no_verdict(tmp_path: Path) -> None:
    records = synthetic_records(np.random.default_rng(7))
    del records[("sent", "k8_x1", "run", "lora", 5)]  # one run still to come: that endpoint has 5 of 6 seeds
    for seed in SEEDS:  # a group's member with no run in: the group's endpoint has no seed yet
        for method in ("kradapter", "lora"):
            del records[("g2", "k8_x1", "run", method, seed)]
    results = _document(records, PlannedStudy(SEEDS), tmp_path / "interim")
    by_name = {e["name"]: e for e in results["primary"]["endpoints"]}
    assert list(by_name) == ["sent/k4_x1", "sent/k8_x1", "news/k4_x1", "news/k8_x1"]  # the group, not g1 alone
    assert by_name["sent/k8_x1"]["pending"] == {"seeds": 5, "planned": 6}
    assert by_name["sent/k8_x1"]["verdict"] == "pending (5 of 6 seeds in)" and "holm_p" not in by_name["sent/k8_x1"]
    assert by_name["sent/k8_x1"]["t"]["p"] > 0  # its interim interval is still shown
    assert by_name["news/k8_x1"]["verdict"] == "pending (0 of 6 seeds in)" and by_name["news/k8_x1"]["n"] == 0
    complete = [by_name[n] for n in ("sent/k4_x1", "news/k4_x1")]
    raw = [e["t"]["p"] for e in complete]
    assert [e["holm_p"] for e in complete] == pytest.approx(hand_holm([*raw, 1.0, 1.0])[:2])
    assert results["primary"]["family"] | {"size": 4, "tested": 2, "pending": 2} == results["primary"]["family"]
    assert by_name["sent/k4_x1"]["verdict"] == "supported"
    sensitivity = {e["name"]: e for e in results["primary"]["sensitivity"]}
    assert sensitivity["sent/k8_x1"]["verdict"] == "pending (5 of 6 seeds in)"
    text = sr.markdown(results)
    assert "Holm over the family's 4 endpoints" in text and "Interim: 2 of them pending" in text
    assert "| sent, 8 shots | 5 |" in text and "**pending (5 of 6 seeds in)**" in text
    for table in text.split("Sensitivity")[:2]:  # a row with no test keeps the verdict in its column
        rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")]
        column = rows[0].index("verdict")
        row = next(r for r in rows if r[0] == "| news, 8 shots")
        assert len(row) == len(rows[0]) and row[column] == "pending (0 of 6 seeds in)"


def test_an_endpoint_one_seed_short_of_a_larger_design_is_pending(built, tmp_path: Path) -> None:
    _, records, _ = built
    results = _document(records, PlannedStudy((*SEEDS, 6)), tmp_path / "more")
    assert {e["verdict"] for e in results["primary"]["endpoints"]} == {"pending (6 of 7 seeds in)"}
    assert results["primary"]["family"]["tested"] == 0 and results["primary"]["family"]["size"] == 4


@given(
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12),
    st.lists(st.booleans(), min_size=12, max_size=12),
    st.sampled_from([0.01, 0.05, 0.1]),
)
def test_holm_with_the_pending_at_one_rejects_only_what_the_full_family_rejects(p, waiting, alpha) -> None:
    """Why a verdict of an interim look stands: whatever the pending p-values turn out to be, every endpoint Holm
    rejects with them set to 1 it also rejects with their true values, and its adjusted p only falls."""
    interim = [1.0 if w else x for x, w in zip(p, waiting, strict=False)]
    now, later = stats.holm(interim, alpha=alpha), stats.holm(p, alpha=alpha)
    for i, w in enumerate(waiting[: len(p)]):
        if not w:
            assert later.adjusted[i] <= now.adjusted[i] + 1e-15
            assert later.reject[i] or not now.reject[i]


def test_a_rebuild_resamples_only_the_endpoints_whose_runs_changed(tmp_path: Path, monkeypatch) -> None:
    """The document is rebuilt after every unit: an unchanged endpoint's two-way bootstrap is remembered (the same
    numbers), and a changed prediction is seen (its endpoint resampled again)."""
    calls: list[int] = []
    real = stats.two_way_bootstrap

    def counted(a, b, *args, **kwargs):
        calls.append(a.shape[0])
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(sr, "_TWO_WAY", {})
    monkeypatch.setattr(stats, "two_way_bootstrap", counted)
    records = synthetic_records(np.random.default_rng(11))
    first = _document(records, PlannedStudy(SEEDS), tmp_path / "a")
    assert len(calls) == len(first["primary"]["endpoints"]) == 4
    again = _document(records, PlannedStudy(SEEDS), tmp_path / "b")
    assert len(calls) == 4 and again["primary"] == first["primary"]
    items = records[("sent", "k4_x1", "run", "kradapter", 0)]["a"]["predictions"]
    items[0] = 1 - items[0]  # one item of one run: its endpoint's item scores change, its accuracies do not
    changed = _document(records, PlannedStudy(SEEDS), tmp_path / "c")
    assert len(calls) == 5
    by_name = {e["name"]: e for e in changed["primary"]["endpoints"]}
    assert by_name["sent/k4_x1"]["two_way"] != first["primary"]["endpoints"][0]["two_way"]
    assert by_name["sent/k4_x1"]["t"] == first["primary"]["endpoints"][0]["t"]
