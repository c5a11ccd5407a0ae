"""One training or prediction pass through ``transformers.Trainer`` (so torchrun/DDP and GPUs work unchanged),
with its wall time and peak memory."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import resource
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from .protocol import EVAL_BATCH_SIZE, VAL_CHECKPOINTS, WARMUP_FRACTION, final_loss, fit_verdict, world


def broadcast_object(value: Any, device: str = "auto") -> Any:
    """Rank 0's ``value`` in every process (starts torch.distributed if torchrun's processes have not yet: the
    Trainer then uses the same process group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and device not in ("cpu", "mps")
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every process (no-op outside torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class Examples(Dataset):
    """Rows of a dict of equal-length sequences, as dicts of tensors (the Trainer's collator pads them)."""

    def __init__(self, columns: dict[str, Any], indices: np.ndarray | None = None) -> None:
        self.columns = columns
        n = len(next(iter(columns.values())))
        self.indices = np.arange(n) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(self.indices[i])
        return {k: torch.as_tensor(v[j]) for k, v in self.columns.items()}


def training_args(
    workdir: Path,
    *,
    lr: float = 1e-3,
    epochs: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    device: str = "auto",
    steps: int | None = None,
) -> TrainingArguments:
    """The one recipe: AdamW, no weight decay, linear decay after 10% warm-up; global batch ``batch_size``;
    ``steps`` optimiser steps when given (the data is passed over as often as that takes), else ``epochs``
    passes."""
    _, world_size = world()
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available to torch")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: no Apple GPU is available to torch")
    use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return TrainingArguments(
        output_dir=str(workdir),
        learning_rate=lr,
        num_train_epochs=epochs,
        max_steps=steps if steps is not None else -1,
        per_device_train_batch_size=batch_size // world_size,
        per_device_eval_batch_size=EVAL_BATCH_SIZE,
        weight_decay=0.0,
        lr_scheduler_type="linear",
        warmup_steps=WARMUP_FRACTION,
        optim="adamw_torch",
        seed=seed,
        data_seed=seed,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=use_cpu,
        ddp_backend="gloo" if world_size > 1 and use_cpu else None,
        ddp_find_unused_parameters=False,  # every trainable parameter is used: skip the extra graph walk
        dataloader_num_workers=0,
        label_names=["labels"],
        remove_unused_columns=False,
    )


def make_trainer(model: nn.Module, args: TrainingArguments, collator: Any, train: Dataset | None = None) -> Trainer:
    trainer = Trainer(model=model, args=args, data_collator=collator, train_dataset=train)
    trainer.remove_callback(PrinterCallback)
    return trainer


def _trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back so the next run's high-water is its own


