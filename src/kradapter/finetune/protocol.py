"""The comparison's settings: methods, learning-rate grids, the recipe, and every check that needs no data or model.

Every method uses one recipe: AdamW (no weight decay), linear decay after a 10% warm-up, ``--steps`` optimiser steps
(or, when not given, ``--epochs`` passes over the k-shot set) in batches of ``--batch-size``; only the learning rate
differs, picked per method from its grid (:mod:`kradapter.registry`) by accuracy on a validation split carved from the
training pool (never the test split). The classifier reads the encoder's native sentence-transformers pooling
(``--head-input native``; ``pooler`` keeps transformers' own head input). A run given a validation scorer is scored
after each fifth of its steps and ends with its best checkpoint (:data:`VAL_CHECKPOINTS`); every run records its
per-step training loss and a verdict, fit / underfit / diverged (:data:`FIT_RULE`). The shift study's default step
count, :func:`fit_steps`, comes from a measurement recorded beside it. Only the standard library is imported here,
so a bad flag answers at once.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import registry
from ..guards import is_finite, one_of, positive_int
from ..store import RunSpec

KINDS = ("baseline", "adapter")  # finetune runs the adapters and the head-only / full fine-tuning baselines
WARMUP_FRACTION = 0.1
EVAL_BATCH_SIZE = 64
DEVICES = ("auto", "cpu", "cuda", "mps")
HEAD_INPUTS = ("native", "pooler")  # the encoder's sentence-transformers pooling, or transformers' own head input
MIN_MAX_LENGTH = 8


# -- training that fits --------------------------------------------------------------------------------------------

VAL_CHECKPOINTS = 5  # a run with validation is scored after each fifth of its steps; the best checkpoint is kept
FINAL_FRACTION = 0.1  # final_train_loss: the mean training loss of the last 10% of the optimiser steps
UNDERFIT_FRACTION = 0.25  # underfit: final_train_loss above this fraction of chance, ln(num_classes)
FIT_RULE = (
    "diverged: a non-finite training loss at any step, or final_train_loss (mean of the last 10% of steps) above "
    "the mean of the first 10%; underfit: otherwise, final_train_loss above "
    f"{UNDERFIT_FRACTION:g} x ln(num_classes) (the loss of guessing uniformly); fit: otherwise"
)


# The shift study's default step count, from a measurement (all-MiniLM-L6-v2, native mean-pooling head, sentiment
# pool, batch 8, seed 0, one thread): the fewest steps of the doubling series max(10, 2 epochs), x2, ... at which a
# run was "fit" by FIT_RULE (final_train_loss < 0.173 = 0.25 ln 2).
#   rate 3e-3 (the registry grids' middle):  8 shots  LoRA 10, KRAdapter 20  |  32 shots  LoRA 32, KRAdapter 32
#                                            128 shots LoRA 64 (0.168), KRAdapter 128
#   rate 1e-3 (the grids' lowest):           8 shots  LoRA 20, KRAdapter 40  |  32 shots  LoRA 32, KRAdapter 128
#                                            (0.207 at 64 steps; 128 shots not measured at 1e-3)
# Fitting takes about 4 passes over the data at 3e-3 (more at 8 shots: 10 passes) and more than twice that for
# KRAdapter at 1e-3; the default gives each run FIT_EPOCHS passes and at least MIN_FIT_STEPS steps: twice the 3e-3
# need at every shot count, the 1e-3 need at 8 shots, not KRAdapter's at 1e-3 from 32 shots (the sweep's higher
# rates fit there; the fit verdict flags the runs that do not). Validation checkpoint selection makes extra steps
# cheap in accuracy.
EXTRA_TRIALS = 2  # adaptive tuning trials after a method's grid (the same number for every method)
FIT_EPOCHS = 8
MIN_FIT_STEPS = 50


def fit_steps(train_size: int, batch_size: int) -> int:
    """The default optimiser steps of a run on ``train_size`` texts in batches of ``batch_size``: FIT_EPOCHS passes,
    at least MIN_FIT_STEPS (8 shots x 2 classes: 50; 32: 64; 128: 256 at batch 8)."""
    for name, value in (("train_size", train_size), ("batch_size", batch_size)):
        _positive(name, value)
    return max(MIN_FIT_STEPS, FIT_EPOCHS * math.ceil(train_size / batch_size))


def _tail_mean(values: list[float], head: bool = False) -> float:
    n = max(1, math.ceil(FINAL_FRACTION * len(values)))
    part = values[:n] if head else values[-n:]
    return sum(part) / len(part) if part else float("nan")


def final_loss(curve: list[float]) -> float:
    """Mean training loss over the last 10% of the steps (at least one step); NaN for an empty curve."""
    return _tail_mean(list(curve))


def fit_verdict(curve: list[float], num_classes: int) -> str:
    """``"fit"``, ``"underfit"`` or ``"diverged"`` for a run's per-step training losses, by :data:`FIT_RULE`."""
    values = [float(v) for v in curve]
    if not values or not all(math.isfinite(v) for v in values):
        return "diverged"
    final = _tail_mean(values)
    if final > _tail_mean(values, head=True):
        return "diverged"
    return "underfit" if final > UNDERFIT_FRACTION * math.log(max(num_classes, 2)) else "fit"


