"""Round checkpoints are durable (fsynced), a torn latest one falls back to the previous, and registration follows them."""

from __future__ import annotations

import os

import torch

from fedllm.core.adapter_registry import AdapterRegistry
from fedllm.federation.runtime.checkpoint import Checkpoint, load_latest, round_dir, save_checkpoint
from tests.federation.conftest import FakeTrainer, federation, write_exporter


def _ckpt(round_id: int) -> Checkpoint:
    return Checkpoint(round_id, {"w": torch.full((4,), float(round_id))}, {}, {"history": [{"round": round_id}]})


def test_every_checkpoint_file_and_folder_is_fsynced(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    final = save_checkpoint(tmp_path, _ckpt(1))
    names = {os.path.basename(p) for p in synced}
    # each file through its temp name, the staging folder, the rounds folder (the rename) and the run folder
    for name in ("global.safetensors", "strategy.safetensors", "state.json"):
        assert any(n.startswith(f".{name}.") for n in names), name
    assert str(final.parent) in synced and str(tmp_path) in synced


def test_a_torn_latest_checkpoint_falls_back_to_the_previous_round(tmp_path):
    save_checkpoint(tmp_path, _ckpt(1))
    save_checkpoint(tmp_path, _ckpt(2))
    torn = round_dir(tmp_path, 2) / "global.safetensors"
    torn.write_bytes(torn.read_bytes()[:20])  # a write cut short
    ckpt = load_latest(tmp_path)
    assert ckpt is not None and ckpt.round_id == 1 and torch.equal(ckpt.global_state["w"], torch.full((4,), 1.0))


def test_a_torn_pointer_falls_back_to_the_newest_readable_round(tmp_path):
    save_checkpoint(tmp_path, _ckpt(1))
    save_checkpoint(tmp_path, _ckpt(2))
    (tmp_path / "latest.json").write_text('{"round": 2, "di')
    assert load_latest(tmp_path).round_id == 2


async def test_a_version_is_registered_only_after_its_checkpoint(tmp_path):
    seen: list[int | None] = []

    def exporter(state, out_dir):
        ckpt = load_latest(tmp_path / "c" / "federation" / "testrun")
        seen.append(ckpt.round_id if ckpt else None)
        write_exporter(state, out_dir)

    async with federation(tmp_path, [FakeTrainer(0), FakeTrainer(1)], exporter=exporter, rounds=2, min_silos=2) as (coord, _):
        await coord.wait_done(20)
    assert seen == [1, 2]
    assert [r["adapter"] for r in coord.history] == ["testrun:1", "testrun:2"]


async def test_a_restart_registers_a_round_checkpointed_but_not_registered(tmp_path):
    # Arrange: a run whose round 1 was checkpointed while registration never happened (a crash between the two)
    async with federation(tmp_path, [FakeTrainer(0), FakeTrainer(1)], exporter=False, rounds=1, min_silos=2) as (coord, _):
        await coord.wait_done(20)
    registry = AdapterRegistry(coord.settings.adapters_dir)
    assert registry.versions("testrun") == []
    published = []
    # Act: the coordinator starts again on the same home (the run is complete: it only resumes)
    async with federation(tmp_path, [], exporter=write_exporter, on_publish=[published.append], rounds=1,
                          min_silos=2) as (coord2, _):
        await coord2.wait_done(20)
    # Assert
    assert registry.versions("testrun") == [1] and registry.get("testrun:1").meta["round"] == 1
    assert [v.ref for v in published] == ["testrun:1"] and coord2.history[-1]["adapter"] == "testrun:1"
