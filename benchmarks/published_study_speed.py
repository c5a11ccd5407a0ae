"""Wall time and final loss of ``kradapter compare`` against the authors' ``approximate_weight.py``, side by side.

    python benchmarks/published_study_speed.py PATH [--rounds 3] [--threads 2] [--size 1024x768] [--iterations 300]

PATH is a local copy of the authors' repository (github.com/PaulAlbert31/KRAdapter): a checkout, or a bare git
directory (its ``HEAD`` is read). Nothing is fetched. Both studies run the published default: six synthetic matrix
types, five methods, 300 AdamW steps at lr 0.1, 1024x768, on the CPU with torch pinned to ``--threads``. Each
runs in its own fresh process; rounds alternate the authors' script and kradapter, and the training time inside
each process (imports, plots and the authors' failed CLIP download excluded: their ``open_clip`` is replaced by a
stub that fails at once, as it does offline) is compared by median. Round ``i`` runs both at seed ``42 + i`` (the
authors' ``RANDOM_SEED`` is set in their config before their script is imported). Loss is compared as
``||dW - W||_F / ||W||_F`` per method and matrix type, as the mean over the rounds' seeds on each side (the two
draw their random targets and initialisations from different streams, so one draw differs by noise alone; the
worst single round is printed beside); the authors' value is their own reported final loss over the target's norm.
The authors' script sizes its methods by its own rules (LoRA and SinLoRA one rank above the budget, RandLoRA 1.75x
it), so LoRA, SinLoRA and RandLoRA are also fitted, untimed, at the authors' sizes. Results go to
``benchmarks/results/published_study_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kradapter import files, guards, registry

PUBLISHED_FILES = ("approximate_weight.py", "config.py")
MATRICES = {  # the authors' names -> kradapter's
    "Random noise": "random_noise",
    "Sparse noise": "sparse_noise",
    "PCA whitened noise": "pca_whitened",
    "Low rank": "low_rank",
    "High freq": "high_freq",
    "Low freq": "low_freq",
}
# The published study's methods are `kradapter compare`'s default ones; its labels are the registry's, less any
# parenthesis ("Kronecker (LoKr)" is "Kronecker" there).
METHODS = {registry.label(name).split(" (")[0]: name for name in registry.tagged("compare-default")}
PUBLISHED_RANK_SHARE = {"LoRA": 1, "SinLoRA": 1, "RandLoRA": 4}  # its rank rule: r, r and r // 4 (see its script)
OURS = "kradapter"  # the program, as the tables name the other side
LOSS_TOLERANCE = 1.01
FIRST_SEED = 42  # the authors' RANDOM_SEED; round i runs seed 42 + i on both sides

PUBLISHED_CHILD = r"""
import json, sys, time, types, warnings
repo, rows, cols, iterations, threads, seed_value, out = sys.argv[1], *map(int, sys.argv[2:7]), sys.argv[7]
import torch
torch.set_num_threads(threads)
stub = types.ModuleType("open_clip")
def _offline(*args, **kwargs):
    raise RuntimeError("CLIP weights are not available offline")
stub.create_model_and_transforms = _offline
sys.modules["open_clip"] = stub
sys.path.insert(0, repo)
import config as published_config
published_config.RANDOM_SEED = seed_value  # read by ``from config import *`` when the script is imported
import matplotlib
matplotlib.use("Agg")
warnings.simplefilter("ignore")
import approximate_weight as published
norms = {}
make = published.create_synthetic_matrices
def recording(size):
    matrices = make(size)
    norms.update({k: float(v.half().float().norm()) for k, v in matrices.items()})  # the authors fit .half() targets
    return matrices
published.create_synthetic_matrices = recording
start = time.perf_counter()
lr = published.TRAINING_CONFIG["learning_rate"]
results = published.run_experiment(size=(rows, cols), n_iterations=iterations, learning_rate=lr)
seconds = time.perf_counter() - start
rows_out = {m: {a: {"loss": v["Final loss"], "params": v["Parameters"]} for a, v in r.items() if a != "Target"}
            for m, r in results.items()}
json.dump({"seconds": seconds, "norms": norms, "results": rows_out}, open(out, "w"))
"""

OURS_CHILD = r"""
import json, sys, tempfile, time
rows, cols, iterations, threads, seed = map(int, sys.argv[1:6])
types, sizes, out = sys.argv[6].split(","), json.loads(sys.argv[7]), sys.argv[8]
import torch
torch.set_num_threads(threads)
from kradapter.compare.config import StudyConfig, with_changes
from kradapter.compare.inputs import run_spec
from kradapter.compare.study import run_study
from kradapter.store import Store
def study(tmp, **methods):
    config = with_changes(StudyConfig(), matrices={"size": (rows, cols), "types": types}, methods=methods,
                          training={"iterations": iterations, "seeds": [seed]},
                          runtime={"threads": threads, "device": "cpu"}, output={"directory": tmp, "plots": False})
    with Store.open(tmp, run_spec(config)) as store:
        return run_study(config, store, progress=False)[0]["results"]
