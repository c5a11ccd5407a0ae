"""Quantized frozen base layers under KRAdapter and SinLoRA: bitsandbytes 8-bit and 4-bit, torchao.

PEFT recognises a quantized base layer by its type (``bnb.nn.Linear8bitLt``, ``bnb.nn.Linear4bit``) or by its
weight's type (any torchao tensor subclass) and attaches a *quantization backend* to the tuner layer
(``layer.quantization_backend``; :func:`peft.utils.resolve_quantization_backend`). The backends here follow the
same interface (they subclass PEFT's ``QuantizationBackend``), so ``layer.get_base_weight()`` and
``layer.set_base_weight()`` of PEFT work on our layers too. Each backend knows its layer's ``(out, in)`` shape
(4-bit weights are stored packed, ``(out * in / 2, 1)`` bytes), dequantizes the weight to a dense ``(out, in)``
tensor and requantizes a dense tensor into the layer in place, with the layer's own scheme.

Forward on a quantized base is ``base(x)`` (the library's kernel) plus each adapter's term computed in the
adapter's dtype; the fused single-matmul path of KRAdapter never applies. Merging dequantizes, adds the update
and requantizes; unmerging does the same with the update subtracted, so both round the weight again: unmerge
restores the base only approximately (``docs/quantization.md`` has the measured sizes).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, cast

import torch
from peft.import_utils import is_bnb_4bit_available, is_bnb_available, is_torchao_available
from peft.utils.quantization_utils import QuantizationBackend
from torch import nn

if TYPE_CHECKING:
    from collections.abc import Callable

    from .base import DeltaLayer


def broken_adapter(adapter: str) -> ValueError:
    """PEFT's error, word for word, for a merge that would write non-finite weights."""
    return ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")


class QuantizedBase(QuantizationBackend):
    """What a tuner layer needs of a quantized base layer: its shape, its dense weight, and a way to store one."""

    layer_type = "linear"
    supports_merge = True

    def features(self, base_layer: Any) -> tuple[int, int]:
        """``(out_features, in_features)`` of the layer's logical weight."""
        raise NotImplementedError

    def get_base_weight(self, base_layer: Any) -> torch.Tensor:
        """The dequantized weight as a new dense ``(out, in)`` tensor in the layer's compute dtype."""
        raise NotImplementedError

    def quantize(self, base_layer: Any, weight: torch.Tensor) -> nn.Parameter:
        """``weight`` quantized with the scheme of ``base_layer``'s weight, as a new parameter; nothing is stored."""
        raise NotImplementedError

    def set_base_weight(self, peft_layer: Any, weight_data: torch.Tensor) -> None:
        """Requantize ``weight_data`` into the base layer in place (the new parameter is built before any change)."""
        base_layer = peft_layer.get_base_layer()
        base_layer.weight = self.quantize(base_layer, weight_data)
        self.after_store(base_layer)

    def after_store(self, base_layer: Any) -> None:
        """Reset whatever the layer cached from its previous weight."""


class Bnb8bit(QuantizedBase):
    """``bnb.nn.Linear8bitLt``: int8 weight with one absmax scale per output row (LLM.int8())."""

    backend_name = "bnb 8bit"

    def features(self, base_layer: Any) -> tuple[int, int]:
        out_features, in_features = base_layer.weight.shape
        return int(out_features), int(in_features)

    def get_base_weight(self, base_layer: Any) -> torch.Tensor:
        import bitsandbytes as bnb

        weight = base_layer.weight
        if weight.dtype != torch.int8:  # has_fp16_weights=True keeps the weight dense
            return weight.detach().clone()
        # After the first forward bitsandbytes keeps the row scales in the layer's state, before it on the weight.
        scales = base_layer.state.SCB if base_layer.state.SCB is not None else weight.SCB
        if scales is None:
            raise ValueError(f"{self.backend_name} layer has an int8 weight but no row scales (SCB) to dequantize it")
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))

    def quantize(self, base_layer: Any, weight: torch.Tensor) -> nn.Parameter:
        import bitsandbytes as bnb

        old = base_layer.weight
        # Int8Params quantizes when moved from the CPU to a device (the CPU included), through float16.
        new = bnb.nn.Int8Params(weight.detach().to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights)
        return cast(Any, new).to(old.device)

    def after_store(self, base_layer: Any) -> None:
        base_layer.state.reset_grads()  # drop the old CB/SCB; the next forward takes the new weight's


