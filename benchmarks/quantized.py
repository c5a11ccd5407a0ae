"""Benchmark a training step of KRAdapter against PEFT's LoRA over quantized frozen bases, at equal trainable counts.

    python benchmarks/quantized.py                          # every base that runs here, 2 threads (a few minutes)
    python benchmarks/quantized.py --bases bnb_nf4,dense --rounds 5 --out /tmp/q.json
    python benchmarks/quantized.py --merge-errors          # how far merge/unmerge move outputs (no timing)

The model is a Llama built from a config (no download; square 256x256 attention projections, tall 768x256 and wide
256x768 MLP projections), saved once and loaded back through transformers with each quantization config and
``device_map="cpu"``, exactly as users load a quantized base. Both methods adapt every attention and MLP projection;
LoRA is sized by :func:`kradapter.registry.plan` to KRAdapter's trainable count (printed; scale 1, alpha = r, as
everywhere in the library). A step is forward, backward and an AdamW step on one batch. Per base: both contenders are
built, warmed up, measured for memory (resident bytes of parameters, quantized storage, optimiser state; and the step's
extra peak from the allocator), then timed in rounds that alternate the order (A B, B A, ...); medians of wall-clock and
of process CPU time per step and the KRAdapter / LoRA ratios are reported, and the JSON is rewritten atomically after
each base.

``--merge-errors`` measures instead how far a requantizing merge moves a model's outputs, for KRAdapter, SinLoRA
and PEFT's LoRA on each base (LoRA and SinLoRA sized to KRAdapter's count by the registry): the tests' tiny Llama
(hidden 64, MLP 192), every projection adapted, 10 AdamW
steps at lr 1e-2 on one batch, then the logits of another batch before and after merge_adapter() and
unmerge_adapter() (training mode, so that PEFT's LoRA is measured where it merges correctly), over ``--seeds``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from measure import step_peak_bytes
from torch import nn

from kradapter import registry
from kradapter.records import environment
from kradapter.store import write_json

BASES = ("dense", "bnb_int8", "bnb_nf4", "bnb_fp4", "torchao_int8")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KR = registry.budget_method().name  # the method under test
LORA = registry.reference_adapter()  # what it is measured against


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bases", default=",".join(BASES), help=f"comma-separated subset of {BASES}")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (pinned)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (a multiple of 64)")
    p.add_argument("--intermediate", type=int, default=768, help="MLP size (a multiple of 64)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--length", type=int, default=128, help="tokens per sequence")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per contender")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds (each runs both contenders)")
    p.add_argument("--inner", type=int, default=2, help="steps per timing sample")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/quantized-cpu.json)")
    p.add_argument("--merge-errors", action="store_true", help="measure merge/unmerge output errors, not speed")
    p.add_argument("--seeds", type=int, default=3, help="seeds for --merge-errors")
    args = p.parse_args(argv)
    args.bases = [b for b in args.bases.split(",") if b]
    unknown = [b for b in args.bases if b not in BASES]
    if unknown:
        p.error(f"unknown base {unknown[0]!r}; choose from {BASES}")
    for name in ("hidden", "intermediate"):
        if getattr(args, name) % 64:
            p.error(f"--{name} must be a multiple of 64 (bitsandbytes' CPU 4-bit kernel), got {getattr(args, name)}")
    return args


def quantization_config(base: str):  # type: ignore[no-untyped-def]
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if base == "dense":
        return None
    if base == "bnb_int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if base.startswith("bnb_"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=base.removeprefix("bnb_"))
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(quant_type=Int8WeightOnlyConfig())


def save_model(args: argparse.Namespace, folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.merge_errors:  # the tests' model
        config = LlamaConfig(
            vocab_size=101,
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    else:
        config = LlamaConfig(
            vocab_size=512,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=max(args.length, 64),
        )
    torch.manual_seed(0)
    path = folder / "llama"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load(path: Path, base: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = {} if base == "dense" else {"quantization_config": quantization_config(base), "device_map": "cpu"}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def plans(dense: nn.Module, methods: tuple[str, ...]) -> dict[str, registry.Plan]:
    """Each method sized to KRAdapter's trainable count on the adapted layers of ``dense`` (the unquantized model:
    a 4-bit weight is stored packed)."""
    shapes = [tuple(m.weight.shape) for n, m in dense.named_modules() if n.split(".")[-1] in TARGETS]
    budget = registry.budget_method().count(shapes)
    return {name: registry.plan(name, shapes, budget) for name in methods}


def storage_bytes(t: torch.Tensor) -> list[tuple[int, int]]:
    """(data pointer, bytes) of the storages behind ``t``, looking inside tensor subclasses (torchao)."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return [s for name in names for s in storage_bytes(getattr(t, name))]
    storage = t.untyped_storage()
    return [(storage.data_ptr(), storage.nbytes())]


