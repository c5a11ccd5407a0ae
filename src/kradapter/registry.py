"""Every method the studies compare, defined once: name, aliases, label, settings, PEFT config, trainable count,
budget search and tolerance. ``compare``, ``finetune`` and the benchmarks read :data:`METHODS`; no other module
branches on a method's name, and adding a method is adding one entry.

Kinds: ``adapter`` (a PEFT config sized to a budget), ``reference`` (``compare`` only: the truncated SVD at LoRA's
rank and zero, computed from the target's spectrum) and ``baseline`` (``finetune`` only: the head alone, or full
fine-tuning). The budget is KRAdapter's own count (it has no rank knob); every other adapter's count knobs are
searched to match it (:func:`plan`). Counts are closed forms of the code users run, checked in the tests against
``get_peft_model``; they count the adapter weights of the targeted layers only (``bias="none"``).

Library defaults applied to every config, where PEFT's would blur a comparison: LoRA and LoKr at scale 1
(``alpha = r``), RandLoRA at PEFT's recommended scale 20 (``randlora_alpha = 20 r``). ``study`` holds the extra
defaults of the matrix study (the published code's toy methods all had scale 1, SinLoRA ``sin(20 B A)``).

Membership and roles are tags on the entries (:data:`TAGS`), read with :func:`tagged`: the default ``--methods``
of each study (``compare-default``, ``finetune-default``), the shift study's presets, the budget method
(:func:`budget_method`), the shift study's anchor (:func:`anchor`), the adapter others are shown relative to
(:func:`reference_adapter`) and the adapters ``kradapter export`` reads. A list keeps registry order unless its
entries give ``positions`` for its tag (finetune's list is ordered baselines first). Help texts come from
:func:`methods_help`, and the derived lists (``ADAPTERS``, ``DEFAULT_ADAPTERS``, ...) are computed when read, so a
method added to :data:`METHODS` is at once in every list, every ``--help`` and both studies
(``tests/compare/test_method_facts.py`` proves it, and fails on a quoted method name anywhere else in the code).

Importing this module loads no heavy library: names, settings and checks answer at once; counts and configs
import PEFT and torch only when called.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from . import guards
from .shape import FACTORIZATIONS, Factorization, KhatriRaoShape

Shape = tuple[int, int]
Settings = dict[str, Any]
COMMON_SETTINGS = ("modules_to_save", "task_type")  # PEFT config fields every adapter takes


class MethodError(ValueError):
    """An unknown method, a bad setting, or a budget no setting can match; the message names the value."""


@dataclass(frozen=True)
class Candidate:
    """One setting of a method's count knobs and the trainable count it gives."""

    settings: Settings
    count: int


@dataclass(frozen=True)
class Plan:
    """One method sized for layers of given shapes: its PEFT settings, exact count, the budget and any gap note."""

    method: str
    settings: Settings
    count: int
    budget: int | None
    note: str | None = None

    @property
    def budget_ratio(self) -> float | None:
        return self.count / self.budget if self.budget else None


@dataclass(frozen=True)
class Method:
    """One method, everything the studies need to know about it."""

    name: str
    label: str
    kind: str  # "adapter", "reference" or "baseline"
    aliases: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()  # the PEFT config fields (and study settings) the studies accept
    count_knobs: tuple[str, ...] = ()  # settings that change the trainable count (searched for a budget)
    rank_knob: str | None = None  # the knob an "equal rank" study sets
    scale_one: str | None = None  # the alpha field that gives scale 1 when equal to the rank (matrix study)
    seed_setting: str | None = None  # a config field seeding the method's frozen random parts
    tolerance: float = 0.05  # largest relative gap to the budget a study accepts
    tags: frozenset[str] = frozenset()  # the lists and roles the method belongs to (TAGS); read with tagged()
    positions: Mapping[str, int] = field(default_factory=dict)  # tag -> place in that list, where not registry order
    trains_base: bool = False  # a baseline that trains the whole model (else only its head)
    update_uses_base: bool = False  # the update is made from the frozen weight (HiRA: W0 * (B A))
    rank_of: str | None = None  # a reference: the truncated SVD at this method's rank (None: rank 0, i.e. zero)
    optimum_of: str | None = None  # a reference: this method's best update on the target (compare/optima.py)
    lr_grid: tuple[float, ...] = ()  # finetune's and the shift study's learning-rate grid (half_decades)
    knob_values: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # count knobs with a fixed set of values
    sweep: tuple[Settings, ...] = ()  # the shift study's rank sweep: this method's fixed sizes, as variants
    study: Mapping[str, Any] = field(default_factory=dict)  # the matrix study's defaults
    build: Callable[[Any, Settings], Any] | None = None  # (target_modules, settings) -> PeftConfig
    counter: Callable[[list[Shape], Settings], int] | None = None
    candidates: Callable[[list[Shape], Settings], list[list[Candidate]]] | None = None
    describe: Callable[[Settings], str] = lambda s: f"r={s['r']}" if "r" in s else ""
    to_peft: Callable[[Settings, Shape], Settings] = lambda s, shape: s  # study settings -> config fields

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter"

    @property
    def init_setting(self) -> str | None:
        """The config field that, set False, starts the adapter from a random non-zero update (benchmarks of merged
        and unmerged inference need one); None if the method has none."""
        return next((k for k in ("init_lora_weights", "init_weights") if k in self.settings), None)

    def check_settings(self, settings: Mapping[str, Any], where: str) -> None:
        """A MethodError naming ``where`` and the first setting this method does not accept or a bad count knob."""
        for key, value in settings.items():
            if key not in self.settings and key not in COMMON_SETTINGS:
                raise MethodError(f"{where}.{key}: unknown setting of {self.name}; known: {', '.join(self.settings)}")
            if key == self.rank_knob:
                positive_int(f"{where}.{key}", value)

    def config(self, target_modules: Any, **settings: Any) -> Any:
        """The PEFT config with ``settings`` and the library defaults (module docstring)."""
        if self.build is None:
            raise MethodError(f"{self.name} is not a PEFT method")
        self.check_settings(settings, self.name)
        try:
            return self.build(target_modules, dict(settings))
        except (TypeError, ValueError) as exc:  # PEFT's own validation: one line naming the method
            raise MethodError(f"invalid setting for {self.name}: {exc}") from None

    def count(self, shapes: Iterable[Sequence[int]], **settings: Any) -> int:
        """Trainable adapter parameters with ``settings`` on layers of ``shapes``."""
        if self.counter is None:
            raise MethodError(f"{self.name} has no closed-form trainable count")
        return int(self.counter(check_shapes(shapes), settings))