class Bnb4bit(QuantizedBase):
    """``bnb.nn.Linear4bit`` (NF4 or FP4): two 4-bit codes per byte, one absmax per block of ``blocksize``."""

    backend_name = "bnb 4bit"

    def features(self, base_layer: Any) -> tuple[int, int]:
        out_features, in_features = self.quant_state(base_layer).shape  # the weight itself is packed bytes
        return int(out_features), int(in_features)

    def quant_state(self, base_layer: Any) -> Any:
        weight = base_layer.weight
        state = weight.quant_state if weight.quant_state is not None else getattr(base_layer, "quant_state", None)
        if state is None:
            raise ValueError(f"{self.backend_name} layer has no quant_state: its weight was never quantized")
        return state

    def get_base_weight(self, base_layer: Any) -> torch.Tensor:
        """The dense weight, read without changing the layer.

        On CPUs with AVX512-BF16 an inference forward repacks the weight for bitsandbytes' CPU kernel (and rounds
        the block scales to bfloat16); ``dequantize_4bit`` reads only the standard layout, so a copy is unpacked
        first, as bitsandbytes itself does before saving.
        """
        import bitsandbytes as bnb

        data, state = base_layer.weight.data, self.quant_state(base_layer)
        if getattr(state, "packing_format_for_cpu", False):
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnb.functional.dequantize_4bit(data, state)

    def quantize(self, base_layer: Any, weight: torch.Tensor) -> nn.Parameter:
        import bitsandbytes as bnb

        old = base_layer.weight
        new = bnb.nn.Params4bit(
            weight.detach().to("cpu"),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=base_layer,
        )
        return cast(Any, new).to(old.device)  # Params4bit quantizes on its first move to a device

    def maybe_clone_base_result(self, x: torch.Tensor) -> torch.Tensor:
        # As PEFT does for 4-bit bases: bitsandbytes' output may be a view that backward cannot modify.
        return x.clone()


class TorchAO(QuantizedBase):
    """A linear layer whose weight is a torchao tensor subclass (e.g. ``Int8Tensor`` from ``Int8WeightOnlyConfig``).

    Requantization needs the scheme: ``get_apply_tensor_subclass`` (the ``TorchAoConfig`` of a model transformers
    loaded, as for PEFT's LoRA); without it an ``Int8Tensor`` is requantized from its own granularity and
    activation settings, and any other tensor type refuses to merge.
    """

    backend_name = "torchao"

    def __init__(self, get_apply_tensor_subclass: Callable[[], Any] | None = None) -> None:
        self.get_apply_tensor_subclass = get_apply_tensor_subclass

    def features(self, base_layer: Any) -> tuple[int, int]:
        out_features, in_features = base_layer.weight.shape
        return int(out_features), int(in_features)

    def get_base_weight(self, base_layer: Any) -> torch.Tensor:
        weight = base_layer.weight
        try:
            return weight.dequantize()
        except NotImplementedError as exc:
            raise NotImplementedError(
                f"Weights of type {type(weight).__name__} do not support dequantization (yet), which is needed to "
                "support merging."
            ) from exc

    def quantize(self, base_layer: Any, weight: torch.Tensor) -> nn.Parameter:
        old = base_layer.weight
        if self.get_apply_tensor_subclass is not None:
            from torchao import quantize_

            # quantize_ works on modules: quantize a scratch layer so that the base changes only on success.
            scratch = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            scratch.weight = nn.Parameter(weight.detach(), requires_grad=False)
            quantize_(scratch, self.get_apply_tensor_subclass())
            return nn.Parameter(scratch.weight.detach(), requires_grad=False)
        from torchao.quantization import Int8Tensor

        if type(old) is Int8Tensor:
            return nn.Parameter(self._requantize_int8(old, weight.detach()), requires_grad=False)
        raise ValueError(
            f"cannot requantize a torchao {type(old).__name__} weight without its quantization config: load the base "
            "model through transformers with a TorchAoConfig (as PEFT's LoRA requires for merging)"
        )

    @staticmethod
    def _requantize_int8(old: Any, weight: torch.Tensor) -> Any:
        """``weight`` as an ``Int8Tensor`` with ``old``'s block size and activation settings."""
        from torchao.quantization import Int8Tensor, PerGroup, PerRow, PerTensor

        out_features, in_features = weight.shape
        block = list(old.block_size)
        if block == [out_features, in_features]:
            granularity = PerTensor()
        elif block == [1, in_features]:
            granularity = PerRow()
        elif block[0] == 1:
            granularity = PerGroup(block[1])
        else:
            raise ValueError(f"cannot requantize a torchao Int8Tensor with block size {block}")
        return Int8Tensor.from_hp(
            weight, granularity, act_quant_kwargs=old.act_quant_kwargs, reduce_range=bool(old.reduce_range)
        )


