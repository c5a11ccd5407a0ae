"""The SinLoRA update (Ji et al., ICLR 2025): one definition used by the tuner and the benchmarks.

``dW = sin(frequency * B @ A) / sqrt(in_features) * alpha / r``, as in the authors' code. The sine
lifts the rank of the low-rank product ``B @ A``; ``B = 0`` at start gives ``dW = 0``.
"""

from __future__ import annotations

import math

import torch


def sinlora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, frequency: float, alpha: float) -> torch.Tensor:
    """The update of shape ``(out_features, in_features)`` from ``A`` (r x in) and ``B`` (out x r)."""
    r, in_features = lora_a.shape
    if lora_b.shape[1] != r:
        raise ValueError(f"SinLoRA factors disagree on the rank: A is {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    return torch.sin(frequency * (lora_b @ lora_a)) * (alpha / r / math.sqrt(in_features))
