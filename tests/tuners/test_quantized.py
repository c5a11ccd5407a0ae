"""KRAdapter and SinLoRA over quantized frozen bases: bitsandbytes 8-bit and 4-bit (NF4, FP4), torchao int8.

Models are a tiny Llama built from a ``LlamaConfig`` (no download), saved once and loaded back the way users
load a quantized base: transformers with a ``BitsAndBytesConfig`` or ``TorchAoConfig`` and ``device_map="cpu"``.
References are independent of the code under test: the libraries' own quantize/dequantize functions, a float64
dense forward, and PEFT's LoRA on the same base (the yardstick for how far a requantizing merge may move outputs).
Each library is optional: its tests skip when it is not installed.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from kradapter import KRAdapterConfig, SinLoRAConfig
from kradapter.tuners import quantized
from tests import support

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = ["bnb_int8", "bnb_nf4", "bnb_fp4", "torchao_int8"]
BACKENDS = {"bnb_int8": "Bnb8bit", "bnb_nf4": "Bnb4bit", "bnb_fp4": "Bnb4bit", "torchao_int8": "TorchAO"}
# How far merge_adapter() may move the logits from the unmerged adapted forward (relative Frobenius norm), after a
# few training steps. Requantizing re-rounds every weight: one int8 step is small, one 4-bit step is ~10% of a
# block's range. PEFT's LoRA, trained the same way on the same base, moves them by about as much (measured in the
# test and in docs/quantization.md); ours must stay within twice LoRA's figure and under these bounds.
MERGE_TOLERANCE = {"bnb_int8": 0.05, "bnb_nf4": 0.35, "bnb_fp4": 0.45, "torchao_int8": 0.05}
PEFT_BROKEN = "NaNs detected in the merged weights. The adapter default seems to be broken"


def quantization_config(kind: str):  # type: ignore[no-untyped-def]
    """The transformers config for ``kind``; skips when its library is missing."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if kind.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
        if kind == "bnb_int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind.removeprefix("bnb_"))
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(quant_type=Int8WeightOnlyConfig())


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with square (64x64), wide (32x64, 64x192) and tall (192x64) projections, saved once.

    Output sizes are multiples of 32 and input sizes of 64: bitsandbytes' CPU 4-bit inference kernel repacks the
    weight in blocks of 32 rows and 64 columns and asserts on other shapes.
    """
    from transformers import LlamaForCausalLM

    # LlamaConfig's own token ids (no padding row): the merge tolerances were measured on these weights
    config = support.tiny_llama_config(
        vocab_size=101, hidden_size=64, intermediate_size=192, pad_token_id=None, bos_token_id=1, eos_token_id=2
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama") / "tiny"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load(path: Path, kind: str) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quantization_config(kind), device_map="cpu"
        )


def method_config(method: str, **kwargs):  # type: ignore[no-untyped-def]
    if method == "kradapter":
        return KRAdapterConfig(target_modules=TARGETS, **kwargs)
    if method == "sinlora":
        return SinLoRAConfig(target_modules=TARGETS, r=4, **kwargs)
    return LoraConfig(target_modules=TARGETS, r=8, **kwargs)


def batch(seed: int, rows: int = 4, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 101, (rows, length), generator=torch.Generator().manual_seed(seed))


def train(model: nn.Module, steps: int, lr: float, seed: int) -> list[float]:
    ids = batch(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def adapted_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "quantization_backend", None) is not None]


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that stores the frozen base: quantized data and its scales (all that a merge may change)."""
    state = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or not hasattr(module, "in_features") or hasattr(module, "base_layer"):
            continue
        if type(weight).__module__.startswith("torchao"):
            state[name] = weight.dequantize().clone()
            continue
        state[name] = weight.detach().clone()
        scales = getattr(getattr(module, "state", None), "SCB", None)
        scales = scales if scales is not None else getattr(weight, "SCB", None)
        if scales is not None:
            state[name + ".SCB"] = scales.clone()
        if getattr(weight, "quant_state", None) is not None:
            state[name + ".absmax"] = weight.quant_state.absmax.clone()
    return state