# -- checks ---------------------------------------------------------------------------------------------------------


def positive_int(name: str, value: Any) -> int:
    """``value`` as an ``int`` if it is a positive integer (numpy integers too); a MethodError naming it."""
    return guards.positive_int(name, value, error=MethodError)


def check_shapes(shapes: Iterable[Sequence[int]]) -> list[Shape]:
    """The ``(out_features, in_features)`` pairs as tuples; a MethodError naming a bad one."""
    out: list[Shape] = []
    for shape in shapes:
        pair = tuple(shape)
        try:
            if len(pair) != 2:
                raise MethodError("")
            out.append((positive_int("out_features", pair[0]), positive_int("in_features", pair[1])))
        except MethodError:
            raise MethodError(
                f"a layer shape must be two positive integers (out_features, in_features), got {shape!r}"
            ) from None
    if not out:
        raise MethodError("no layer shapes given")
    return out


# -- KRAdapter --------------------------------------------------------------------------------------------------------


def kradapter_budget(shapes: Iterable[Sequence[int]], factorization: str = "sqrt_min") -> int:
    """KRAdapter's trainable count summed over layers: the budget every other method is sized to."""
    guards.one_of("KRAdapter factorization", factorization, FACTORIZATIONS, error=MethodError)
    checked = cast(Factorization, factorization)
    return sum(KhatriRaoShape(d, k, checked).num_params for d, k in check_shapes(shapes))


def _kradapter_config(targets: Any, s: Settings) -> Any:
    from .tuners import KRAdapterConfig

    return KRAdapterConfig(target_modules=targets, **s)


def _kradapter_candidates(layers: list[Shape], fixed: Settings) -> list[list[Candidate]]:
    names = [fixed["factorization"]] if "factorization" in fixed else list(FACTORIZATIONS)
    return [[Candidate({"factorization": f}, kradapter_budget(layers, f)) for f in names]]


# -- rank-r methods ---------------------------------------------------------------------------------------------------

DEFAULT_RANK = 8


def _rank(settings: Settings, default: int = DEFAULT_RANK) -> int:
    return positive_int("r", settings.get("r", default))


def _rank_candidates(
    counter: Callable[[list[Shape], Settings], int], bound: Callable[[list[Shape]], int]
) -> Callable[[list[Shape], Settings], list[list[Candidate]]]:
    """Candidates ``r = 1..bound(layers)``: a rank above the smaller side adds parameters and no expressiveness."""

    def candidates(layers: list[Shape], fixed: Settings) -> list[list[Candidate]]:
        ranks = [fixed["r"]] if "r" in fixed else range(1, bound(layers) + 1)
        return [[Candidate({"r": r}, counter(layers, {"r": r})) for r in ranks]]

    return candidates


def _smallest_side(layers: list[Shape]) -> int:
    return min(min(s) for s in layers)


def _lora_count(layers: list[Shape], s: Settings) -> int:
    r = _rank(s)
    return sum(r * (d + k) for d, k in layers)


