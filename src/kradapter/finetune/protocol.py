"""The comparison's protocol: methods, per-method learning-rate grids, defaults, and the checks run before training.

Every method uses one recipe: AdamW (no weight decay), linear decay after a 10% warm-up, ``--epochs`` passes over
the k-shot set in batches of ``--batch-size``; only the learning rate differs, picked per method from its grid by
accuracy on a validation split carved from the training pool (never the test split).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..methods import METHOD_NAMES

METHODS: tuple[str, ...] = ("head", "full", "lora", "kronecker", "randlora", "kradapter", "sinlora")
ALIASES = {"lokr": "kronecker"}  # PEFT calls the Kronecker adapter LoKr; results report it as "kronecker"
assert set(METHOD_NAMES) <= set(METHODS)

# Learning-rate grids, one small sweep per method: three values spaced ~3x. They were centred on validation
# accuracy (never the test split): a first sweep of 3e-4..3e-3 for every adapter picked its top value for LoRA,
# LoKr and KRAdapter (so their grids moved up one step) and its middle for RandLoRA and SinLoRA, which diverge at
# 3e-3 (docs/finetune.md).
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "head": (1e-2, 3e-2, 1e-1),
    "full": (1e-4, 3e-4, 1e-3),
    "lora": (1e-3, 3e-3, 1e-2),
    "kronecker": (1e-3, 3e-3, 1e-2),
    "randlora": (3e-4, 1e-3, 3e-3),
    "kradapter": (1e-3, 3e-3, 1e-2),
    "sinlora": (3e-4, 1e-3, 3e-3),
}
WARMUP_FRACTION = 0.1
EVAL_BATCH_SIZE = 64
DEVICES = ("auto", "cpu", "cuda", "mps")


def parse_methods(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Canonical method names in the given order (``lokr`` means ``kronecker``); a ValueError naming unknown ones."""
    out: list[str] = []
    for raw in names:
        for name in (part.strip() for part in str(raw).split(",")):
            if not name:
                continue
            name = ALIASES.get(name.lower(), name.lower())
            if name not in METHODS:
                raise ValueError(f"unknown method {raw!r}; choose from {', '.join(METHODS)} (or 'lokr' for kronecker)")
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError("no methods given")
    return tuple(out)


def parse_lr_grid(items: list[str] | None) -> dict[str, tuple[float, ...]]:
    """``["lora=1e-3,3e-3", ...]`` as ``{"lora": (0.001, 0.003)}``; a ValueError naming a malformed item."""
    grids: dict[str, tuple[float, ...]] = {}
    for item in items or []:
        method, sep, values = item.partition("=")
        if not sep:
            raise ValueError(f"--lr-grid {item!r} is not METHOD=LR[,LR...]")
        (name,) = parse_methods([method])
        try:
            lrs = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--lr-grid {item!r}: learning rates must be numbers") from None
        if not lrs or any(not math.isfinite(lr) or lr <= 0 for lr in lrs):
            raise ValueError(f"--lr-grid {item!r}: learning rates must be positive finite numbers")
        grids[name] = lrs
    return grids


@dataclass(frozen=True)
class Settings:
    """Everything a comparison depends on. ``protocol()`` lists the fields that change results (for --resume)."""

    model: str
    data: str
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    shots: int = 16
    val_shots: int = 16
    epochs: int = 5
    batch_size: int = 8
    max_length: int = 128
    targets: tuple[str, ...] | None = None
    lr_grids: dict[str, tuple[float, ...]] = field(default_factory=dict)
    device: str = "auto"

    def grid(self, method: str) -> tuple[float, ...]:
        return self.lr_grids.get(method, LR_GRIDS[method])

    def protocol(self) -> dict[str, object]:
        """Fields whose change makes earlier runs incomparable; methods and later seeds may be added on resume."""
        keep = asdict(self)
        for name in ("methods", "seeds", "lr_grids", "device"):
            keep.pop(name)
        keep["targets"] = list(self.targets) if self.targets else None
        keep["sweep_seed"] = self.seeds[0]
        return keep

    def check(self) -> None:
        """A ValueError naming the first bad setting (the data- and model-dependent checks come later)."""
        positive = {"--epochs": self.epochs, "--batch-size": self.batch_size, "--max-length": self.max_length}
        for flag, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")
        if self.max_length < 8:
            raise ValueError(f"--max-length {self.max_length} is too short to hold a sentence (use at least 8)")
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds has duplicates: {list(self.seeds)}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"--seeds must be non-negative integers, got {list(self.seeds)}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown --device {self.device!r}; choose one of {DEVICES}")
        parse_methods(list(self.methods))
        for method, grid in self.lr_grids.items():
            if method not in METHODS or not grid:
                raise ValueError(f"learning-rate grid for {method!r} is invalid: {grid!r}")
