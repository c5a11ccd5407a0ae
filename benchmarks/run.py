"""Benchmark a training step of KRAdapter against PEFT's LoRA, the frozen base and the published layer's execution.

    python benchmarks/run.py                       # every workload on the CPU, float32 (a few minutes on 2 cores)
    python benchmarks/run.py --quick               # a sanity run in well under a minute
    python benchmarks/run.py --device cuda --dtype bfloat16 --out results/cuda.json

For each workload the contenders are built from copies of one base model, warmed up, measured for memory (one
step each), then timed in rounds: each round runs every contender once, in a rotating order, until the workload's
time budget is spent (at least ``--min-rounds``, at most ``--rounds``). Medians and ratios are printed, and the
JSON file is rewritten atomically after every workload, so an interrupted run keeps what it finished.

It has no ``--executor`` option, on purpose: its workloads are independent computations but not independent
measurements. Two workloads timed at once on one machine share its cores, caches and memory bandwidth and
slow each other down, and workloads timed on different nodes of a cluster are timed on different machines
while the ratios and the JSON's ``machine`` record assume one. Each workload runs alone, in this process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from contenders import KR, LAYER_SHAPES, LORA, MERGED_CONTENDERS, TRAIN_CONTENDERS, WORKLOADS, Contender, build
from measure import resident_bytes, step_peak_bytes, sync, time_steps
from tqdm import tqdm

from kradapter import guards
from kradapter.plotting import pyplot, write_figure
from kradapter.records import environment
from kradapter.store import RunSpec, Store, StoreError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The goals: (workload, contender, reference, what, limit); "<=" for cost ratios, ">=" for speed-ups.
GOALS = [  # the goals: (workload, contender, reference, measure, "<=" or ">=", limit) on contender / reference
    ("minilm", f"{KR}-fused", LORA, "median_s", "<=", 1.3),
    ("minilm", f"{KR}-fused", LORA, "peak_bytes", "<=", 1.1),
    *[(w, "published", f"{KR}-fused", "median_s", ">=", 1.5) for w in LAYER_SHAPES],
    ("minilm-merged", f"{KR}-merged", "base", "median_s", "<=", 1.02),
]


RESULTS_FILE = "results.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {WORKLOADS}")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the base model and inputs")
    p.add_argument("--threads", type=guards.cli_int(), default=os.cpu_count() or 1, help="torch CPU threads (pinned)")
    p.add_argument("--tokens", type=guards.cli_int(), default=2048, help="tokens per step (single layers and MiniLM)")
    p.add_argument(
        "--batch", type=guards.cli_int(), default=16, help="MiniLM sequences per step (seq len = tokens / batch)"
    )
    p.add_argument("--min-rounds", type=guards.cli_int(), default=3, help="timed rounds at least")
    p.add_argument("--rounds", type=guards.cli_int(), default=15, help="timed rounds at most")
    p.add_argument("--budget", type=float, default=40.0, help="seconds of timed rounds per workload")
    p.add_argument("--min-sample", type=float, default=0.02, help="seconds per timing sample (steps repeat to fill)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default benchmarks/results/DEVICE-DTYPE/)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="keep the finished workloads in --out, run the rest")
    mode.add_argument("--overwrite", action="store_true", help="delete the results in --out first")
    p.add_argument("--allow-code-change", action="store_true", help="--resume even though the code changed (recorded)")
    p.add_argument("--quick", action="store_true", help="sanity run: small workloads, fewer tokens, 2 rounds")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {WORKLOADS}")
    if args.quick:
        args.workloads = [w for w in args.workloads if w in ("layer-1024x768", "minilm", "minilm-merged")]
        args.tokens, args.batch, args.min_rounds, args.rounds, args.budget = 256, 2, 2, 2, 5.0
    if args.tokens % args.batch:
        p.error(f"--tokens ({args.tokens}) must be a multiple of --batch ({args.batch})")
    return args


def machine(device: torch.device) -> dict:
    """The library's environment record, with the GPU only when the benchmark runs on one."""
    return {**environment(), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def run_workload(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Build, check, measure memory, and time every contender of one workload."""
    names = MERGED_CONTENDERS if name == "minilm-merged" else TRAIN_CONTENDERS
    contenders, info = build(name, names, device, dtype, args.tokens, args.batch)
    # Warm-up (two steps each, so optimiser state exists) and a check that every KRAdapter execution computes the
    # same thing: with the same start, all KRAdapter-family contenders must see the same losses.
    losses = {c.name: [float(c.step()) for _ in range(2)] for c in contenders}
    memory = {}
    for c in contenders:
        _clear_grads(c)
        memory[c.name] = {
            "resident_bytes": resident_bytes(c.model, c.extra.get("optimizer"), c.inputs),
            "step_peak_bytes": step_peak_bytes(c.step, device),
        }
    inner = {}
    for c in contenders:  # repeat short steps so each timing sample lasts at least --min-sample seconds
        once = time_steps(c.step, device, 1)
        inner[c.name] = max(1, min(100, round(args.min_sample / max(once, 1e-6))))
    samples: dict[str, list[float]] = {c.name: [] for c in contenders}
    start = time.perf_counter()
    bar = tqdm(total=args.rounds, desc=name, unit="round", leave=False)
    for round_index in range(args.rounds):
        shift = round_index % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            samples[c.name].append(time_steps(c.step, device, inner[c.name]))
        bar.update()
        if round_index + 1 >= args.min_rounds and time.perf_counter() - start > args.budget:
            break
    bar.close()
    result = {"workload": name, **info, "contenders": {}}
    for c in contenders:
        times = samples[c.name]
        result["contenders"][c.name] = {
            "trainable_params": c.trainable,
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "samples": len(times),
            "steps_per_sample": inner[c.name],
            "peak_bytes": memory[c.name]["resident_bytes"] + memory[c.name]["step_peak_bytes"],
            **memory[c.name],
            "warmup_losses": losses[c.name],
            **{k: v for k, v in c.extra.items() if k != "optimizer"},
        }
    result[f"{KR}_loss_agreement"] = _loss_agreement(losses)
    del contenders
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
    return result


def _clear_grads(c: Contender) -> None:
    for t in (*c.params, *c.inputs):
        t.grad = None


def _loss_agreement(losses: dict[str, list[float]]) -> float | None:
    """Largest relative difference of the warm-up losses among the published layer and KRAdapter's trained
    executions."""
    family = [v for k, v in losses.items() if k in ("published", f"{KR}-fused", f"{KR}-separate")]
    if len(family) < 2:
        return None
    worst = 0.0
    for step in range(len(family[0])):
        values = [f[step] for f in family]
        worst = max(worst, (max(values) - min(values)) / max(abs(statistics.mean(values)), 1e-30))
    return worst


def table(result: dict) -> str:
    """The workload's contenders as a text table: median step, ratios to LoRA/base and the published layer, memory."""
    rows = result["contenders"]
    ref = LORA if LORA in rows else "base"
    header = f"{'contender':<20}{'params':>10}{'median ms':>11}{'x ' + ref:>9}{'publ./x':>8}{'peak MB':>9}"
    header += f"{'x ' + ref:>8}{'step MB':>9}"
    lines = [f"== {result['workload']} ==", header]
    for name, r in rows.items():
        speedup = rows["published"]["median_s"] / r["median_s"] if "published" in rows else float("nan")
        lines.append(
            f"{name:<20}{r['trainable_params']:>10,}{r['median_s'] * 1e3:>11.2f}"
            f"{r['median_s'] / rows[ref]['median_s']:>9.3f}{speedup:>8.2f}{r['peak_bytes'] / 2**20:>9.1f}"
            f"{r['peak_bytes'] / rows[ref]['peak_bytes']:>8.3f}{r['step_peak_bytes'] / 2**20:>9.1f}"
        )
    return "\n".join(lines)


def goals(results: dict[str, dict]) -> list[dict]:
    """Each goal of the issue that this run measured: the ratio, the limit, met or not."""
    verdicts = []
    for workload, who, ref, key, op, limit in GOALS:
        rows = results.get(workload, {}).get("contenders", {})
        if who in rows and ref in rows:
            ratio = rows[who][key] / rows[ref][key]
            met = ratio <= limit if op == "<=" else ratio >= limit
            what = "step time" if key == "median_s" else "peak memory"
            goal = f"{who} / {ref} {what} {op} {limit}"
            verdicts.append({"workload": workload, "goal": goal, "ratio": ratio, "met": met})
    return verdicts


def plot(payload: dict, path: Path) -> None:
    """Step time and peak memory of every contender, relative to LoRA (base for merged inference), per workload."""
    plt = pyplot()
    workloads = payload["workloads"]
    names = list(dict.fromkeys(n for w in workloads.values() for n in w["contenders"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    height = 0.8 / max(len(names), 1)
    for ax, key, label in ((axes[0], "median_s", "step time"), (axes[1], "peak_bytes", "peak memory")):
        for i, name in enumerate(names):
            ys, xs = [], []
            for j, w in enumerate(workloads.values()):
                rows = w["contenders"]
                ref = LORA if LORA in rows else "base"
                if name in rows:
                    ys.append(j + (i - (len(names) - 1) / 2) * height)
                    xs.append(rows[name][key] / rows[ref][key])
            ax.barh(ys, xs, height=height, label=name)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel(f"{label} / LoRA's (merged workload: / base's)")
        ax.set_yticks(range(len(workloads)), list(workloads))
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(names))
    machine = payload["machine"].get("gpu") or payload["machine"]["cpu"]
    fig.suptitle(f"One training step (inference for minilm-merged): {machine}, {payload['dtype']}")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    write_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise SystemExit(f"bad --device {args.device!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device!r} asked for, but torch sees no CUDA device")
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    folder = args.out or Path(__file__).resolve().parent / "results" / f"{device.type}-{args.dtype}"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    fixed = {
        k: v for k, v in settings.items() if k not in ("workloads", "out", "resume", "overwrite", "allow_code_change")
    }
    spec = RunSpec("benchmark", fixed, {"workloads": list(args.workloads)})
    mode = "overwrite" if args.overwrite else "resume" if args.resume else "new"
    try:
        store = Store.open(folder, spec, mode, allow_code_change=args.allow_code_change)
    except StoreError as error:
        raise SystemExit(f"benchmarks/run.py: error: {error}") from None
    payload = {"device": device.type, "dtype": args.dtype, "machine": machine(device), "settings": settings}
    payload["workloads"] = {str(k[1]): r for k, r in store.matching("workload")}
    for name in tqdm(args.workloads, desc="workloads", unit="workload"):
        if store.done(("workload", name)):
            continue
        payload["workloads"][name] = run_workload(name, args, device, dtype)
        store.add(("workload", name), payload["workloads"][name])  # a finished workload survives an interruption
        payload["goals"] = goals(payload["workloads"])
        store.write_json(RESULTS_FILE, payload, indent=1)
        tqdm.write(table(payload["workloads"][name]))
    payload["goals"] = goals(payload["workloads"])
    out = store.write_json(RESULTS_FILE, payload, indent=1)
    plot(payload, out.with_suffix(".png"))
    store.written(out.with_suffix(".png").name)
    store.close()
    where = payload["machine"].get("gpu") or payload["machine"]["cpu"]
    print(f"\nmachine: {where}, {args.dtype}, {args.threads} threads")
    for g in payload.get("goals", []):
        print(f"{'MET ' if g['met'] else 'MISS'} {g['workload']:<18} {g['goal']:<52} measured {g['ratio']:.3f}")
    print(f"results: {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
