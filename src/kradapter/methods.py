"""The five PEFT methods compared by the benchmarks, their trainable counts, and configs at an equal budget.

One place says how each method is configured and how many parameters it trains, so the matrix study and the
fine-tuning benchmark give every method the same budget: KRAdapter's own count (it has no rank knob), which
:func:`make_peft_config` matches by searching each other method's knobs. Counts are closed forms of the code
users run (checked in the tests against ``get_peft_model`` on models of ``nn.Linear`` layers); they count the
adapter weights of the targeted layers only (``bias="none"``, nothing in ``modules_to_save``).

Method settings are the PEFT config fields, with these defaults where PEFT's would blur a comparison:

- ``lora``: PEFT ``LoraConfig``; ``lora_alpha = r`` (scale 1, the seed study's plain ``B @ A``).
- ``sinlora``: :class:`kradapter.SinLoRAConfig`; its own defaults for ``alpha`` and ``frequency``.
- ``kradapter``: :class:`kradapter.KRAdapterConfig`; ``factorization`` ``"sqrt_min"`` unless given.
- ``randlora``: PEFT ``RandLoraConfig``; trains ``ceil(m / r) * (r + m)`` per layer (``m = min(d, k)``),
  ``randlora_alpha = 20 * r`` (PEFT's guidance: scale 20), bases shared across layers of any shapes.
- ``kronecker``: PEFT ``LoKrConfig`` (LoKr); ``alpha = r`` (scale 1). Its count depends on how
  ``decompose_factor`` splits each side and on whether ``r`` makes the factors low rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from peft import LoKrConfig, LoraConfig, PeftConfig, RandLoraConfig
from peft.tuners.lokr.layer import factorization as lokr_split

from .khatri_rao import FACTORIZATIONS, KhatriRaoShape
from .tuners import KRAdapterConfig, SinLoRAConfig

METHOD_NAMES: tuple[str, ...] = ("lora", "sinlora", "kradapter", "randlora", "kronecker")
BUDGET_TOLERANCE = 0.05
Shape = tuple[int, int]


def check_method(method: str) -> str:
    """``method`` itself, or a ValueError naming it and the known methods."""
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown PEFT method {method!r}; choose one of {METHOD_NAMES}")
    return method


def check_shapes(shapes: Iterable[Sequence[int]]) -> list[Shape]:
    """The ``(out_features, in_features)`` pairs as tuples; a ValueError naming a bad one."""
    out: list[Shape] = []
    for shape in shapes:
        pair = tuple(shape)
        if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1 for v in pair):
            raise ValueError(f"a layer shape must be two positive integers (out_features, in_features), got {shape!r}")
        out.append((int(pair[0]), int(pair[1])))
    if not out:
        raise ValueError("no layer shapes given")
    return out


def kradapter_budget(shapes: Sequence[tuple[int, int]], factorization: str = "sqrt_min") -> int:
    """KRAdapter's trainable parameter count summed over layers of ``(out_features, in_features)`` shapes."""
    return sum(KhatriRaoShape(d, k, factorization).num_params for d, k in check_shapes(shapes))  # type: ignore[arg-type]


# -- closed-form counts ------------------------------------------------------------------------------------------


def _lokr_layer_count(shape: Shape, r: Any, decompose_both: bool, decompose_factor: int) -> tuple[Any, Any]:
    """LoKr's trainable count on one ``nn.Linear`` (mirrors ``LoKrLayer.update_layer`` for linear layers), and
    whether its ``w2`` is low rank; ``r`` is an integer or an integer array (then both results are arrays)."""
    out_l, out_k = lokr_split(shape[0], decompose_factor)
    in_m, in_n = lokr_split(shape[1], decompose_factor)
    w1_low = np.logical_and(decompose_both, np.less(r, max(out_l, in_m) / 2))
    w2_low = np.less(r, max(out_k, in_n) / 2)
    w1 = np.where(w1_low, np.multiply(r, out_l + in_m), out_l * in_m)
    w2 = np.where(w2_low, np.multiply(r, out_k + in_n), out_k * in_n)
    return w1 + w2, w2_low


