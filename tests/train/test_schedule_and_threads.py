"""LR schedules (per call, constant, one schedule across calls), frozen-A training, threads sized to the CPU affinity."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.conftest import small_cfg
from fedllm.train.engine import lr_lambda


def test_schedules_warm_up_then_decay_or_stay_constant():
    cosine, constant, linear = (lr_lambda(2, 10, kind) for kind in ("cosine", "constant", "linear"))
    assert [round(cosine(s), 4) for s in (0, 1)] == [round(1 / 3, 4), round(2 / 3, 4)] == [round(constant(s), 4) for s in (0, 1)]
    assert cosine(2) == 1.0 and math.isclose(cosine(6), 0.5) and cosine(10) == 0.0
    assert all(constant(s) == 1.0 for s in range(2, 20))
    assert math.isclose(linear(6), 0.5) and linear(10) == 0.0


def test_a_schedule_spanning_several_calls_equals_one_long_schedule():
    whole = lr_lambda(1, 12, "cosine")
    # three calls of 4 steps (a federation's rounds), each told where it stands in the 12-step schedule
    pieces = [lr_lambda(1, 12, "cosine", offset)(s) for offset in (0, 4, 8) for s in range(4)]
    assert pieces == [whole(s) for s in range(12)]
    restarted = [lr_lambda(1, 4, "cosine")(s) for _ in range(3) for s in range(4)]
    assert sum(pieces) / 12 > 0 and restarted[4] < restarted[1]  # per-call restarts warm up again each call


def test_unknown_schedule_is_refused():
    from fedllm.core.errors import ConfigError

    with pytest.raises(ConfigError, match="lr_scheduler"):
        lr_lambda(0, 5, "step")


@pytest.mark.slow
def test_frozen_a_trains_b_only(tiny_model_dir: Path, records) -> None:
    from fedllm.train import fit_adapter, initial_adapter_state

    cfg = small_cfg(lora_freeze_a=True)
    init = initial_adapter_state(cfg, tiny_model_dir)
    result = fit_adapter(cfg, tiny_model_dir, records, init_state=init, max_steps=3)
    a_keys = [k for k in init if "lora_A" in k]
    b_keys = [k for k in init if "lora_B" in k]
    assert a_keys and all(torch.equal(result.state[k], init[k]) for k in a_keys)
    assert any(not torch.equal(result.state[k], init[k]) for k in b_keys)


@pytest.mark.slow
def test_constant_schedule_and_span_reach_the_engine(tiny_model_dir: Path, records, tmp_path: Path) -> None:
    import json

    from fedllm.train import fit_adapter

    fit_adapter(small_cfg(lr=1e-3, lr_scheduler="constant"), tiny_model_dir, records, max_steps=3, run_dir=tmp_path / "c")
    fit_adapter(small_cfg(lr=1e-3), tiny_model_dir, records, max_steps=2, run_dir=tmp_path / "s", schedule_span=(2, 4))
    lrs = lambda d: [r["lr"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs("c") == pytest.approx([1e-3] * 3)
    # steps 2 and 3 of a 4-step cosine; metrics.jsonl records the rate read after each step (the next step's)
    assert lrs("s") == pytest.approx([1e-3 * lr_lambda(0, 4)(s) for s in (3, 4)])


@pytest.mark.slow
def test_a_span_continues_the_pass_over_the_data_where_the_previous_call_stopped(tiny_model_dir: Path, records, tmp_path: Path) -> None:
    # Arrange: a learning rate so small that a step's loss depends on its batch only; 24 rows = 6 batches of 4.
    import json

    from fedllm.train import fit_adapter, initial_adapter_state

    cfg = small_cfg(lr=1e-9, lr_scheduler="constant", packing=False)
    init = initial_adapter_state(cfg, tiny_model_dir)
    losses = lambda d: [r["loss"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    # Act: one 4-step run; then its second half alone, told where it stands (a federation's round 2 of 2 x 2 steps)
    fit_adapter(cfg, tiny_model_dir, records, init_state=init, max_steps=4, run_dir=tmp_path / "whole")
    fit_adapter(cfg, tiny_model_dir, records, init_state=init, max_steps=2, run_dir=tmp_path / "round2", schedule_span=(2, 4))
    # Assert: round 2 trained on batches 3 and 4 of the pass, not on batches 1 and 2 again
    whole, round2 = losses("whole"), losses("round2")
    assert round2 == pytest.approx(whole[2:], rel=1e-4)
    assert round2 != pytest.approx(whole[:2], rel=1e-2)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
@pytest.mark.slow
def test_threads_follow_the_cores_a_process_may_use():
    code = ("import os, torch; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); torch.set_num_threads(4);"
            "from fedllm.train.engine import set_threads; print(set_threads(None), torch.get_num_threads(), set_threads(3))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout.split()
    assert out == ["1", "1", "3"]
