"""The promotion gate (federation/publishing/gate.py) through the real publisher and router: a worse round's adapter is served
under its own name while NAME-latest stays on the better one; a good round moves it again."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from fedllm.core.adapter_registry import AdapterRegistry
from fedllm.federation.publishing.gate import PromotionGate
from fedllm.federation.publishing.publish import RouterPublisher
from fedllm.testing.factories import make_settings
from tests.train.conftest import arithmetic_records, write_jsonl


def _register(registry: AdapterRegistry, cfg, model_dir: Path, data: Path, tmp_path: Path, round_: int, *, worse: bool):
    from fedllm import train

    if worse:  # a round gone wrong: back to the untrained adapter (the base model's loss)
        state = train.initial_adapter_state(cfg, model_dir)
    else:  # a good round: a few steps on the data
        state = train.fit_adapter(cfg, model_dir, data, max_steps=4).state
    folder = train.save_adapter_dir(state, cfg, model_dir, tmp_path / f"staging{round_}")
    return registry.register("fed", folder, {"kind": "federated", "run": "fed", "round": round_})


async def test_a_worse_round_is_held_back_and_a_good_one_promoted(fake_factory, router_factory, tiny_model_dir: Path, tmp_path: Path):
    home = tmp_path / "home"
    settings = make_settings(home, train={"max_seq_len": 64, "batch_size": 4, "lr": 0.01, "warmup_steps": 0, "zero_stage": 0})
    data = write_jsonl(tmp_path / "gate.jsonl", arithmetic_records(8))
    gate = PromotionGate(settings, data, 0.02, home / "federation" / "fed" / "gate.jsonl", model_dir=tiny_model_dir)
    registry = AdapterRegistry(home / "adapters")
    fake = fake_factory("base")
    router = await router_factory([fake], home=home)
    publisher = RouterPublisher(router.url, router.admin_token, gate=gate)
    answers = {}
    try:
        async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
            for round_, worse in ((1, False), (2, True), (3, False)):
                version = await asyncio.to_thread(_register, registry, settings.train, tiny_model_dir, data, tmp_path, round_,
                                                worse=worse)
                publisher(version)
                assert await asyncio.to_thread(publisher.wait_published, version.served_name, 120)
                answers[round_] = (await c.post("/v1/chat/completions", json={"model": "fed-latest"})).json()["model"]
            own = await c.post("/v1/chat/completions", json={"model": "fed-v2"})
            history = (await c.get("/admin/adapters/fed-latest/history", headers=router.admin_headers())).json()
            back = (await c.post("/admin/adapters/fed-latest/rollback", json={}, headers=router.admin_headers())).json()
    finally:
        await asyncio.to_thread(publisher.close)
    decisions = [json.loads(line) for line in (home / "federation" / "fed" / "gate.jsonl").read_text().splitlines()]
    assert [d["decision"] for d in decisions] == ["promoted", "held back", "promoted"]
    held = decisions[1]
    assert held["current"] == "fed-v1" and held["loss"] > held["current_loss"] + 0.02
    assert answers == {1: "fed-v1", 2: "fed-v1", 3: "fed-v3"}
    assert own.status_code == 200 and own.json()["model"] == "fed-v2"  # held back, still served under its own name
    assert [(r["name"], r.get("held_back", False)) for r in history["history"]] == [
        ("fed-v1", False), ("fed-v2", True), ("fed-v3", False)]
    row = history["history"][1]
    assert row["loss"] == held["loss"] and row["current_loss"] == held["current_loss"] and row["from"] == "fed-v1"
    assert row["reason"].startswith("held back: loss ") and row["by"] == "federation fed round 2"
    assert publisher.status()["fed-v2"]["gate"]["decision"] == "held back"
    assert back["name"] == "fed-v1"  # a rollback skips the held-back version
    # A restarted coordinator's gate knows which version is current.
    again = PromotionGate(settings, data, 0.02, home / "federation" / "fed" / "gate.jsonl", model_dir=tiny_model_dir)
    assert again.current == "fed-v3"


def test_a_missing_gate_data_set_is_refused(tmp_path: Path):
    import pytest

    from fedllm.core.errors import ConfigError

    with pytest.raises(ConfigError, match="gate_data .* is not a file"):
        PromotionGate(make_settings(tmp_path), tmp_path / "nope.jsonl", 0.02, tmp_path / "gate.jsonl")


def _bare_version(registry: AdapterRegistry, tmp_path: Path, round_: int, received: dict | None) -> "AdapterVersion":
    folder = tmp_path / f"bare{round_}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return registry.register("fed", folder, {"kind": "federated", "run": "fed", "round": round_, "received_eval": received})


async def test_without_gate_data_the_silos_held_out_losses_decide_one_round_late(fake_factory, router_factory, tmp_path: Path):
    """HeldOutGate: round r's version is decided by the silos' held-out loss of it, which round r+1's version carries."""
    from fedllm.federation.publishing.gate import HeldOutGate

    home = tmp_path / "home"
    log = home / "federation" / "fed" / "gate.jsonl"
    registry = AdapterRegistry(home / "adapters")
    router = await router_factory([fake_factory("base")], home=home)
    publisher = RouterPublisher(router.url, router.admin_token, gate=HeldOutGate(0.02, log), gate_prompts=["Say hi."])
    figures = {1: {"adapter": None, "loss": 3.0}, 2: {"adapter": "fed:1", "loss": 2.0},
               3: {"adapter": "fed:2", "loss": 2.5}, 4: {"adapter": "fed:3", "loss": 1.9}}
    latest = {}
    try:
        async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
            for round_ in (1, 2, 3, 4):
                version = _bare_version(registry, tmp_path, round_, figures[round_])
                publisher(version)
                assert await asyncio.to_thread(publisher.wait_published, version.served_name, 60)
                answer = await c.post("/v1/chat/completions", json={"model": "fed-latest"})
                latest[round_] = answer.json()["model"] if answer.status_code == 200 else answer.status_code
            history = (await c.get("/admin/adapters/fed-latest/history", headers=router.admin_headers())).json()
    finally:
        await asyncio.to_thread(publisher.close)
    decisions = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(d["adapter"], d["decision"], d["loss"]) for d in decisions] == [
        ("fed-v1", "promoted", 2.0), ("fed-v2", "held back", 2.5), ("fed-v3", "promoted", 1.9)]
    assert decisions[1]["current"] == "fed-v1" and decisions[1]["current_loss"] == 2.0 and decisions[0]["prompts"] == "ok"
    # No alias before round 2's figures; then round 1's version; round 2's is held back; round 3's promoted at round 4.
    assert latest == {1: 404, 2: "fed-v1", 3: "fed-v1", 4: "fed-v3"}
    assert [(r["name"], r.get("held_back", False)) for r in history["history"]] == [
        ("fed-v1", False), ("fed-v2", True), ("fed-v3", False)]
    assert history["history"][1]["loss"] == 2.5 and history["history"][1]["current_loss"] == 2.0


