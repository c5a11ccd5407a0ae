"""The encoder's own sentence embedding: sentence-transformers pooling, read from the model folder.

A sentence-transformers model (all-MiniLM-L6-v2) is trained to be read through the pooling its ``1_Pooling/config.json``
names (mean over the non-padding tokens for MiniLM), not through BERT's ``tanh(pooler(CLS))``, which its training
never touched. :func:`pool` is the one definition of that pooling: the classifier's native head
(:func:`attach`, used by :mod:`kradapter.finetune.models`) and the frozen embedding of the linear probe
(:func:`embed`) both call it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import logging as hf_logging

from .protocol import HEAD_INPUTS as HEAD_INPUTS
from .protocol import SettingsError

POOLING_CONFIG = "1_Pooling/config.json"
# sentence-transformers' flags in 1_Pooling/config.json -> our mode names (the ones pool() implements)
MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
UNSUPPORTED = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (it lists the new head as missing, which is expected)."""
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def native_pooling(model_dir: Path | str) -> str:
    """The pooling mode the model folder's sentence-transformers configuration names (``"mean"`` for MiniLM);
    a SettingsError naming the folder when it has none, or names several or one not implemented here."""
    path = Path(model_dir) / POOLING_CONFIG
    hint = "give --head-input pooler to read the model's own classification head"
    if not path.is_file():
        raise SettingsError(
            f"--model {str(model_dir)!r} has no {POOLING_CONFIG} (not a sentence-transformers model), so it has no "
            f"native pooling; {hint}"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SettingsError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise SettingsError(f"{path}: not a sentence-transformers pooling config")
    chosen = [mode for flag, mode in MODES.items() if config.get(flag) is True]
    odd = [flag for flag in UNSUPPORTED if config.get(flag) is True]
    if odd or len(chosen) != 1:
        raise SettingsError(f"{path}: needs exactly one of {sorted(MODES)} set (found {chosen + odd}); {hint}")
    return chosen[0]


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """``(batch, tokens, width)`` hidden states to ``(batch, width)``, over the tokens where ``mask`` is 1 (all
    tokens when ``mask`` is None), as sentence-transformers' ``Pooling`` module computes them."""
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    total = (hidden * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp(min=1e-9)
    if mode == "mean":
        return total / count
    if mode == "mean_sqrt_len":
        return total / count.sqrt()
    raise ValueError(f"unknown pooling mode {mode!r}; choose one of {sorted(set(MODES.values()))}")


class NativePooling(nn.Module):
    """Takes the place of a BERT-style ``pooler``: the sentence embedding :func:`pool` gives, no parameters.

    The pooler is called with the hidden states only, so a forward pre-hook on the encoder (:func:`attach`) hands
    it the attention mask of the same call first.
    """

    def __init__(self, mode: str) -> None:
        super().__init__()
        pool(torch.zeros(1, 1, 1), None, mode)  # an unknown mode fails here, not in the first forward
        self.mode = mode
        self.mask: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask, self.mask = self.mask, None
        if mask is not None and mask.shape != hidden_states.shape[:2]:
            raise RuntimeError(f"attention mask {tuple(mask.shape)} does not match tokens {tuple(hidden_states.shape)}")
        return pool(hidden_states, mask, self.mode)


def attach(encoder: nn.Module, mode: str) -> NativePooling:
    """Replace ``encoder.pooler`` (BERT's dense + tanh over CLS, read by the classifier as ``pooler_output``) by
    :class:`NativePooling`; a SettingsError naming the encoder when it has no such pooler."""
    old = getattr(encoder, "pooler", None)
    if not isinstance(old, nn.Module) or isinstance(old, NativePooling):
        raise SettingsError(
            f"{type(encoder).__name__} has no pooler module for the native head to replace; give --head-input pooler"
        )
    pooling = NativePooling(mode)
    encoder.pooler = pooling

    def hand_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]  # BertModel.forward(input_ids, attention_mask, ...)
        pooling.mask = mask

    encoder.register_forward_pre_hook(hand_mask, with_kwargs=True)
    return pooling


def pad_batch(rows: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Tokenised rows (``input_ids``, ``attention_mask``, maybe ``token_type_ids``) padded on the right."""
    width = max(len(r["input_ids"]) for r in rows)
    out: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.tensor([list(r[key]) + [fill] * (width - len(r[key])) for r in rows], dtype=torch.long)
    if "attention_mask" not in out:
        out["attention_mask"] = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                              for r in rows])  # fmt: skip
    return out


TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


@torch.no_grad()
def embed(
    model_dir: Path | str,
    columns: Mapping[str, Sequence[Any]],
    *,
    mode: str | None = None,
    batch_size: int = 64,
    trust_remote_code: bool = False,
) -> np.ndarray:
    """The frozen encoder's pooled embedding (``mode``, default the folder's native pooling) of every tokenised
    row of ``columns`` (``input_ids`` and ``attention_mask``, as the tokenizer gives them), in eval mode, float32,
    ``(rows, width)``; the linear probe reads it. Rows are padded per batch; the mask keeps padding out."""
    from transformers import AutoModel

    mode = mode or native_pooling(model_dir)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    with quiet_transformers():
        encoder = AutoModel.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code).eval()
    pad_id = getattr(encoder.config, "pad_token_id", None) or 0
    keys = [k for k in TOKEN_COLUMNS if k in columns]
    n = len(columns["input_ids"])
    out = []
    for start in range(0, n, batch_size):
        rows = [{k: columns[k][i] for k in keys} for i in range(start, min(n, start + batch_size))]
        batch = pad_batch(rows, pad_id)
        hidden = encoder(**batch).last_hidden_state
        out.append(pool(hidden, batch["attention_mask"], mode).float().numpy())
    width = int(encoder.config.hidden_size)
    return np.concatenate(out) if out else np.zeros((0, width), dtype=np.float32)
