"""The on-paper projection (benchmarks/shift_projection.py) schedules the preset's own units at the study's cost
model: its unit count is the one a run records, its seconds sum to ``StudySettings.estimate()``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from benchmarks import shift_projection as sp


def test_the_rank_sweep_units_are_the_recorded_runs_and_sum_to_the_estimate() -> None:
    s = sp.settings("ranks")
    waves = sp.waves(s)
    # 14 configurations x (5 grid trials, 2 adaptive, 5 seeds) + 2 reference rows x 5 seeds: runs/shift-ranks holds 178
    assert [len(w) for w in waves] == [14 * 5 + 2 * 5, 14, 14, 14 * 5]
    assert sum(map(sum, waves)) == pytest.approx(s.estimate(), rel=1e-12)


def test_makespan_is_the_sum_on_one_slot_and_bounded_below_on_many(rng: random.Random) -> None:
    units = [rng.uniform(0.1, 10.0) for _ in range(37)]
    assert sp.makespan(units, 1) == pytest.approx(sum(units))
    for slots in (2, 5, 64):
        span = sp.makespan(units, slots)
        assert max(max(units), sum(units) / slots) - 1e-9 <= span <= sum(units) / slots + max(units) + 1e-9


def test_measured_ratio_is_train_time_over_the_models_training_seconds(tmp_path: Path) -> None:
    s = sp.settings("ranks")
    model = sp.training_seconds(s, "sentiment", 32)
    lines = [
        {"key": ["sentiment", "k32_x1", "sweep", "lora", 0, 0.001], "record": {"train_time_s": 2 * model, "steps": 64}},
        {"key": ["sentiment", "k32_x1", "run", "majority", 0], "record": {"train_time_s": 0.0}},
    ]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert sp.measured_ratios(s, [tmp_path]) == pytest.approx([2.0])
