"""Wall time and final loss of ``kradapter compare`` against the authors' ``approximate_weight.py``, side by side.

    python benchmarks/seed_study_speed.py PATH [--rounds 3] [--threads 2] [--size 1024x768] [--iterations 300]

PATH is a local copy of the authors' repository (github.com/PaulAlbert31/KRAdapter): a checkout, or a bare git
directory (its ``HEAD`` is read). Nothing is fetched. Both studies run the seed's default: six synthetic matrix
types, five methods, 300 AdamW steps at lr 0.1, 1024x768, on the CPU with torch pinned to ``--threads``. Each
runs in its own fresh process; rounds alternate seed and kradapter, and the training time inside each process
(imports, plots and the authors' failed CLIP download excluded: their ``open_clip`` is replaced by a stub that
fails at once, as it does offline) is compared by median. Round ``i`` runs both at seed ``42 + i`` (the seed's
``RANDOM_SEED`` is set in its config before its script is imported). Loss is compared as
``||dW - W||_F / ||W||_F`` per method and matrix type, as the mean over the rounds' seeds on each side (the two
draw their random targets and initialisations from different streams, so one draw differs by noise alone; the
worst single round is printed beside); the seed's value is its own reported final loss over its target's norm.
The seed sizes its methods by its own rules (LoRA and SinLoRA one rank above the budget, RandLoRA 1.75x it),
so LoRA, SinLoRA and RandLoRA are also fitted, untimed, at the seed's own sizes. Results go to
``benchmarks/results/seed_study_speed.json``.
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

SEED_FILES = ("approximate_weight.py", "config.py")
MATRICES = {  # the seed's names -> kradapter's
    "Random noise": "random_noise",
    "Sparse noise": "sparse_noise",
    "PCA whitened noise": "pca_whitened",
    "Low rank": "low_rank",
    "High freq": "high_freq",
    "Low freq": "low_freq",
}
METHODS = {
    "LoRA": "lora",
    "SinLoRA": "sinlora",
    "KRAdapter": "kradapter",
    "RandLoRA": "randlora",
    "Kronecker": "kronecker",
}
LOSS_TOLERANCE = 1.01
FIRST_SEED = 42  # the seed's RANDOM_SEED; round i runs seed 42 + i on both sides

SEED_CHILD = r"""
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
import config as seed_config
seed_config.RANDOM_SEED = seed_value  # read by ``from config import *`` when the script is imported
import matplotlib
matplotlib.use("Agg")
warnings.simplefilter("ignore")
import approximate_weight as seed
norms = {}
make = seed.create_synthetic_matrices
def recording(size):
    matrices = make(size)
    norms.update({k: float(v.half().float().norm()) for k, v in matrices.items()})  # the seed fits .half() targets
    return matrices
seed.create_synthetic_matrices = recording
start = time.perf_counter()
lr = seed.TRAINING_CONFIG["learning_rate"]
results = seed.run_experiment(size=(rows, cols), n_iterations=iterations, learning_rate=lr)
seconds = time.perf_counter() - start
rows_out = {m: {a: {"loss": v["Final loss"], "params": v["Parameters"]} for a, v in r.items() if a != "Target"}
            for m, r in results.items()}
