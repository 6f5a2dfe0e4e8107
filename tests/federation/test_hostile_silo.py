"""One hostile silo among three, under the DEFAULT settings: the real CLI coordinator (`python -m fedllm.appliance coordinator
start`, CURVE over real ZeroMQ), the tiny Llama trained by the appliance's engine in every silo. The hostile silo
claims 10**12 examples and sends 1000x the update it really trained; the defaults (the adaptive norm bound and the
share cap) keep the published adapter within a few honest updates per round and keep the honest silos' learning.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fedllm.federation.demo.data import generate
from fedllm.federation.wire.keys import enroll_silo, ensure_keypair
from fedllm.federation.runtime.silo import EngineTrainer, SiloClient
from fedllm.testing.factories import REPO, free_port, make_settings

pytestmark = pytest.mark.slow  # starts the CLI coordinator and trains the tiny model in three silos

ROUNDS, LOCAL_STEPS, FACTOR = 3, 4, 1000.0
TRAIN = {"max_seq_len": 64, "batch_size": 2, "warmup_steps": 0, "zero_stage": 0, "lr": 2e-3}


class HostileTrainer(EngineTrainer):
    """Trains for real, then sends FACTOR x its real update and claims 10**12 examples."""

    def fit(self, steps, config):
        start = {k: v.clone() for k, v in self.get_state().items()}
        _, metrics = super().fit(steps, config)
        self._state = {k: start[k] + FACTOR * (self._state[k] - start[k]) for k in start}
        return 10**12, metrics


class RecordingSilo(SiloClient):
    """A real silo that notes the L2 norm of each update it sends (round -> norm), as decoded from the wire."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.sent_norms: dict[int, float] = {}

    async def _send(self, header, tensors=None):
        from fedllm.federation.aggregation.strategies import global_norm
        from fedllm.federation.wire.frames import decode_header
        from fedllm.federation.wire.payload import decode_payload
        from fedllm.federation.wire.protocol import MsgType

        frames = await super()._send(header, tensors)
        if header.type == MsgType.UPDATE:
            self.sent_norms[header.round_id] = global_norm(decode_payload(decode_header(frames), frames))
        return frames


def _norm(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(torch.sum((a[k].float() - b[k].float()) ** 2)) for k in a))


def _start_coordinator(home: Path, port: int) -> subprocess.Popen:
    config = home / "config.yaml"
    # Only what a test needs (free status port, no router to publish to, the tiny model's training shape); nothing
    # about update bounds, shares or aggregation: those are the defaults under test.
    config.write_text(yaml.safe_dump({"federation": {"status_port": free_port(), "auto_publish": False,
                                                     "round_deadline_s": 600.0, "silo_timeout_s": 120.0},
                                      "train": TRAIN}))
    return subprocess.Popen([sys.executable, "-m", "fedllm.appliance", "--home", str(home), "--config", str(config), "coordinator",
                             "start", "--port", str(port), "--min-silos", "3", "--rounds", str(ROUNDS), "--local-steps",
                             str(LOCAL_STEPS), "--run", "hostile"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


async def test_a_hostile_silo_moves_the_published_adapter_by_a_few_honest_updates_at_most(tmp_path, tiny_model_dir):
    from fedllm import train
    from fedllm.core.adapter_registry import AdapterRegistry

    # Arrange: a coordinator home with its keys and the tiny model as its base model; three enrolled silos
    coord_home = tmp_path / "coord"
    coord = make_settings(coord_home)
    coord_key = ensure_keypair(coord.keys_dir, "coordinator").public
    coord.models_dir.mkdir(parents=True, exist_ok=True)
    (coord.models_dir / coord.model).symlink_to(tiny_model_dir, target_is_directory=True)
    data = generate()
    orgs = {"northbridge": "alpha", "lakeside": "beta", "redwood": "gamma"}  # gamma is hostile
    port = free_port()
    silos = []
    for org, name in orgs.items():
        home = tmp_path / name
        enroll_silo(coord.keys_dir, name, ensure_keypair(make_settings(home).keys_dir, "silo").public)
        settings = make_settings(home, train=TRAIN, federation={
            "coordinator": f"tcp://127.0.0.1:{port}", "coordinator_key": coord_key, "silo_id": name,
            "silo_timeout_s": 120.0})
        cls = HostileTrainer if name == "gamma" else EngineTrainer
        silos.append(RecordingSilo(settings, cls(settings.train, tiny_model_dir, data[org]["train"][:12])))
    held_out = [row for org in ("northbridge", "lakeside") for row in data[org]["eval"][:6]]  # the honest silos' task
    proc = _start_coordinator(coord_home, port)
    try:
        for silo in silos:
            await silo.start()
        # Act: the run (3 rounds) to its end
        await asyncio.wait_for(asyncio.gather(*(s.finished.wait() for s in silos)), 600)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=120)
    finally:
        for silo in silos:
            await silo.stop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    # Assert: every round counted all three silos, and named gamma as clipped (with its original norm)
    records = [json.loads(line) for line in (coord.federation_dir / "hostile" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3], records
    registry = AdapterRegistry(coord.adapters_dir)
    cfg = coord.train.model_copy(update=TRAIN)
    previous = train.initial_adapter_state(cfg, tiny_model_dir)
    losses = [train.evaluate_adapter(cfg, tiny_model_dir, previous, held_out)["eval_loss"]]
    figures = []
    for record in records:
        r = record["round"]
        honest = max(silos[0].sent_norms[r], silos[1].sent_norms[r])
        state = train.load_adapter_state(registry.get(f"hostile:{r}").path)
        figures.append({"round": r, "honest": honest, "hostile": silos[2].sent_norms[r], "moved": _norm(state, previous),
                        "participants": record["participants"], "clipped": record.get("clipped")})
        losses.append(train.evaluate_adapter(cfg, tiny_model_dir, state, held_out)["eval_loss"])
        previous = state
    print("figures:", figures, "held-out losses:", losses)
    for f in figures:
        assert f["participants"] == ["alpha", "beta", "gamma"]
        assert f["hostile"] > 100 * f["honest"]  # what it sent: hundreds of honest updates
        # the published adapter of this round moved by at most 3 honest updates (the bound is 3x the median norm,
        # the hostile silo weighs at most half the round)
        assert f["moved"] <= 3 * f["honest"], f
        assert set(f["clipped"]) == {"gamma"} and f["clipped"]["gamma"]["norm"] > 100 * f["honest"], f
    # the honest silos' learning is kept: the held-out loss falls round after round
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