def world() -> tuple[int, int]:
    """``(rank, world_size)`` as torchrun sets them (``(0, 1)`` in a plain process)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class SettingsError(ValueError):
    """A flag or a combination of flags that cannot run; the message names it."""


def default_methods() -> tuple[str, ...]:
    """``kradapter finetune``'s methods when ``--methods`` is not given (the registry's ``finetune-default``)."""
    return registry.tagged("finetune-default")


SHARDED_LAUNCHES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}  # set by accelerate launch


def check_launch() -> None:
    """Refuse an ``accelerate launch`` with an FSDP or DeepSpeed config, naming why: ``finetune`` runs in one
    process or data-parallel (torchrun, or accelerate's multi-CPU/multi-GPU DDP config). On CPUs accelerate turns
    an FSDP config into DDP without a word, and the Trainer's sharded saving of a PEFT adapter (which PEFT 0.21
    gets wrong under FSDP1) could not be checked here without a GPU."""
    for variable, engine in SHARDED_LAUNCHES.items():
        if os.environ.get(variable, "").lower() == "true":
            raise SettingsError(
                f"launched with a {engine} config ({variable}=true): kradapter finetune does not shard; run it "
                "with torchrun or accelerate's DDP config (examples/accelerate/multi_cpu.yaml), and train sharded "
                "with examples/fsdp_train.py (docs/sharded.md)"
            )


def parse_methods(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Canonical method names in the given order (aliases such as ``lokr`` accepted, and adapters at a fixed size,
    ``METHOD@KNOB=VALUE``: :func:`kradapter.registry.variant`); naming an unknown one or the bad part."""
    try:
        return registry.parse_names(names, KINDS, variants=True)
    except registry.MethodError as exc:
        raise SettingsError(f"--methods: {exc}") from None


def parse_lr_grid(items: list[str] | None) -> dict[str, tuple[float, ...]]:
    """``["METHOD=1e-3,3e-3", ...]`` as ``{METHOD: (0.001, 0.003)}`` (a variant too: ``lora@r=4=1e-3``, split at
    the last ``=``); a SettingsError naming a malformed item."""
    grids: dict[str, tuple[float, ...]] = {}
    for item in items or []:
        method, sep, values = item.rpartition("=")
        if not sep:
            raise SettingsError(f"--lr-grid {item!r} is not METHOD=LR[,LR...]")
        try:
            (name,) = registry.parse_names([method], KINDS, variants=True)
        except registry.MethodError as exc:
            raise SettingsError(f"--lr-grid {item!r}: {exc}") from None
        try:
            lrs = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise SettingsError(f"--lr-grid {item!r}: learning rates must be numbers") from None
        if not lrs or not all(is_finite(lr) and lr > 0 for lr in lrs):
            raise SettingsError(f"--lr-grid {item!r}: learning rates must be positive finite numbers")
        if len(set(lrs)) != len(lrs):
            raise SettingsError(f"--lr-grid {item!r}: a learning rate is listed twice")
        grids[name] = lrs
    return grids


