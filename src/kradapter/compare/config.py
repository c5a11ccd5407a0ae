"""The study's configuration: one typed tree covering everything the published ``config.py`` names.

Read from TOML (:func:`load_config`), overridden by command-line flags (:func:`apply_overrides`), validated on
construction: an unknown key or an invalid value is a :class:`ConfigError` naming it (``training.lr: ...``).
``docs/compare.md`` lists every key with its default; ``examples/study.toml`` is a complete file.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from .. import guards, registry
from ..shape import FACTORIZATIONS

SYNTHETIC_TYPES = ("random_noise", "sparse_noise", "pca_whitened", "low_rank", "high_freq", "low_freq")
CLIP_TYPES = ("clip_language", "clip_vision")
STAND_IN_TYPES = ("minilm_attention", "whisper_qkv")
BUILTIN_TYPES = SYNTHETIC_TYPES + CLIP_TYPES + STAND_IN_TYPES
STRATEGIES = ("equal_budget", "equal_rank", "custom")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("none", "cosine", "linear")
DTYPES = ("float32", "float64", "bfloat16")
LOSSES = ("frobenius", "squared_frobenius")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
MAX_DPI = 1200
MAX_FIGURE_PIXELS = 100_000_000  # a figure of more pixels than this is a typo, not a plot (about 400 MB of RGBA)


class ConfigError(ValueError):
    """A configuration key or value that is not valid; the message names it."""


def _fail(where: str, message: str) -> None:
    raise ConfigError(f"{where}: {message}")


def _check_int(where: str, value: Any, minimum: int = 0) -> None:
    if not guards.is_int(value, minimum):
        _fail(where, f"expected an integer >= {minimum}, got {value!r}")


def _check_number(
    where: str, value: Any, low: float = -math.inf, high: float = math.inf, open_low: bool = False
) -> None:
    if not guards.is_finite(value):
        _fail(where, f"expected a finite number, got {value!r}")
    if value < low or value > high or (open_low and value == low):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        _fail(where, f"{value!r} is outside {bound}")


def _check_choice(where: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(where, f"unknown value {value!r}; choose one of {choices}")


def _check_names(where: str, values: Any, choices: tuple[str, ...], what: str) -> None:
    if not isinstance(values, list) or not values:
        _fail(where, f"expected a non-empty list of {what}s, got {values!r}")
    for value in values:
        _check_choice(where, value, choices)
    if len(set(values)) != len(values):
        _fail(where, f"a {what} is listed twice: {values!r}")


def _number_pair(where: str, value: Any, low: float, high: float, what: str) -> tuple[float, float]:
    """``value`` as two floats in ``[low, high]``; a ConfigError naming ``where`` otherwise."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        _fail(where, f"expected {what}, got {value!r}")
    for v in value:
        _check_number(where, v, low, high)
    return float(value[0]), float(value[1])


def _range(where: str, value: Any) -> tuple[float, float]:
    low, high = _number_pair(where, value, 0.0, math.inf, "[low, high]")
    if low > high:
        _fail(where, f"low {low!r} is above high {high!r}")
    return low, high


@dataclass
class UserMatrix:
    """A matrix of the user's: a tensor ``key`` in ``path`` (``.safetensors``, ``.pt``/``.bin``, ``.npy``/``.npz``)."""

    name: str
    path: str
    key: str = ""

    def validate(self, where: str) -> None:
        if not isinstance(self.name, str) or not self.name or self.name in BUILTIN_TYPES:
            _fail(f"{where}.name", f"needs a name that is not a built-in type, got {self.name!r}")
        if not isinstance(self.path, str) or not self.path:
            _fail(f"{where}.path", f"expected a file path, got {self.path!r}")
        if not isinstance(self.key, str):
            _fail(f"{where}.key", f"expected a tensor name, got {self.key!r}")


