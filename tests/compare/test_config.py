"""The study's config: seed defaults, TOML files, flag overrides, and errors that name the bad key or value."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kradapter.compare.cli import add_parser, build_config
from kradapter.compare.config import (
    SYNTHETIC_TYPES,
    ConfigError,
    StudyConfig,
    config_from_dict,
    load_config,
    with_changes,
)
from tests import support

EXAMPLE = support.EXAMPLES / "study.toml"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["compare", *argv])


def test_defaults_are_the_seed_study() -> None:
    c = StudyConfig()
    assert c.matrices.size == (1024, 768)
    assert c.matrices.selected() == [*SYNTHETIC_TYPES, "minilm_attention", "whisper_qkv"]
    assert c.methods.names == ["lora", "sinlora", "kradapter", "randlora", "kronecker"]
    assert (c.methods.strategy, c.methods.kradapter_factorization) == ("equal_budget", "sqrt_max")
    t = c.training
    assert (t.optimizer, t.lr, t.weight_decay, t.iterations, t.seeds, t.scheduler) == (
        "adamw",
        0.1,
        0.01,
        300,
        [42],
        "none",
    )
    g = c.generators
    assert (g.sparse_dropout, g.low_rank_fraction, g.low_freq_range, g.high_freq_range) == (
        0.9,
        0.25,
        (1.0, 100.0),
        (1000.0, 10000.0),
    )
    assert c.output.results_file == "experimental_results.json" and c.output.plot_file == "peft_comparison.png"


def test_clip_checkpoint_swaps_the_real_rows() -> None:
    c = with_changes(StudyConfig(), matrices={"clip_checkpoint": "clip.pt"})
    assert c.matrices.selected()[-2:] == ["clip_language", "clip_vision"]


def test_example_file_loads_and_round_trips(tmp_path: Path) -> None:
    config = load_config(EXAMPLE)
    assert config.matrices.user[0].name == "my_matrix"
    assert config_from_dict(config.to_dict()) == config


def test_toml_file_and_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        '[matrices]\nsize = [64, 48]\ntypes = ["random_noise", "low_rank"]\n'
        '[methods]\nnames = ["lora"]\nstrategy = "custom"\n[methods.settings.lora]\nr = 4\n'
        "[training]\niterations = 7\nseeds = [1, 2]\nscheduler = 'cosine'\nwarmup_steps = 2\n"
        "[early_stopping]\nenabled = false\n"
    )
    config = build_config(parse(["--config", str(path), "--iterations", "9", "--size", "32x16", "--out", "o"]))
    assert config.matrices.size == (32, 16) and config.matrices.types == ["random_noise", "low_rank"]
    assert config.training.iterations == 9 and config.training.seeds == [1, 2]
    assert config.methods.settings == {"lora": {"r": 4}} and config.output.directory == "o"
    flags = build_config(parse(["--methods", "lora,kradapter", "--matrices", "low_freq", "--seeds", "3,4"]))
    assert flags.methods.names == ["lora", "kradapter"]
    assert (flags.matrices.types, flags.training.seeds) == (["low_freq"], [3, 4])
    assert (build_config(parse(["--dtype", "float64", "--device", "cpu"])).runtime.dtype) == "float64"


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        ("[training]\nlearning_rate = 0.1\n", r"training\.learning_rate: unknown key"),
        ("[trainer]\nlr = 0.1\n", r"trainer: unknown key"),
        ("[training]\nlr = -1\n", r"training\.lr: -1"),
        ("[training]\niterations = 0\n", r"training\.iterations: expected an integer >= 1, got 0"),
        ("[training]\noptimizer = 'lamb'\n", r"training\.optimizer: unknown value 'lamb'"),
        ("[training]\nscheduler = 'step'\n", r"training\.scheduler: unknown value 'step'"),
        ("[training]\nwarmup_steps = 400\n", r"training\.warmup_steps: 400 is not below"),
        ("[training]\nseeds = []\n", r"training\.seeds"),
        ("[methods]\nnames = ['lora', 'dora']\n", r"methods\.names: unknown method 'dora'; choose from lora, sinlora"),
        ("[methods]\nstrategy = 'equal_params'\n", r"methods\.strategy: unknown value 'equal_params'"),
        ("[methods.settings.vera]\nr = 1\n", r"methods\.settings\.vera: unknown method 'vera'"),
        ("[matrices]\nsize = [0, 4]\n", r"matrices\.size"),
        ("[matrices]\ntypes = ['gaussian']\n", r"matrices\.types: unknown value 'gaussian'"),
        ("[matrices]\ntypes = ['clip_vision']\n", r"matrices\.types: clip_language/clip_vision need"),
        ("[matrices]\ncrop = 'yes'\n", r"matrices\.crop: expected true or false"),
        ("[[matrices.user]]\nname = 'random_noise'\npath = 'x.pt'\n", r"matrices\.user\[0\]\.name"),
        ("[[matrices.user]]\npath = 'x.pt'\n", r"matrices\.user\[0\]"),
        ("[generators]\nsparse_dropout = 1.5\n", r"generators\.sparse_dropout: 1\.5 is outside"),
        ("[generators]\nlow_freq_range = [100, 1]\n", r"generators\.low_freq_range: low 100"),
        ("[early_stopping]\npatience = 0\n", r"early_stopping\.patience"),
        ("[runtime]\ndtype = 'float16'\n", r"runtime\.dtype: unknown value 'float16'"),
        ("[runtime]\ndevice = 'tpu:x'\n", r"runtime\.device: expected cpu, cuda, cuda:N, mps or auto, got 'tpu:x'"),
        ("[output]\ndpi = 2\n", r"output\.dpi"),
        ("[output]\nplot_file = 'a/b.png'\n", r"output\.plot_file"),
    ],
)
def test_bad_keys_and_values_are_named(tmp_path: Path, toml: str, match: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[training\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--iterations", "-3"], r"training\.iterations: expected an integer >= 1, got -3"),
        (["--methods", "lora,qlora"], r"methods\.names: unknown method 'qlora'"),
        (["--dtype", "half"], r"runtime\.dtype: unknown value 'half'"),
    ],
)
def test_bad_flags_are_named(argv: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_config(parse(argv))


def test_unparseable_flags_exit_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--size", "big"])
    assert "expected ROWSxCOLS" in capsys.readouterr().err
