"""The run folder: one config.json schema, metrics that survive a crash mid-line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.core.errors import ConfigError
from fedllm.core.sections.train import TrainSettings
from fedllm.train.run_folder import RunFolder, read_metrics, run_config


def test_a_torn_last_metrics_line_is_skipped_and_the_rest_kept(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')

    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_a_damaged_line_before_the_last_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 3, "loss": 1.0}\n')

    with pytest.raises(ConfigError, match=r"metrics.jsonl:2 is not JSON"):
        read_metrics(path)


def test_truncating_for_a_resume_keeps_the_steps_up_to_the_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo')

    earlier = RunFolder(tmp_path).truncate_metrics(2)

    assert earlier == [2.0, 1.5]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_the_engine_keeps_the_config_its_creator_wrote(tmp_path: Path) -> None:
    cfg = TrainSettings()
    full = run_config(cfg, tmp_path / "m", tmp_path / "d.jsonl", model="m", output="bot", settings={"home": "h"})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(full))

    RunFolder(tmp_path / "run").start(run_config(cfg, tmp_path / "m", tmp_path / "d.jsonl"))

    assert json.loads((tmp_path / "run" / "config.json").read_text()) == full
    assert set(full) == {"train", "model", "model_dir", "data", "eval_data", "max_steps", "output", "settings"}
    assert full["data"] == str((tmp_path / "d.jsonl").resolve()) and run_config(cfg, tmp_path, [{"text": "x"}])["data"] == "<records>"