@dataclass
class MatricesConfig:
    """Which targets, at which size. ``size`` is (rows, cols) = (out_features, in_features) of the layer."""

    size: tuple[int, int] = (1024, 768)
    types: list[str] | None = None  # None: the six synthetic types and two real rows (see default_types)
    crop: bool = False  # crop real matrices to `size` (the published code did); default: their native shape
    clip_checkpoint: str = ""  # a local CLIP state dict; enables clip_language / clip_vision
    whisper_key: str = "encoder/layer_5/self_attention/linear_0/weight"
    minilm_layer: int = 5
    user: list[UserMatrix] = field(default_factory=list)

    def default_types(self) -> list[str]:
        real = CLIP_TYPES if self.clip_checkpoint else STAND_IN_TYPES
        return [*SYNTHETIC_TYPES, *real]

    def selected(self) -> list[str]:
        """Names of the matrices of the study, in order: the chosen built-in types, then user matrices."""
        return [*(self.default_types() if self.types is None else self.types), *(u.name for u in self.user)]

    def validate(self) -> None:
        size = self.size
        if not isinstance(size, list | tuple) or len(size) != 2:
            _fail("matrices.size", f"expected [rows, cols], got {size!r}")
        for v in size:
            _check_int("matrices.size", v, 1)
        self.size = (int(size[0]), int(size[1]))
        if self.types is not None:
            _check_names("matrices.types", self.types, BUILTIN_TYPES, "type")
            if any(t in CLIP_TYPES for t in self.types) and not self.clip_checkpoint:
                _fail("matrices.types", "clip_language/clip_vision need matrices.clip_checkpoint (a local file)")
        _check_int("matrices.minilm_layer", self.minilm_layer, 0)
        for i, u in enumerate(self.user):
            u.validate(f"matrices.user[{i}]")
        names = self.selected()
        if len(set(names)) != len(names):
            _fail("matrices.user", f"matrix names must be unique, got {names!r}")


@dataclass
class MethodsConfig:
    """Which methods, and how each is sized.

    ``strategy``: ``equal_budget`` (each method within 5% of KRAdapter's count at the matrix's shape),
    ``equal_rank`` (LoRA, SinLoRA, RandLoRA and Kronecker at ``rank``) or ``custom`` (``settings`` only).
    ``settings[method]`` holds PEFT config fields of that method (e.g. ``{"r": 64}``), plus the study's
    ``amplitude`` for SinLoRA; under ``equal_budget`` a fixed count knob there overrides the search.
    """

    names: list[str] = field(default_factory=lambda: list(registry.tagged("compare-default")))
    strategy: str = "equal_budget"
    rank: int = 0  # equal_rank: the shared rank (0: LoRA's equal-budget rank)
    kradapter_factorization: str = "sqrt_max"
    references: bool = True  # the truncated SVD at LoRA's rank and zero, in every table
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> None:
        if not isinstance(self.names, list) or not self.names or not all(isinstance(n, str) for n in self.names):
            _fail("methods.names", f"expected a non-empty list of method names, got {self.names!r}")
        try:
            names = list(registry.parse_names(self.names))
        except registry.MethodError as exc:
            _fail("methods.names", str(exc))
        if len(names) != len(self.names):
            _fail("methods.names", f"a method is listed twice: {self.names!r}")
        self.names = names
        _check_choice("methods.strategy", self.strategy, STRATEGIES)
        _check_int("methods.rank", self.rank, 0)
        _check_choice("methods.kradapter_factorization", self.kradapter_factorization, FACTORIZATIONS)
        if not isinstance(self.settings, dict):
            _fail("methods.settings", f"expected a table per method, got {self.settings!r}")
        settings = {}
        for name, table in self.settings.items():
            try:
                method = registry.get(name)
            except registry.MethodError as exc:
                _fail(f"methods.settings.{name}", str(exc))
            if not isinstance(table, dict):
                _fail(f"methods.settings.{name}", f"expected a table of settings, got {table!r}")
            try:
                method.check_settings(table, f"methods.settings.{name}")
            except registry.MethodError as exc:
                raise ConfigError(str(exc)) from None
            settings[method.name] = table
        self.settings = settings


