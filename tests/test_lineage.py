"""Lineage of an adapter version (federation/runtime/lineage.py, core/contracts/lineage.py): what a federated round registers,
`appliance adapters show`, and the exported model card that peft and huggingface_hub load."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fedllm.appliance.cli import app
from fedllm.core.adapter_registry import AdapterRegistry
from fedllm.core.contracts.lineage import base_model_hash
from tests.federation.conftest import FakeTrainer, federation, write_exporter


async def test_a_federated_round_registers_its_lineage(tmp_path):
    published = []
    trainers = [FakeTrainer(i, examples=n) for i, n in enumerate((10, 30))]
    async with federation(tmp_path, trainers, rounds=1, min_silos=2, exporter=write_exporter, on_publish=[published.append],
                          bind_address=f"ipc://{tmp_path}/fed.sock", local_steps=7, max_silo_share=0.6) as (coord, _):
        await coord.wait_done(30)
    meta = published[-1].meta
    assert meta["kind"] == "federated" and meta["round"] == 1 and meta["participants"] == ["s0", "s1"]
    assert meta["shares"] == coord.history[0]["shares"] and abs(sum(meta["shares"].values()) - 1) < 1e-6
    assert max(meta["shares"].values()) <= 0.6 + 1e-6  # the capped weights, not the raw example counts (0.25/0.75)
    assert meta["local_steps"] == 7 and meta["strategy"] == "fedavg" and meta["dp"]["mode"] == "off"
    assert meta["secure_aggregation"] is False and meta["lr"] == coord.settings.train.lr
    assert "base_model_hash" in meta


def test_base_model_hash_of_a_folder(tiny_model_dir: Path, tmp_path: Path):
    from fedllm.core.model_store import sha256_of

    assert base_model_hash(tiny_model_dir) == sha256_of(tiny_model_dir / "model.safetensors")
    assert base_model_hash(tmp_path / "absent") is None


def _federated_version(home: Path, tiny_model_dir: Path, tmp_path: Path):
    from fedllm import train

    from fedllm.testing.factories import make_settings

    cfg = make_settings(home).train
    folder = train.save_adapter_dir(train.initial_adapter_state(cfg, tiny_model_dir), cfg, tiny_model_dir, tmp_path / "staging")
    meta = {"kind": "federated", "run": "clinics", "round": 3, "participants": ["north", "south"],
            "shares": {"north": 0.5, "south": 0.5}, "strategy": "fedprox", "lora_aggregation": "factors",
            "metrics": {"eval_loss": 1.25}, "base_model": str(tiny_model_dir), "base_model_hash": base_model_hash(tiny_model_dir),
            "epsilon": 4.5, "dp": {"mode": "central", "delta": 1e-5, "noise_multiplier": 1.1, "clip_norm": 1.0},
            "secure_aggregation": True, "local_steps": 20, "lr": 0.0002}
    return AdapterRegistry(home / "adapters").register("clinics", folder, meta)


def test_show_and_export_with_a_model_card_that_peft_and_the_hub_load(tiny_model_dir: Path, tmp_path: Path):
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    home = tmp_path / "home"
    version = _federated_version(home, tiny_model_dir, tmp_path)
    runner = CliRunner()
    shown = runner.invoke(app, ["--home", str(home), "adapters", "show", "clinics:1", "--json"])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.stdout)
    assert info["source"] == {"kind": "federated", "run": "clinics", "round": 3}
    assert info["silos"] == [{"silo": "north", "weight": 0.5}, {"silo": "south", "weight": 0.5}]
    assert info["dp"]["epsilon"] == 4.5 and info["dp"]["delta"] == 1e-5 and info["secure_aggregation"] is True
    assert info["base_model"] == tiny_model_dir.name and len(info["base_model_hash"]) == 64
    text = runner.invoke(app, ["--home", str(home), "adapters", "show", "clinics"])
    assert "silos: north (0.5), south (0.5)" in text.output and "strategy: fedprox" in text.output

    out = tmp_path / "exported"
    exported = runner.invoke(app, ["--home", str(home), "adapters", "export", "clinics:1", "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == tiny_model_dir.name
    assert "federated-learning" in card.data.tags
    assert "| Round | 3 |" in card.text and "north (0.5), south (0.5)" in card.text and "| DP epsilon | 4.5 |" in card.text
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    assert model.peft_config["default"].r == json.loads((version.path / "adapter_config.json").read_text())["r"]

    bad = runner.invoke(app, ["--home", str(home), "adapters", "show", "nope"])
    assert bad.exit_code != 0 and "unknown adapter 'nope'" in bad.output
