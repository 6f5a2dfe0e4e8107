"""From rounds to production under control, end to end: the real CLI coordinator (`appliance coordinator start`, CURVE
over real ZeroMQ) runs three rounds with a real silo training the embedded model; each round's adapter is published
to the real router (`appliance serve`) in front of a real vLLM worker, through the promotion gate on a gate data set.

Round 2 is made worse on purpose: the silo trains it with a rate 100x too high (within the update bounds: nothing is
clipped). The gate holds it back (`gated-latest` keeps answering from round 1's version, the round record and
`appliance adapters history` show both losses); round 3 starts from the promoted version (federation/publishing/gate_resume.py),
is good again and is promoted; `appliance adapters rollback` returns to round 1's version; after a router restart
`gated-latest` answers as before without any new publish.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from fedllm.appliance.cli import app
from fedllm.federation.wire.keys import enroll_silo, ensure_keypair
from fedllm.federation.runtime.silo import EngineTrainer, SiloClient
from fedllm.testing.factories import REPO, free_port, make_settings
from tests.train.conftest import write_jsonl

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

RUN, LR, BAD = "gated", 1e-3, 100.0
TRAIN = {"lora_r": 8, "lora_alpha": 16, "max_seq_len": 64, "batch_size": 2, "warmup_steps": 0, "zero_stage": 0, "lr": LR,
         "lr_scheduler": "constant"}


def _rows(ids) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Which ticket queue handles case {i}?"},
                          {"role": "assistant", "content": f"Case {i} goes to the billing queue."}]} for i in ids]


class SteeredTrainer(EngineTrainer):
    """A real silo's engine trainer: round 2 at a rate BAD x too high; before round 3 trains, it asks the router which
    version `gated-latest` answers from (the gate decided round 2 by then: the coordinator waited for it)."""

    def __init__(self, *a, router_url: str, **kw):
        super().__init__(*a, **kw)
        self.router_url, self.fits, self.before_round3 = router_url, 0, None

    def fit(self, steps, config):
        self.fits += 1
        if self.fits == 3:
            self.before_round3 = _answered_by(self.router_url, f"{RUN}-latest")
        lr = LR * BAD if self.fits == 2 else LR
        self.cfg = self.cfg.model_copy(update={"lr": lr})
        return super().fit(steps, config)


def _answered_by(url: str, model: str) -> str:
    resp = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "Which ticket queue handles case 3?"}]})
    return resp.json()["model"] if resp.status_code == 200 else f"HTTP {resp.status_code}: {resp.text}"


def _start_coordinator(home: Path, port: int, router_port: int, admin_token: str, gate_data: Path) -> subprocess.Popen:
    config = home / "config.yaml"
    config.write_text(yaml.safe_dump({
        "federation": {"status_port": free_port(), "round_deadline_s": 600.0, "silo_timeout_s": 120.0,
                       "gate_data": str(gate_data), "gate_tolerance": 0.05},
        "serve": {"port": router_port, "admin_token": admin_token}, "train": TRAIN}))
    return subprocess.Popen([sys.executable, "-m", "fedllm.appliance", "--home", str(home), "--config", str(config), "coordinator",
                             "start", "--port", str(port), "--min-silos", "1", "--rounds", "3", "--local-steps", "2",
                             "--run", RUN], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def test_a_worse_round_is_held_back_then_promotion_rollback_and_restart(vllm_worker, embedded_model_dir, tmp_path,
                                                                               monkeypatch):
    from fedllm.federation.publishing.heldout import with_gate
    from tests.ui.services import start_router

    admin_token = "gated-rollout-admin-token-0123456789"
    router_home = tmp_path / "router-home"
    router = start_router(router_home, [vllm_worker.spec], admin_token)
    coord_home = tmp_path / "coord"
    coord = make_settings(coord_home)
    coord_key = ensure_keypair(coord.keys_dir, "coordinator").public
    coord.models_dir.mkdir(parents=True, exist_ok=True)
    (coord.models_dir / coord.model).symlink_to(embedded_model_dir, target_is_directory=True)
    gate_data = write_jsonl(tmp_path / "gate.jsonl", _rows(range(20, 24)))
    port = free_port()
    silo_home = tmp_path / "silo"
    enroll_silo(coord.keys_dir, "clinic", ensure_keypair(make_settings(silo_home).keys_dir, "silo").public)
    silo_settings = make_settings(silo_home, train=TRAIN, federation={
        "coordinator": f"tcp://127.0.0.1:{port}", "coordinator_key": coord_key, "silo_id": "clinic", "silo_timeout_s": 120.0})
    trainer = SteeredTrainer(silo_settings.train, embedded_model_dir, _rows(range(8)), router_url=router.url)
    silo = SiloClient(silo_settings, trainer)
    router_port = int(router.url.rsplit(":", 1)[1])
    proc = _start_coordinator(coord_home, port, router_port, admin_token, gate_data)
    admin = {"Authorization": f"Bearer {admin_token}"}
    monkeypatch.setenv("APPLIANCE_SERVE__ADMIN_TOKEN", admin_token)  # for `appliance adapters history|rollback`
    runner = CliRunner()
    cli = ["--home", str(router_home)]
    try:
        await silo.start()
        # Act: the run (3 rounds) to its end
        await asyncio.wait_for(silo.finished.wait(), 900)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=300)
        assert proc.returncode == 0, out
        after_run = await asyncio.to_thread(_answered_by, router.url, f"{RUN}-latest")
        history = await asyncio.to_thread(runner.invoke, app, [*cli, "adapters", "history", RUN, "--router", router.url])
        rolled = await asyncio.to_thread(runner.invoke, app, [*cli, "adapters", "rollback", RUN, "--router", router.url])
        after_rollback = await asyncio.to_thread(_answered_by, router.url, f"{RUN}-latest")
        held_back_own_name = await asyncio.to_thread(_answered_by, router.url, f"{RUN}-v2")
        before_restart = httpx.get(f"{router.url}/admin/adapters/{RUN}-latest/history", headers=admin, timeout=10).json()
        # the router restarts: the alias answers as before, nothing is published again
        router.stop()
        router = start_router(router_home, [vllm_worker.spec], admin_token)
        after_restart = await asyncio.to_thread(_answered_by, router.url, f"{RUN}-latest")
        restored_history = httpx.get(f"{router.url}/admin/adapters/{RUN}-latest/history", headers=admin, timeout=10).json()
    finally:
        await silo.stop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for n in (1, 2, 3):  # leave the session's vLLM worker as it was
            httpx.delete(f"{router.url}/admin/adapters/{RUN}-v{n}", headers=admin, timeout=60)
        router.stop()

    run_dir = coord.federation_dir / RUN
    records = with_gate([json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()], run_dir)
    gates = {r["round"]: r["gate"] for r in records}
    print("gate decisions:", json.dumps(gates), "started_from:", [r.get("started_from") for r in records])
    # Assert: round 1 promoted; round 2 (the 100x rate, nothing clipped) held back with both losses; round 3 promoted
    assert [r["round"] for r in records] == [1, 2, 3]
    assert not records[1].get("clipped"), "round 2's update must be within the bounds"
    assert [gates[r]["decision"] for r in (1, 2, 3)] == ["promoted", "held back", "promoted"], gates
    assert gates[2]["current"] == f"{RUN}-v1" and gates[2]["current_loss"] == gates[1]["loss"]
    assert gates[2]["loss"] > gates[1]["loss"] + 0.05 and gates[1]["prompts"] == "ok"
    assert records[2]["started_from"] == f"{RUN}-v1"  # round 3 trained from the promoted version, not the held-back one
    # during round 3 (after round 2's decision) the alias still answered from round 1's version
    assert trainer.before_round3 == f"{RUN}-v1"
    assert after_run == f"{RUN}-v3" and held_back_own_name == f"{RUN}-v2"
    assert history.exit_code == 0, history.output
    shown = " ".join(history.output.split())  # rich wraps long lines
    assert f"held back: loss {gates[2]['loss']:.4f} vs {gates[1]['loss']:.4f} of {RUN}-v1" in shown, shown
    assert rolled.exit_code == 0 and f"now names {RUN}-v1 (was {RUN}-v3)" in " ".join(rolled.output.split()), rolled.output
    assert after_rollback == f"{RUN}-v1"
    assert after_restart == f"{RUN}-v1"
    assert restored_history == before_restart and restored_history["current"] == f"{RUN}-v1"  # no publish since