def rows_of(results):
    return {m: {k: {"relative": v["relative_frobenius_error"], "params": v["params"], "iterations": v["iterations"]}
                for k, v in r["methods"].items()} for m, r in results.items()}
with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    results = study(tmp)  # the default study: what is timed
    seconds = time.perf_counter() - start
with tempfile.TemporaryDirectory() as tmp:  # untimed: the methods sized differently, at the authors' sizes
    published_sizes = study(tmp, names=list(sizes), strategy="custom", settings=sizes)
sized_runs = rows_of(published_sizes)
json.dump({"seconds": seconds, "results": rows_of(results), "published_sizes": sized_runs}, open(out, "w"))
"""


def published_copy(path: Path, into: Path) -> Path:
    """The authors' two files in ``into``, from a checkout or a bare git directory."""
    for name in PUBLISHED_FILES:
        if (path / name).is_file():
            shutil.copy(path / name, into / name)
            continue
        show = subprocess.run(
            ["git", "--git-dir", str(path), "show", f"HEAD:{name}"], capture_output=True, text=True, check=False
        )
        if show.returncode != 0:
            raise SystemExit(f"{path}: no {name} (neither a checkout of the authors' repository nor its git directory)")
        (into / name).write_text(show.stdout)
    return into


def run_child(code: str, args: list[str], env: dict[str, str], log: Path) -> dict:
    """Run ``code`` in a fresh process; its JSON, with ``process_seconds``: the whole process as a user waits for
    it (interpreter start, imports, the study, plots)."""
    out = log.with_suffix(".json")
    result = run_process([sys.executable, "-c", code, *args, str(out)], env, log)
    return {**json.loads(out.read_text()), "process_seconds": result}


def run_process(command: list[str], env: dict[str, str], log: Path) -> float:
    """Wall time of ``command`` from start to exit."""
    with log.open("w") as f:
        start = time.perf_counter()
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env)
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed (exit {done.returncode}):\n{log.read_text()[-3000:]}")
    return seconds


def published_lora_rank(rows: int, cols: int) -> int:
    """The rank the authors' script gives LoRA and SinLoRA (its RandLoRA gets a quarter of it)."""
    budget = 2 * min(rows, cols) * math.sqrt(max(rows, cols))
    return int(budget / (rows + cols)) + 1


def relative_losses(published_run: dict) -> dict[str, dict[str, float]]:
    """The authors' final loss over the target's norm, under kradapter's names; a method they dropped is absent."""
    return {
        name: {
            method: published_run["results"][published_name][published_method]["loss"]
            / published_run["norms"][published_name]
            for published_method, method in METHODS.items()
            if published_method in published_run["results"].get(published_name, {})
        }
        for published_name, name in MATRICES.items()
    }


def mean_over(runs: list[dict[str, dict[str, float]]], name: str, method: str) -> float | None:
    values = [run[name][method] for run in runs if method in run.get(name, {})]
    return statistics.fmean(values) if len(values) == len(runs) else None


def worst_ratios(table: dict[str, dict[str, dict]]) -> dict[str, float | None]:
    """Each method's largest ratio of means over the matrix types (None where no type compared)."""
    labels = next(iter(table.values())).keys()
    found = {
        label: [row[label]["ratio_of_means"] for row in table.values() if "ratio_of_means" in row[label]]
        for label in labels
    }
    return {label: max(values, default=None) for label, values in found.items()}


