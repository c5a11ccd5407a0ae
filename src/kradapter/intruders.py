"""Intruder dimensions of a fine-tuned weight (Shuttleworth et al., arXiv 2410.21228).

Shuttleworth, Andreas, Torralba & Sharma, "LoRA vs Full Fine-tuning: An Illusion of Equivalence" (arXiv
2410.21228, NeurIPS 2025) call a singular vector ``y_j`` of the fine-tuned weight an *intruder dimension* when
``max_i cos(y_j, x_i) < epsilon`` over every singular vector ``x_i`` of the pre-trained weight: a new high-ranking
direction that the pre-trained matrix does not have. They count intruders among the fine-tuned weight's top ``k``
singular vectors (largest singular values) and sweep ``epsilon``; their released code
(``find_number_of_intruder_dimensions``) uses the left singular vectors (``U`` of ``torch.linalg.svd`` with
``full_matrices=False``), the absolute value of the cosine, ``k = 10`` and a default threshold ``epsilon = 0.5``.
Those are the defaults here (:data:`K`, :data:`EPSILON`, ``side="left"``); ``side="right"`` uses the right
singular vectors instead.

Details fixed here:

- The absolute cosine makes the count independent of the sign of each singular vector (an SVD's signs are
  arbitrary).
- Both SVDs are taken in float64 (``numpy.linalg.svd``). Singular vectors of (numerically) zero singular
  values are arbitrary, so only those above ``max(m, n) * eps * sigma_max`` (``numpy.linalg.matrix_rank``'s
  tolerance) count: on the pre-trained side as references, on the fine-tuned side as candidates (``k`` is
  capped at that rank).
- The comparison is against the thin SVD (``min(m, n)`` vectors), as in the authors' code; for a tall matrix's
  left side a direction outside the pre-trained column space has cosine 0 with every reference.
- The pre-trained side's singular vectors are kept for the last :data:`REFERENCE_CACHE` matrices, keyed by their
  content (a study measures the same frozen layers in every run): the same numbers, one SVD instead of two.
- With repeated pre-trained singular values the singular vectors within a repeated group are not unique; the
  count is meaningful for the distinct spectra that trained weights have.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

K = 10
EPSILON = 0.5
SIDES = ("left", "right")
REFERENCE_CACHE = 64  # pre-trained matrices whose singular vectors are kept (MiniLM's adapted layers: 36)
_references: OrderedDict[tuple[bytes, tuple[int, ...], str], torch.Tensor] = OrderedDict()


def _matrix(name: str, value: Any) -> torch.Tensor:
    tensor = torch.as_tensor(value).detach().to("cpu", torch.float64)
    if tensor.ndim != 2 or tensor.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D matrix, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must be finite")
    return tensor


def _singular_vectors(matrix: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and the matching ``side`` singular vectors as columns, kept above the rank tolerance."""
    u, s, vh = np.linalg.svd(matrix.numpy(), full_matrices=False)  # LAPACK gesdd, as torch.linalg.svd on CPU
    tol = max(matrix.shape) * np.finfo(np.float64).eps * (float(s[0]) if s.size else 0.0)
    keep = s > tol
    vectors = u if side == "left" else vh.T
    return torch.from_numpy(s[keep].copy()), torch.from_numpy(np.ascontiguousarray(vectors[:, keep]))


def _reference_vectors(matrix: torch.Tensor, side: str) -> torch.Tensor:
    """:func:`_singular_vectors`' vectors of a pre-trained ``matrix``, from the cache when its content was seen."""
    array = np.ascontiguousarray(matrix.numpy())
    key = (hashlib.sha256(array.data.cast("B")).digest(), array.shape, side)
    found = _references.get(key)
    if found is None:
        found = _singular_vectors(matrix, side)[1]
        _references[key] = found
        if len(_references) > REFERENCE_CACHE:
            _references.popitem(last=False)
    _references.move_to_end(key)
    return found


def max_cosine_similarity(vectors: Any, references: Any) -> torch.Tensor:
    """For each column of ``vectors``, the largest ``|cos|`` with any column of ``references`` (float64).

    Columns need not be unit length; a zero column has similarity 0. Invariant to the sign of every column.
    """
    a, b = _matrix("vectors", vectors), _matrix("references", references)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"vectors and references must have the same length, got {a.shape[0]} and {b.shape[0]}")
    a_norm, b_norm = a.norm(dim=0), b.norm(dim=0)
    a = a / torch.where(a_norm > 0, a_norm, 1.0)
    b = b / torch.where(b_norm > 0, b_norm, 1.0)
    if b.shape[1] == 0:
        return torch.zeros(a.shape[1], dtype=torch.float64)
    return (a.mT @ b).abs().amax(dim=1)


@dataclass(frozen=True)
class IntruderDimensions:
    """Intruder count of one fine-tuned weight and, for each of its top singular vectors, the best match.

    ``max_similarity[j]`` and ``singular_values[j]`` belong to the fine-tuned weight's ``j``-th singular vector
    (largest first); ``intruders`` lists the ``j`` with ``max_similarity[j] < epsilon``.
    """

    count: int
    k: int
    epsilon: float
    side: str
    intruders: list[int]
    max_similarity: list[float]
    singular_values: list[float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def intruder_dimensions(
    pretrained: Any,
    finetuned: Any,
    *,
    k: int = K,
    epsilon: float = EPSILON,
    side: Literal["left", "right"] = "left",
) -> IntruderDimensions:
    """Intruder dimensions of ``finetuned`` against ``pretrained`` (two weights of the same shape).

    Among the fine-tuned weight's top ``k`` singular vectors (``side`` ones), those whose largest absolute cosine
    similarity with every pre-trained singular vector of the same side is below ``epsilon``.
    """
    if side not in SIDES:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not 0 < epsilon <= 1:
        raise ValueError(f"epsilon must be in (0, 1], got {epsilon!r}")
    base, tuned = _matrix("pretrained", pretrained), _matrix("finetuned", finetuned)
    if base.shape != tuned.shape:
        raise ValueError(
            f"pretrained and finetuned must have the same shape, got {tuple(base.shape)} and {tuple(tuned.shape)}"
        )
    references = _reference_vectors(base, side)
    values, vectors = _singular_vectors(tuned, side)
    top = min(int(k), vectors.shape[1])
    similarity = max_cosine_similarity(vectors[:, :top], references) if top else torch.zeros(0, dtype=torch.float64)
    intruders = [j for j in range(top) if float(similarity[j]) < epsilon]
    return IntruderDimensions(
        count=len(intruders),
        k=int(k),
        epsilon=float(epsilon),
        side=side,
        intruders=intruders,
        max_similarity=[float(x) for x in similarity],
        singular_values=[float(x) for x in values[:top]],
    )


def count_intruder_dimensions(pretrained: Any, finetuned: Any, **options: Any) -> int:
    """The number of intruder dimensions (:func:`intruder_dimensions`' ``count``)."""
    return intruder_dimensions(pretrained, finetuned, **options).count


def update_intruder_dimensions(pretrained: Any, delta: Any, **options: Any) -> IntruderDimensions:
    """Intruder dimensions of ``pretrained + delta``: for a learned update ``delta`` (e.g. a merged adapter's)."""
    base, update = _matrix("pretrained", pretrained), _matrix("delta", delta)
    if base.shape != update.shape:
        raise ValueError(
            f"pretrained and delta must have the same shape, got {tuple(base.shape)} and {tuple(update.shape)}"
        )
    return intruder_dimensions(base, base + update, **options)