def _lora_config(targets: Any, s: Settings) -> Any:
    from peft import LoraConfig

    s.setdefault("lora_alpha", s.get("r", DEFAULT_RANK))
    return LoraConfig(target_modules=targets, **s)


def _sinlora_config(targets: Any, s: Settings) -> Any:
    from .tuners import SinLoRAConfig

    return SinLoRAConfig(target_modules=targets, **s)


def _sinlora_to_peft(s: Settings, shape: Shape) -> Settings:
    """The study's ``amplitude`` as SinLoRA's ``alpha`` (the tuner divides by ``r`` and ``sqrt(in)``; the published
    code did not)."""
    s = dict(s)
    amplitude = s.pop("amplitude", None)
    if amplitude is not None and "alpha" not in s:
        s["alpha"] = float(amplitude) * s.get("r", DEFAULT_RANK) * math.sqrt(shape[1])
    return s


RANDLORA_DEFAULT_RANK = 32


def _randlora_count(layers: list[Shape], s: Settings) -> int:
    r = _rank(s, RANDLORA_DEFAULT_RANK)
    return sum(math.ceil(min(shape) / r) * (r + min(shape)) for shape in layers)


def _randlora_config(targets: Any, s: Settings) -> Any:
    from peft import RandLoraConfig

    s.setdefault("randlora_alpha", 20 * s.get("r", RANDLORA_DEFAULT_RANK))
    return RandLoraConfig(target_modules=targets, **s)


# -- Kronecker (PEFT's LoKr) ------------------------------------------------------------------------------------------


def _lokr_layer_count(shape: Shape, r: Any, decompose_both: bool, decompose_factor: int) -> tuple[Any, Any]:
    """LoKr's trainable count on one ``nn.Linear`` (as ``LoKrLayer.update_layer`` sizes it), and whether its ``w2``
    is low rank; ``r`` is an integer or an integer array (then both results are arrays)."""
    import numpy as np
    from peft.tuners.lokr.layer import factorization as lokr_split

    out_l, out_k = lokr_split(shape[0], decompose_factor)
    in_m, in_n = lokr_split(shape[1], decompose_factor)
    w1_low = np.logical_and(decompose_both, np.less(r, max(out_l, in_m) / 2))
    w2_low = np.less(r, max(out_k, in_n) / 2)
    w1 = np.where(w1_low, np.multiply(r, out_l + in_m), out_l * in_m)
    w2 = np.where(w2_low, np.multiply(r, out_k + in_n), out_k * in_n)
    return w1 + w2, w2_low


def _lokr_count(layers: list[Shape], s: Settings) -> int:
    r = _rank(s)
    both, factor = bool(s.get("decompose_both", False)), int(s.get("decompose_factor", -1))
    return int(sum(_lokr_layer_count(shape, r, both, factor)[0] for shape in layers))


def _lokr_config(targets: Any, s: Settings) -> Any:
    from peft import LoKrConfig

    s.setdefault("alpha", s.get("r", DEFAULT_RANK))
    return LoKrConfig(target_modules=targets, **s)


def _lokr_candidates(layers: list[Shape], fixed: Settings) -> list[list[Candidate]]:
    """Groups, most preferred first: both factors full, then a full ``w1`` and a low-rank ``w2``, then both low rank
    (``decompose_both``); within each, PEFT's default split (``decompose_factor=-1``) first, then the factors giving
    the largest ``w1``. So LoKr stays a plain Kronecker product of two full factors where the budget allows."""
    import numpy as np
    from peft.tuners.lokr.layer import factorization as lokr_split

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
            group = [Candidate({"r": int(ranks[i]), **settings}, int(counts[i])) for i in sorted(first) if keep[i]]
            if group:
                groups.append(group)
    return groups


# -- the high-rank relatives PEFT ships (LoHa, SHiRA, HiRA, GraLoRA, C3A) ---------------------------------------------


def _loha_count(layers: list[Shape], s: Settings) -> int:
    return 2 * _lora_count(layers, s)  # two rank-r pairs, Hadamard-multiplied


def _loha_config(targets: Any, s: Settings) -> Any:
    from peft import LoHaConfig

    s.setdefault("alpha", s.get("r", DEFAULT_RANK))
    return LoHaConfig(target_modules=targets, **s)


def _shira_count(layers: list[Shape], s: Settings) -> int:
    """``r (d + k)`` trained entries of a fixed random mask per layer; PEFT refuses more than the layer's ``d k``."""
    r = _rank(s)
    for d, k in layers:
        if r * (d + k) > d * k:
            raise MethodError(f"shira r={r} needs {r * (d + k)} entries, more than the {d * k} of a {d}x{k} layer")
    return _lora_count(layers, s)


def _shira_config(targets: Any, s: Settings) -> Any:
    from peft import ShiraConfig

    s.setdefault("random_seed", 0)  # the same mask positions every run
    return ShiraConfig(target_modules=targets, **s)