# -- dispatch ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["kradapter", "sinlora"])
def test_dispatch_recognises_quantized_layers(llama_path: Path, kind: str, method: str) -> None:
    """Every targeted layer gets the backend of its library and the dense layer's logical (out, in) shape."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(llama_path)
    shapes = {n: tuple(m.weight.shape) for n, m in dense.named_modules() if n.split(".")[-1] in TARGETS}
    model = get_peft_model(load(llama_path, kind), method_config(method))
    seen = 0
    for name, module in model.base_model.model.named_modules():
        if name.split(".")[-1] not in TARGETS:
            continue
        backend = module.quantization_backend
        assert type(backend).__name__ == BACKENDS[kind], name
        assert (module.out_features, module.in_features) == shapes[name] == backend.features(module.get_base_layer())
        assert not module.can_fuse()
        seen += 1
    assert seen == len(shapes) == 14


# -- training ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["kradapter", "sinlora"])
def test_trains_only_the_adapter_and_round_trips(llama_path: Path, tmp_path: Path, kind: str, method: str) -> None:
    """Only adapter parameters get gradients, the loss falls, the quantized base stays bit for bit, and the saved
    adapter loaded onto a freshly quantized base gives the same outputs."""
    model = get_peft_model(load(llama_path, kind), method_config(method))
    before = base_state(model)
    ids = batch(1)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    prefix = "kradapter_" if method == "kradapter" else "sinlora_"
    assert with_grad and all(prefix in n for n in with_grad)
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    losses = train(model, steps=10, lr=1e-2, seed=1)
    assert losses[-1] < losses[0] - 0.1, losses
    after = base_state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    model.eval()  # compare in one mode: bitsandbytes' CPU inference kernels differ from its training ones
    probe = batch(10, rows=2, length=8)
    expected = logits(model, probe)
    model.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(load(llama_path, kind), tmp_path / "adapter").eval()
    assert len(adapted_layers(again)) == 14
    assert torch.equal(logits(again, probe), expected)


def reference_delta(u: torch.Tensor, v: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """KRAdapter's update in float64, row by row with torch.kron (independent of the library's blockwise code)."""
    u, v = u.double(), v.double()
    rows = torch.stack([torch.kron(v[i], u[i])[: max(out_features, in_features)] for i in range(u.shape[0])])
    return rows.T if out_features > in_features else rows


class One(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.lin = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def hand_quantized(kind: str, out_features: int, in_features: int, seed: int) -> tuple[nn.Module, nn.Linear]:
    """A single layer quantized by hand (no transformers), with the dense layer it came from."""
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features)
    if kind.startswith("bnb"):
        bnb = pytest.importorskip("bitsandbytes")
        if kind == "bnb_int8":
            layer = bnb.nn.Linear8bitLt(in_features, out_features, has_fp16_weights=False)
        else:
            quant = kind.removeprefix("bnb_")
            layer = bnb.nn.Linear4bit(in_features, out_features, quant_type=quant, compute_dtype=torch.float32)
        layer.load_state_dict(dense.state_dict())
        return layer.to("cpu"), dense
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = copy.deepcopy(dense)
    quantize_(layer, Int8WeightOnlyConfig())
    return layer, dense


def library_dequantize(layer: nn.Module) -> torch.Tensor:
    """The layer's weight dequantized with the library's own functions."""
    weight = layer.weight
    if type(weight).__name__ == "Int8Params":
        import bitsandbytes as bnb

        scb = layer.state.SCB if layer.state.SCB is not None else weight.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb)
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    return weight.dequantize()


def library_roundtrip(layer: nn.Module, dense: torch.Tensor) -> torch.Tensor:
    """``dense`` quantized with ``layer``'s scheme and dequantized again, with the library's functions."""
    weight = layer.weight
    if type(weight).__name__ == "Int8Params":
        import bitsandbytes as bnb

        codes, scales, _ = bnb.functional.int8_vectorwise_quant(dense.half())
        return bnb.functional.int8_vectorwise_dequant(codes, scales)
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes as bnb

        codes, state = bnb.functional.quantize_4bit(
            dense,
            blocksize=weight.blocksize,
            compress_statistics=weight.compress_statistics,
            quant_type=weight.quant_type,
        )
        return bnb.functional.dequantize_4bit(codes, state)
    from torchao.quantization import Int8Tensor, PerRow

    return Int8Tensor.from_hp(dense, PerRow()).dequantize()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(37, 67), (67, 37), (53, 53)])
def test_layer_forward_and_gradients_match_dense_float64(kind: str, shape: tuple[int, int]) -> None:
    """Odd, prime, tall and wide layers quantized by hand: output is the library's base(x) plus the update term,
    and the factor gradients match float64 autograd through the dequantized weight."""
    out_features, in_features = shape
    layer, _ = hand_quantized(kind, out_features, in_features, seed=out_features)
    model = get_peft_model(One(layer), KRAdapterConfig(target_modules=["lin"], init_weights=False))
    tuner = model.base_model.model.lin
    u, v = tuner.kradapter_u["default"], tuner.kradapter_v["default"]
    x = torch.randn(5, in_features)
    g = torch.randn(5, out_features)
    model.train()  # bitsandbytes' 4-bit CPU inference repacking needs multiples of 32 x 64; training does not repack
    y = model(x)
    (y * g).sum().backward()

    base_out = layer(x).double()  # the library's own kernel for the frozen part
    u64 = u.detach().double().requires_grad_()
    v64 = v.detach().double().requires_grad_()
    y64 = base_out + tuner.kradapter_scaling["default"] * x.double() @ reference_delta(u64, v64, *shape).T
    (y64 * g.double()).sum().backward()
    assert (y.double() - y64).abs().max() <= 1e-4 * y64.abs().max()
    assert torch.allclose(u.grad.double(), u64.grad, rtol=1e-4, atol=1e-4 * u64.grad.abs().max())
    assert torch.allclose(v.grad.double(), v64.grad, rtol=1e-4, atol=1e-4 * v64.grad.abs().max())


@pytest.mark.parametrize("method", ["kradapter", "sinlora"])
def test_bfloat16_base_runs_the_adapter_term_in_the_adapters_dtype(method: str) -> None:
    """A bfloat16 NF4 layer (QLoRA's usual setting) with float32 adapters: the output is base(x) in bfloat16 plus
    the term computed in float32 from the float32 input, rounded once."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(11)
    dense = nn.Linear(128, 64).to(torch.bfloat16)
    layer = bnb.nn.Linear4bit(128, 64, quant_type="nf4", compute_dtype=torch.bfloat16).to(torch.bfloat16)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")
    config = KRAdapterConfig if method == "kradapter" else SinLoRAConfig
    model = get_peft_model(One(layer), config(target_modules=["lin"], init_weights=False))
    tuner = model.base_model.model.lin
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    x = torch.randn(6, 128).to(torch.bfloat16)
    model.train()
    with torch.no_grad():
        y = model(x)
        term = torch.nn.functional.linear(x.float(), tuner.get_delta_weight("default"))
        expected = layer(x) + term.to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, expected)


