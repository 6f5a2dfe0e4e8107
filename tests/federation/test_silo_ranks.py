"""A silo that trains on 2 CPU ranks (fedllm.train.rank_group under DeepSpeed's launcher) beside a 1-rank silo."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from fedllm.federation.demo.data import generate
from fedllm.federation.runtime.rank_group import RankGroupTrainer
from fedllm.federation.runtime.silo import EngineTrainer
from tests.federation.conftest import federation, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # several launches; minutes on a loaded 2-core machine


def _trainers(tiny_model_dir: Path):
    from fedllm import train
    from fedllm.core.sections.train import TrainSettings

    cfg = TrainSettings(max_seq_len=64, batch_size=2, lr=1e-2, warmup_steps=0, lora_dropout=0.0, zero_stage=2, threads=1)
    data = generate()
    big = RankGroupTrainer(cfg, tiny_model_dir, data["northbridge"]["train"][:12], ranks=2)
    small = EngineTrainer(cfg, tiny_model_dir, data["redwood"]["train"][:12])
    return big, small, train.initial_adapter_state(cfg, tiny_model_dir)


async def test_a_two_rank_silo_completes_three_rounds_with_a_one_rank_silo_on_one_rank_group(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Arrange
    big, small, init = _trainers(tiny_model_dir)
    try:
        async with federation(tmp_path, [big, small], initial=init, rounds=3, min_silos=2, local_steps=2,
                              round_deadline_s=600, silo_timeout_s=600, start_timeout_s=600) as (coord, silos):
            # Act
            await coord.wait_done(1500)
        # Assert: both silos in every round; the 2-rank group was started once and really had 2 ranks.
        assert coord.phase == "done"
        assert [r["participants"] for r in coord.history] == [["s0", "s1"]] * 3
        assert silos[0].rounds_done == [1, 2, 3]
        assert big.group.starts == 1 and big.group.world_size == 2
    finally:
        big.close()


async def test_killing_rank_1_mid_round_fails_that_round_for_the_silo_and_the_next_round_completes(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Arrange: both silos are needed (min_silos 2), so the 2-rank silo's failure fails the round, which is retried.
    big, small, init = _trainers(tiny_model_dir)
    try:
        async with federation(tmp_path, [big, small], initial=init, rounds=1, min_silos=2, local_steps=20,
                              round_deadline_s=600, silo_timeout_s=600, start_timeout_s=600) as (coord, silos):
            await wait_for(lambda: big.group.busy and 1 in big.group.rank_pids(), timeout_s=600)

            # Act: rank 1 dies in the middle of round 1's training.
            os.kill(big.group.rank_pids()[1], signal.SIGKILL)
            await coord.wait_done(1500)

        # Assert: round 1 failed naming the silo's error, then completed with both silos on a rebuilt group.
        failed, completed = coord.history
        assert failed["round"] == 1 and "s0 (train_failed)" in failed["failed"]
        assert completed["round"] == 1 and completed["participants"] == ["s0", "s1"]
        assert coord.phase == "done" and silos[0].rounds_done == [1]
        assert big.group.starts == 2
    finally:
        big.close()