json.dump({"seconds": seconds, "norms": norms, "results": rows_out}, open(out, "w"))
"""

OURS_CHILD = r"""
import json, sys, tempfile, time
rows, cols, iterations, threads, seed = map(int, sys.argv[1:6])
types, lora_r, out = sys.argv[6].split(","), int(sys.argv[7]), sys.argv[8]
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
with tempfile.TemporaryDirectory() as tmp:  # untimed: the methods whose size differs, at the seed's own sizes
    sizes = {"lora": {"r": lora_r}, "sinlora": {"r": lora_r}, "randlora": {"r": lora_r // 4}}
    seed_sizes = study(tmp, names=list(sizes), strategy="custom", settings=sizes)
json.dump({"seconds": seconds, "results": rows_of(results), "seed_sizes": rows_of(seed_sizes)}, open(out, "w"))
"""


def seed_copy(path: Path, into: Path) -> Path:
    """The authors' two files in ``into``, from a checkout or a bare git directory."""
    for name in SEED_FILES:
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


def seed_lora_rank(rows: int, cols: int) -> int:
    """The rank the authors' script gives LoRA and SinLoRA (its RandLoRA gets a quarter of it)."""
    budget = 2 * min(rows, cols) * math.sqrt(max(rows, cols))
    return int(budget / (rows + cols)) + 1


def relative_losses(seed_run: dict) -> dict[str, dict[str, float]]:
    """The seed's final loss over its target's norm, under kradapter's names; a method it dropped is absent."""
    return {
        name: {
            method: seed_run["results"][seed_name][seed_method]["loss"] / seed_run["norms"][seed_name]
            for seed_method, method in METHODS.items()
            if seed_method in seed_run["results"].get(seed_name, {})
        }
        for seed_name, name in MATRICES.items()
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
    parser.add_argument("seed_repo", type=Path, help="local copy of github.com/PaulAlbert31/KRAdapter")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", default="1024x768")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "seed_study_speed.json")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    rows, cols = (int(v) for v in args.size.lower().split("x"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
    lora_r = seed_lora_rank(rows, cols)
    seed_runs, our_runs, cli_runs = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        repo = seed_copy(args.seed_repo.expanduser().resolve(), Path(tmp))
        shape = [str(rows), str(cols), str(args.iterations), str(args.threads)]
        for round_ in range(args.rounds):
            seed = FIRST_SEED + round_
            print(f"round {round_ + 1}/{args.rounds} (seed {seed}): authors' approximate_weight.py ...", flush=True)
            seed_runs.append(run_child(SEED_CHILD, [str(repo), *shape, str(seed)], env, Path(tmp) / f"seed{round_}"))
            print(f"  {seed_runs[-1]['seconds']:.1f} s; kradapter compare ...", flush=True)
            types = ",".join(MATRICES.values())
            our_runs.append(
                run_child(OURS_CHILD, [*shape, str(seed), types, str(lora_r)], env, Path(tmp) / f"ours{round_}")
            )
            print(f"  {our_runs[-1]['seconds']:.1f} s; the kradapter command, whole process ...", flush=True)
            command = [str(Path(sys.executable).parent / "kradapter"), "compare", "--size", f"{rows}x{cols}"]
            command += ["--matrices", types, "--iterations", str(args.iterations), "--seeds", str(seed)]
            command += ["--threads", str(args.threads), "--out", str(Path(tmp) / f"cli{round_}"), "--quiet"]
            cli_runs.append(run_process(command, env, Path(tmp) / f"cli{round_}.log"))
            print(f"  {cli_runs[-1]:.1f} s", flush=True)
    seed_times = [run["seconds"] for run in seed_runs]
    our_times = [run["seconds"] for run in our_runs]
    seed_losses = [relative_losses(run) for run in seed_runs]
    ours = [{m: {k: v["relative"] for k, v in r.items()} for m, r in run["results"].items()} for run in our_runs]
    ours_seed_size = [
        {m: {k: v["relative"] for k, v in r.items()} for m, r in run["seed_sizes"].items()} for run in our_runs
    ]

    def compare(title: str, columns: dict[str, tuple[str, list, str]]) -> dict:
        """Mean over rounds of each side's relative error, their ratio, and the worst single-round ratio."""
        print(f"\n{title}")
        print(f"{'matrix':<20}" + "".join(f"{c:>32}" for c in columns))
        table: dict[str, dict] = {}
        for seed_name, name in MATRICES.items():
            line = f"{seed_name:<20}"
            for label, (seed_method, our_list, our_key) in columns.items():
                a, b = mean_over(seed_losses, name, seed_method), mean_over(our_list, name, our_key)
                if a is None or b is None:
                    line += f"{'seed failed' if a is None else 'kradapter failed':>32}"
                    table.setdefault(name, {})[label] = {"seed": a, "kradapter": b}
                    continue
                pairs = zip(seed_losses, our_list, strict=True)
                per_round = [o[name][our_key] / s[name][seed_method] for s, o in pairs]
                table.setdefault(name, {})[label] = {
                    "seed_mean": a,
                    "kradapter_mean": b,
                    "ratio_of_means": b / a,
                    "worst_round_ratio": max(per_round),
                }
                line += f"{f'{a:.4f} / {b:.4f} ({b / a:.3f}, {max(per_round):.3f})':>32}"
            print(line)
        return table

    n = len(seed_runs)
    main_table = compare(
        f"relative Frobenius error ||dW - W||_F / ||W||_F, seed / kradapter: means over {n} seeds "
        f"(ratio of means, worst single seed); goal: ratio <= {LOSS_TOLERANCE}",
        {label: (method, ours, method) for label, method in METHODS.items()},
    )
    sized = {"LoRA": "lora", "SinLoRA": "sinlora", "RandLoRA": "randlora"}
    counts = ", ".join(
        f"{label} {int(our_runs[0]['seed_sizes']['random_noise'][m]['params']):,} "
        f"(seed {seed_runs[0]['results']['Random noise'][label]['params']:,})"
        for label, m in sized.items()
    )
    seed_size_table = compare(
        f"at the seed's own sizes (LoRA and SinLoRA r={lora_r}, RandLoRA r={lora_r // 4}; untimed): {counts}",
        {label: (m, ours_seed_size, m) for label, m in sized.items()},
    )
    seed_median, our_median = statistics.median(seed_times), statistics.median(our_times)
    speedup = seed_median / our_median
    ratios, seed_size_ratios = worst_ratios(main_table), worst_ratios(seed_size_table)
    print(f"\nworst ratio of means per method at equal budget: {json.dumps(rounded(ratios))}")
    print(f"worst ratio of means per method at the seed's sizes: {json.dumps(rounded(seed_size_ratios))}")
    print(
        f"wall time (median of {n}, {args.threads} threads): seed {seed_median:.1f} s, kradapter {our_median:.1f} s: "
        f"{speedup:.1f}x faster"
    )
    seed_process = statistics.median(run["process_seconds"] for run in seed_runs)
    cli_process = statistics.median(cli_runs)
    print(
        f"whole process, start-up and plots included (median of {n}): python approximate_weight.py "
        f"{seed_process:.1f} s, kradapter compare {cli_process:.1f} s: {seed_process / cli_process:.1f}x faster"
    )
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "threads": args.threads,
        "size": [rows, cols],
        "iterations": args.iterations,
        "seeds": [FIRST_SEED + i for i in range(n)],
        "seed_seconds": seed_times,
        "kradapter_seconds": our_times,
        "speedup_of_medians": speedup,
        "seed_process_seconds": [run["process_seconds"] for run in seed_runs],
        "kradapter_compare_process_seconds": cli_runs,
        "process_speedup_of_medians": seed_process / cli_process,
        "worst_ratio_of_means": ratios,
        "worst_ratio_of_means_at_seed_sizes": seed_size_ratios,
        "relative_frobenius_error": main_table,
        "at_seed_sizes": seed_size_table,
        "params": {
            "seed": {m: r["params"] for m, r in seed_runs[0]["results"]["Random noise"].items()},
            "kradapter": {m: r["params"] for m, r in our_runs[0]["results"]["random_noise"].items()},
        },
        "iterations_run": {m: {k: v["iterations"] for k, v in r.items()} for m, r in our_runs[0]["results"].items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
