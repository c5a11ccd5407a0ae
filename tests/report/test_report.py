"""``kradapter report``: what the page holds for each kind of results folder, and its one-line errors."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kradapter.cli import main
from kradapter.report import build_report, load
from kradapter.report.page import pareto_flags
from kradapter.store import FolderLock


def test_pareto_flags_match_a_sweep(tmp_path: Path) -> None:
    """Against an independent rule: sorted by cost, a point is on the front iff its score beats every cheaper one
    (ties in cost: only the best score of that cost counts)."""
    rng = random.Random()
    for _ in range(50):
        points = [(float(rng.randrange(8)), float(rng.randrange(8))) for _ in range(rng.randrange(1, 12))]
        for higher in (True, False):
            sign = 1 if higher else -1
            want = []
            for cost, score in points:
                cheaper_or_equal = [sign * s for c, s in points if c < cost] + [
                    sign * s for c, s in points if c == cost and sign * s > sign * score
                ]
                want.append(all(sign * score > s for s in cheaper_or_equal))
            assert pareto_flags(points, higher) == want, (points, higher)


def test_finetune_report_holds_every_run(finetune_dir: Path) -> None:
    results = json.loads((finetune_dir / "finetune_results.json").read_text())
    data = load(finetune_dir)
    want = {(m, s, r["test"]["accuracy"]) for m, by_seed in results["runs"].items() for s, r in by_seed.items()}
    got = {(run["method"].lower(), run["seed"], run["metrics"]["accuracy"]) for run in data.runs}
    assert got == want
    assert [p["endpoint"] for p in data.paired] == ["accuracy", "macro_f1"]  # primary endpoint first
    assert data.running is None
    page = build_report(finetune_dir).read_text()
    assert "http://" not in page.split("<script>")[0] and "<script src" not in page
    assert 'id="chart-pareto"' in page and "Settings and provenance" in page


def test_extra_fields_are_ignored(finetune_dir: Path) -> None:
    """Fields a later version may add (optimum rows, recorded learning rates) do not break the report."""
    path = finetune_dir / "finetune_results.json"
    results = json.loads(path.read_text())
    results["optimum"] = {"kradapter": {"lr": 1e-3}}
    results["recorded_lr"] = [1, 2, 3]
    for by_seed in results["runs"].values():
        for run in by_seed.values():
            run["lr_recorded"] = {"chosen": run["lr"]}
    path.write_text(json.dumps(results))
    assert len(load(finetune_dir).runs) == sum(len(v) for v in results["runs"].values())


def test_a_running_folder_says_so(finetune_dir: Path) -> None:
    lock = FolderLock(finetune_dir)
    lock.acquire()
    try:
        holder = load(finetune_dir).running
        assert holder is not None and f"pid {__import__('os').getpid()}" in holder
        assert 'id="running"' in build_report(finetune_dir).read_text()
    finally:
        lock.release()
    assert load(finetune_dir).running is None


def test_compare_report(compare_dir: Path) -> None:
    results = json.loads((compare_dir / "experimental_results.json").read_text())
    data = load(compare_dir)
    runs = [(m, s) for e in results["results"].values() for m, r in e["methods"].items() for s in r.get("runs") or {}]
    assert len(data.runs) == len(runs)
    # KRAdapter minus LoRA and minus SinLoRA (references have one deterministic value per seed too) per matrix
    assert {p["against"] for p in data.paired} >= {"LoRA", "SinLoRA"}
    assert len(data.tables) == len(results["results"])


def test_finetune_forest_intervals_are_paired_t(finetune_dir: Path) -> None:
    """Recomputed with scipy: KRAdapter minus each method, a t interval on n - 1 degrees of freedom (never the
    percentile bootstrap, which covers ~84% at five seeds)."""
    from scipy import stats as sps

    results = json.loads((finetune_dir / "finetune_results.json").read_text())
    runs = results["runs"]
    for pair in load(finetune_dir).paired:
        other = next(m for m in runs if m != "kradapter" and pair["against"].lower() == m)
        seeds = sorted(set(runs["kradapter"]) & set(runs[other]))
        d = [runs["kradapter"][s]["test"][pair["endpoint"]] - runs[other][s]["test"][pair["endpoint"]] for s in seeds]
        low, high = sps.t.interval(0.95, len(d) - 1, loc=sum(d) / len(d), scale=sps.sem(d))
        assert (pair["low"], pair["high"]) == pytest.approx((low, high)) and pair["n"] == len(seeds)


def test_shift_report_reads_the_current_document(shift_v2_dir: Path) -> None:
    """The pre-registered primary endpoints first (a table with every one, pending ones included, and their
    intervals), then every exploratory contrast, and each cell's table of methods and baselines."""
    results = json.loads((shift_v2_dir / "shift_results.json").read_text())
    data = load(shift_v2_dir)
    endpoints = results["primary"]["endpoints"]
    first = data.tables[0]
    assert first["title"].startswith("Primary endpoints (pre-registered)") and "1 pending (interim)" in first["title"]
    assert [row[0] for row in first["rows"]] == [f"{e['benchmark']}, {e['shots']} shots" for e in endpoints]
    assert [row[-1] for row in first["rows"]] == [e["verdict"] for e in endpoints]
    assert "pending (5 of 6 seeds in)" in [row[-1] for row in first["rows"]]
    tested = [e for e in endpoints if "t" in e]
    contrasts = [e for family in results["exploratory"]["contrasts"].values() for e in family if "t" in e]
    assert len(data.paired) == len(tested) + len(contrasts)
    for pair, e in zip(data.paired, tested + contrasts, strict=True):  # primary first, in the document's order
        assert (pair["mean"], pair["low"], pair["high"]) == (e["mean"], e["t"]["low"], e["t"]["high"])
        assert pair["verdict"] == e["verdict"] and pair["n"] == e["n"]
    assert all(p["endpoint"] == "ood (primary)" for p in data.paired[: len(tested)])
    tables = list(results["tables"].values())
    assert len(data.tables) == 1 + len(tables)
    for got, want in zip(data.tables[1:], tables, strict=True):
        assert len(got["rows"]) == len(want["rows"])
        kradapter = next(row for row in got["rows"] if row[0] == "KRAdapter")
        ood = want["rows"]["kradapter"]["ood"]
        assert kradapter[got["columns"].index("ood")] == f"{ood['mean']:.4f} ± {ood['std']:.4f}"
    assert data.primary == "ood" and len(data.runs) == sum(
        len(seeds) for b in results["benchmarks"].values() for c in b["cells"].values() for seeds in c["runs"].values()
    )
    page = build_report(shift_v2_dir).read_text()
    assert "Primary endpoints (pre-registered)" in page and 'id="chart-forest"' in page


