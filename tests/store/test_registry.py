"""The method registry: counts are the real counts of the injected PEFT layers, budgets are matched within each
method's tolerance, names and settings are checked with errors that name the bad value."""

from __future__ import annotations

import random

import pytest
import torch
from peft import get_peft_model
from torch import nn

from kradapter import registry
from kradapter.registry import ADAPTERS, DEFAULT_ADAPTERS, MethodError, get, kradapter_budget, parse_names, plan

BUDGET_SHAPES = [(130, 72), (72, 130), (1000, 768), (97, 389), (1024, 768)]
MINILM_SHAPES = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]
MINILM_ATTENTION = [(384, 384)] * 4
MIXED = [(130, 72), (72, 130), (96, 96), (97, 389)]


class Stack(nn.Module):
    """One ``nn.Linear`` per shape, named ``layer0``, ``layer1``, ..."""

    def __init__(self, shapes: list[tuple[int, int]]) -> None:
        super().__init__()
        for i, (d, k) in enumerate(shapes):
            self.add_module(f"layer{i}", nn.Linear(k, d))


def built_count(config, shapes) -> int:  # type: ignore[no-untyped-def]
    """Trainable parameters of the model PEFT builds: the independent reference for every closed form."""
    torch.manual_seed(0)
    model = get_peft_model(Stack(shapes), config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def targets(shapes) -> list[str]:  # type: ignore[no-untyped-def]
    return [f"layer{i}" for i in range(len(shapes))]


@pytest.mark.parametrize("factorization", ["sqrt_min", "sqrt_max"])
@pytest.mark.parametrize("shape", [(130, 72), (97, 389), (1000, 768)])
def test_budget_is_the_kradapter_layer_count(shape, factorization) -> None:
    budget = kradapter_budget([shape], factorization)
    found = plan("kradapter", [shape], budget)
    assert found.settings["factorization"] == factorization
    config = get("kradapter").config(["layer0"], **found.settings)
    assert found.count == built_count(config, [shape]) == budget


@pytest.mark.parametrize("method", DEFAULT_ADAPTERS)
@pytest.mark.parametrize("shape", BUDGET_SHAPES)
def test_budget_within_tolerance_and_count_is_real(method, shape) -> None:
    """sqrt_min budgets on odd shapes: every method lands within its tolerance (5%; RandLoRA 10%, whose one knob
    moves its count in steps), and the count is the built model's."""
    budget = kradapter_budget([shape])
    found = plan(method, [shape], budget)
    entry = get(method)
    assert abs(found.count - budget) <= entry.tolerance * budget
    if abs(found.count - budget) > 0.05 * budget:
        assert method == "randlora" and shape == (97, 389)  # 4,851 against 5,141: -5.6%
    config = entry.config(["layer0"], **found.settings)
    assert found.count == built_count(config, [shape]) == entry.count([shape], **found.settings)
    assert found.budget == budget and found.note is None


@pytest.mark.parametrize("method", ADAPTERS)
@pytest.mark.parametrize("shapes", [MINILM_ATTENTION, MINILM_SHAPES], ids=["attention", "all"])
def test_minilm_shape_set(method, shapes) -> None:
    budget = kradapter_budget(shapes)
    if method == "c3a" and shapes is MINILM_ATTENTION:  # 384 x 384 / b for b | 384: 18,432 or 12,288 per layer
        with pytest.raises(MethodError, match=r"c3a cannot match a budget of 61,440 .* closest is 73,728"):
            plan(method, shapes, budget)
        return
    found = plan(method, shapes, budget)
    if method == "c3a":
        assert found.settings == {"block_size": 12} and found.count == 147_456  # +6.7%
    if method == "randlora" and shapes is MINILM_SHAPES:
        # One rank for 384x384 and 1536x384 layers: 129,030 or 149,760 against 138,240; -6.7% is within 10%.
        assert found.count == 129_030
    assert abs(found.count - budget) <= get(method).tolerance * budget
    assert found.count == built_count(get(method).config(targets(shapes), **found.settings), shapes)


def test_a_budget_beyond_the_tolerance_is_refused_or_noted() -> None:
    """A budget far above anything RandLoRA can train on an 8x8 layer: refused (strict) or planned with a note."""
    with pytest.raises(MethodError, match=r"randlora cannot match a budget of 1,000 .*within 10%.*closest is"):
        plan("randlora", [(8, 8)], 1000)
    loose = plan("randlora", [(8, 8)], 1000, strict=False)
    assert loose.note is not None and "off the budget 1,000" in loose.note
    assert loose.count == built_count(get("randlora").config(["layer0"], **loose.settings), [(8, 8)])


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("lora", {"r": 3}),
        ("sinlora", {"r": 5}),
        ("kradapter", {"factorization": "sqrt_max"}),
        ("kradapter", {"factorization": "sqrt_min"}),
        ("randlora", {"r": 7}),
        ("kronecker", {"r": 2, "decompose_both": True, "decompose_factor": -1}),
        ("kronecker", {"r": 1, "decompose_factor": 4}),
        ("kronecker", {"r": 30, "decompose_factor": 3}),
    ],
)
def test_count_matches_built_model_on_mixed_shapes(method, settings) -> None:
    """Several shapes in one model (RandLoRA then shares bases sized for the largest): closed form == real."""
    entry = get(method)
    assert entry.count(MIXED, **settings) == built_count(entry.config(targets(MIXED), **settings), MIXED)