def _shira_bound(layers: list[Shape]) -> int:
    return min(d * k // (d + k) for d, k in layers)


def _hira_config(targets: Any, s: Settings) -> Any:
    from peft import HiraConfig

    return HiraConfig(target_modules=targets, **s)


GRALORA_BLOCKS = 2  # PEFT's default gralora_k: it must divide r and both sides of every layer


def _gralora_count(layers: list[Shape], s: Settings) -> int:
    r, blocks = _rank(s), positive_int("gralora_k", s.get("gralora_k", GRALORA_BLOCKS))
    if r % blocks or any(d % blocks or k % blocks for d, k in layers):
        raise MethodError(f"gralora_k={blocks} must divide r={r} and both sides of every layer {layers}")
    return (r + int(s.get("hybrid_r", 0))) * sum(d + k for d, k in layers)


def _gralora_config(targets: Any, s: Settings) -> Any:
    from peft import GraloraConfig

    s.setdefault("alpha", s.get("r", DEFAULT_RANK) + s.get("hybrid_r", 0))
    return GraloraConfig(target_modules=targets, **s)


def _gralora_candidates(layers: list[Shape], fixed: Settings) -> list[list[Candidate]]:
    blocks = int(fixed.get("gralora_k", GRALORA_BLOCKS))
    ranks = [fixed["r"]] if "r" in fixed else range(blocks, _smallest_side(layers) + 1, blocks)
    return [[Candidate({"r": r}, _gralora_count(layers, {"r": r, "gralora_k": blocks})) for r in ranks]]


def _c3a_count(layers: list[Shape], s: Settings) -> int:
    """One circulant kernel per ``b x b`` block: ``d k / b`` per layer; ``b`` (PEFT's default unless given) must
    divide both sides."""
    if "block_size" in s:
        b = positive_int("block_size", s["block_size"])
    else:
        from peft import C3AConfig

        b = C3AConfig.block_size
    if any(d % b or k % b for d, k in layers):
        raise MethodError(f"c3a block_size={b} must divide both sides of every layer {layers}")
    return sum(d * k // b for d, k in layers)


def _c3a_config(targets: Any, s: Settings) -> Any:
    from peft import C3AConfig

    return C3AConfig(target_modules=targets, **s)


def _c3a_candidates(layers: list[Shape], fixed: Settings) -> list[list[Candidate]]:
    """Every block size dividing all sides (one for the whole model: PEFT's per-module patterns are keyed by
    name, which a budget over shapes does not know)."""
    common = math.gcd(*(v for shape in layers for v in shape))
    sizes = [fixed["block_size"]] if "block_size" in fixed else [b for b in range(1, common + 1) if common % b == 0]
    return [[Candidate({"block_size": b}, _c3a_count(layers, {"block_size": b})) for b in sizes]]


# -- the registry -------------------------------------------------------------------------------------------------

LR_GRID_RATES = 5  # rates in every registry grid: the shift study's tuning rule needs at least 5 (log-spaced)


def half_decades(centre: float, rates: int = LR_GRID_RATES) -> tuple[float, ...]:
    """``rates`` learning rates in half-decade steps (ratio sqrt(10)) centred on ``10 ** centre`` (a half decade):
    ``half_decades(-2.5)`` = 3.2e-4, 1e-3, 3.2e-3, 1e-2, 3.2e-2, bracketing the earlier 1e-3, 3e-3, 1e-2 by one
    step on each side, so a sweep can tell whether the best rate sits inside the grid."""
    twice = round(2 * centre)
    if twice != 2 * centre:
        raise MethodError(f"a grid's centre must be a whole or half decade, got 10^{centre}")
    low = -(rates // 2)
    return tuple(10.0 ** ((twice + k) / 2) for k in range(low, low + rates))


_ENTRIES = (
    Method(
        "lora",
        "LoRA",
        "adapter",
        tags=frozenset(
            {"compare-default", "finetune-default", "shift-reduced", "shift-primary", "shift-full", "reference-adapter"}
        ),
        positions={"finetune-default": 2},
        settings=("r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights"),
        count_knobs=("r",),
        rank_knob="r",
        scale_one="lora_alpha",
        sweep=tuple({"r": 2**i} for i in range(9)),  # 1 .. 256
        lr_grid=half_decades(-2.5),
        build=_lora_config,
        counter=_lora_count,
        candidates=_rank_candidates(_lora_count, _smallest_side),
    ),
    Method(
        "sinlora",
        "SinLoRA",
        "adapter",
        tags=frozenset({"compare-default", "finetune-default", "export-source"}),
        positions={"finetune-default": 6, "export-source": 1},
        settings=("r", "alpha", "frequency", "dropout", "init_weights", "amplitude"),
        count_knobs=("r",),
        rank_knob="r",
        lr_grid=half_decades(-3),
        study={"frequency": 20.0, "amplitude": 1.0},
        build=_sinlora_config,
        counter=_lora_count,
        candidates=_rank_candidates(_lora_count, _smallest_side),
        to_peft=_sinlora_to_peft,
    ),
    Method(
        "kradapter",
        "KRAdapter",
        "adapter",
        tags=frozenset(
            {
                "compare-default",
                "finetune-default",
                "shift-reduced",
                "shift-primary",
                "shift-full",
                "shift-anchor",
                "budget",
                "export-source",
            }
        ),
        positions={"finetune-default": 5, "export-source": 0},
        settings=("scaling", "factorization", "execution", "dropout", "init_weights"),
        count_knobs=("factorization",),
        knob_values={"factorization": FACTORIZATIONS},
        sweep=({"factorization": "sqrt_max"},),  # sqrt_min is KRAdapter itself (the budget, the sweep's anchor)
        lr_grid=half_decades(-2.5),
        study={"scaling": 1.0},
        build=_kradapter_config,
        counter=lambda layers, s: kradapter_budget(layers, s.get("factorization", "sqrt_min")),
        candidates=_kradapter_candidates,
        describe=lambda s: f"{s.get('factorization', 'sqrt_min')}, scale {s.get('scaling', 2.0)}",
    ),
    Method(
        "randlora",
        "RandLoRA",
        "adapter",
        tags=frozenset({"compare-default", "finetune-default"}),
        positions={"finetune-default": 4},
        settings=("r", "randlora_alpha", "randlora_dropout", "sparse", "very_sparse", "projection_prng_key"),
        count_knobs=("r",),
        rank_knob="r",
        scale_one="randlora_alpha",
        seed_setting="projection_prng_key",
        tolerance=0.10,  # its count moves in steps of ceil(m / r): on MiniLM's layers the closest is -6.7%
        lr_grid=half_decades(-3),
        build=_randlora_config,
        counter=_randlora_count,
        candidates=_rank_candidates(_randlora_count, lambda layers: max(min(s) for s in layers)),
    ),
    Method(
        "kronecker",
        "Kronecker (LoKr)",
        "adapter",
        tags=frozenset({"compare-default", "finetune-default"}),
        positions={"finetune-default": 3},
        aliases=("lokr",),
        settings=("r", "alpha", "decompose_both", "decompose_factor", "rank_dropout", "module_dropout", "init_weights"),
        count_knobs=("r", "decompose_both", "decompose_factor"),
        rank_knob="r",
        scale_one="alpha",
        lr_grid=half_decades(-2.5),
        build=_lokr_config,
        counter=_lokr_count,
        candidates=_lokr_candidates,
        describe=lambda s: f"r={s.get('r')}, factor={s.get('decompose_factor')}, both={s.get('decompose_both')}",
    ),
    Method(
        "loha",
        "LoHa",
        "adapter",
        tags=frozenset({"shift-full"}),
        settings=("r", "alpha", "rank_dropout", "module_dropout", "init_weights"),
        count_knobs=("r",),
        rank_knob="r",
        scale_one="alpha",
        sweep=({"r": 2}, {"r": 8}, {"r": 32}),
        lr_grid=half_decades(-2.5),
        build=_loha_config,
        counter=_loha_count,
        candidates=_rank_candidates(_loha_count, _smallest_side),
    ),
    Method(
        "shira",
        "SHiRA",
        "adapter",
        tags=frozenset({"shift-contender"}),
        settings=("r", "random_seed", "init_weights"),
        count_knobs=("r",),
        rank_knob="r",
        lr_grid=half_decades(-2.5),
        build=_shira_config,
        counter=_shira_count,
        candidates=_rank_candidates(_shira_count, _shira_bound),
    ),
    Method(
        "hira",
        "HiRA",
        "adapter",
        tags=frozenset({"shift-contender"}),
        settings=("r", "dropout", "init_weights"),
        count_knobs=("r",),
        rank_knob="r",
        update_uses_base=True,
        lr_grid=half_decades(-2),  # its update is W0 * (B A): entries ~W0 (0.05) times smaller than LoRA's
        build=_hira_config,
        counter=_lora_count,
        candidates=_rank_candidates(_lora_count, _smallest_side),
    ),
    Method(
        "gralora",
        "GraLoRA",
        "adapter",
        tags=frozenset({"shift-contender"}),
        settings=("r", "alpha", "gralora_k", "hybrid_r", "gralora_dropout", "init_weights"),
        count_knobs=("r", "gralora_k", "hybrid_r"),
        rank_knob="r",
        scale_one="alpha",
        lr_grid=half_decades(-2.5),
        build=_gralora_config,
        counter=_gralora_count,
        candidates=_gralora_candidates,
    ),
    Method(
        "c3a",
        "C3A",
        "adapter",
        tags=frozenset({"shift-contender"}),
        settings=("block_size", "init_weights"),
        count_knobs=("block_size",),
        tolerance=0.10,  # its count moves in steps of d k / b: on MiniLM's layers the closest is +6.7% (b = 12)
        lr_grid=half_decades(-1.5),  # PEFT divides its output by the input width
        build=_c3a_config,
        counter=_c3a_count,
        candidates=_c3a_candidates,
        describe=lambda s: f"block {s.get('block_size')}",
    ),
    Method("svd", "Truncated SVD", "reference", rank_of="lora"),
    Method("kradapter_optimum", "KRAdapter optimum", "reference", optimum_of="kradapter"),
    Method("kronecker_optimum", "LoKr optimum", "reference", optimum_of="kronecker"),
    Method("zero", "Zero", "reference"),
    Method(
        "head",
        "head only",
        "baseline",
        tags=frozenset({"finetune-default", "shift-full"}),
        positions={"finetune-default": 0},
        lr_grid=half_decades(-1.5),
        describe=lambda s: "",
    ),
    Method(
        "full",
        "full fine-tuning",
        "baseline",
        tags=frozenset({"finetune-default", "shift-contender", "shift-anchor-cell"}),
        positions={"finetune-default": 1},
        lr_grid=half_decades(-3.5),
        trains_base=True,
        describe=lambda s: "",
    ),
)

METHODS: dict[str, Method] = {m.name: m for m in _ENTRIES}  # registry order; a new entry is a new method

TAGS = {
    "compare-default": "in kradapter compare's default --methods",
    "finetune-default": "in kradapter finetune's default --methods",
    "shift-reduced": "in the shift study's reduced preset (its --methods)",
    "shift-primary": "a side of the shift study's primary endpoints (the powered preset's --methods)",
    "shift-full": "in the shift study's full preset (its --methods)",
    "shift-contender": "a contender of the shift study's full preset (anchor cell only)",
    "shift-anchor-cell": "run by the shift study in each benchmark's anchor cell only, whatever the flag (its cost)",
    "shift-anchor": "the method every shift comparison is against",
    "budget": "the method whose trainable count is the budget every other adapter is sized to",
    "reference-adapter": "the adapter others are shown relative to (compare's error bars, the benchmarks' speed)",
    "export-source": "an adapter of this package's own tuners, which kradapter export turns into LoRA",
}


def tagged(tag: str) -> tuple[str, ...]:
    """Names of the methods carrying ``tag``, in registry order (or the entries' ``positions`` for that tag, where
    a list keeps an order of its own; entries without a position follow, in registry order)."""
    if tag not in TAGS:
        raise MethodError(f"unknown method tag {tag!r}; known: {', '.join(TAGS)}")
    found = [m for m in METHODS.values() if tag in m.tags]
    return tuple(m.name for m in sorted(found, key=lambda m: m.positions.get(tag, len(METHODS))))


def _the(tag: str) -> Method:
    names = tagged(tag)
    if len(names) != 1:
        raise MethodError(f"exactly one method must carry the tag {tag!r}, found {list(names)}")
    return METHODS[names[0]]


def budget_method() -> Method:
    """The method whose trainable count is the budget (KRAdapter: it has no rank knob)."""
    return _the("budget")


def reference_adapter() -> str:
    """The name of the adapter others are shown relative to (LoRA: the usual low-rank method)."""
    return _the("reference-adapter").name


def anchor() -> str:
    """The name of the method every shift comparison is against."""
    return _the("shift-anchor").name


def of_kind(*kinds: str) -> tuple[str, ...]:
    """Names of the methods of ``kinds`` ("adapter", "reference", "baseline"), in registry order."""
    return tuple(m.name for m in METHODS.values() if m.kind in kinds)


def aliases() -> dict[str, str]:
    """Every accepted spelling (name or alias, lower case) -> canonical name."""
    return {alias: m.name for m in METHODS.values() for alias in (m.name, *m.aliases)}


def __getattr__(name: str) -> Any:
    """The derived lists, computed from :data:`METHODS` when read, so an added entry is in them at once."""
    derived: dict[str, Callable[[], Any]] = {
        "ALIASES": aliases,
        "ADAPTERS": lambda: of_kind("adapter"),
        "DEFAULT_ADAPTERS": lambda: tagged("compare-default"),
        "REFERENCES": lambda: of_kind("reference"),
        "BASELINES": lambda: of_kind("baseline"),
        "BUDGET_METHOD": lambda: budget_method().name,
        "RELATIVE_TO": lambda: reference_adapter(),
    }
    if name in derived:
        return derived[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def methods_help(kind: str | Iterable[str] | None = None, *, default: str | None = None) -> str:
    """A help text listing the methods (of ``kind``: one kind or several; all by default) with their aliases,
    and the methods tagged ``default`` if given: for argparse help and epilogs, generated so it never goes stale."""
    if kind is None:
        kinds: tuple[str, ...] = ("adapter", "reference", "baseline")
    else:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    items = []
    for m in METHODS.values():
        if m.kind not in kinds:
            continue
        extras = [m.label] if m.label.lower().replace(" ", "") != m.name else []
        extras += [f"also {a}" for a in m.aliases]
        items.append(f"{m.name} ({'; '.join(extras)})" if extras else m.name)
    text = ", ".join(items)
    if default is not None:
        text += f"; default: {','.join(tagged(default))}"
    return text


def get(name: str, kinds: Iterable[str] = ("adapter",)) -> Method:
    """The method called ``name`` (or one of its aliases, any case) among ``kinds``; a MethodError naming it."""
    kinds = tuple(kinds)
    canonical = aliases().get(str(name).strip().lower())
    if canonical is None or METHODS[canonical].kind not in kinds:
        known = [m.name for m in METHODS.values() if m.kind in kinds]
        spellings = [f"{a} = {m.name}" for m in METHODS.values() if m.kind in kinds for a in m.aliases]
        extra = f" (aliases: {', '.join(spellings)})" if spellings else ""
        raise MethodError(f"unknown method {name!r}; choose from {', '.join(known)}{extra}")
    return METHODS[canonical]


def parse_names(
    items: Iterable[str], kinds: Iterable[str] = ("adapter",), *, variants: bool = False
) -> tuple[str, ...]:
    """Canonical names, in order, from items that may each be comma-separated; with ``variants``, an adapter at a
    fixed size (``METHOD@KNOB=VALUE``, :func:`variant`) too; a MethodError naming a bad one."""
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            if part.strip():
                name = variant(part, kinds).name if variants and VARIANT_MARK in part else get(part, kinds).name
                if name not in out:
                    out.append(name)
    if not out:
        raise MethodError("no methods given")
    return tuple(out)


# -- variants: an adapter at a fixed size ----------------------------------------------------------------------------

VARIANT_MARK = "@"


@dataclass(frozen=True)
class Variant:
    """An adapter at a fixed size instead of the budget: ``name`` is its canonical spelling
    (``METHOD@KNOB=VALUE[@KNOB=VALUE]``, the method's canonical name, knobs in its ``count_knobs`` order), the key
    it has in results; ``knobs`` the count knobs it fixes."""

    name: str
    method: Method
    knobs: Settings

    def plan(self, shapes: Iterable[Sequence[int]], budget: int | None = None, **fixed: Any) -> Plan:
        """The variant on layers of ``shapes``: its knobs as given, its exact count (``budget`` is only recorded:
        nothing is searched); a MethodError naming the knob when a layer cannot honour its value (a rank above a
        layer's smaller side, a block size that does not divide it: whatever the method's own search excludes)."""
        layers = check_shapes(shapes)
        settings = {**fixed, **self.knobs}
        self.method.check_settings(settings, self.name)
        assert self.method.candidates is not None
        for knob, value in self.knobs.items():
            others = {k: v for k, v in self.knobs.items() if k != knob}
            allowed = {c.settings.get(knob) for group in self.method.candidates(layers, others) for c in group}
            if None not in allowed and value not in allowed:  # None: a knob the search does not vary (counted)
                raise MethodError(
                    f"{self.name}: {knob}={_knob_text(value)} is not a size {self.method.name} can take on these "
                    f"layers (smallest {_smallest_side(layers)} wide); {knob} {_choices(allowed)}"
                )
        return Plan(self.name, settings, self.method.count(layers, **settings), budget)


def _knob_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _choices(values: Iterable[Any]) -> str:
    ordered = sorted(values, key=lambda v: (str(type(v)), v))
    ints = [v for v in ordered if isinstance(v, int) and not isinstance(v, bool)]
    if ints and len(ints) == len(ordered) and ints == list(range(ints[0], ints[-1] + 1)) and len(ints) > 3:
        return f"from {ints[0]} to {ints[-1]}"
    return "one of " + ", ".join(_knob_text(v) for v in ordered[:12]) + (", ..." if len(ordered) > 12 else "")


def _parse_knob(text: str) -> Any:
    """A knob's value as written: an integer, true/false, or a word (lower case)."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(low)
    except ValueError:
        return low


def variant(spelling: str, kinds: Iterable[str] = ("adapter",)) -> Variant:
    """``METHOD@KNOB=VALUE[@KNOB=VALUE]`` (any case, aliases accepted) as a :class:`Variant`; a one-line
    MethodError naming the bad part: an unknown method or one without size knobs, a knob that is not one of the
    method's count knobs (given twice, or without ``=VALUE``), a value it cannot take. Whether the layers can
    honour the value is checked when it is sized (:meth:`Variant.plan`)."""
    text = str(spelling).strip()
    head, *parts = text.split(VARIANT_MARK)
    method = get(head, kinds)
    if not method.is_adapter or not method.count_knobs:
        raise MethodError(f"{text}: {method.name} has no size knobs (a variant fixes an adapter's size)")
    knobs: Settings = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or not key or not value.strip():
            raise MethodError(f"{text}: {part!r} is not KNOB=VALUE (knobs of {method.name}: "
                              f"{', '.join(method.count_knobs)})")  # fmt: skip
        if key not in method.count_knobs:
            raise MethodError(f"{text}: unknown knob {key!r} of {method.name}; its size knobs: "
                              f"{', '.join(method.count_knobs)}")  # fmt: skip
        if key in knobs:
            raise MethodError(f"{text}: knob {key!r} given twice")
        knobs[key] = _parse_knob(value)
        choices = method.knob_values.get(key)
        if choices is not None and knobs[key] not in choices:
            raise MethodError(f"{text}: {key} must be one of {', '.join(map(str, choices))}, got {value.strip()!r}")
    if not knobs:
        raise MethodError(f"{text}: no knob after {VARIANT_MARK!r} (knobs of {method.name}: "
                          f"{', '.join(method.count_knobs)})")  # fmt: skip
    if method.rank_knob in knobs:
        positive_int(f"{text}: {method.rank_knob}", knobs[method.rank_knob])
    ordered = {k: knobs[k] for k in method.count_knobs if k in knobs}
    name = VARIANT_MARK.join([method.name, *(f"{k}={_knob_text(v)}" for k, v in ordered.items())])
    return Variant(name, method, ordered)


def variant_name(method: str, knobs: Mapping[str, Any]) -> str:
    """The canonical spelling of ``method`` at ``knobs`` (checked as :func:`variant` checks it)."""
    return variant(VARIANT_MARK.join([method, *(f"{k}={_knob_text(v)}" for k, v in knobs.items())])).name


def is_variant(name: str) -> bool:
    return VARIANT_MARK in str(name)


def entry(name: str) -> Method:
    """The registry entry of a method name or of a variant's canonical spelling (its method's)."""
    return variant(name).method if is_variant(name) else METHODS[name]


def family(name: str) -> str:
    """The method a name belongs to: a variant's method, else the name itself (baselines, reference rows)."""
    return variant(name).method.name if is_variant(name) else name


def order_key(name: str) -> tuple[int, int, tuple[tuple[int, Any], ...]]:
    """Registry order, each method's variants right after it by their knobs' values (ranks ascending)."""
    base = family(name)
    position = list(METHODS).index(base) if base in METHODS else len(METHODS)
    knobs = variant(name).knobs.values() if is_variant(name) else ()
    return position, int(is_variant(name)), tuple((0, v) if isinstance(v, int) else (1, str(v)) for v in knobs)


def sweep_variants() -> tuple[str, ...]:
    """The shift study's rank sweep: every method's ``sweep`` sizes as variants, in registry order."""
    return tuple(variant_name(m.name, knobs) for m in METHODS.values() for knobs in m.sweep)


def label(name: str) -> str:
    return METHODS[name].label if name in METHODS else name


def plan(name: str, shapes: Iterable[Sequence[int]], budget: int, *, strict: bool = True, **fixed: Any) -> Plan:
    """``name`` sized so its trainable count on layers of ``shapes`` is as close as possible to ``budget``.

    Count knobs in ``fixed`` are kept; the others are searched over the method's candidates, taking the closest
    count of the first candidate group within the method's tolerance (else the closest overall). Beyond the
    tolerance: a MethodError naming the method, the shapes and the closest count, or with ``strict=False`` the
    closest plan with a note (the matrix study reports the gap).
    """
    if is_variant(name):  # a fixed size: nothing to search
        return variant(name).plan(shapes, positive_int("budget", budget), **fixed)
    method = get(name)
    layers = check_shapes(shapes)
    budget = positive_int("budget", budget)
    method.check_settings(fixed, name)
    assert method.candidates is not None
    knobs = {k: v for k, v in fixed.items() if k in method.count_knobs}

    def gap(c: Candidate) -> float:
        return abs(c.count - budget) / budget

    best: Candidate | None = None
    for group in method.candidates(layers, knobs):
        closest = min(group, key=gap)
        if gap(closest) <= method.tolerance:
            best = closest
            break
        if best is None or gap(closest) < gap(best):
            best = closest
    assert best is not None
    note = None
    if gap(best) > method.tolerance:
        off = (best.count - budget) / budget
        if strict:
            raise MethodError(
                f"{name} cannot match a budget of {budget:,} trainable parameters within {method.tolerance:.0%} "
                f"on layers of shapes {layers}: the closest is {best.count:,} ({best.settings}, {off:+.1%})"
            )
        note = f"closest count {best.count:,} is {off:+.1%} off the budget {budget:,}: no setting of {name} fits"
    return Plan(name, {**fixed, **best.settings}, best.count, budget, note)
