"""The matrix-approximation study (``kradapter compare``): PEFT updates fitted to target matrices."""

from .config import ConfigError, StudyConfig, load_config
from .study import run_study

__all__ = ["ConfigError", "StudyConfig", "load_config", "run_study"]