def resident(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes a contender holds between steps: parameters (quantized storage and scales), buffers, optimiser state."""
    seen: dict[int, int] = {}
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():  # quantization scales kept beside the weight (bitsandbytes)
        state = getattr(module, "state", None)
        tensors += [t for t in (getattr(state, "SCB", None), getattr(state, "CB", None)) if t is not None]
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        if quant_state is not None:
            tensors += [t for t in vars(quant_state).values() if isinstance(t, torch.Tensor)]
    for state in optimizer.state.values():
        tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        for ptr, nbytes in storage_bytes(t):
            seen[ptr] = nbytes
    return sum(seen.values())


class Contender:
    """One PEFT model over its own freshly loaded base, its optimiser and its batch."""

    def __init__(self, name: str, path: Path, base: str, plan: registry.Plan, args: argparse.Namespace) -> None:
        from peft import get_peft_model

        model = load(path, base)
        config = registry.get(name).config(TARGETS, **plan.settings)
        self.name = name
        self.model = get_peft_model(model, config)
        self.model.train()
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-3)
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 512, (args.batch, args.length), generator=generator)
        self.losses: list[float] = []

    def step(self) -> torch.Tensor:
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        return loss


def run_base(base: str, path: Path, args: argparse.Namespace) -> dict:
    sized = plans(load(path, "dense"), (KR, LORA))
    contenders = [Contender(name, path, base, sized[name], args) for name in (KR, LORA)]
    for c in contenders:
        for _ in range(args.warmup):
            c.step()
    memory = {}
    for c in contenders:
        memory[c.name] = {"resident_bytes": resident(c.model, c.optimizer), "step_peak_bytes": 0}
        memory[c.name]["step_peak_bytes"] = step_peak_bytes(c.step, torch.device("cpu"))
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    cpu_times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(args.rounds):
        for c in contenders if r % 2 == 0 else contenders[::-1]:
            wall, cpu = time_steps(c.step, args.inner)
            times[c.name].append(wall)
            cpu_times[c.name].append(cpu)
    result = {"base": base, "contenders": {}}
    for c in contenders:
        med = statistics.median(times[c.name])
        cpu_med = statistics.median(cpu_times[c.name])
        peak = memory[c.name]["resident_bytes"] + memory[c.name]["step_peak_bytes"]
        result["contenders"][c.name] = {
            "trainable": c.trainable,
            "median_s": med,
            "times_s": times[c.name],
            "median_cpu_s": cpu_med,
            "cpu_times_s": cpu_times[c.name],
            **memory[c.name],
            "peak_bytes": peak,
            "first_loss": c.losses[0],
            "last_loss": c.losses[-1],
        }
    kr, lora = result["contenders"][KR], result["contenders"][LORA]
    result["time_ratio"] = kr["median_s"] / lora["median_s"]
    result["cpu_time_ratio"] = kr["median_cpu_s"] / lora["median_cpu_s"]
    result["peak_ratio"] = kr["peak_bytes"] / lora["peak_bytes"]
    result[f"{LORA}_rank"] = sized[LORA].settings[registry.get(LORA).rank_knob]
    result["count_ratio"] = kr["trainable"] / lora["trainable"]  # 1 exactly at the default sizes
    return result


def time_steps(step: Callable[[], torch.Tensor], inner: int) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per step over ``inner`` back-to-back steps. On a shared machine the CPU
    time (with one thread) is the steadier measure: it does not count the time other processes hold the cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(inner):
        step()
    return (time.perf_counter() - wall) / inner, (time.process_time() - cpu) / inner


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def merge_errors(base: str, path: Path, args: argparse.Namespace) -> dict:
    """Mean and max over seeds of: the adapter's effect on the logits, and how far merge and unmerge move them."""
    from peft import get_peft_model

    methods = tuple(dict.fromkeys((LORA, KR, *registry.tagged("export-source"))))
    sized = plans(load(path, "dense"), methods)
    probe = torch.randint(0, 101, (3, 11), generator=torch.Generator().manual_seed(7))
    out = {}
    for method, plan in sized.items():
        rows = []
        for seed in range(args.seeds):
            torch.manual_seed(100 + seed)
            model = get_peft_model(load(path, base), registry.get(method).config(TARGETS, **plan.settings))
            ids = torch.randint(0, 101, (4, 12), generator=torch.Generator().manual_seed(seed))
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            model.train()
            for _ in range(10):
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            with torch.no_grad():
                with model.disable_adapter():
                    plain = model(input_ids=probe).logits.double()
                adapted = model(input_ids=probe).logits.double()
                model.merge_adapter()
                merged = model(input_ids=probe).logits.double()
                model.unmerge_adapter()
                unmerged = model(input_ids=probe).logits.double()
            rows.append((relative(adapted, plain), relative(merged, adapted), relative(unmerged, adapted)))
        values = torch.tensor(rows)
        out[method] = {
            name: {"mean": float(values[:, i].mean()), "max": float(values[:, i].max())}
            for i, name in enumerate(("effect", "merge", "unmerge"))
        }
    return {"base": base, "methods": out}


def merge_table(results: list[dict]) -> str:
    lines = ["| base | method | effect | merge | unmerge |", "|---|---|---|---|---|"]
    for r in results:
        for method, v in r["methods"].items():
            cells = [f"{v[k]['mean']:.4f} ({v[k]['max']:.4f})" for k in ("effect", "merge", "unmerge")]
            lines.append(f"| {r['base']} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    lines = [
        "| base | KRAdapter step ms (CPU) | LoRA step ms (CPU) | CPU time KR/LoRA | wall KR/LoRA "
        "| KRAdapter peak MB | LoRA peak MB | peak KR/LoRA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        kr, lora = r["contenders"][KR], r["contenders"][LORA]
        lines.append(
            f"| {r['base']} | {1e3 * kr['median_cpu_s']:.1f} | {1e3 * lora['median_cpu_s']:.1f} "
            f"| {r['cpu_time_ratio']:.2f} | {r['time_ratio']:.2f} "
            f"| {kr['peak_bytes'] / 2**20:.1f} | {lora['peak_bytes'] / 2**20:.1f} | {r['peak_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    name = "quantized-merge-cpu.json" if args.merge_errors else "quantized-cpu.json"
    out = args.out or Path(__file__).resolve().parent / "results" / name
    payload = {"machine": environment(), "settings": {k: str(v) for k, v in vars(args).items()}, "bases": []}
    with tempfile.TemporaryDirectory() as folder:
        path = save_model(args, Path(folder))
        if args.merge_errors:
            for base in [b for b in args.bases if b != "dense"]:
                payload["bases"].append(merge_errors(base, path, args))
                write_json(out, payload, indent=1)
                print(merge_table(payload["bases"][-1:]), flush=True)
            print(f"\n{merge_table(payload['bases'])}\n\nresults: {out}")
            return 0
        for base in args.bases:
            result = run_base(base, path, args)
            payload["bases"].append(result)
            write_json(out, payload, indent=1)
            kr, lora = result["contenders"][KR], result["contenders"][LORA]
            rank = result[f"{LORA}_rank"]
            print(
                f"{base}: trainable KRAdapter {kr['trainable']:,}, LoRA r={rank} {lora['trainable']:,}; "
                f"CPU time ratio {result['cpu_time_ratio']:.2f}, peak ratio {result['peak_ratio']:.2f}",
                flush=True,
            )
    print()
    print(table(payload["bases"]))
    print(f"\nmachine: {payload['machine'].get('cpu')}, {args.threads} threads; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