def test_shift_report_takes_the_layers_from_the_records_as_they_stand(shift_v2_dir: Path) -> None:
    """The current document leaves the per-layer update rows in the records: the report reads each method's lowest
    seed there, every row of it, and skips a line a running study is still appending."""
    lines = [json.loads(line) for line in (shift_v2_dir / "records.jsonl").read_text().splitlines()]
    want = {}
    for entry in sorted(lines, key=lambda e: -e["key"][4] if len(e["key"]) == 5 else 0):
        key = entry["key"]
        if len(key) == 5 and key[2] == "run" and entry["record"].get("updates"):
            ranks = [row["effective_rank"] for row in entry["record"]["updates"]]
            want[(f"{key[0]} {key[1]}", key[3])] = (str(key[4]), ranks)
    with (shift_v2_dir / "records.jsonl").open("a") as f:
        f.write('{"key":["sent","k4_x1","run","lora",-1],"record":{"updates":[{"effective_rank": 1')
    data = load(shift_v2_dir)
    got: dict = {}
    for row in data.layers:
        got.setdefault((row["group"], row["method"].lower()), (row["seed"], []))[1].append(row["effective_rank"])
    assert got == want and all(seed == "0" for seed, _ in got.values())
    assert 'id="chart-layers"' in build_report(shift_v2_dir).read_text()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "is not a folder"),
        (lambda p: p, "is not a results folder"),
    ],
)
def test_not_a_results_folder_is_one_line_exit_2(
    tmp_path: Path, make, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("x")
    assert main(["report", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_bad_output_and_unreadable_results(
    finetune_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(finetune_dir), "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["report", str(finetune_dir), "-o", str(tmp_path / "no" / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (finetune_dir / "finetune_results.json").write_text("{not json")
    assert main(["report", str(finetune_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read" in err


def test_help_answers_without_heavy_imports() -> None:
    code = "import sys; from kradapter.cli import main\ntry: main(['report', '--help'])\nexcept SystemExit: pass\n"
    code += "print(sorted(m for m in ('torch', 'altair', 'vl_convert', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert re.search(r"\[\]\s*$", out), out


def test_shift_report_survives_a_damaged_record_line(shift_v2_dir: Path) -> None:
    """A complete but damaged record line (edited by hand) costs that method's layer rows, not the report."""
    path = shift_v2_dir / "records.jsonl"
    path.write_text(path.read_text() + '{"key":["sent","k4_x1","run","lora",-1],"record":{"updates": [oops\n')
    data = load(shift_v2_dir)
    groups = {(row["group"], row["method"]) for row in data.layers}
    assert ("sent k4_x1", "LoRA") not in groups and ("sent k4_x1", "KRAdapter") in groups
    assert 'id="chart-layers"' in build_report(shift_v2_dir).read_text()