def _status_mb(field: str) -> float:
    """A memory field of ``/proc/self/status`` (kB) in MiB."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith(f"{field}:")).split()[1]) / 1024


@contextlib.contextmanager
def peak_memory(cuda: bool) -> Iterator[dict[str, Any]]:
    """Peak memory of the block: CUDA ``max_memory_allocated``, or the process's resident-set high-water mark.

    On Linux the RSS high-water mark (``VmHWM``) is reset first (``/proc/self/clear_refs``), so it is this block's
    peak of the whole process (model, data and Python included), and ``resident_before_mb`` is what the process
    held when the block began (the peak minus it is what training added); elsewhere it is ``ru_maxrss`` since
    start.
    """
    out: dict[str, Any] = {}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _trim_heap()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            out["memory_kind"] = "cpu_rss_peak"
            out["resident_before_mb"] = _status_mb("VmRSS")  # what the process held before (a study grows it)
        except OSError:
            out["memory_kind"] = "cpu_maxrss_since_start"
    yield out
    if cuda:
        torch.cuda.synchronize()
        out["memory_kind"] = "cuda_max_allocated"
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    elif out["memory_kind"] == "cpu_rss_peak":
        out["peak_memory_mb"] = _status_mb("VmHWM")
    else:
        scale = 1 if os.uname().sysname == "Darwin" else 1024  # bytes on macOS, KiB on Linux
        out["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


Score = Callable[[nn.Module], Mapping[str, float]]


def checkpoint_steps(total: int, count: int = VAL_CHECKPOINTS) -> list[int]:
    """The optimiser steps after which a run with validation is scored: ``count`` evenly spaced steps ending at
    the last (``ceil(i * total / count)``, i = 1..count; fewer when the run has fewer steps). Every method, every
    run: the same fraction of its run."""
    return sorted({math.ceil(i * total / count) for i in range(1, count + 1)} - {0})


def rank_key(scores: Mapping[str, float]) -> tuple[float, float, float]:
    """Validation ranking: accuracy, then macro-F1, then lower loss (the learning-rate sweep's order too)."""
    return float(scores["accuracy"]), float(scores["macro_f1"]), -float(scores["loss"])


class BestCheckpoint(TrainerCallback):
    """Scores the model at :func:`checkpoint_steps` and keeps a CPU copy of the trainable parameters of the best
    (earliest of equals); :meth:`restore` puts them back."""

    def __init__(self, model: nn.Module, score: Score) -> None:
        self.model, self.score = model, score
        self.steps: list[int] = []
        self.curve: list[list[float]] = []
        self.best: tuple[tuple[float, float, float], int, dict[str, torch.Tensor]] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps = checkpoint_steps(state.max_steps)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step not in self.steps:
            return
        was_training = self.model.training
        scores = self.score(self.model)
        self.model.train(was_training)
        self.curve.append([state.global_step, float(scores["accuracy"])])
        key = rank_key(scores)
        if self.best is None or key > self.best[0]:
            trainable = {
                n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad
            }
            self.best = (key, state.global_step, trainable)

    @torch.no_grad()
    def restore(self) -> int:
        """Load the best checkpoint's trainable parameters into the model; its step."""
        assert self.best is not None, "no checkpoint was scored"
        params = dict(self.model.named_parameters())
        for name, value in self.best[2].items():
            params[name].copy_(value.to(params[name].device))
        return self.best[1]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _classes(train: Dataset) -> int | None:
    """Distinct labels in the training set (``Examples`` with a ``labels`` column), else None."""
    if isinstance(train, Examples) and "labels" in train.columns:
        labels = train.columns["labels"]
        return len({int(labels[int(i)]) for i in train.indices})
    return None


def fit(
    model: nn.Module,
    train: Dataset,
    collator: Any,
    args: TrainingArguments,
    *,
    val: Score | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place; wall time, peak memory, the training-loss curve and whether the run fit.

    Returns ``steps``, ``loss_first_epoch``/``loss_last_epoch`` (mean loss of the first and last pass over the
    data), ``loss_curve`` (one loss per optimiser step), ``final_train_loss`` (mean of the last 10% of steps),
    ``fit`` (:func:`kradapter.finetune.protocol.fit_verdict` against chance ``ln(num_classes)``; ``num_classes``
    defaults to the distinct training labels). With ``val`` (``score(model) -> {accuracy, macro_f1, loss}``) the
    model is scored at :func:`checkpoint_steps` and ends with the best-scoring checkpoint's trainable weights:
    ``val_curve`` ``[[step, accuracy], ...]`` and ``selected_step`` say which.
    """
    trainer = make_trainer(model, args, collator, train)
    best = BestCheckpoint(model, val) if val is not None else None
    if best is not None:
        trainer.add_callback(best)
    cuda = trainer.args.device.type == "cuda"
    with peak_memory(cuda) as memory:
        start = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "loss" in h and "epoch" in h]
    curve = [float(h["loss"]) for h in logs]
    last_epoch = logs[-1]["epoch"] if logs else 0.0
    first = [h["loss"] for h in logs if h["epoch"] <= 1 + 1e-9]
    last = [h["loss"] for h in logs if h["epoch"] > last_epoch - 1 + 1e-9]
    classes = num_classes if num_classes is not None else _classes(train)
    out: dict[str, Any] = {
        "train_time_s": elapsed,
        **memory,
        "steps": trainer.state.global_step,
        "loss_first_epoch": _mean(first),
        "loss_last_epoch": _mean(last),
        "loss_curve": curve,
        "final_train_loss": final_loss(curve),
        "fit": fit_verdict(curve, classes or 2),
    }
    if best is not None:
        out["val_curve"] = best.curve
        out["selected_step"] = best.restore()
    return out


def predict(model: nn.Module, data: Dataset, collator: Any, args: TrainingArguments) -> np.ndarray:
    """Logits (or whatever the model returns as ``logits``) of every example, gathered across processes."""
    output = make_trainer(model, args, collator).predict(data)
    predictions = output.predictions
    return predictions[0] if isinstance(predictions, tuple) else predictions


@torch.no_grad()
def local_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of one batch in this process only (no Trainer, no collective ops), in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits.float().cpu()
