"""The spooled round (updates on disk, streamed into the accumulator at close) gives bit-identical aggregates to the
in-memory round it replaced, for the default strategy and for the robust ones, and leaves no files behind."""

from __future__ import annotations

import asyncio

import pytest
import torch

from fedllm.federation.aggregation.aggregate import capped_weights
from fedllm.federation.aggregation.bounds import adaptive_norm_bound, clip_round, norms_of
from fedllm.federation.aggregation.strategy_factory import make_strategy
from fedllm.federation.aggregation.update_spool import UpdateSpool, open_round_spool
from fedllm.testing.factories import make_settings
from tests.federation.conftest import FakeTrainer, federation, initial_state, wait_for

SHAPES = {"m.0.lora_A.weight": (8, 32), "m.0.lora_B.weight": (32, 8), "m.1.lora_A.weight": (8, 48),
          "m.1.lora_B.weight": (48, 8)}


def _updates(n: int, seed: int = 3) -> tuple[dict, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    glob = {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}
    ups = {f"silo{i:02d}": {k: torch.randn(*s, generator=g) * (1 + i % 4) * (30 if i == 2 else 1) for k, s in SHAPES.items()}
           for i in range(n)}
    counts = {sid: 5 + 7 * i for i, sid in enumerate(ups)}
    return glob, ups, counts


class _Cfg:
    max_update_norm = None
    update_norm_floor = 1e-3
    update_norm_multiple = 3.0


def _in_memory(strategy, glob, ups, counts):
    """The coordinator's aggregation before the spool (`RoundRunner._accumulate` as it was)."""
    updates = {sid: {k: v.float() for k, v in u.items()} for sid, u in ups.items()}
    acc = strategy.start_round(1, glob)
    bound = adaptive_norm_bound(norms_of(updates), _Cfg)
    clipped = clip_round(updates, bound)
    shares = capped_weights(counts, 0.5)
    for sid in sorted(updates):
        acc.add(sid, updates[sid], shares[sid])
    return strategy.finish_round(1, glob, acc, []), clipped


def _spooled(strategy, glob, ups, counts, run_dir):
    acc = strategy.start_round(1, glob)
    spool = open_round_spool(run_dir, 1, acc)
    for sid in ups:  # arrival order differs from the sorted order of aggregation
        spool[sid] = ups[sid]
    bound = adaptive_norm_bound(spool.norms(), _Cfg)
    shares = capped_weights(counts, 0.5)
    clipped = {}
    for sid in sorted(spool):
        update, c = spool.load_clipped(sid, bound)
        if c is not None:
            clipped[sid] = c
        acc.add(sid, update, shares[sid])
    spool.clear()
    new = strategy.finish_round(1, glob, acc, [])
    spool.close()
    return new, clipped


@pytest.mark.parametrize("name,params", [("fedavg", {}), ("fedadam", {}), ("median", {}),
                                         ("trimmed_mean", {"trim_ratio": 0.2}), ("krum", {"num_byzantine": 2, "num_selected": 4})])
def test_spooled_aggregation_is_bit_identical_to_the_in_memory_one(tmp_path, name, params):
    glob, ups, counts = _updates(9)
    expected, clipped_mem = _in_memory(make_strategy(name, **params), glob, ups, counts)
    got, clipped_disk = _spooled(make_strategy(name, **params), glob, ups, counts, tmp_path / "run")
    assert clipped_mem and clipped_disk == clipped_mem  # silo02's outsized update was clipped the same way
    assert list(got) == list(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key  # bit for bit, not within a tolerance
    assert not (tmp_path / "run" / "spool" / "round-1").exists()


def test_a_robust_strategy_reads_its_updates_from_disk_not_ram(tmp_path):
    glob, ups, counts = _updates(5)
    strategy = make_strategy("median")
    acc = strategy.start_round(1, glob)
    spool = open_round_spool(tmp_path, 1, acc)
    for sid, u in ups.items():
        acc.add(sid, u, counts[sid])
    files = sorted((spool.directory / "stored").glob("*.safetensors"))
    assert len(files) == 5
    assert all(type(u).__name__ == "SpooledUpdate" for u in acc.updates)  # views of files, not tensors in RAM
    assert torch.equal(acc.updates[3]["m.1.lora_B.weight"], ups["silo03"]["m.1.lora_B.weight"].float())


def test_the_spool_keeps_norms_forgets_dropped_silos_and_starts_clean(tmp_path):
    glob, ups, _ = _updates(3)
    spool = UpdateSpool(tmp_path / "r")
    for sid, u in ups.items():
        spool[sid] = u
    assert spool.norms() == pytest.approx(norms_of(ups))
    assert spool.pop("silo01", None) is None and "silo01" not in spool and len(spool) == 2
    assert len(list((tmp_path / "r").glob("*.safetensors"))) == 2
    (tmp_path / "r" / "leftover.tmp").write_bytes(b"x")  # a crash mid-write
    again = UpdateSpool(tmp_path / "r")
    assert list((tmp_path / "r").iterdir()) == [] and len(again) == 0


async def test_a_coordinator_round_leaves_no_spooled_update_behind(tmp_path):
    trainers = [FakeTrainer(i) for i in range(3)]
    async with federation(tmp_path, trainers, rounds=2, min_silos=3) as (coord, _silos):
        await coord.wait_done(60)
        run_dir = coord.run_dir
        assert [r["round"] for r in coord.history] == [1, 2]
        assert not list((run_dir / "spool").rglob("*.safetensors"))
    assert not (run_dir / "spool").exists()


def test_spool_files_are_safetensors_that_the_library_reads(tmp_path):
    from safetensors.torch import load_file

    _glob, ups, _ = _updates(1)
    spool = UpdateSpool(tmp_path / "r")
    spool["silo00"] = ups["silo00"]
    (path,) = list((tmp_path / "r").glob("*.safetensors"))
    loaded = load_file(str(path))
    assert loaded.keys() == ups["silo00"].keys()
    assert all(torch.equal(loaded[k], ups["silo00"][k]) for k in loaded)
    assert all(torch.equal(spool["silo00"][k], ups["silo00"][k]) for k in loaded)


async def test_a_robust_strategy_over_real_sockets_reads_its_updates_from_the_round_spool(tmp_path, monkeypatch):
    from fedllm.federation.aggregation.accumulators import StoringAccumulator

    spooled: list[int] = []
    original = StoringAccumulator.spool_to

    def recording(self, directory):
        original(self, directory)
        spooled.append(1)

    monkeypatch.setattr(StoringAccumulator, "spool_to", recording)
    trainers = [FakeTrainer(i) for i in range(3)]
    async with federation(tmp_path, trainers, strategy="median", rounds=2, min_silos=3) as (coord, _silos):
        await coord.wait_done(60)
        assert [len(r["participants"]) for r in coord.history] == [3, 3]
        assert not list((coord.run_dir / "spool").rglob("*.safetensors"))
    assert spooled == [1, 1]  # each round's median read its updates from disk
