"""Fit one method's weight update to one target: the PEFT layer users inject, trained on ``||dW - T||_F``.

The update is what ``merge()`` adds to the layer ``peft.get_peft_model`` puts into ``nn.Linear(cols, rows)``
(:func:`kradapter.analysis.layer_update`: ``get_delta_weight``, dense, times the base weight for HiRA):
no copy of any method's maths lives here. Each step evaluates the loss at the current parameters, so the loss
seen at step ``i`` is that of the parameters after ``i`` updates; the returned update is recomputed from the
parameters the adapter ends with (with ``keep_best``: the best ones seen, restored), so metrics are never a
step stale.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft import get_peft_model
from torch import nn

from .. import registry
from ..analysis import layer_update
from ..registry import Plan
from .config import StudyConfig
from .matrices import stable_seed


@dataclass
class Fit:
    update: torch.Tensor
    params: int
    seconds: float
    iterations: int
    loss_history: list[float]  # loss at the parameters after 0, 1, ... updates (empty unless recorded)
    loss: float  # loss of ``update``


class _OneLayer(nn.Module):
    def __init__(self, rows: int, cols: int, device: torch.device, dtype: torch.dtype, base: bool = False) -> None:
        super().__init__()
        # The update alone is fitted, so the base weight's initialisation is skipped, unless the method's update is
        # made from it (HiRA's W0 * (B A)): then it is nn.Linear's own random initialisation, from the cell's seed.
        if base:
            self.layer = nn.Linear(cols, rows, bias=False, device=device, dtype=dtype)
        else:
            self.layer = nn.utils.skip_init(nn.Linear, cols, rows, bias=False, device=device, dtype=dtype)


class _FrobeniusLoss(torch.autograd.Function):
    """``||dW - T||_F`` (or its square) with one pass over the matrices forward and one backward.

    Autograd's own ``vector_norm(dW - T)`` takes three more passes in backward (division, masking of a zero
    norm, product); the value and gradient are the same.
    """

    @staticmethod
    def forward(ctx, update, target, squared: bool):
        diff = update - target
        norm = torch.linalg.vector_norm(diff)
        ctx.save_for_backward(diff, norm)
        ctx.squared = squared
        return norm * norm if squared else norm

    @staticmethod
    def backward(ctx, grad):
        diff, norm = ctx.saved_tensors
        if ctx.squared:
            return diff * (2 * grad), None, None
        scale = grad / norm if norm > 0 else torch.zeros_like(grad)
        return diff * scale, None, None


def frobenius_loss(update: torch.Tensor, target: torch.Tensor, squared: bool = False) -> torch.Tensor:
    return _FrobeniusLoss.apply(update, target, squared)


def _stalled(recent: deque[float], window: int, tolerance: float) -> bool:
    """Whether the mean loss of the last ``window`` steps is less than ``tolerance`` (relative) below the mean of
    the ``window`` steps before. Means, not minima: a lucky early low (or a loss that first rises and then falls
    steadily, as SinLoRA's and RandLoRA's do at large shapes) does not stop a fit that is still improving."""
    if len(recent) < 2 * window:
        return False
    values = list(recent)
    before, last = sum(values[:window]) / window, sum(values[window:]) / window
    return before - last <= tolerance * before


def _schedule(config: StudyConfig) -> Callable[[int], float]:
    t = config.training
    warm, total = t.warmup_steps, t.iterations

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if t.scheduler == "none":
            return 1.0
        progress = (step - warm) / max(total - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * progress)) if t.scheduler == "cosine" else 1.0 - progress

    return factor


def _optimizer(params: list[torch.Tensor], config: StudyConfig) -> torch.optim.Optimizer:
    t = config.training
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)


def inject(plan: Plan, rows: int, cols: int, seed: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The PEFT model around ``nn.Linear(cols, rows)``, initialised from the cell's own seed.

    The seed depends on the replicate and the method only: a method starts from the same draw on every matrix
    of a shape, and no cell's draw depends on which cells ran before it.
    """
    cell_seed = stable_seed("cell", seed, plan.method)
    method = registry.get(plan.method)
    settings = dict(plan.settings)
    if method.seed_setting:  # frozen random parts (RandLoRA's bases) seeded by the cell, not torch's global stream
        settings.setdefault(method.seed_setting, cell_seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cell_seed)
        base = _OneLayer(rows, cols, device, dtype, base=method.update_uses_base)
        return get_peft_model(base, method.config(["layer"], **settings))


def fit_method(
    plan: Plan,
    target: torch.Tensor,
    config: StudyConfig,
    seed: int,
    log: Callable[[str], object] | None = None,
    record: bool = False,
) -> Fit:
    """Fit ``plan``'s adapter to ``target`` and return its final update, measured from the final parameters.

    ``record`` keeps every step's loss in ``Fit.loss_history``; ``log`` receives a line every
    ``training.log_interval`` steps.
    """
    rows, cols = target.shape
    model = inject(plan, rows, cols, seed, target.device, target.dtype)
    peft_model: Any = model
    layer: Any = peft_model.base_model.model.layer
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    t, stop = config.training, config.early_stopping
    squared = t.loss == "squared_frobenius"
    history: list[float] = []
    recent: deque[float] = deque(maxlen=2 * stop.patience)  # the losses the stopping rule compares
    best_loss, best, steps = math.inf, None, 0
    track = stop.enabled or t.keep_best or log is not None or record
    start = time.perf_counter()
    for step in range(t.iterations):
        loss = frobenius_loss(layer_update(layer, "default"), target, squared)
        if track:
            value = float(loss.detach())
            if record:
                history.append(value)
            if log is not None and t.log_interval and step % t.log_interval == 0:
                log(f"{plan.method} step {step}: loss {value:.4f}")
            recent.append(value)
            if value < best_loss:
                best_loss = value
                if t.keep_best:
                    best = [p.detach().clone() for p in params]
            if stop.enabled and step >= stop.min_iterations and _stalled(recent, stop.patience, stop.tolerance):
                break  # the parameters are those the loss was just measured at: no update after it
        loss.backward()
        if t.gradient_clip:
            torch.nn.utils.clip_grad_norm_(params, t.gradient_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        steps = step + 1
    with torch.no_grad():
        update = layer_update(layer, "default").detach()
        final = float(frobenius_loss(update, target, squared))
        if t.keep_best and best is not None and best_loss < final:
            torch._foreach_copy_(params, best)
            update = layer_update(layer, "default").detach()
            final = float(frobenius_loss(update, target, squared))
    return Fit(update, sum(p.numel() for p in params), time.perf_counter() - start, steps, history, final)
