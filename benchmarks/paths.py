"""Fused against separate execution of ``khatri_rao_linear`` per shape, token count, dtype and device.

    python benchmarks/paths.py                                  # CPU, float32
    python benchmarks/paths.py --device cuda --dtype bfloat16

Times forward + backward (input, U and V need gradients; the base weight is frozen), the two paths alternated,
medians over rounds. This is the evidence behind the ``"auto"`` rule: fuse whenever fusing is correct. A second
table times the two ways :func:`kradapter.khatri_rao.write_update` builds ``W + s * dW`` (blockwise in place,
or padded in two operations) and, for transposed shapes, with and without the m-fastest copy of the factors:
the evidence behind ``BLOCKWISE_MIN_NUMEL`` and ``FACTOR_COPY_DEVICES``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from measure import time_steps
from tqdm import tqdm

import kradapter.khatri_rao as kr
from kradapter.khatri_rao import KhatriRaoShape, init_factors, khatri_rao_linear, write_update

SHAPES = [(384, 384), (1536, 384), (384, 1536), (768, 1024), (1024, 768), (4096, 4096), (11008, 4096)]  # (out, in)
TOKENS = [1, 16, 64, 256, 2048]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def case(shape: tuple[int, int], tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    d, k = shape
    s = KhatriRaoShape(d, k)
    weight = torch.randn(d, k, device=device, dtype=dtype) / k**0.5
    bias = torch.randn(d, device=device, dtype=dtype)
    u = torch.empty(s.u_shape, device=device, requires_grad=True)
    v = torch.empty(s.v_shape, device=device, requires_grad=True)
    init_factors(u, v, zero_update=False)
    x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, d, device=device, dtype=dtype)

    def fused() -> torch.Tensor:
        y = khatri_rao_linear(x, u, v, s, 2.0, weight, bias)
        y.backward(grad)
        return y

    def separate() -> torch.Tensor:
        y = F.linear(x, weight, bias) + khatri_rao_linear(x, u, v, s, 2.0)
        y.backward(grad)
        return y

    med = alternate({"fused": fused, "separate": separate}, device)
    return {"out": d, "in": k, "tokens": tokens, **{f"{n}_ms": t * 1e3 for n, t in med.items()}}


def alternate(runs: dict, device: torch.device, rounds: int = 7) -> dict[str, float]:
    """Median seconds per call of each callable, alternated round by round."""
    inner = {}
    for name, fn in runs.items():
        fn()
        inner[name] = max(1, min(200, round(0.02 / max(time_steps(fn, device, 1), 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(rounds):
        for name in sorted(runs, reverse=bool(i % 2)):
            samples[name].append(time_steps(runs[name], device, inner[name]))
    return {name: statistics.median(t) for name, t in samples.items()}


def write_variants(shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> dict:
    """Time each way of building ``W + s * dW`` for one shape (module switches set and restored around each call)."""
    d, k = shape
    s = KhatriRaoShape(d, k)
    weight = torch.randn(d, k, device=device, dtype=dtype)
    u, v = torch.randn(s.u_shape, device=device), torch.randn(s.v_shape, device=device)

    def variant(blockwise: bool, copy: bool):  # type: ignore[no-untyped-def]
        def fn() -> torch.Tensor:
            saved = kr.BLOCKWISE_MIN_NUMEL, kr.BLOCKWISE_MIN_NUMEL_TRANSPOSED, kr.FACTOR_COPY_DEVICES
            kr.BLOCKWISE_MIN_NUMEL = kr.BLOCKWISE_MIN_NUMEL_TRANSPOSED = 0 if blockwise else 1 << 62
            kr.FACTOR_COPY_DEVICES = {device.type} if copy else set()
            try:
                return write_update(u, v, s, 2.0, weight, dtype)
            finally:
                kr.BLOCKWISE_MIN_NUMEL, kr.BLOCKWISE_MIN_NUMEL_TRANSPOSED, kr.FACTOR_COPY_DEVICES = saved

        return fn

    runs = {"padded": variant(False, False), "blockwise": variant(True, False)}
    if s.transposed:
        runs["blockwise+copy"] = variant(True, True)
    med = alternate(runs, device)
    chosen = "blockwise" if kr.blockwise(s) else "padded"
    if chosen == "blockwise" and s.transposed and device.type in kr.FACTOR_COPY_DEVICES:
        chosen = "blockwise+copy"
    return {"out": d, "in": k, "chosen": chosen, **{f"{n}_ms": t * 1e3 for n, t in med.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-flops", type=float, default=None, help="skip cases above this many multiply-adds")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    limit = args.max_flops or (2e9 if device.type == "cpu" else float("inf"))
    cases = [(s, n) for s in SHAPES for n in TOKENS if s[0] * s[1] * n <= limit]
    rows = [case(s, n, device, dtype) for s, n in tqdm(cases, desc="cases")]
    print(f"{'out x in':>12}{'tokens':>8}{'fused ms':>11}{'separate ms':>13}{'sep/fused':>11}")
    for r in rows:
        ratio = r["separate_ms"] / r["fused_ms"]
        print(
            f"{r['out']:>6}x{r['in']:<5}{r['tokens']:>8}{r['fused_ms']:>11.3f}{r['separate_ms']:>13.3f}{ratio:>11.2f}"
        )
    writes = [write_variants(s, device, dtype) for s in tqdm(SHAPES, desc="writes")]
    print(f"\n{'out x in':>12}{'padded ms':>11}{'blockwise ms':>14}{'+copy ms':>10}  chosen")
    for w in writes:
        copy = f"{w['blockwise+copy_ms']:>10.3f}" if "blockwise+copy_ms" in w else f"{'-':>10}"
        print(f"{w['out']:>6}x{w['in']:<5}{w['padded_ms']:>11.3f}{w['blockwise_ms']:>14.3f}{copy}  {w['chosen']}")
    out = args.out or Path(__file__).resolve().parent / "results" / f"paths-{device.type}-{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"device": str(device), "dtype": args.dtype, "rows": rows, "writes": writes}
    out.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
