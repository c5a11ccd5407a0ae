"""High-rank PEFT methods shipped by PEFT 0.21 that can be set to KRAdapter's parameter budget: closed-form
trainable counts, config builders and a budget match, to be folded into the method registry.

Counts are per ``nn.Linear`` of shape ``(out_features, in_features) = (d, k)``, adapter weights only (``bias="none"``,
nothing in ``modules_to_save``); each mirrors the method's ``update_layer`` and is checked against
``get_peft_model`` in the tests. KRAdapter trains about ``sqrt(min(d, k)) * (d + k)`` per layer.

============  =====================  ===========================  ==============================  ======  =====
method        config class           knob(s)                       trainable per layer             Conv1D  merge
============  =====================  ===========================  ==============================  ======  =====
``loha``      ``LoHaConfig``         ``r``                         ``2 r (d + k)``                 no      yes
``c3a``       ``C3AConfig``          ``block_size`` (+ pattern)    ``d k / b``, ``b | d, b | k``   no      yes
``shira``     ``ShiraConfig``        ``r``                         ``r (d + k) <= d k``            no      yes
``gralora``   ``GraloraConfig``      ``r``, ``hybrid_r``           ``(r + hybrid_r) (d + k)``      yes     yes
``hira``      ``HiraConfig``         ``r``                         ``r (d + k)``                   yes     yes
============  =====================  ===========================  ==============================  ======  =====

- **LoHa** ``dW = (alpha / r) (W1a W1b) * (W2a W2b)`` (Hadamard product of two rank-``r`` products; rank up to
  ``r^2``). KRAdapter is a LoHa-like product whose second factors are fixed selectors. Here ``alpha = r``
  (scale 1), as LoRA in :mod:`kradapter.registry`.
- **C3A** ``dW`` is block-circulant: ``(d / b) x (k / b)`` circulant blocks of size ``b`` (one length-``b`` kernel
  each), divided by ``k``; full rank in general. ``b`` must divide both sides, so the budget is reachable only
  in steps; ``block_size_pattern`` sets ``b`` per module. Kernels are float32 (FFT).
- **SHiRA** trains ``r (d + k)`` entries of ``dW`` at fixed random positions (a sparse, high-rank update); the mask
  comes from ``random_seed`` (here 0 unless given, so runs are reproducible).
- **GraLoRA** splits the layer into ``gralora_k x gralora_k`` blocks, each with its own rank-``r / gralora_k``
  LoRA: rank up to ``gralora_k * r`` at LoRA's count (``gralora_k`` must divide ``r``, ``d`` and ``k``); here
  ``alpha = r + hybrid_r`` (scale 1).
- **HiRA** ``dW = W0 * (B A)`` (Hadamard product with the frozen weight; high rank, LoRA's count). Its
  ``get_delta_weight`` returns ``B A`` only; the update is ``W0 * (B A)`` (its ``merge`` multiplies).
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from peft import C3AConfig, GraloraConfig, HiraConfig, LoHaConfig, PeftConfig, ShiraConfig

Shape = tuple[int, int]
BUDGET_TOLERANCE = 0.05  # as the study's equal-budget rule
CONTENDERS: tuple[str, ...] = ("loha", "c3a", "shira", "gralora", "hira")
FACTS: dict[str, dict[str, Any]] = {
    "loha": {"config": "LoHaConfig", "knobs": ["r"], "conv1d": False, "merge": True},
    "c3a": {"config": "C3AConfig", "knobs": ["block_size", "block_size_pattern"], "conv1d": False, "merge": True},
    "shira": {"config": "ShiraConfig", "knobs": ["r"], "conv1d": False, "merge": True},
    "gralora": {"config": "GraloraConfig", "knobs": ["r", "hybrid_r"], "conv1d": True, "merge": True},
    "hira": {"config": "HiraConfig", "knobs": ["r"], "conv1d": True, "merge": True},
}


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_shapes(shapes: Sequence[Sequence[int]]) -> list[Shape]:
    """The ``(out_features, in_features)`` pairs as tuples; a ValueError naming a bad one."""
    out: list[Shape] = []
    for shape in shapes:
        pair = tuple(shape)
        if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in pair):
            raise ValueError(f"a layer shape must be two positive integers (out_features, in_features), got {shape!r}")
        out.append((int(pair[0]), int(pair[1])))
    if not out:
        raise ValueError("no layer shapes given")
    return out


def _config(cls: type[PeftConfig], method: str, target_modules: Any, settings: dict[str, Any]) -> PeftConfig:
    try:
        return cls(target_modules=target_modules, **settings)
    except TypeError as exc:  # an unknown field: name it instead of a dataclass traceback
        raise ValueError(f"invalid setting for PEFT method {method!r}: {exc}") from None


# -- LoHa -----------------------------------------------------------------------------------------------------------


def count_loha(shapes: Sequence[Sequence[int]], r: int = 8) -> int:
    """LoHa: two rank-``r`` pairs per layer, ``2 r (d + k)``."""
    r = _positive_int("r", r)
    return sum(2 * r * (d + k) for d, k in check_shapes(shapes))


def config_loha(target_modules: Any, r: int = 8, **settings: Any) -> PeftConfig:
    """``LoHaConfig`` with ``alpha = r`` (scale 1) unless given."""
    settings.setdefault("alpha", r)
    return _config(LoHaConfig, "loha", target_modules, {"r": r, **settings})


# -- C3A ------------------------------------------------------------------------------------------------------------


def count_c3a(shapes: Sequence[Sequence[int]], block_size: int = 256, block_sizes: Sequence[int] | None = None) -> int:
    """C3A: ``d k / b`` per layer; ``block_sizes`` (one per shape) overrides ``block_size`` layer by layer."""
    layers = check_shapes(shapes)
    sizes = [block_size] * len(layers) if block_sizes is None else list(block_sizes)
    if len(sizes) != len(layers):
        raise ValueError(f"block_sizes has {len(sizes)} entries for {len(layers)} layer shapes")
    total = 0
    for (d, k), b in zip(layers, sizes, strict=True):
        b = _positive_int("block_size", b)
        if d % b or k % b:
            raise ValueError(f"block_size {b} must divide both sides of a layer of shape {(d, k)}")
        total += d * k // b
    return total


def config_c3a(
    target_modules: Any, block_size: int = 256, block_size_pattern: Mapping[str, int] | None = None, **settings: Any
) -> PeftConfig:
    """``C3AConfig``; ``block_size_pattern`` maps module names (regular expressions) to their own block size."""
    settings |= {"block_size": block_size, "block_size_pattern": dict(block_size_pattern or {})}
    return _config(C3AConfig, "c3a", target_modules, settings)


def c3a_pattern(module_shapes: Mapping[str, Sequence[int]], by_shape: Mapping[Shape, int]) -> dict[str, int]:
    """A ``block_size_pattern`` giving each module the block size of its ``(d, k)`` shape.

    ``module_shapes`` is keyed by the full module names of the base model (``model.named_modules()``). C3A looks a
    module up by its exact full name, else by the first key ``K`` with ``re.match(".*\\.K$", name)``; a full name
    matches no other module of the same model.
    """
    return {name: by_shape[(int(s[0]), int(s[1]))] for name, s in module_shapes.items()}


# -- SHiRA ----------------------------------------------------------------------------------------------------------


def count_shira(shapes: Sequence[Sequence[int]], r: int = 32) -> int:
    """SHiRA: ``r (d + k)`` trained entries per layer, at most the layer's ``d k`` (PEFT refuses more)."""
    r = _positive_int("r", r)
    total = 0
    for d, k in check_shapes(shapes):
        if r * (d + k) > d * k:
            raise ValueError(f"SHiRA rank {r} needs {r * (d + k)} entries, more than the {d * k} of a {(d, k)} layer")
        total += r * (d + k)
    return total