def test_counts_on_random_odd_shapes_and_settings() -> None:
    """Fresh random shapes (primes, tall, wide, 1-wide) and knob settings: every count equals PEFT's own."""
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    sides = [1, 2, 3, 5, 7, 11, 13, 17, 29, 31, 48, 64, 97]
    for _ in range(3):
        shapes = [(rng.choice(sides), rng.choice(sides)) for _ in range(rng.randint(1, 3))]
        smallest = min(min(s) for s in shapes)
        cases = {
            "lora": {"r": rng.randint(1, 12)},
            "sinlora": {"r": rng.randint(1, smallest)},
            "kradapter": {"factorization": rng.choice(["sqrt_min", "sqrt_max"])},
            "randlora": {"r": rng.randint(1, max(min(s) for s in shapes))},
            "kronecker": {
                "r": rng.randint(1, 20),
                "decompose_both": rng.random() < 0.5,
                "decompose_factor": rng.choice([-1, 2, 3, 4]),
            },
        }
        for method, settings in cases.items():
            entry = get(method)
            real = built_count(entry.config(targets(shapes), **settings), shapes)
            assert entry.count(shapes, **settings) == real, (seed, method, shapes, settings)


def test_defaults_documented_scale_one() -> None:
    lora = get("lora").config(["layer0"], **plan("lora", [(64, 48)], 2000).settings)
    assert lora.lora_alpha == lora.r
    lokr = get("kronecker").config(["layer0"], **plan("kronecker", [(64, 48)], 2000).settings)
    assert lokr.alpha == lokr.r
    rand = get("randlora").config(["layer0"], **plan("randlora", [(64, 48)], 1200).settings)
    assert rand.randlora_alpha == 20 * rand.r


def test_overrides_fix_knobs_and_pass_through() -> None:
    found = plan("lora", [(100, 100)], 2000, r=10, lora_dropout=0.1)
    assert (found.settings, found.count) == ({"r": 10, "lora_dropout": 0.1}, 2000)
    config = get("lora").config(["layer0"], **found.settings)
    assert (config.r, config.lora_dropout) == (10, 0.1)
    with pytest.raises(MethodError, match="lora cannot match"):
        plan("lora", [(100, 100)], 2000, r=20)


def test_names_aliases_and_kinds() -> None:
    assert get("lokr") is get("kronecker") is get(" Kronecker ")
    assert get("LoRA").name == "lora"
    assert parse_names(["lora, lokr", "kronecker", "KRAdapter"]) == ("lora", "kronecker", "kradapter")
    assert get("svd", kinds=("reference",)).rank_of == "lora"
    with pytest.raises(MethodError, match="unknown method 'svd'"):
        get("svd")
    assert get("head", kinds=("baseline",)).label == "head only"
    # Each name and alias belongs to one method; labels are distinct.
    names = [n for m in registry.METHODS.values() for n in (m.name, *m.aliases)]
    assert len(names) == len(set(names)) == len(registry.ALIASES)
    labels = [m.label for m in registry.METHODS.values()]
    assert len(labels) == len(set(labels))
    for name in ADAPTERS:
        entry = get(name)
        assert entry.build and entry.counter and entry.candidates and entry.lr_grid