def rounded(ratios: dict[str, float | None]) -> dict[str, float | None]:
    return {k: None if v is None else round(v, 4) for k, v in ratios.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("published_repo", type=Path, help="local copy of github.com/PaulAlbert31/KRAdapter")
    parser.add_argument("--rounds", type=guards.cli_int(), default=3)
    parser.add_argument("--threads", type=guards.cli_int(), default=2)
    parser.add_argument("--size", default="1024x768")
    parser.add_argument("--iterations", type=guards.cli_int(), default=300)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "published_study_speed.json")
    args = parser.parse_args()
    rows, cols = (int(v) for v in args.size.lower().split("x"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
    lora_r = published_lora_rank(rows, cols)
    sized = {label: METHODS[label] for label in PUBLISHED_RANK_SHARE}
    sizes = {m: {"r": lora_r // PUBLISHED_RANK_SHARE[label]} for label, m in sized.items()}
    published_runs, our_runs, cli_runs = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        repo = published_copy(args.published_repo.expanduser().resolve(), Path(tmp))
        shape = [str(rows), str(cols), str(args.iterations), str(args.threads)]
        for round_ in range(args.rounds):
            seed = FIRST_SEED + round_
            print(f"round {round_ + 1}/{args.rounds} (seed {seed}): authors' approximate_weight.py ...", flush=True)
            published_runs.append(
                run_child(PUBLISHED_CHILD, [str(repo), *shape, str(seed)], env, Path(tmp) / f"published{round_}")
            )
            print(f"  {published_runs[-1]['seconds']:.1f} s; kradapter compare ...", flush=True)
            types = ",".join(MATRICES.values())
            our_runs.append(
                run_child(OURS_CHILD, [*shape, str(seed), types, json.dumps(sizes)], env, Path(tmp) / f"ours{round_}")
            )
            print(f"  {our_runs[-1]['seconds']:.1f} s; the kradapter command, whole process ...", flush=True)
            command = [str(Path(sys.executable).parent / "kradapter"), "compare", "--size", f"{rows}x{cols}"]
            command += ["--matrices", types, "--iterations", str(args.iterations), "--seeds", str(seed)]
            command += ["--threads", str(args.threads), "--out", str(Path(tmp) / f"cli{round_}"), "--quiet"]
            cli_runs.append(run_process(command, env, Path(tmp) / f"cli{round_}.log"))
            print(f"  {cli_runs[-1]:.1f} s", flush=True)
    published_times = [run["seconds"] for run in published_runs]
    our_times = [run["seconds"] for run in our_runs]
    published_losses = [relative_losses(run) for run in published_runs]
    ours = [{m: {k: v["relative"] for k, v in r.items()} for m, r in run["results"].items()} for run in our_runs]
    ours_published_size = [
        {m: {k: v["relative"] for k, v in r.items()} for m, r in run["published_sizes"].items()} for run in our_runs
    ]

    def compare(title: str, columns: dict[str, tuple[str, list, str]]) -> dict:
        """Mean over rounds of each side's relative error, their ratio, and the worst single-round ratio."""
        print(f"\n{title}")
        print(f"{'matrix':<20}" + "".join(f"{c:>32}" for c in columns))
        table: dict[str, dict] = {}
        for published_name, name in MATRICES.items():
            line = f"{published_name:<20}"
            for label, (published_method, our_list, our_key) in columns.items():
                a, b = mean_over(published_losses, name, published_method), mean_over(our_list, name, our_key)
                if a is None or b is None:
                    line += f"{'published failed' if a is None else OURS + ' failed':>32}"
                    table.setdefault(name, {})[label] = {"published": a, OURS: b}
                    continue
                pairs = zip(published_losses, our_list, strict=True)
                per_round = [o[name][our_key] / s[name][published_method] for s, o in pairs]
                table.setdefault(name, {})[label] = {
                    "published_mean": a,
                    f"{OURS}_mean": b,
                    "ratio_of_means": b / a,
                    "worst_round_ratio": max(per_round),
                }
                line += f"{f'{a:.4f} / {b:.4f} ({b / a:.3f}, {max(per_round):.3f})':>32}"
            print(line)
        return table

    n = len(published_runs)
    main_table = compare(
        f"relative Frobenius error ||dW - W||_F / ||W||_F, published / kradapter: means over {n} seeds "
        f"(ratio of means, worst single seed); goal: ratio <= {LOSS_TOLERANCE}",
        {label: (method, ours, method) for label, method in METHODS.items()},
    )
    counts = ", ".join(
        f"{label} {int(our_runs[0]['published_sizes']['random_noise'][m]['params']):,} "
        f"(published {published_runs[0]['results']['Random noise'][label]['params']:,})"
        for label, m in sized.items()
    )
    published_size_table = compare(
        f"at the authors' sizes (LoRA and SinLoRA r={lora_r}, RandLoRA r={lora_r // 4}; untimed): {counts}",
        {label: (m, ours_published_size, m) for label, m in sized.items()},
    )
    published_median, our_median = statistics.median(published_times), statistics.median(our_times)
    speedup = published_median / our_median
    ratios, published_size_ratios = worst_ratios(main_table), worst_ratios(published_size_table)
    print(f"\nworst ratio of means per method at equal budget: {json.dumps(rounded(ratios))}")
    print(f"worst ratio of means per method at the authors' sizes: {json.dumps(rounded(published_size_ratios))}")
    print(
        f"wall time (median of {n}, {args.threads} threads): published {published_median:.1f} s, "
        f"kradapter {our_median:.1f} s: {speedup:.1f}x faster"
    )
    published_process = statistics.median(run["process_seconds"] for run in published_runs)
    cli_process = statistics.median(cli_runs)
    print(
        f"whole process, start-up and plots included (median of {n}): python approximate_weight.py "
        f"{published_process:.1f} s, kradapter compare {cli_process:.1f} s: "
        f"{published_process / cli_process:.1f}x faster"
    )
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "threads": args.threads,
        "size": [rows, cols],
        "iterations": args.iterations,
        "seeds": [FIRST_SEED + i for i in range(n)],
        "published_seconds": published_times,
        "kradapter_seconds": our_times,
        "speedup_of_medians": speedup,
        "published_process_seconds": [run["process_seconds"] for run in published_runs],
        "kradapter_compare_process_seconds": cli_runs,
        "process_speedup_of_medians": published_process / cli_process,
        "worst_ratio_of_means": ratios,
        "worst_ratio_of_means_at_published_sizes": published_size_ratios,
        "relative_frobenius_error": main_table,
        "at_published_sizes": published_size_table,
        "params": {
            "published": {m: r["params"] for m, r in published_runs[0]["results"]["Random noise"].items()},
            OURS: {m: r["params"] for m, r in our_runs[0]["results"]["random_noise"].items()},
        },
        "iterations_run": {m: {k: v["iterations"] for k, v in r.items()} for m, r in our_runs[0]["results"].items()},
    }
    files.write_json(args.out, report, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
