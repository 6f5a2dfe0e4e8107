"""Training on 2 CPU ranks under DeepSpeed's launcher: the same adapter as 1 rank, exact resume, ZeRO-3 partitions.

Tolerance: 2 ranks reduce the same global batch's gradients in another order (a gloo all-reduce of two halves), so
adapters agree to float32 rounding amplified by a few AdamW steps: |2 ranks - 1 rank| <= 1e-4 (the weights are
O(1e-2)); a resumed 2-rank run replays the same reductions and agrees to 1e-6.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fedllm.testing.factories import REPO, make_settings
from tests.train.conftest import arithmetic_records, small_cfg, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # several launches; minutes on a loaded 2-core machine

TRAIN = dict(max_seq_len=128, batch_size=4, lr=1e-2, warmup_steps=1, lora_dropout=0.0, zero_stage=2, seed=0,
             max_steps=4, checkpoint_every_steps=2, threads=1)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_ranks_train_the_adapter_one_rank_trains_and_a_crashed_two_rank_run_resumes_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedllm.train import fit_adapter, load_adapter_state
    from fedllm.train.runs import resume_run, start_run

    # Arrange
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_records(24))
    settings = make_settings(tmp_path / "home", model=str(tiny_model_dir), train={**TRAIN, "ranks": 2})
    steps: list[int] = []
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))

    # Act: 4 steps on 2 ranks (launcher), and the same global batches on 1 rank in this process.
    two = start_run(settings, data, output="two", progress=lambda m: steps.append(m["step"]))
    one = fit_adapter(small_cfg(**TRAIN), tiny_model_dir, data)

    # Assert: same adapter; the run folder follows the contract; progress came from the ranks' metrics.
    assert _max_diff(two.result.state, one.state) <= 1e-4
    assert max(float(v.abs().max()) for k, v in two.result.state.items() if "lora_B" in k) > 1e-3  # it did train
    assert abs(two.result.metrics["train_loss"] - one.metrics["train_loss"]) <= 1e-4
    assert steps == [1, 2, 3, 4]
    status = json.loads((two.run_dir / "status.json").read_text())
    assert (status["state"], status["adapter"]) == ("done", two.adapter.ref)
    assert _max_diff(load_adapter_state(two.adapter.path), two.result.state) <= 1e-6
    # The ranks' shared-memory all-reduce buffers (2 x 66 MB that DeepSpeed leaves) went with the launch.
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - shm_before == set()

    # Arrange: a crash after step 2 (the step-4 checkpoint and its metrics never written).
    ckpts = two.run_dir / "checkpoints"
    shutil.rmtree(ckpts / "step-00000004")
    (ckpts / "latest").write_text("step-00000002")

    # Act: resume on 2 ranks (the run's config.json says 2).
    resumed = resume_run(settings, two.run_id)

    # Assert: the resumed run ends where the uninterrupted one did.
    assert _max_diff(resumed.result.state, two.result.state) <= 1e-6
    assert [r["step"] for r in map(json.loads, (two.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r] == [1, 2, 3, 4]


def test_zero3_on_two_ranks_gives_each_rank_about_half_of_the_parameters(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedllm.train.distributed import free_port, launch_env, launcher_command, remove_shm_buffers

    # Arrange
    port = free_port()
    cmd = launcher_command(2, [str(tiny_model_dir), str(tmp_path)], module="tests.train.zero3_probe", master_port=port)
    env = {**launch_env(), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    # Act
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        remove_shm_buffers(port)

    # Assert: each rank holds its partition (about half, padding aside), and the two make the whole model.
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    total = ranks[0]["total"]
    for r in ranks:
        assert r["world"] == 2 and r["total"] == total
        assert 0.45 * total <= r["held"] <= 0.55 * total, r
    assert ranks[0]["held"] + ranks[1]["held"] >= total
    assert ranks[0]["loss"] == ranks[0]["loss"]  # a finite step ran (not NaN)


def test_only_the_launchs_own_shared_memory_buffers_are_removed(tmp_path: Path) -> None:
    from fedllm.train.distributed import remove_shm_buffers

    names = ["deepspeed_allreduce_buffer_0_127.0.0.1_29500_0", "deepspeed_allreduce_buffer_0_127.0.0.1_29500_1",
             "deepspeed_allreduce_buffer_0_127.0.0.1_295001_0", "deepspeed_allreduce_buffer_0_127.0.0.1_39500_0", "other_29500_0"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")

    gone = remove_shm_buffers(29500, shm_dir=tmp_path)

    assert sorted(p.name for p in gone) == names[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