def _positive(flag: str, value: Any, minimum: int = 1) -> None:
    positive_int(flag, value, minimum=minimum, error=SettingsError)


def lr_key(lr: float) -> str:
    """A learning rate as it appears in record keys and adapter folder names."""
    return f"{lr:g}"


@dataclass(frozen=True)
class Recipe:
    """How every method trains, shared by ``kradapter finetune`` and ``kradapter shift``: passes over the k-shot
    set, global batch size, tokens kept per text, target layers, device, and validation texts per class for the
    learning-rate sweep. Checked on construction."""

    val_shots: int = 16
    epochs: int = 5
    batch_size: int = 8
    max_length: int = 128
    targets: tuple[str, ...] | None = None
    device: str = "auto"
    steps: int | None = None  # optimiser steps; None: ``epochs`` passes over the k-shot set
    head_input: str = "native"

    def __post_init__(self) -> None:
        for flag, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size)):
            _positive(flag, value)
        if self.steps is not None:
            _positive("--steps", self.steps)
        one_of("--head-input", self.head_input, HEAD_INPUTS, error=SettingsError)
        _positive("--max-length", self.max_length, MIN_MAX_LENGTH)
        _positive("--val-shots", self.val_shots, 0)
        one_of("--device", self.device, DEVICES, error=SettingsError)
        if self.targets is not None and not all(isinstance(t, str) and t for t in self.targets):
            raise SettingsError(f"--targets must be layer names, got {list(self.targets)}")

    def spec_settings(self) -> dict[str, Any]:
        """The recipe's part of a run's identity in the results store (every value changes results)."""
        return {
            "val_shots": self.val_shots,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "targets": list(self.targets) if self.targets else None,
            "device": self.device,
            "steps": self.steps,
            "head_input": self.head_input,
        }

    def check_validation(self, methods: tuple[str, ...], grids: LearningRates) -> None:
        """Refuse ``--val-shots 0`` when one of ``methods`` has a grid to choose from, naming them."""
        sweeping = [m for m in methods if len(grids.grid(m)) > 1]
        if self.val_shots == 0 and sweeping:
            raise SettingsError(
                f"--val-shots 0 leaves no validation articles to choose a learning rate for {', '.join(sweeping)}; "
                "give --val-shots >= 1, or one rate per method with --lr-grid METHOD=LR"
            )


class LearningRates:
    """Each method's learning-rate grid: the registry's, unless ``lr_grids`` (``--lr-grid``) replaces it."""

    lr_grids: dict[str, tuple[float, ...]]

    def grid(self, method: str) -> tuple[float, ...]:
        return self.lr_grids.get(method, registry.entry(method).lr_grid)  # a variant: its method's grid

    def spec(self, kind: str, settings: dict[str, Any], axes: dict[str, list[Any]], inputs: dict[str, str]) -> RunSpec:
        """The run's identity in the results store; every method of the ``methods`` axis brings its grid."""
        per_value = {"methods": {m: {"lr_grid": list(self.grid(m))} for m in axes["methods"]}}
        return RunSpec(kind, settings, axes, inputs, per_value)