def _randlora_layer_count(shape: Shape, r: int) -> int:
    m = min(shape)
    return math.ceil(m / r) * (r + m)


def count_trainable(method: str, shapes: Sequence[tuple[int, int]], **settings: Any) -> int:
    """Trainable adapter parameters of ``method`` with ``settings`` on layers of ``shapes``.

    Settings that change the count: ``r`` (lora, sinlora, randlora, kronecker), ``factorization``
    (kradapter), ``decompose_both`` and ``decompose_factor`` (kronecker); others are ignored here.
    """
    check_method(method)
    layers = check_shapes(shapes)
    if method == "kradapter":
        return kradapter_budget(layers, settings.get("factorization", "sqrt_min"))
    r = _positive_int("r", settings.get("r", _default_rank(method)))
    if method in ("lora", "sinlora"):
        return sum(r * (d + k) for d, k in layers)
    if method == "randlora":
        return sum(_randlora_layer_count(s, r) for s in layers)
    both = bool(settings.get("decompose_both", False))
    factor = int(settings.get("decompose_factor", -1))
    return int(sum(_lokr_layer_count(s, r, both, factor)[0] for s in layers))


def _default_rank(method: str) -> int:
    return {"lora": 8, "sinlora": 8, "randlora": 32, "kronecker": 8}[method]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# -- configs ------------------------------------------------------------------------------------------------------


def build_peft_config(method: str, target_modules: Any, **settings: Any) -> PeftConfig:
    """The PEFT config of ``method`` with ``settings`` (config fields) and the defaults in the module docstring."""
    check_method(method)
    settings = dict(settings)
    try:
        if method == "lora":
            settings.setdefault("lora_alpha", settings.get("r", 8))
            return LoraConfig(target_modules=target_modules, **settings)
        if method == "sinlora":
            return SinLoRAConfig(target_modules=target_modules, **settings)
        if method == "kradapter":
            return KRAdapterConfig(target_modules=target_modules, **settings)
        if method == "randlora":
            settings.setdefault("randlora_alpha", 20 * settings.get("r", 32))
            return RandLoraConfig(target_modules=target_modules, **settings)
        settings.setdefault("alpha", settings.get("r", 8))
        return LoKrConfig(target_modules=target_modules, **settings)
    except TypeError as exc:  # an unknown field: name it instead of a dataclass traceback
        raise ValueError(f"invalid setting for PEFT method {method!r}: {exc}") from None


@dataclass(frozen=True)
class _Candidate:
    settings: dict[str, Any]
    count: int


def _rank_candidates(method: str, layers: list[Shape], fixed: dict[str, Any]) -> list[list[_Candidate]]:
    """Groups of candidate settings for ``method``, most preferred group first.

    The budget search picks the closest count of the first group that has one within the tolerance (else the
    closest overall). Kronecker's groups, in order: both factors full, then a full ``w1`` and a low-rank
    ``w2``, then both low rank (``decompose_both``); within each, PEFT's default split
    (``decompose_factor=-1``) first, then the factors giving the largest ``w1``. So LoKr stays a plain
    Kronecker product of two full factors where the budget allows, and becomes low rank only where it must.
    """
    if method == "kradapter":
        names = [fixed["factorization"]] if "factorization" in fixed else list(FACTORIZATIONS)
        return [[_Candidate({"factorization": f}, kradapter_budget(layers, f)) for f in names]]
    # A rank above the smaller side adds parameters and no expressiveness (SinLoRA refuses it).
    max_rank = min(min(s) for s in layers) if method != "randlora" else max(min(s) for s in layers)
    if method in ("lora", "sinlora", "randlora"):
        ranks = [fixed["r"]] if "r" in fixed else range(1, max_rank + 1)
        return [[_Candidate({"r": r}, count_trainable(method, layers, r=r)) for r in ranks]]
    return _kronecker_groups(layers, fixed)


