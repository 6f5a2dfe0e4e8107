"""Pure pieces of multi-rank training: ZeRO bucket sizes from the trainable count, and each rank's share of a batch."""

from __future__ import annotations

import pytest

from fedllm.core.errors import ConfigError
from tests.train.conftest import small_cfg


def test_a_lora_of_under_a_million_parameters_gets_a_bucket_of_its_size_not_deepspeeds_default() -> None:
    from fedllm.train.engine import DEEPSPEED_DEFAULT_BUCKET, MIN_BUCKET, bucket_elements

    # Arrange: the embedded model's LoRA (r=8 on q/k/v/o), a bigger LoRA, and full fine-tuning of a 1.3B model.
    lora_135m, lora_big, full_1b = 921_600, 40_000_000, 1_300_000_000

    # Act / Assert: one bucket holds every trainable parameter, clamped to [MIN_BUCKET, DeepSpeed's default].
    assert bucket_elements(lora_135m) == MIN_BUCKET == 1 << 20
    assert DEEPSPEED_DEFAULT_BUCKET / bucket_elements(lora_135m) > 400
    assert bucket_elements(lora_big) == lora_big
    assert bucket_elements(full_1b) == DEEPSPEED_DEFAULT_BUCKET
    with pytest.raises(ConfigError, match="nothing to train"):
        bucket_elements(0)


def test_deepspeed_config_sizes_buckets_from_the_trainable_count_and_splits_the_global_batch() -> None:
    from fedllm.train.engine import deepspeed_config

    # Arrange
    cfg2, cfg3 = small_cfg(zero_stage=2, batch_size=4, grad_accum=2), small_cfg(zero_stage=3, batch_size=4)

    # Act
    two = deepspeed_config(cfg2, "fp32", world_size=2, trainable_params=3_000_000)
    three = deepspeed_config(cfg3, "fp32", world_size=2, trainable_params=921_600)
    default = deepspeed_config(cfg2, "fp32")

    # Assert: buckets follow the trainable count; the global batch stays the configured one on 2 ranks.
    assert two["zero_optimization"]["reduce_bucket_size"] == two["zero_optimization"]["allgather_bucket_size"] == 3_000_000
    assert three["zero_optimization"]["reduce_bucket_size"] == 1 << 20 and "allgather_bucket_size" not in three["zero_optimization"]
    assert "reduce_bucket_size" not in default["zero_optimization"]
    assert (two["train_micro_batch_size_per_gpu"], two["train_batch_size"]) == (2, 8)
    assert (default["train_micro_batch_size_per_gpu"], default["train_batch_size"]) == (4, 8)
    with pytest.raises(ConfigError, match="multiple of the 3 ranks"):
        deepspeed_config(cfg2, "fp32", world_size=3)


def test_the_ranks_shares_of_a_global_micro_batch_are_the_rows_one_rank_takes() -> None:
    from fedllm.train.data import Row, micro_batch

    # Arrange: 10 rows, global micro-batches of 4 (epochs wrap after 2 batches).
    rows = [Row(input_ids=[i], labels=[i], position_ids=[0]) for i in range(10)]

    for index in range(5):
        # Act
        one = micro_batch(rows, index, 4, seed=3)
        two = micro_batch(rows, index, 4, seed=3, rank=0, world_size=2) + micro_batch(rows, index, 4, seed=3, rank=1, world_size=2)
        four = [r for k in range(4) for r in micro_batch(rows, index, 4, seed=3, rank=k, world_size=4)]

        # Assert
        assert [r.input_ids for r in two] == [r.input_ids for r in one] == [r.input_ids for r in four]
        assert len(micro_batch(rows, index, 4, seed=3, rank=1, world_size=2)) == 2