def config_shira(target_modules: Any, r: int = 32, random_seed: int = 0, **settings: Any) -> PeftConfig:
    """``ShiraConfig`` with a seeded random mask (``random_seed``, 0 by default: the same positions every run)."""
    return _config(ShiraConfig, "shira", target_modules, {"r": r, "random_seed": random_seed, **settings})


# -- GraLoRA --------------------------------------------------------------------------------------------------------


def count_gralora(shapes: Sequence[Sequence[int]], r: int = 32, hybrid_r: int = 0, gralora_k: int = 2) -> int:
    """GraLoRA: ``(r + hybrid_r) (d + k)`` per layer; ``gralora_k`` must divide ``r`` and both sides."""
    r, k_blocks = _positive_int("r", r), _positive_int("gralora_k", gralora_k)
    if isinstance(hybrid_r, bool) or not isinstance(hybrid_r, int) or hybrid_r < 0:
        raise ValueError(f"hybrid_r must be a non-negative integer, got {hybrid_r!r}")
    if r % k_blocks:
        raise ValueError(f"r should be divisible by gralora_k, but got {r} and {k_blocks}")
    total = 0
    for d, k in check_shapes(shapes):
        if d % k_blocks or k % k_blocks:
            raise ValueError(f"gralora_k {k_blocks} must divide both sides of a layer of shape {(d, k)}")
        total += (r + hybrid_r) * (d + k)
    return total