def test_a_bad_name_in_a_list_is_named_alone() -> None:
    with pytest.raises(MethodError) as info:
        parse_names(["lora,kradapter,bogus"])
    message = str(info.value)
    assert message.startswith("unknown method 'bogus'; choose from lora, sinlora, kradapter, randlora, kronecker")
    assert "lora,kradapter,bogus" not in message
    with pytest.raises(MethodError, match="no methods given"):
        parse_names([" , "])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: plan("dora", [(4, 4)], 10), "unknown method 'dora'"),
        (lambda: plan("lora", [(4, 0)], 10), r"\(4, 0\)"),
        (lambda: plan("lora", [(4, 4, 4)], 10), r"\(4, 4, 4\)"),
        (lambda: plan("lora", [], 10), "no layer shapes"),
        (lambda: plan("lora", [(4, 4)], -3), "budget must be a positive integer, got -3"),
        (lambda: get("lora").config(["x"], bogus=1), r"lora\.bogus: unknown setting of lora; known: r, lora_alpha"),
        (lambda: get("lora").check_settings({"rr": 3}, "methods.settings.lora"), r"methods\.settings\.lora\.rr"),
        (lambda: get("lora").check_settings({"r": 0}, "methods.settings.lora"), r"settings\.lora\.r must .* got 0"),
        (lambda: get("kradapter").config(["x"], factorization="sqrt_mid"), "invalid setting for kradapter.*sqrt_mid"),
        (lambda: get("kronecker").count([(8, 8)], r=0), "r must be a positive integer, got 0"),
        (lambda: get("svd", kinds=("reference",)).config(["x"]), "svd is not a PEFT method"),
        (lambda: kradapter_budget([(8, 8)], "sqrt_mid"), "sqrt_mid"),
    ],
)
def test_bad_input_names_the_value(call, match) -> None:
    with pytest.raises(MethodError, match=match):
        call()


HIGH_RANK_RELATIVES = [m for m in ADAPTERS if m not in DEFAULT_ADAPTERS]


@pytest.mark.parametrize("method", HIGH_RANK_RELATIVES)
def test_high_rank_relatives_count_on_odd_shapes(method) -> None:
    rng = random.Random()
    shapes = [(2 * rng.randint(3, 40), 2 * rng.randint(3, 40)) for _ in range(3)]  # even sides: GraLoRA's 2 x 2 grid
    r = 2 * rng.randint(1, 2)
    knobs = {"block_size": rng.choice([1, 2])} if method == "c3a" else {"r": r}  # C3A: a block size dividing all sides
    config = get(method).config(targets(shapes), **knobs)
    assert get(method).count(shapes, **knobs) == built_count(config, shapes), (shapes, knobs)


def test_c3a_block_size_must_divide_every_side() -> None:
    with pytest.raises(MethodError, match=r"c3a block_size=4 must divide both sides"):
        get("c3a").count([(8, 8), (12, 6)], block_size=4)
    shapes = [(96, 48), (48, 144)]  # gcd 48: every divisor is a candidate
    found = plan("c3a", shapes, 96 * 48 // 6 + 48 * 144 // 6)
    assert found.settings == {"block_size": 6}
    assert found.count == built_count(get("c3a").config(targets(shapes), **found.settings), shapes)


def test_c3a_count_without_a_block_size_is_that_of_peft_s_default() -> None:
    """The closed form and PEFT agree when the setting is left to PEFT (its default block size, 256)."""
    shapes = [(512, 256), (256, 768)]
    assert get("c3a").count(shapes) == built_count(get("c3a").config(targets(shapes)), shapes) == 512 + 768
    with pytest.raises(MethodError, match=r"c3a block_size=256 must divide both sides"):
        get("c3a").count([(384, 384)])
