"""Export a KRAdapter or SinLoRA adapter as a PEFT LoRA adapter, for engines that serve only LoRA.

Each adapted layer's update ``dW`` (``d x k``) is taken from the tuner's own ``get_delta_weight`` (the adapter is
loaded onto its base model), in float64, and cut to a truncated SVD ``dW_r = U_r S_r V_r^T`` stored as LoRA
factors ``B = U_r sqrt(S_r)`` and ``A = sqrt(S_r) V_r^T``. By Eckart-Young ``dW_r`` is the best rank-``r``
approximation in Frobenius norm, and its relative error is ``sqrt(sum_{i>r} s_i^2) / sqrt(sum_i s_i^2)``.

Two ways to choose the rank:

- ``rank=r``: every layer gets rank ``r`` (zero-padded where ``r > min(d, k)``), so the LoRA config has one ``r``
  and no ``rank_pattern``: the form every LoRA engine accepts.
- ``max_error=e``: each layer gets the smallest rank whose relative error is at most ``e`` (a per-layer target,
  not a global one: a layer whose update is close to low rank stays small, a high-rank one grows), written with
  PEFT's ``rank_pattern``. Every layer's scaling ``lora_alpha / r_layer`` is folded into its ``B``, so no
  ``alpha_pattern`` is needed.

Tensors of the source that are not adapter factors (``modules_to_save`` such as a classifier head, trained biases)
are copied unchanged under the same keys, and the LoRA config keeps ``modules_to_save``, ``bias`` and
``task_type``, so ``PeftModel.from_pretrained`` rebuilds the same model with a LoRA in place of the source adapter.

This module imports only the standard library at load time (``kradapter export --help`` answers at once);
:func:`check_request` validates inputs without torch, :func:`export_lora` does the work.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from . import files, guards, registry

if TYPE_CHECKING:
    import torch
    from torch import nn

# The adapters this package's own tuners make; a tuner's peft_type is its registry name in capitals.
SOURCE_METHODS: tuple[str, ...] = registry.tagged("export-source")
SOURCE_TYPES: tuple[str, ...] = tuple(name.upper() for name in SOURCE_METHODS)
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES: tuple[str, ...] = ("adapter_model.safetensors", "adapter_model.bin")
REPORT_NAME = "export_report.json"
MODEL_PREFIX = "base_model.model."
# PEFT task types and the transformers auto class whose module names a saved adapter of that task refers to.
AUTO_CLASSES: dict[str | None, str] = {
    None: "AutoModel",
    "FEATURE_EXTRACTION": "AutoModel",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}


class ExportError(ValueError):
    """An export request that cannot be carried out; the message names the bad value."""


@dataclass(frozen=True)
class Request:
    """A validated export request (what :func:`check_request` returns)."""

    adapter_dir: Path
    out_dir: Path
    peft_type: str
    config: dict[str, Any]
    weights_file: Path
    rank: int | None
    max_error: float | None
    base: str | None
    dtype: str
    overwrite: bool


@dataclass(frozen=True)
class LayerExport:
    """One exported layer: its shape ``(out, in)``, the LoRA rank kept and the relative Frobenius error."""

    name: str
    out_features: int
    in_features: int
    rank: int
    relative_error: float
    update_norm: float
    lora_params: int


@dataclass(frozen=True)
class ExportReport:
    """What an export produced: per-layer ranks and errors, the overall error, and file sizes in bytes."""

    source_type: str
    out_dir: str
    rank: int | None
    max_error: float | None
    dtype: str
    layers: tuple[LayerExport, ...]
    global_relative_error: float
    lora_params: int
    copied_tensors: tuple[str, ...]
    file_bytes: int
    source_file_bytes: int
    capped: tuple[str, ...] = ()  # layers whose requested rank was above what their update can use

    @property
    def max_layer_error(self) -> float:
        return max((layer.relative_error for layer in self.layers), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["max_layer_error"] = self.max_layer_error
        return data

    def table(self) -> str:
        """A plain-text table of the layers and a summary line."""
        width = max((len(layer.name) for layer in self.layers), default=5)
        lines = [f"{'layer':<{width}}  {'shape':>11}  {'rank':>5}  {'rel. error':>10}"]
        for layer in self.layers:
            shape = f"{layer.out_features}x{layer.in_features}"
            lines.append(f"{layer.name:<{width}}  {shape:>11}  {layer.rank:>5}  {layer.relative_error:>10.4f}")
        if self.capped:
            lines.append(
                f"rank {self.rank} capped at the layer's full rank min(out, in) for {len(self.capped)} layer(s) "
                "(rank_pattern): a larger rank adds nothing"
            )
        lines.append(
            f"{len(self.layers)} layers; relative error of the stored {self.dtype} factors: "
            f"overall {self.global_relative_error:.4f}, "
            f"worst layer {self.max_layer_error:.4f}; LoRA parameters {self.lora_params:,}; "
            f"file {files.format_bytes(self.file_bytes)} (source {files.format_bytes(self.source_file_bytes)})"
        )
        return "\n".join(lines)


def check_request(
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    rank: int | None = None,
    max_error: float | None = None,
    base: str | os.PathLike[str] | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    need_base: bool = True,
) -> Request:
    """Validate an export request with the standard library only; raise :class:`ExportError` on the first problem."""
    source = Path(adapter_dir)
    if not source.is_dir():
        raise ExportError(f"adapter folder {str(source)!r} does not exist or is not a folder")
    config_path = source / CONFIG_NAME
    if not config_path.is_file():
        raise ExportError(f"{str(source)!r} is not a PEFT adapter folder: it has no {CONFIG_NAME}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {str(config_path)!r}: {exc}") from None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type not in SOURCE_TYPES:
        raise ExportError(
            f"{str(source)!r} holds a {peft_type!r} adapter, not a "
            f"{' or '.join(registry.label(m) for m in SOURCE_METHODS)} adapter "
            f"(peft_type must be one of {SOURCE_TYPES})"
        )
    weights = next((source / name for name in WEIGHT_NAMES if (source / name).is_file()), None)
    if weights is None:
        raise ExportError(f"{str(source)!r} has no adapter weights ({' or '.join(WEIGHT_NAMES)})")
    if (rank is None) == (max_error is None):
        raise ExportError("give exactly one of rank and max_error")
    if rank is not None:
        guards.positive_int("rank", rank, error=ExportError)
    if max_error is not None and not (guards.is_finite(max_error) and 0.0 < max_error < 1.0):
        raise ExportError(f"max_error must be a relative error in (0, 1), got {max_error!r}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {DTYPES}")
    target = Path(out_dir)
    if target.is_symlink() and not target.exists():
        raise ExportError(f"output {str(target)!r} is a symbolic link to {os.readlink(target)!r}, which does not exist")
    if target.exists() and not target.is_dir():
        raise ExportError(f"output {str(target)!r} exists and is not a folder")
    if target.exists() and target.resolve() == source.resolve():
        raise ExportError(f"output folder {str(target)!r} is the adapter folder itself; choose another")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ExportError(f"output folder {str(target)!r} already holds files; pass overwrite (--overwrite) to replace")
    base_name = str(base) if base is not None else config.get("base_model_name_or_path")
    if need_base:
        if not base_name:
            raise ExportError(f"{str(config_path)!r} names no base_model_name_or_path; pass the base model (--base)")
        looks_local = os.path.isabs(base_name) or base_name.startswith(".") or base_name.count("/") > 1
        if looks_local and not Path(base_name).is_dir():
            raise ExportError(f"base model folder {base_name!r} does not exist")
    return Request(
        adapter_dir=source,
        out_dir=target,
        peft_type=peft_type,
        config=config,
        weights_file=weights,
        rank=rank,
        max_error=float(max_error) if max_error is not None else None,
        base=base_name or None,
        dtype=dtype,
        overwrite=overwrite,
    )


def export_lora(
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    rank: int | None = None,
    max_error: float | None = None,
    base: str | os.PathLike[str] | nn.Module | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> ExportReport:
    """Convert the KRAdapter/SinLoRA adapter in ``adapter_dir`` into a PEFT LoRA adapter in ``out_dir``.

    Give ``rank`` (one rank for every layer) or ``max_error`` (per layer, the smallest rank whose relative
    Frobenius error is at most this). ``base`` is the base model: a local folder or hub name (default: the adapter
    config's ``base_model_name_or_path``), loaded in float32 with the transformers auto class of the adapter's
    ``task_type``; or a model object, which is used in place and left as it was. ``dtype`` is the stored LoRA
    factors' dtype. Writes ``adapter_config.json``, ``adapter_model.safetensors`` and ``export_report.json``.
    """
    from torch import nn

    module = base if isinstance(base, nn.Module) else None
    request = check_request(
        adapter_dir,
        out_dir,
        rank=rank,
        max_error=max_error,
        base=None if module is not None else cast(Any, base),
        dtype=dtype,
        overwrite=overwrite,
        need_base=module is None,
    )
    model = module if module is not None else load_base(request)
    return run_export(request, model)


def load_base(request: Request) -> nn.Module:
    """The base model named by ``request``, float32, with the module names a saved adapter of its task refers to."""
    import torch
    import transformers

    task = request.config.get("task_type")
    auto = getattr(transformers, AUTO_CLASSES.get(task, "AutoModel"))
    try:
        return auto.from_pretrained(request.base, dtype=torch.float32).eval()
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load base model {request.base!r}: {str(exc).splitlines()[0]}") from None


def load_weights(request: Request) -> dict[str, torch.Tensor]:
    """The adapter's tensors, read without running any code (``weights_only`` for a ``.bin``); a file that is not a
    table of finite tensors is an ExportError naming it (and the tensor)."""
    import torch

    path = request.weights_file
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            saved: Any = load_file(str(path), device="cpu")
        else:
            saved = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors have no common type: each is a bad file
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ExportError(f"cannot read the adapter weights {str(path)!r}: {first}") from None
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise ExportError(f"{str(path)!r} is not a table of tensors (name -> tensor)")
    for name, tensor in saved.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(f"{str(path)!r}: tensor {name!r} holds NaN or infinite values; nothing to export")
    return cast("dict[str, torch.Tensor]", saved)


def run_export(request: Request, model: nn.Module, saved: Mapping[str, torch.Tensor] | None = None) -> ExportReport:
    """Load the adapter's factors onto ``model``, truncate each layer's update, write the LoRA folder, and load it
    back with ``PeftModel.from_pretrained`` to check it holds exactly the factors whose errors are reported."""
    import torch
    from peft import PeftConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import set_peft_model_state_dict
    from torch import nn

    from .tuners import METHODS

    prefix = METHODS[cast(Any, request.peft_type)][1].prefix
    saved = load_weights(request) if saved is None else saved
    factors = {k: v for k, v in saved.items() if prefix in k}
    copied = {k: v for k, v in saved.items() if prefix not in k}
    if not factors:
        raise ExportError(f"{str(request.weights_file)!r} holds no {prefix}* tensors")

    try:
        config = PeftConfig.from_pretrained(str(request.adapter_dir))
    except (OSError, ValueError, TypeError) as exc:
        raise ExportError(f"cannot read the adapter config in {str(request.adapter_dir)!r}: {exc}") from None
    config.modules_to_save = None  # heads are copied as tensors, never rebuilt on the base
    config.task_type = None
    config.inference_mode = True
    misfit = f"the adapter in {str(request.adapter_dir)!r} does not fit the base model"
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, TypeError, KeyError) as exc:  # PEFT's own: e.g. no module matches target_modules
        raise ExportError(f"{misfit}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    try:
        layers = {
            name.removeprefix(MODEL_PREFIX): layer
            for name, layer in peft_model.named_modules()
            if isinstance(layer, BaseTunerLayer) and hasattr(layer, "get_delta_weight")
        }
        for layer in layers.values():  # float64 factors: the copy below is exact, the update computed in float64
            for attr in layer.adapter_layer_names:
                params = getattr(layer, attr)
                params["default"] = torch.nn.Parameter(params["default"].detach().double(), requires_grad=False)
        try:
            result: Any = set_peft_model_state_dict(peft_model, factors, adapter_name="default")
        except (ValueError, RuntimeError) as exc:  # the tuner names the module whose shape differs
            raise ExportError(f"{misfit}: {str(exc).splitlines()[0]}") from None
        missing = [k for k in result.missing_keys if prefix in k]
        unexpected = [k for k in result.unexpected_keys if prefix in k]
        if missing or unexpected:
            raise ExportError(
                f"{misfit} ({len(missing)} adapter tensors missing, e.g. {missing[:1]}; {len(unexpected)} unexpected, "
                f"e.g. {unexpected[:1]}); pass the base model it was trained on (--base)"
            )
        deltas: dict[str, torch.Tensor] = {}
        fan_in_fan_out = False
        with torch.no_grad():
            for name, layer in layers.items():
                if getattr(layer.get_base_layer(), "groups", 1) > 1:
                    raise ExportError(
                        f"layer {name!r} is a grouped convolution (groups={layer.get_base_layer().groups}): PEFT's "
                        "LoRA cannot hold its update as a truncated SVD; nothing was written"
                    )
                delta = cast(Any, layer).delta_matrix("default").double()  # (out, in), whatever the weight layout
                base_layer = layer.get_base_layer()
                if isinstance(base_layer, nn.modules.conv._ConvNd):  # PEFT's LoRA holds conv factors 4-D (3-D, 5-D)
                    delta = delta.reshape(base_layer.weight.shape)
                if not bool(torch.isfinite(delta).all()):
                    raise ExportError(f"layer {name!r}: the adapter's update holds NaN or infinite values")
                deltas[name] = delta
                fan_in_fan_out = fan_in_fan_out or bool(getattr(layer, "fan_in_fan_out", False))
    finally:
        peft_model.unload()  # give back the base model as it was

    exported, tensors, capped = choose_factors(deltas, request)
    r = max(item.rank for item in exported)
    ranks = {item.name: item.rank for item in exported}
    pattern = {name: rank for name, rank in ranks.items() if rank != r}
    out_tensors = dict(tensors)
    out_tensors.update({k: v.detach().clone().contiguous() for k, v in copied.items()})
    lora_config = make_lora_config(request, list(ranks), r, pattern, fan_in_fan_out)
    try:
        file_bytes = write_folder(request, lora_config, out_tensors)
    except OSError as exc:
        raise ExportError(f"cannot write the output folder {str(request.out_dir)!r}: {exc.strerror or exc}") from None
    check_written(request, model, exported, tensors)

    total = math.sqrt(sum(layer.update_norm**2 for layer in exported))
    tail = math.sqrt(sum((layer.relative_error * layer.update_norm) ** 2 for layer in exported))
    report = ExportReport(
        source_type=request.peft_type,
        out_dir=str(request.out_dir),
        rank=request.rank,
        max_error=request.max_error,
        dtype=request.dtype,
        layers=tuple(exported),
        global_relative_error=tail / total if total > 0 else 0.0,
        lora_params=sum(layer.lora_params for layer in exported),
        copied_tensors=tuple(sorted(copied)),
        file_bytes=file_bytes,
        source_file_bytes=request.weights_file.stat().st_size,
        capped=tuple(capped),
    )
    files.write_atomic(request.out_dir / REPORT_NAME, json.dumps(report.to_dict(), indent=2))
    return report


def choose_factors(
    deltas: Mapping[str, torch.Tensor], request: Request
) -> tuple[list[LayerExport], dict[str, torch.Tensor], list[str]]:
    """Each layer's rank and stored LoRA factors, and the layers whose requested rank was capped.

    A layer's rank is at most ``min(out, in)`` (what its update can use): a larger ``rank`` is capped there, and
    the capped layers get their rank through ``rank_pattern``. Errors are those of the factors as stored: after the
    scaling fold and the rounding to ``request.dtype``. With ``max_error``, a layer whose rounded error is above it
    gets a higher rank until it is within, and a layer where even its full rank is not (the dtype's rounding alone
    exceeds the target) stops the export naming it."""
    svds = {name: _svd(delta) for name, delta in deltas.items()}
    full = {name: min(_matrix(delta).shape) for name, delta in deltas.items()}
    if request.rank is not None:
        ranks = {name: min(request.rank, full[name]) for name in deltas}
    else:
        assert request.max_error is not None
        ranks = {name: _smallest_rank(svds[name][1], request.max_error) for name in deltas}
    capped = sorted(name for name in deltas if request.rank is not None and request.rank > full[name])
    while True:
        r = max(ranks.values())
        stored = {name: _stored(deltas[name], svds[name], ranks[name], r, request.dtype) for name in deltas}
        errors = {name: _relative_error(deltas[name], *stored[name], r) for name in deltas}
        if request.max_error is None:
            break
        over = [name for name in deltas if errors[name] > request.max_error]
        if not over:
            break
        for name in over:
            if ranks[name] >= full[name]:
                raise ExportError(
                    f"layer {name!r}: even at its full rank {full[name]} the {request.dtype} LoRA has relative error "
                    f"{errors[name]:.4g} > --max-error {request.max_error:g} (the {request.dtype} rounding alone); "
                    "store float32 factors (--dtype float32) or allow a larger error"
                )
            ranks[name] = min(full[name], ranks[name] + max(1, ranks[name] // 8))
    exported, tensors = [], {}
    for name, delta in deltas.items():
        a, b = stored[name]
        matrix = _matrix(delta)
        exported.append(
            LayerExport(
                name=name,
                out_features=matrix.shape[0],
                in_features=matrix.shape[1],
                rank=ranks[name],
                relative_error=errors[name],
                update_norm=float(torch_norm(matrix)),
                lora_params=a.numel() + b.numel(),
            )
        )
        tensors[f"{MODEL_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{MODEL_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    return exported, tensors, capped


def torch_norm(matrix: torch.Tensor) -> float:
    import torch

    return float(torch.linalg.vector_norm(matrix, dtype=torch.float64))  # float32 CPU norms drift with size


def _matrix(delta: torch.Tensor) -> torch.Tensor:
    """The update as a matrix ``out x (in * kernel)`` (a convolution's kernel flattened, as PEFT's LoRA does)."""
    return delta.reshape(delta.shape[0], -1)


def _svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import torch

    return cast(
        "tuple[torch.Tensor, torch.Tensor, torch.Tensor]", tuple(torch.linalg.svd(_matrix(delta), full_matrices=False))
    )


def _smallest_rank(s: torch.Tensor, max_error: float) -> int:
    """The smallest rank whose exact truncation error is at most ``max_error`` (at least 1)."""
    import torch

    energy = s.square()
    total = float(energy.sum())
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    within = (tail <= (max_error**2) * total).nonzero()
    return max(1, int(within[0]))


def _stored(
    delta: torch.Tensor, svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], keep: int, r: int, dtype: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors ``A`` and ``B`` as stored: rank ``keep``, ``B`` holding the scaling fold ``keep / r`` (the
    config's ``lora_alpha = r``), in ``dtype``; a convolution's in PEFT's conv shapes ``(keep, in, *kernel)`` and
    ``(out, keep, 1, ...)``."""
    import torch

    u, s, vh = svd
    root = s[:keep].sqrt()
    a = root[:, None] * vh[:keep]
    b = u[:, :keep] * root * (keep / r)
    if delta.dim() > 2:
        a = a.reshape(keep, *delta.shape[1:])
        b = b.reshape(delta.shape[0], keep, *([1] * (delta.dim() - 2)))
    return a.to(getattr(torch, dtype)), b.to(getattr(torch, dtype))


def _relative_error(delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, r: int) -> float:
    """``||dW - (r / keep) B A||_F / ||dW||_F`` of the stored factors, read back in float64 with the layer's LoRA
    scaling ``lora_alpha / keep = r / keep`` (the fold undone as PEFT undoes it)."""
    matrix = _matrix(delta)
    keep = a.shape[0]
    product = (b.double().reshape(b.shape[0], keep) @ a.double().reshape(keep, -1)) * (r / keep)
    norm = torch_norm(matrix)
    return torch_norm(matrix - product) / norm if norm > 0 else 0.0


def check_written(
    request: Request, model: nn.Module, exported: list[LayerExport], tensors: Mapping[str, torch.Tensor]
) -> None:
    """Load the written folder with ``PeftModel.from_pretrained`` onto a copy of ``model`` and check that every
    exported layer is a LoRA layer whose update is the stored factors' (the update the errors were measured on)."""
    import copy
    import warnings

    import torch
    from peft import PeftModel

    r = max(item.rank for item in exported)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(request.out_dir))
    except Exception as exc:  # any failure here means the folder is not a loadable LoRA: say so, exit non-zero
        raise ExportError(
            f"the LoRA written to {str(request.out_dir)!r} does not load with PeftModel.from_pretrained: "
            f"{(str(exc).splitlines() or [type(exc).__name__])[0][:200]}"
        ) from None
    for item in exported:
        try:
            layer: Any = cast(Any, loaded.base_model).model.get_submodule(item.name)
            got = layer.get_delta_weight("default").double()
        except (AttributeError, KeyError) as exc:
            raise ExportError(
                f"layer {item.name!r} is not a LoRA layer once the export is loaded back ({exc})"
            ) from None
        a = tensors[f"{MODEL_PREFIX}{item.name}.lora_A.weight"].double()
        b = tensors[f"{MODEL_PREFIX}{item.name}.lora_B.weight"].double()
        want = (b.reshape(b.shape[0], item.rank) @ a.reshape(item.rank, -1)) * (r / item.rank)
        if getattr(layer, "fan_in_fan_out", False):
            got = got.T
        got = got.reshape(want.shape)
        scale = float(torch.linalg.vector_norm(want)) or 1.0
        if float(torch.linalg.vector_norm(got - want)) > 1e-6 * scale:
            raise ExportError(f"layer {item.name!r}: the loaded-back LoRA's update differs from the exported factors")