def test_gate_prompt_answers_must_be_non_empty_and_finite():
    from fedllm.federation.publishing.gate_prompts import answer_problem

    def answer(text, *logprobs):
        return {"choices": [{"message": {"content": text}, "logprobs": {"content": [{"token": "t", "logprob": x} for x in logprobs]}}]}

    assert answer_problem(answer("Hello", -0.5, -1.2)) is None
    assert answer_problem(answer("  ")) == "empty answer"
    assert "non-finite log-probability nan" in answer_problem(answer("Hi", float("nan")))
    assert answer_problem({"choices": []}) == "the answer has no message"


async def test_adapters_publish_gates_on_a_gate_file_and_no_gate_moves_at_once(fake_factory, router_factory, tiny_model_dir: Path,
                                                                                tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from fedllm.appliance.cli import app

    home = tmp_path / "home"
    settings = make_settings(home, train={"max_seq_len": 64, "batch_size": 4, "lr": 0.01, "warmup_steps": 0, "zero_stage": 0})
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    (settings.models_dir / settings.model).symlink_to(tiny_model_dir, target_is_directory=True)
    data = write_jsonl(tmp_path / "gate.jsonl", arithmetic_records(8))
    registry = AdapterRegistry(home / "adapters")
    for round_, worse in ((1, False), (2, True)):
        await asyncio.to_thread(_register, registry, settings.train, tiny_model_dir, data, tmp_path, round_, worse=worse)
    router = await router_factory([fake_factory("base")], home=tmp_path / "router-home")
    monkeypatch.setenv("APPLIANCE_SERVE__ADMIN_TOKEN", router.admin_token)
    config = home / "config.yaml"
    config.write_text("train: {max_seq_len: 64, batch_size: 4, lr: 0.01, warmup_steps: 0, zero_stage: 0}\n")

    def cli(*args: str):
        return CliRunner().invoke(app, ["--home", str(home), "--config", str(config), "adapters", "publish", *args,
                                        "--router", router.url])

    first = await asyncio.to_thread(cli, "fed:1", "--gate", str(data))
    held = await asyncio.to_thread(cli, "fed:2", "--gate", str(data))
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        still = (await c.post("/v1/chat/completions", json={"model": "fed-latest"})).json()["model"]
        forced = await asyncio.to_thread(cli, "fed:2", "--no-gate")
        after = (await c.post("/v1/chat/completions", json={"model": "fed-latest"})).json()["model"]
    assert first.exit_code == 0 and "gate passed" in first.output and "alias fed-latest" in first.output, first.output
    assert held.exit_code == 0 and "held back: fed-v2 is served under its own name only" in held.output, held.output
    assert "of fed-v1)" in " ".join(held.output.split())
    assert still == "fed-v1"
    assert forced.exit_code == 0 and "alias fed-latest" in forced.output and after == "fed-v2", forced.output
