"""Training step time and memory of the high-rank contenders against LoRA and KRAdapter at one parameter budget.

    python benchmarks/contenders_shift.py                 # all-MiniLM-L6-v2, all linear layers, 2 threads
    python benchmarks/contenders_shift.py --budget-factor 4 --tokens 512
    python benchmarks/contenders_shift.py --device cuda

Every contender adapts every attention and MLP ``nn.Linear`` of all-MiniLM-L6-v2 (384x384, 1536x384, 384x1536;
random weights of the same architecture when the asset package is absent: step time does not depend on the
values) at KRAdapter's trainable count times ``--budget-factor``, sized by :func:`kradapter.registry.plan`
(LoRA, LoHa, SHiRA, GraLoRA, HiRA by their rank, C3A by one block size for the model; counts printed). One
training step = forward, MSE loss on the mean-pooled output, backward, AdamW. Contenders are built from copies of
one model, warmed up (2 steps), measured for memory (one step each, see ``measure.py``), then timed in rounds that
run every contender once in a rotating order; medians and ratios to LoRA are reported. Results go to ``--out``
(JSON).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from contenders import load_minilm
from measure import resident_bytes, step_peak_bytes, sync, time_steps
from peft import get_peft_model
from torch import nn

from kradapter import guards, registry
from kradapter.records import environment
from kradapter.store import write_json

TARGETS = ("query", "key", "value", "dense")
NAMES = (*registry.tagged("shift-full"), *registry.tagged("shift-contender"))  # the shift study's full preset


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contenders", default=",".join(NAMES), help=f"comma-separated subset of {NAMES}")
    p.add_argument("--budget-factor", type=guards.cli_int(), default=1, help="budget = KRAdapter's count times this")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=guards.cli_int(), default=2, help="torch CPU threads (pinned)")
    p.add_argument("--tokens", type=guards.cli_int(), default=1024, help="tokens per step")
    p.add_argument("--batch", type=guards.cli_int(), default=8, help="sequences per step (length = tokens / batch)")
    p.add_argument("--rounds", type=guards.cli_int(), default=7, help="timed rounds at most")
    p.add_argument("--min-rounds", type=guards.cli_int(), default=3, help="timed rounds at least")
    p.add_argument("--time-budget", type=float, default=120.0, help="seconds of timed rounds")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "contenders_shift.json")
    args = p.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in args.contenders if c not in NAMES]
    if unknown:
        p.error(f"unknown contender(s) {unknown}; choose from {NAMES}")
    if args.tokens % args.batch:
        p.error(f"--tokens ({args.tokens}) must be a multiple of --batch ({args.batch})")
    return args


def peft_config(name: str, named: dict[str, tuple[int, int]], budget: int) -> tuple[object, int, dict]:
    """The contender's PEFT config at ``budget``, its exact trainable count and its settings."""
    shapes = list(named.values())
    plan = registry.plan(name, shapes, budget)
    return registry.get(name).config(list(TARGETS), **plan.settings), plan.count, plan.settings


def build(name: str, base: nn.Module, named: dict, budget: int, inputs: dict, target: torch.Tensor) -> dict:
    config, count, settings = peft_config(name, named, budget)
    torch.manual_seed(1234)
    model = get_peft_model(copy.deepcopy(base), config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if sum(p.numel() for p in params) != count:
        raise RuntimeError(f"{name}: PEFT trains {sum(p.numel() for p in params)} parameters, the closed form {count}")
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = (model(**inputs).last_hidden_state.mean(dim=1) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return {"model": model, "params": params, "optimizer": optimizer, "step": step, "count": count, **settings}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    base, weights = load_minilm()
    base = base.to(device)
    named = {
        n: (m.out_features, m.in_features)
        for n, m in base.named_modules()
        if isinstance(m, nn.Linear) and n.split(".")[-1] in TARGETS
    }
    kr_budget = registry.budget_method().count(named.values())
    budget = kr_budget * args.budget_factor
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.tokens // args.batch), generator=generator)
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    target = torch.randn(args.batch, base.config.hidden_size, generator=generator).to(device)
    built = {name: build(name, base, named, budget, inputs, target) for name in args.contenders}
    for c in built.values():  # warm-up: optimiser state exists, first-call costs are paid
        c["losses"] = [float(c["step"]()) for _ in range(2)]
    for c in built.values():
        for p in c["params"]:
            p.grad = None
        c["resident_bytes"] = resident_bytes(c["model"], c["optimizer"], inputs.values())
        c["step_peak_bytes"] = step_peak_bytes(c["step"], device)
    samples: dict[str, list[float]] = {n: [] for n in built}
    order = list(built)
    start = time.perf_counter()
    for index in range(args.rounds):
        shift = index % len(order)
        for name in order[shift:] + order[:shift]:
            samples[name].append(time_steps(built[name]["step"], device, 1))
        print(f"round {index + 1}: " + ", ".join(f"{n} {samples[n][-1]:.2f}s" for n in order), flush=True)
        if index + 1 >= args.min_rounds and time.perf_counter() - start > args.time_budget:
            break
    sync(device)
    ref = registry.reference_adapter() if registry.reference_adapter() in built else order[0]
    rows = {}
    for name, c in built.items():
        median = statistics.median(samples[name])
        peak = c["resident_bytes"] + c["step_peak_bytes"]
        rows[name] = {
            "trainable_params": c["count"],
            "budget_ratio": c["count"] / budget,
            "settings": {k: v for k, v in c.items() if k not in ("model", "params", "optimizer", "step", "count")},
            "median_s": median,
            "samples_s": samples[name],
            "peak_bytes": peak,
            "resident_bytes": c["resident_bytes"],
            "step_peak_bytes": c["step_peak_bytes"],
        }
    for row in rows.values():
        row["time_vs_" + ref] = row["median_s"] / rows[ref]["median_s"]
        row["peak_vs_" + ref] = row["peak_bytes"] / rows[ref]["peak_bytes"]
    payload = {
        "machine": environment(),
        "weights": weights,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "kradapter_budget": kr_budget,
        "budget": budget,
        "contenders": rows,
    }
    write_json(args.out, payload, indent=1)
    print(
        f"\nMiniLM ({weights}), {args.batch} x {args.tokens // args.batch} tokens, {args.threads} threads, "
        f"budget {budget:,} (KRAdapter x {args.budget_factor})"
    )
    print(
        f"{'contender':<11}{'trainable':>11}{'x budget':>9}{'median s':>10}{'x ' + ref:>8}{'peak MB':>9}{'x ' + ref:>8}"
    )
    for name, r in rows.items():
        print(
            f"{name:<11}{r['trainable_params']:>11,}{r['budget_ratio']:>9.3f}{r['median_s']:>10.3f}"
            f"{r['time_vs_' + ref]:>8.2f}{r['peak_bytes'] / 2**20:>9.0f}{r['peak_vs_' + ref]:>8.2f}"
        )
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