def resolve(base_layer: Any, get_apply_tensor_subclass: Callable[[], Any] | None = None) -> QuantizedBase | None:
    """The backend for ``base_layer``, or None for a dense layer; recognised as PEFT recognises them."""
    if is_bnb_available():
        import bitsandbytes as bnb

        if isinstance(base_layer, bnb.nn.Linear8bitLt):
            return Bnb8bit()
    if is_bnb_4bit_available():
        import bitsandbytes as bnb

        if isinstance(base_layer, bnb.nn.Linear4bit):
            return Bnb4bit()
    if is_torchao_available():
        from torchao.utils import TorchAOBaseTensor

        if isinstance(getattr(base_layer, "weight", None), TorchAOBaseTensor):
            return TorchAO(get_apply_tensor_subclass)
    return None


def layer_kwargs(model: nn.Module) -> dict[str, Any]:
    """What a tuner layer needs from the model to requantize: torchao's config from transformers' quantizer."""
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    get = getattr(config, "get_apply_tensor_subclass", None)
    return {"get_apply_tensor_subclass": get} if get is not None else {}


def adapter_dtype(layer: DeltaLayer, adapter: str) -> torch.dtype:
    return getattr(layer, layer.adapter_layer_names[0])[adapter].dtype


def adapter_input(layer: DeltaLayer, x: torch.Tensor, adapter: str) -> torch.Tensor:
    """The input of ``adapter``'s term: over a quantized base, cast to the adapter's dtype (the activations may be
    bfloat16 while the adapter is float32), as :func:`forward` does; elsewhere ``x`` as it is. The per-sample
    (``adapter_names``) path goes through here too, so a mixed batch equals single-adapter passes."""
    return x.to(adapter_dtype(layer, adapter)) if layer.quantization_backend is not None else x


def forward(layer: DeltaLayer, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
    """``base(x)`` through the quantized kernel plus each adapter's term, computed in the adapter's dtype."""
    result = cast(Any, layer.quantization_backend).maybe_clone_base_result(layer.base_layer(x, *args, **kwargs))
    for adapter in adapters:
        term = layer.adapter_term(adapter_input(layer, x, adapter), adapter)
        result = result + term.to(result.dtype)
    return result


@torch.no_grad()
def add_update(layer: DeltaLayer, adapter: str, sign: int = 1, safe_merge: bool = False) -> None:
    """Dequantize the base weight, add ``sign`` times ``adapter``'s update, requantize in place.

    With ``safe_merge`` a non-finite result raises PEFT's error and the base layer is left as it was.
    """
    backend = cast(QuantizedBase, layer.quantization_backend)
    base_layer = layer.get_base_layer()
    weight = backend.get_base_weight(base_layer)
    delta = layer.get_delta_weight(adapter)
    dtype = torch.promote_types(weight.dtype, delta.dtype)
    merged = weight.to(dtype).add_(delta.to(device=weight.device, dtype=dtype), alpha=sign)
    if safe_merge and not torch.isfinite(merged).all():
        raise broken_adapter(adapter)
    backend.set_base_weight(layer, merged.to(weight.dtype))