def make_lora_config(
    request: Request, targets: list[str], r: int, rank_pattern: Mapping[str, int], fan_in_fan_out: bool
) -> Any:
    """The PEFT ``LoraConfig`` of the export: the adapted modules by full name, scaling ``lora_alpha / r = 1``
    for the global rank (per-layer ranks have their scaling folded into ``B``)."""
    from peft import LoraConfig

    source = request.config
    bias = source.get("bias", "none")
    return LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(targets),
        rank_pattern=dict(rank_pattern),
        modules_to_save=source.get("modules_to_save"),
        bias=bias if bias in ("none", "all") else "lora_only",
        task_type=source.get("task_type"),
        base_model_name_or_path=request.base,
        fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=True,
        inference_mode=True,
    )


def write_folder(request: Request, lora_config: Any, tensors: dict[str, torch.Tensor]) -> int:
    """Write the config and the weights (each atomically); drop a stale ``.bin``; return the weights' size."""
    from safetensors.torch import save_file

    out = request.out_dir
    out.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(out / WEIGHT_NAMES[0]) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with tempfile.TemporaryDirectory(dir=out, prefix=".config.") as staging:  # PEFT writes the file; we publish it
        lora_config.save_pretrained(staging)
        files.write_atomic(out / CONFIG_NAME, (Path(staging) / CONFIG_NAME).read_bytes())
    stale = out / WEIGHT_NAMES[1]
    if stale.exists():
        stale.unlink()
    return (out / WEIGHT_NAMES[0]).stat().st_size
