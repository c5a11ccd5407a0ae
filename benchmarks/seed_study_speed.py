"""Wall time and final loss of ``kradapter compare`` against the authors' ``approximate_weight.py``, side by side.

    python benchmarks/seed_study_speed.py PATH [--rounds 3] [--threads 2] [--size 1024x768] [--iterations 300]

PATH is a local copy of the authors' repository (github.com/PaulAlbert31/KRAdapter): a checkout, or a bare git
directory (its ``HEAD`` is read). Nothing is fetched. Both studies run the seed's default: six synthetic matrix
types, five methods, 300 AdamW steps at lr 0.1, 1024x768, on the CPU with torch pinned to ``--threads``. Each
runs in its own fresh process; rounds alternate seed and kradapter, and the training time inside each process
(imports, plots and the authors' failed CLIP download excluded: their ``open_clip`` is replaced by a stub that
fails at once, as it does offline) is compared by median. Loss is compared as ``||dW - W||_F / ||W||_F`` per
method and matrix type, since the two draw their random targets from different streams; the seed's value is its
own reported final loss over its target's norm. Results go to ``benchmarks/results/seed_study_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
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

SEED_CHILD = r"""
import json, sys, time, types, warnings
repo, rows, cols, iterations, threads, out = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
import torch
torch.set_num_threads(threads)
stub = types.ModuleType("open_clip")
def _offline(*args, **kwargs):
    raise RuntimeError("CLIP weights are not available offline")
stub.create_model_and_transforms = _offline
sys.modules["open_clip"] = stub
sys.path.insert(0, repo)
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
rows, cols, iterations, threads, types, out = *map(int, sys.argv[1:5]), sys.argv[5].split(","), sys.argv[6]
import torch
torch.set_num_threads(threads)
from kradapter.compare.config import StudyConfig, with_changes
from kradapter.compare.study import run_study
with tempfile.TemporaryDirectory() as tmp:
    config = with_changes(StudyConfig(), matrices={"size": (rows, cols), "types": types},
                          training={"iterations": iterations}, runtime={"threads": threads, "device": "cpu"},
                          output={"directory": tmp, "plots": False})
    start = time.perf_counter()
    results = run_study(config, progress=False)
    seconds = time.perf_counter() - start
rows_out = {m: {k: {"relative": v["relative_frobenius_error"], "params": v["params"], "iterations": v["iterations"]}
                for k, v in r["methods"].items()} for m, r in results.data["results"].items()}
json.dump({"seconds": seconds, "results": rows_out}, open(out, "w"))
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
    out = log.with_suffix(".json")
    with log.open("w") as f:
        done = subprocess.run(
            [sys.executable, "-c", code, *args, str(out)], stdout=f, stderr=subprocess.STDOUT, env=env
        )
    if done.returncode != 0:
        raise SystemExit(f"child failed (exit {done.returncode}):\n{log.read_text()[-3000:]}")
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seed_repo", type=Path, help="local copy of github.com/PaulAlbert31/KRAdapter")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", default="1024x768")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "seed_study_speed.json")
    args = parser.parse_args()
    rows, cols = (int(v) for v in args.size.lower().split("x"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
    seed_times, our_times, seed_last, ours_last = [], [], None, None
    with tempfile.TemporaryDirectory() as tmp:
        repo = seed_copy(args.seed_repo.expanduser().resolve(), Path(tmp))
        shape = [str(rows), str(cols), str(args.iterations), str(args.threads)]
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}: authors' approximate_weight.py ...", flush=True)
            seed_last = run_child(SEED_CHILD, [str(repo), *shape], env, Path(tmp) / f"seed{round_}.log")
            seed_times.append(seed_last["seconds"])
            print(f"  {seed_last['seconds']:.1f} s; kradapter compare ...", flush=True)
            ours_last = run_child(OURS_CHILD, [*shape, ",".join(MATRICES.values())], env, Path(tmp) / f"ours{round_}")
            our_times.append(ours_last["seconds"])
            print(f"  {ours_last['seconds']:.1f} s", flush=True)
    assert seed_last is not None and ours_last is not None
    seed_median, our_median = statistics.median(seed_times), statistics.median(our_times)
    losses, worst = {}, 0.0
    print(f"\nrelative Frobenius error ||dW - W||_F / ||W||_F, seed vs kradapter (ratio; goal <= {LOSS_TOLERANCE})")
    print(f"{'matrix':<20}" + "".join(f"{m:>26}" for m in METHODS))
    for seed_name, name in MATRICES.items():
        row = f"{seed_name:<20}"
        for seed_method, method in METHODS.items():
            seed_cell = seed_last["results"].get(seed_name, {}).get(seed_method)
            ours = ours_last["results"][name][method]["relative"]
            if seed_cell is None:  # the seed's script drops a method that raised; say so
                row += f"{'seed failed':>26}"
                losses.setdefault(name, {})[method] = {"seed": None, "kradapter": ours}
                continue
            seed_rel = seed_cell["loss"] / seed_last["norms"][seed_name]
            ratio = ours / seed_rel
            worst = max(worst, ratio)
            losses.setdefault(name, {})[method] = {
                "seed": seed_rel,
                "kradapter": ours,
                "ratio": ratio,
                "seed_params": seed_cell["params"],
                "kradapter_params": ours_last["results"][name][method]["params"],
            }
            row += f"{f'{seed_rel:.4f} / {ours:.4f} ({ratio:.3f})':>26}"
        print(row)
    speedup = seed_median / our_median
    print(
        f"\nwall time (median of {args.rounds}, {args.threads} threads): seed {seed_median:.1f} s, "
        f"kradapter {our_median:.1f} s: {speedup:.1f}x faster; worst loss ratio {worst:.3f}"
    )
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "threads": args.threads,
        "size": [rows, cols],
        "iterations": args.iterations,
        "seed_seconds": seed_times,
        "kradapter_seconds": our_times,
        "speedup_of_medians": speedup,
        "worst_loss_ratio": worst,
        "relative_frobenius_error": losses,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
