"""A training job's run: the same folder on every attempt, resumed when an earlier attempt left a checkpoint, kept
under another name and started again when it left none."""

from __future__ import annotations

import pytest

from fedllm.core.errors import ConfigError
from fedllm.testing.factories import make_settings
from fedllm.train.runs import job_run


def test_a_jobs_first_attempt_starts_its_run_and_a_later_one_resumes_it(tmp_path) -> None:
    settings = make_settings(tmp_path)
    run_id, resume = job_run(settings, "train-7")
    run_dir = settings.runs_dir / run_id
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    (run_dir / "checkpoints" / "latest").write_text("step-00000004")

    assert (run_id, resume) == ("job-train-7", False)
    assert job_run(settings, "train-7") == ("job-train-7", True)


def test_an_attempt_that_left_no_checkpoint_is_kept_aside_and_the_run_starts_again(tmp_path) -> None:
    settings = make_settings(tmp_path)
    for attempt in (1, 2):
        run_dir = settings.runs_dir / "job-j"
        run_dir.mkdir(parents=True)
        (run_dir / "train.log").write_text(f"attempt {attempt}\n")

        assert job_run(settings, "j") == ("job-j", False)
        assert not run_dir.exists() and (settings.runs_dir / f"job-j.attempt-{attempt}" / "train.log").read_text() == f"attempt {attempt}\n"


def test_a_job_id_that_is_not_one_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not a job id"):
        job_run(make_settings(tmp_path), "../escape")