def config_gralora(
    target_modules: Any, r: int = 32, hybrid_r: int = 0, gralora_k: int = 2, **settings: Any
) -> PeftConfig:
    """``GraloraConfig`` with ``alpha = r + hybrid_r`` (scale 1) unless given."""
    settings.setdefault("alpha", r + hybrid_r)
    settings |= {"r": r, "hybrid_r": hybrid_r, "gralora_k": gralora_k}
    return _config(GraloraConfig, "gralora", target_modules, settings)


# -- HiRA -----------------------------------------------------------------------------------------------------------


def count_hira(shapes: Sequence[Sequence[int]], r: int = 32) -> int:
    """HiRA: LoRA's ``r (d + k)`` per layer (the update is the frozen weight times ``B A``, entrywise)."""
    r = _positive_int("r", r)
    return sum(r * (d + k) for d, k in check_shapes(shapes))


def config_hira(target_modules: Any, r: int = 32, **settings: Any) -> PeftConfig:
    """``HiraConfig`` with rank ``r``."""
    return _config(HiraConfig, "hira", target_modules, {"r": r, **settings})


# -- budget ---------------------------------------------------------------------------------------------------------

COUNTS: dict[str, Callable[..., int]] = {
    "loha": count_loha,
    "c3a": count_c3a,
    "shira": count_shira,
    "gralora": count_gralora,
    "hira": count_hira,
}
CONFIGS: dict[str, Callable[..., PeftConfig]] = {
    "loha": config_loha,
    "c3a": config_c3a,
    "shira": config_shira,
    "gralora": config_gralora,
    "hira": config_hira,
}


def _divisors(n: int) -> list[int]:
    return sorted({g for f in range(1, math.isqrt(n) + 1) if n % f == 0 for g in (f, n // f)})


def match_budget(method: str, shapes: Sequence[Sequence[int]], budget: int, **fixed: Any) -> tuple[dict, int]:
    """``(settings, count)``: the knob values of ``method`` whose count on ``shapes`` is closest to ``budget``.

    ``loha``, ``shira``, ``hira``: the rank ``r``; ``gralora``: ``r`` in steps of ``gralora_k`` (``fixed`` may set
    it; 2 by default), ``hybrid_r = 0``; ``c3a``: one block size per distinct shape, from the divisors of
    ``gcd(d, k)`` (returned as ``block_sizes``, one per shape, and ``by_shape``): among settings within 5% of the
    budget the most even block sizes (smallest largest/smallest ratio), else the closest count. Ties go to the
    smaller count.
    """
    if method not in COUNTS:
        raise ValueError(f"unknown contender {method!r}; choose one of {CONTENDERS}")
    layers = check_shapes(shapes)
    budget = _positive_int("budget", budget)
    candidates: list[tuple[dict, int]] = []
    if method == "c3a":
        distinct = sorted(set(layers))
        options = [_divisors(math.gcd(d, k)) for d, k in distinct]
        for combo in itertools.product(*options):
            by_shape = dict(zip(distinct, combo, strict=True))
            sizes = [by_shape[s] for s in layers]
            candidates.append(({"block_sizes": sizes, "by_shape": by_shape}, count_c3a(layers, block_sizes=sizes)))
    else:
        step = int(fixed.get("gralora_k", 2)) if method == "gralora" else 1
        top = max(max(s) for s in layers)
        if method == "shira":
            top = min(d * k // (d + k) for d, k in layers)
        if method == "gralora":  # gralora_k must divide every side
            layers_ok = all(d % step == 0 and k % step == 0 for d, k in layers)
            top = top if layers_ok else 0
        for r in range(step, top + 1, step):
            candidates.append(({"r": r, **fixed}, COUNTS[method](layers, **({"r": r} | fixed))))
    if not candidates:
        raise ValueError(f"{method} has no valid setting on layers of shapes {layers}")
    if method == "c3a":  # within the tolerance, the most even block sizes first (not a lopsided exact match)
        close = [c for c in candidates if abs(c[1] - budget) <= BUDGET_TOLERANCE * budget]
        if close:
            spread = {id(c): max(c[0]["by_shape"].values()) / min(c[0]["by_shape"].values()) for c in close}
            return min(close, key=lambda c: (spread[id(c)], abs(c[1] - budget), c[1]))
    return min(candidates, key=lambda c: (abs(c[1] - budget), c[1]))