@dataclass
class TrainingConfig:
    """How each adapter is fitted: ``loss`` of ``dW - T`` minimised by ``optimizer`` for ``iterations`` steps."""

    optimizer: str = "adamw"
    lr: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.0  # sgd only
    iterations: int = 300
    loss: str = "frobenius"  # the published ||dW - T||_F; "squared_frobenius" is ||dW - T||_F^2
    scheduler: str = "none"
    warmup_steps: int = 0
    gradient_clip: float = 0.0  # max global gradient norm; 0: off
    keep_best: bool = True  # end with the parameters of the lowest loss seen (metrics are computed from them)
    seeds: list[int] = field(default_factory=lambda: [42])
    log_interval: int = 0  # 0: no per-iteration log lines

    def validate(self) -> None:
        _check_choice("training.optimizer", self.optimizer, OPTIMIZERS)
        _check_number("training.lr", self.lr, 0.0, open_low=True)
        _check_number("training.weight_decay", self.weight_decay, 0.0)
        self.betas = _number_pair("training.betas", self.betas, 0.0, 1.0, "[beta1, beta2]")
        _check_number("training.momentum", self.momentum, 0.0, 1.0)
        _check_int("training.iterations", self.iterations, 1)
        _check_choice("training.loss", self.loss, LOSSES)
        _check_choice("training.scheduler", self.scheduler, SCHEDULERS)
        _check_int("training.warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps >= self.iterations:
            _fail("training.warmup_steps", f"{self.warmup_steps} is not below training.iterations={self.iterations}")
        _check_number("training.gradient_clip", self.gradient_clip, 0.0)
        if not isinstance(self.seeds, list) or not self.seeds:
            _fail("training.seeds", f"expected a non-empty list of integer seeds, got {self.seeds!r}")
        for s in self.seeds:
            _check_int("training.seeds", s, 0)
        if len(set(self.seeds)) != len(self.seeds):
            _fail("training.seeds", f"a seed is listed twice: {self.seeds!r}")
        _check_int("training.log_interval", self.log_interval, 0)


@dataclass
class EarlyStoppingConfig:
    """Stop a cell once the mean loss of its last ``patience`` steps is less than ``tolerance`` (relative) below
    the mean of the ``patience`` steps before, after at least ``min_iterations`` steps. The published config named
    1e-6 / 50 / 100 for a rule its script never ran. At these defaults the published study stops cells after 24-80
    steps, within 0.5% of the best loss of 300 steps (SinLoRA, chaotic at lr 0.1: up to 1.6%; docs/compare.md)."""

    enabled: bool = True
    tolerance: float = 3e-3
    patience: int = 12
    min_iterations: int = 20

    def validate(self) -> None:
        _check_number("early_stopping.tolerance", self.tolerance, 0.0)
        _check_int("early_stopping.patience", self.patience, 1)
        _check_int("early_stopping.min_iterations", self.min_iterations, 0)


@dataclass
class GeneratorsConfig:
    """Parameters of the synthetic targets, as the published config names them (defaults are the published ones)."""

    sparse_dropout: float = 0.9
    low_rank_fraction: float = 0.25
    low_freq_range: tuple[float, float] = (1.0, 100.0)
    high_freq_range: tuple[float, float] = (1000.0, 10000.0)
    max_harmonics: int = 5
    pca_eps: float = 1e-5

    def validate(self) -> None:
        _check_number("generators.sparse_dropout", self.sparse_dropout, 0.0, 1.0)
        if self.sparse_dropout == 1.0:
            _fail("generators.sparse_dropout", "1.0 drops every entry: the target would be zero")
        _check_number("generators.low_rank_fraction", self.low_rank_fraction, 0.0, 1.0, open_low=True)
        self.low_freq_range = _range("generators.low_freq_range", self.low_freq_range)
        self.high_freq_range = _range("generators.high_freq_range", self.high_freq_range)
        _check_int("generators.max_harmonics", self.max_harmonics, 0)
        _check_number("generators.pca_eps", self.pca_eps, 0.0, open_low=True)


@dataclass
class RuntimeConfig:
    """Where the study runs: ``device`` (``cpu``, ``cuda``, ``cuda:1``, ``auto``), ``dtype`` of targets and fits."""

    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0  # torch intra-op threads; 0: torch's default

    def validate(self) -> None:
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            _fail("runtime.device", f"expected cpu, cuda, cuda:N, mps or auto, got {self.device!r}")
        _check_choice("runtime.dtype", self.dtype, DTYPES)
        _check_int("runtime.threads", self.threads, 0)


@dataclass
class OutputConfig:
    """What is written into ``directory``, and how the plots look."""

    directory: str = "results"
    results_file: str = "experimental_results.json"
    plot_file: str = "peft_comparison.png"
    spectra_file: str = "spectra.png"
    effective_rank_file: str = "effective_rank.png"
    plots: bool = True
    dpi: int = 150
    figure_size: tuple[float, float] = (12.0, 8.0)
    font_size: int = 11
    colors: list[str] = field(
        default_factory=lambda: ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#7f7f7f", "#bcbd22"]
    )
    show_error_bars: bool = True
    table: bool = True

    def validate(self) -> None:
        for name in ("directory", "results_file", "plot_file", "spectra_file", "effective_rank_file"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                _fail(f"output.{name}", f"expected a non-empty path, got {value!r}")
        for name in ("results_file", "plot_file", "spectra_file", "effective_rank_file"):
            if Path(getattr(self, name)).name != getattr(self, name):
                _fail(f"output.{name}", f"expected a file name inside output.directory, got {getattr(self, name)!r}")
        _check_int("output.dpi", self.dpi, 10)
        if self.dpi > MAX_DPI:
            _fail("output.dpi", f"{self.dpi} is above {MAX_DPI}")
        self.figure_size = _number_pair("output.figure_size", self.figure_size, 1.0, 100.0, "[width, height] in inches")
        pixels = self.figure_size[0] * self.figure_size[1] * self.dpi**2
        if pixels > MAX_FIGURE_PIXELS:
            _fail(
                "output.dpi",
                f"figure_size {list(self.figure_size)} at dpi {self.dpi} is {pixels:,.0f} pixels, "
                f"above {MAX_FIGURE_PIXELS:,}",
            )
        _check_int("output.font_size", self.font_size, 4)
        if not isinstance(self.colors, list) or not self.colors or not all(isinstance(c, str) for c in self.colors):
            _fail("output.colors", f"expected a non-empty list of colour strings, got {self.colors!r}")


@dataclass
class StudyConfig:
    """The whole study."""

    matrices: MatricesConfig = field(default_factory=MatricesConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    generators: GeneratorsConfig = field(default_factory=GeneratorsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in fields(self):
            getattr(self, f.name).validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bool_fields(cls: type) -> set[str]:
    return {f.name for f in fields(cls) if f.type in ("bool", bool)}


def _build(cls: type, table: Any, where: str) -> Any:
    """A dataclass from a TOML table: unknown keys and wrongly typed booleans/tables are errors naming them."""
    if not isinstance(table, dict):
        _fail(where, f"expected a table, got {table!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            _fail(f"{where}.{key}" if where else key, f"unknown key; known keys: {sorted(known)}")
        name = f"{where}.{key}" if where else key
        factory = known[key].default_factory
        default = factory() if callable(factory) else known[key].default
        if is_dataclass(default):
            kwargs[key] = _build(type(default), value, name)
        elif key == "user":
            if not isinstance(value, list):
                _fail(name, f"expected an array of tables [[matrices.user]], got {value!r}")
            kwargs[key] = [_build(UserMatrix, v, f"{name}[{i}]") for i, v in enumerate(value)]
        else:
            if key in _bool_fields(cls) and not isinstance(value, bool):
                _fail(name, f"expected true or false, got {value!r}")
            if isinstance(default, str) and not isinstance(value, str):
                _fail(name, f"expected a string, got {value!r}")
            kwargs[key] = value
    try:
        return cls(**kwargs) if cls is not StudyConfig else _study(kwargs)
    except TypeError as exc:  # a required key missing (user matrices)
        raise ConfigError(f"{where}: {exc}") from None


def _study(kwargs: dict[str, Any]) -> StudyConfig:
    return StudyConfig(**kwargs)


def config_from_dict(data: dict[str, Any]) -> StudyConfig:
    """A validated :class:`StudyConfig` from nested tables (as TOML gives them)."""
    return _build(StudyConfig, data, "")


def load_config(path: str | Path) -> StudyConfig:
    """Read a TOML study file; errors name the file and the key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder, not a TOML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def with_changes(config: StudyConfig, **sections: dict[str, Any]) -> StudyConfig:
    """A copy of ``config`` with ``section={key: value}`` changes applied, validated again."""
    out = {f.name: getattr(config, f.name) for f in fields(config)}
    for section, changes in sections.items():
        if section not in out:
            _fail(section, "unknown config section")
        out[section] = replace(out[section], **changes)
    return StudyConfig(**out)