# -- merge / unmerge --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(37, 67), (67, 37)])
@pytest.mark.parametrize("method", ["kradapter", "sinlora"])
def test_merge_requantizes_the_exact_sum(kind: str, shape: tuple[int, int], method: str) -> None:
    """merge() stores quantize(dequantize(W) + dW) with the layer's scheme; unmerge() quantize(that - dW)."""
    layer, dense = hand_quantized(kind, *shape, seed=shape[1])
    if method == "kradapter":
        model = get_peft_model(One(layer), KRAdapterConfig(target_modules=["lin"], init_weights=False))
        tuner = model.base_model.model.lin
        with torch.no_grad():
            tuner.kradapter_u["default"].mul_(0.02)
        reference = reference_delta(tuner.kradapter_u["default"], tuner.kradapter_v["default"], *shape)
        reference = tuner.kradapter_scaling["default"] * reference
    else:
        config = SinLoRAConfig(target_modules=["lin"], init_weights=False, r=3, alpha=0.1)
        model = get_peft_model(One(layer), config)
        tuner = model.base_model.model.lin
        a, b = tuner.sinlora_A["default"].double(), tuner.sinlora_B["default"].double()
        reference = torch.sin(config.frequency * b @ a) / shape[1] ** 0.5 * config.alpha / config.r
    # The update in float32 as the layer computes it: float64 agrees to float32 rounding (of SinLoRA's large
    # phases too), and one ulp of difference could flip a quantization code.
    delta = tuner.get_delta_weight("default").detach()
    assert torch.allclose(delta.double(), reference.detach(), rtol=0, atol=1e-4 * float(reference.abs().max()))
    w0 = library_dequantize(layer).clone()
    quantization_error = rel(w0, dense.weight.detach())

    model.merge_adapter()
    w1 = library_dequantize(tuner.get_base_layer())
    expected = library_roundtrip(layer, w0 + delta)
    assert torch.allclose(w1, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))

    model.unmerge_adapter()
    w2 = library_dequantize(tuner.get_base_layer())
    expected = library_roundtrip(layer, w1 - delta)
    assert torch.allclose(w2, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    # Approximate: unmerge rounds once more, by at most about the format's own rounding of the weight.
    assert rel(w2, w0) <= 1.5 * quantization_error
    assert tuner.merged_adapters == []


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_merge_moves_outputs_as_little_as_peft_lora(llama_path: Path, kind: str) -> None:
    """After a few training steps, merge_adapter() moves the logits by at most MERGE_TOLERANCE and at most twice
    what PEFT's LoRA's merge moves them on the same base, trained the same way; unmerge restores them as closely.
    Then, after inference (bitsandbytes repacks 4-bit weights for its CPU kernel on AVX512-BF16 machines),
    merge_and_unload() gives a plain quantized model within the same tolerance."""
    ids = batch(7, rows=3, length=11)
    moved = {}
    for method in ("lora", "kradapter"):
        torch.manual_seed(3)
        model = get_peft_model(load(llama_path, kind), method_config(method))
        train(model, steps=6, lr=2e-2, seed=2)
        # Training mode (no dropout here): PEFT's LoRA cannot merge a bitsandbytes 4-bit weight that a CPU
        # inference forward has repacked (docs/quantization.md); ours can (below).
        with model.disable_adapter():
            plain = logits(model, ids)
        adapted = logits(model, ids)
        model.merge_adapter()
        merged = logits(model, ids)
        model.unmerge_adapter()
        unmerged = logits(model, ids)
        assert rel(adapted, plain) > 0.2  # the adapter changed the model a lot
        moved[method] = (rel(merged, adapted), rel(unmerged, adapted))
    assert moved["kradapter"][0] <= min(MERGE_TOLERANCE[kind], 2 * moved["lora"][0]), moved
    assert moved["kradapter"][1] <= min(MERGE_TOLERANCE[kind], 2 * moved["lora"][1]), moved

    model.eval()
    adapted = logits(model, ids)
    plain = model.merge_and_unload()
    assert not adapted_layers(plain)
    assert rel(logits(plain, ids), adapted) <= MERGE_TOLERANCE[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_safe_merge_refuses_a_broken_adapter_and_leaves_the_base(llama_path: Path, kind: str) -> None:
    model = get_peft_model(load(llama_path, kind), method_config("kradapter", init_weights=False))
    ids = batch(9, rows=2, length=7)
    out_before = logits(model, ids)  # inference first: 4-bit weights may be repacked, and must stay so
    before = base_state(model)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.kradapter_u["default"][3, 1] = float("nan")
    with pytest.raises(ValueError) as error:
        layer.merge(safe_merge=True)
    assert str(error.value) == PEFT_BROKEN
    assert layer.merged_adapters == []
    after = base_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        layer.kradapter_u["default"][3, 1] = 0.0
    assert torch.isnan(out_before).sum() == 0 and not torch.equal(logits(model, ids), out_before)  # adapter changed
    layer.merge(safe_merge=True)  # and a finite one merges
    assert layer.merged_adapters == ["default"]


# -- torchao without transformers, and int4 ---------------------------------------------------------------------
def test_torchao_int8_quantized_by_hand_merges_without_a_config() -> None:
    """A model quantized with quantize_ directly carries no TorchAoConfig: an Int8Tensor is requantized from its own
    granularity, so merging still works (PEFT's LoRA refuses here)."""
    layer, _ = hand_quantized("torchao_int8", 48, 80, seed=5)
    model = get_peft_model(One(layer), SinLoRAConfig(target_modules=["lin"], init_weights=False, r=3))
    tuner = model.base_model.model.lin
    assert tuner.quantization_backend.get_apply_tensor_subclass is None
    x = torch.randn(4, 80)
    with torch.no_grad():
        adapted = model(x)
        model.merge_adapter()
        assert type(tuner.get_base_layer().weight).__name__ == "Int8Tensor"
        assert rel(model(x), adapted) < 0.01


def test_torchao_int4_cpu_trains_but_cannot_merge() -> None:
    """torchao 0.18's only int4 weight layout that runs on a CPU (the prototype Int4OpaqueTensor) trains under an
    adapter, but has no dequantize: merging raises PEFT's NotImplementedError naming the type."""
    pytest.importorskip("torchao")
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    torch.manual_seed(6)
    layer = nn.Linear(128, 64).to(torch.bfloat16)
    quantize_(layer, PrototypeInt4WeightOnlyConfig(group_size=32))
    assert type(layer.weight).__name__ == "Int4OpaqueTensor"
    model = get_peft_model(One(layer), KRAdapterConfig(target_modules=["lin"]))
    tuner = model.base_model.model.lin
    x, target = torch.randn(8, 128, dtype=torch.bfloat16), torch.randn(8, 64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(8):
        loss = (model(x).float() - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(NotImplementedError, match="Int4OpaqueTensor do not support dequantization"):
        tuner.merge()
    assert tuner.merged_adapters == []


def test_backend_resolution_of_dense_layers_is_none() -> None:
    """A dense nn.Linear gets no backend and keeps the fused execution path."""
    assert quantized.resolve(nn.Linear(3, 5)) is None
    model = get_peft_model(One(nn.Linear(16, 12)), KRAdapterConfig(target_modules=["lin"]))
    assert model.base_model.model.lin.quantization_backend is None
    assert model.base_model.model.lin.can_fuse()