@dataclass(frozen=True)
class Settings(LearningRates):
    """Everything a ``kradapter finetune`` comparison depends on, checked on construction (the data- and
    model-dependent checks come with the plan)."""

    model: str
    data: str
    methods: tuple[str, ...] = ()  # () : the registry's finetune defaults
    seeds: tuple[int, ...] = (0, 1, 2)
    shots: int = 16
    lr_grids: dict[str, tuple[float, ...]] = field(default_factory=dict)
    recipe: Recipe = field(default_factory=Recipe)

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", parse_methods(list(self.methods or default_methods())))
        _positive("--shots", self.shots)
        if not self.seeds:
            raise SettingsError("--seeds needs at least one seed")
        for seed in self.seeds:
            _positive("--seeds", seed, 0)
        if len(set(self.seeds)) != len(self.seeds):
            raise SettingsError(f"--seeds has duplicates: {list(self.seeds)}")
        for method, grid in self.lr_grids.items():
            if not (method in registry.METHODS or registry.is_variant(method)) or not grid:
                raise SettingsError(f"learning-rate grid for {method!r} is invalid: {grid!r}")
        self.recipe.check_validation(self.methods, self)

    @property
    def sweep_seed(self) -> int:
        return self.seeds[0]

    def run_spec(self, model_hash: str, data_hash: str) -> RunSpec:
        """The comparison's identity in the results store: settings that change results, input hashes, axes."""
        settings = {"shots": self.shots, **self.recipe.spec_settings(), "sweep_seed": self.sweep_seed}
        axes: dict[str, list[Any]] = {"methods": list(self.methods), "seeds": list(self.seeds)}
        return self.spec("finetune", settings, axes, {"model": model_hash, "data": data_hash})


# -- model folders, checked without loading a library ------------------------------------------------------------------

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def check_model_dir(path: Path | str, *, trust_remote_code: bool = False) -> Path:
    """A local transformers model folder with a readable config, weights and a tokenizer; a SettingsError naming
    what is missing (a folder without a tokenizer would train on unknown-word tokens), or that it would run the
    folder's own code (``trust_remote_code``: only when the user says so, never by asking)."""
    path = Path(path)
    flag = f"--model {str(path)!r}"
    if not path.is_dir():
        raise SettingsError(f"{flag} is not a local transformers model directory (no such folder)")
    config = model_config(path)
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise SettingsError(f"{flag} has no weights (none of {', '.join(WEIGHT_FILES)})")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise SettingsError(f"{flag} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    if not trust_remote_code and needs_remote_code(config):
        raise SettingsError(
            f"{flag}: its config.json has an 'auto_map' and a model_type ({config['model_type']!r}) transformers "
            "does not know, so loading it would run the folder's own code; pass --trust-remote-code if you trust it"
        )
    return path


def model_config(path: Path) -> dict[str, Any]:
    """The folder's ``config.json``; a SettingsError naming the folder when it is missing or not a model config."""
    flag = f"--model {str(path)!r}"
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SettingsError(f"{flag} is not a local transformers model directory (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SettingsError(f"{flag}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise SettingsError(f"{flag}: config.json has no 'model_type'; it is not a transformers model config")
    return config


def needs_remote_code(config: dict[str, Any]) -> bool:
    """Whether transformers would need the folder's own code: an ``auto_map`` and a ``model_type`` it lacks."""
    if "auto_map" not in config:
        return False
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return config["model_type"] not in CONFIG_MAPPING_NAMES


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len")


def check_max_length(path: Path, max_length: int) -> None:
    """Refuse a ``--max-length`` beyond the positions the model has, naming both (it would fail mid-run)."""
    config = model_config(path)
    for key in POSITION_KEYS:
        limit = config.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            if max_length > limit:
                raise SettingsError(
                    f"--max-length {max_length} is more tokens than the model takes ({key} {limit} in "
                    f"{path / 'config.json'}); give --max-length {limit} or less"
                )
            return


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before any work (``auto`` always works)."""
    if device not in ("cuda", "mps"):
        return
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SettingsError("--device cuda: no CUDA GPU is available to torch on this machine")
    if device == "mps" and not torch.backends.mps.is_available():
        raise SettingsError("--device mps: no Apple GPU is available to torch on this machine")
