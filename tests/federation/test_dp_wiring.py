"""Differential privacy wired into live rounds: central DP reports epsilon; silo DP clips what leaves the silo."""

from __future__ import annotations

import math

import torch

from fedllm.federation.wire import frames as wire
from fedllm.federation.wire.payload import decode_payload
from tests.federation.conftest import FakeTrainer, federation


async def _run(tmp_path, **fed):
    trainers = [FakeTrainer(5), FakeTrainer(6)]  # big steps, so clipping bites
    async with federation(tmp_path, trainers, rounds=2, min_silos=2, **fed) as (coord, silos):
        await coord.wait_done(20)
    return coord, silos


async def test_central_dp_reports_growing_epsilon(tmp_path):
    coord, _ = await _run(tmp_path, dp_mode="central", dp_clip_norm=0.1, dp_noise_multiplier=1.0)
    eps = [r["epsilon"] for r in coord.history]
    assert coord.phase == "done" and len(eps) == 2
    assert all(e is not None and math.isfinite(e) and e > 0 for e in eps) and eps[1] > eps[0]


async def test_silo_dp_clips_the_update_before_it_leaves(tmp_path):
    clip = 0.05
    coord, silos = await _run(tmp_path, dp_mode="silo", dp_clip_norm=clip, dp_noise_multiplier=0.0)
    frames = silos[0].sent_frames
    update = decode_payload(wire.decode_header(frames), frames)
    norm = math.sqrt(sum(float(v.float().pow(2).sum()) for v in update.values()))
    assert norm <= clip * 1.001
    assert coord.history[-1]["dp"] == "silo" and coord.history[-1]["epsilon"] is None  # no noise: no finite epsilon
    assert all(torch.isfinite(v).all() for v in coord.global_state.values())