def _kronecker_groups(layers: list[Shape], fixed: dict[str, Any]) -> list[list[_Candidate]]:
    if "decompose_factor" in fixed:
        factors = [int(fixed["decompose_factor"])]
    else:
        sides = {v for s in layers for v in s}
        divisors = {g for d in sides for f in range(1, math.isqrt(d) + 1) if d % f == 0 for g in (f, d // f)}

        def first_factor_size(factor: int) -> int:  # elements of the full first factor w1, summed over layers
            return sum(lokr_split(d, factor)[0] * lokr_split(k, factor)[0] for d, k in layers)

        factors = [-1, *sorted(divisors, key=lambda f: (-first_factor_size(f), f))]
    boths = [bool(fixed["decompose_both"])] if "decompose_both" in fixed else [False, True]
    top = max(max(s) for s in layers) // 2 + 2
    ranks = np.array([fixed["r"]]) if "r" in fixed else np.arange(1, top + 1)
    groups = []
    for both, low_rank_w2 in [(b, low) for b in boths for low in (False, True) if low or not b]:
        seen = set()
        for factor in factors:
            splits = tuple((lokr_split(d, factor), lokr_split(k, factor)) for d, k in layers)
            if splits in seen:
                continue
            seen.add(splits)
            counts, w2_low = np.zeros_like(ranks), np.zeros(ranks.shape, dtype=bool)
            for layer in layers:
                count, low = _lokr_layer_count(layer, ranks, both, factor)
                counts, w2_low = counts + count, w2_low | low
            keep = w2_low if low_rank_w2 else ~w2_low
            # Ranks giving the same count are the same parameterisation here; keep the smallest of each.
            _, first = np.unique(np.where(keep, counts, -1), return_index=True)
            settings = {"decompose_both": both, "decompose_factor": factor}
            group = [_Candidate({"r": int(ranks[i]), **settings}, int(counts[i])) for i in sorted(first) if keep[i]]
            if group:
                groups.append(group)
    return groups


def make_peft_config(
    method: str,
    target_modules: Any,
    shapes: Sequence[tuple[int, int]],
    budget: int,
    *,
    tolerance: float = BUDGET_TOLERANCE,
    **overrides: Any,
) -> tuple[PeftConfig, int]:
    """PEFT config of ``method`` on ``target_modules`` whose trainable count on layers of ``shapes`` is as close
    as possible to ``budget``; returns ``(config, exact trainable count)``.

    The method's count knobs not fixed in ``overrides`` are searched (see :func:`_rank_candidates`); other
    overrides are passed to the config. A count more than ``tolerance`` (5%) off the budget is a ValueError
    naming the method, the shapes and the closest count; ``tolerance=math.inf`` returns the closest count
    whatever it is (the matrix study runs it and reports the gap).
    """
    check_method(method)
    layers = check_shapes(shapes)
    budget = _positive_int("budget", budget)
    groups = _rank_candidates(method, layers, overrides)

    def error(c: _Candidate) -> float:
        return abs(c.count - budget) / budget

    best = None
    for group in groups:
        closest = min(group, key=error)
        if error(closest) <= BUDGET_TOLERANCE:
            best = closest
            break
        if best is None or error(closest) < error(best):
            best = closest
    assert best is not None
    if error(best) > tolerance:
        raise ValueError(
            f"{method} cannot match a budget of {budget:,} trainable parameters within "
            f"{tolerance:.0%} on layers of shapes {layers}: the closest is {best.count:,} "
            f"({best.settings}, {(best.count - budget) / budget:+.1%})"
        )
    settings = {**overrides, **best.settings}
    return build_peft_config(method, target_modules, **settings), best.count
