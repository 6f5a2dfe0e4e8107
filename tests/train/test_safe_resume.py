"""`train --resume` loads DeepSpeed checkpoints weights-only: a checkpoint file carrying pickled code is refused."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
import torch

from tests.train.conftest import small_cfg
from fedllm.core.errors import ConfigError
from fedllm.train import fit_adapter


class _Payload:
    """What a hostile checkpoint could carry: unpickling it runs `touch MARKER`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_resume_refuses_a_checkpoint_that_carries_code(tiny_model_dir: Path, records, tmp_path: Path, stage: int) -> None:
    # Arrange: a run checkpointed at step 2, whose checkpoint files are then rewritten with a payload beside the states
    cfg = small_cfg(zero_stage=stage, checkpoint_every_steps=2)
    run = tmp_path / "run"
    fit_adapter(cfg, tiny_model_dir, records, max_steps=2, run_dir=run)
    marker = tmp_path / "pwned"
    files = sorted(glob.glob(str(run / "checkpoints" / "step-00000002" / "*.pt")))
    assert files
    for f in files:
        state = torch.load(f, weights_only=False)  # the test's own files, just written
        state["extra"] = _Payload(marker)
        torch.save(state, f)
    # Act / Assert: the resume is refused, naming the file and what it holds; the payload never ran
    with pytest.raises(ConfigError, match="refused to load checkpoint file .*system"):
        fit_adapter(cfg, tiny_model_dir, records, max_steps=4, run_dir=run, resume=True)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("variant", [{"zero_stage": 0}, {"zero_stage": 2}, {"zero_stage": 3},
                                     {"zero_stage": 3, "offload_optimizer": True, "offload_param": True}])
def test_resume_loads_every_file_weights_only(tiny_model_dir: Path, records, tmp_path: Path, monkeypatch, variant) -> None:
    cfg = small_cfg(checkpoint_every_steps=2, **variant)
    fit_adapter(cfg, tiny_model_dir, records, max_steps=2, run_dir=tmp_path / "run")
    calls: list[object] = []
    real_load = torch.load

    def spy(*args, **kw):
        calls.append(kw.get("weights_only"))
        return real_load(*args, **kw)

    monkeypatch.setattr(torch, "load", spy)
    result = fit_adapter(cfg, tiny_model_dir, records, max_steps=4, run_dir=tmp_path / "run", resume=True)
    assert result.metrics["train_loss"] > 0
    assert calls and all(w is True for w in calls), calls
