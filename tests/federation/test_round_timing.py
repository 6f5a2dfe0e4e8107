"""Per-silo round timings (download, train, upload) and deadlines that allow for each silo's transfer time.

The pure parts (fedllm.federation.runtime.timing) on numbers; the coordinator and silos over real sockets on loopback, with slow
links made by the test bed's link emulator (fedllm.testbed.link.Link) in front of the coordinator.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from fedllm.federation.runtime.timing import ClockOffset, silo_timings, throughput_bps, transfer_allowance_s
from fedllm.testbed.link import Link, LinkSpec
from tests.federation.conftest import FakeTrainer, federation, wait_for


# ---------------------------------------------------------------- pure functions
@pytest.mark.parametrize("offset", [0.0, 3600.0, -7.25])  # the silo's clock is right, an hour behind, 7 s ahead
def test_timings_split_the_wire_time_with_the_estimated_offset_whatever_the_clocks(offset):
    # Arrange: true story on the coordinator's clock: TRAIN out at 100.0, 0.4 s down, 2.0 s held (1.5 s training),
    # 0.9 s up. The silo stamps its own clock, which reads coordinator time - offset.
    t = silo_timings(train_sent=100.0, update_received=103.3, train_received=100.4 - offset, update_sent=102.4 - offset,
                     train_s=1.5, offset_s=offset, bytes_down=1000, bytes_up=800)
    # Assert
    assert t["download_s"] == pytest.approx(0.4) and t["upload_s"] == pytest.approx(0.9)
    assert t["transfer_s"] == pytest.approx(1.3) and t["span_s"] == pytest.approx(3.3) and t["train_s"] == 1.5
    assert (t["bytes_down"], t["bytes_up"]) == (1000, 800)


def test_a_wrong_offset_moves_time_between_download_and_upload_but_never_changes_their_sum():
    truth = dict(train_sent=100.0, update_received=103.3, train_received=100.4, update_sent=102.4, train_s=1.5,
                 bytes_down=1, bytes_up=1)
    off = silo_timings(**truth, offset_s=0.2)  # the estimate is 0.2 s off
    way_off = silo_timings(**truth, offset_s=50.0)  # absurd: clamped, the sum still holds
    assert off["download_s"] == pytest.approx(0.6) and off["upload_s"] == pytest.approx(0.7)
    assert way_off["download_s"] == pytest.approx(1.3) and way_off["upload_s"] == 0
    assert off["transfer_s"] == way_off["transfer_s"] == pytest.approx(1.3)


def test_timings_of_a_silo_without_timestamps_or_offset_say_what_is_unknown():
    base = dict(train_sent=10.0, update_received=12.0, train_s=1.0, bytes_down=1, bytes_up=1)
    old = silo_timings(**base, train_received=None, update_sent=None, offset_s=None)
    no_echo = silo_timings(**base, train_received=10.5, update_sent=11.6, offset_s=None)
    assert old["span_s"] == 2.0 and old["transfer_s"] is None and old["download_s"] is None
    assert no_echo["transfer_s"] == pytest.approx(0.9) and no_echo["download_s"] is None and no_echo["upload_s"] is None


def test_clock_offset_keeps_the_echo_with_the_shortest_round_trip():
    clock = ClockOffset(window=3)
    assert clock.best is None
    clock.add(sent_at=0.0, remote_at=1000.9, received_at=1.0)  # rtt 1.0 (queued behind a TRAIN): offset ~1000.4
    clock.add(sent_at=5.0, remote_at=1005.05, received_at=5.1)  # rtt 0.1: offset 1000.0
    clock.add(sent_at=9.0, remote_at=1000.0, received_at=8.0)  # negative rtt (our clock stepped back): ignored
    rtt, offset = clock.best
    assert rtt == pytest.approx(0.1) and offset == pytest.approx(1000.0)
    for i in range(3):  # the window moves on: old samples go
        clock.add(sent_at=20.0 + i, remote_at=1020.25 + i, received_at=20.5 + i)
    assert clock.best == pytest.approx((0.5, 1000.0))


def test_transfer_allowance_uses_the_measured_throughput_else_the_assumed_link():
    mb = 1_000_000
    # unmeasured: 1 MB down and 1 MB up at an assumed 8 Mbit/s (1 MB/s) is 2 s, times the slack
    assert transfer_allowance_s(mb, mb, down_bps=None, up_bps=None, assumed_mbit=8, slack=3) == pytest.approx(6.0)
    # measured: 0.5 MB/s down, 2 MB/s up
    assert transfer_allowance_s(mb, mb, down_bps=0.5 * mb, up_bps=2 * mb, assumed_mbit=8, slack=2) == pytest.approx(5.0)
    assert throughput_bps(mb, 0.5) == 2 * mb and throughput_bps(mb, None) is None and throughput_bps(mb, 0.0) == mb * 1000


# ---------------------------------------------------------------- coordinator and silos on loopback
@contextlib.asynccontextmanager
async def _links(specs: dict[int, LinkSpec]):
    """`route` for `federation()`: silo i connects through a Link of specs[i] (others directly); yields (route, links)."""
    links: dict[int, Link] = {}

    async def route(i: int, address: str) -> str:
        if i not in specs:
            return address
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        link = links[i] = Link((host, int(port)), specs[i], name=f"s{i}")
        lhost, lport = await link.start()
        return f"tcp://{lhost}:{lport}"

    try:
        yield route, links
    finally:
        for link in links.values():
            await link.stop()


def _big_state(numel: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(8, numel // 16, generator=g),
            "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(numel // 16, 8, generator=g)}


async def test_a_slow_link_shows_as_longer_download_and_upload_in_the_round_record(tmp_path):
    # Arrange: s0 straight to the coordinator, s1 behind 600 ms each way (far more than a busy machine's stalls). Heartbeats are rare, so the clock offset
    # comes from the one echo each silo asks for once it is welcomed (not from one sent before its connection was up);
    # training takes longer than s1's round trip, so that echo is back before the first UPDATE leaves.
    trainers = [FakeTrainer(0), FakeTrainer(1)]
    for t in trainers:
        t.fit_delay_s = 1.5
    async with _links({1: LinkSpec(600)}) as (route, _), \
            federation(tmp_path, trainers, rounds=2, min_silos=2, route=route,
                       heartbeat_interval_s=60.0, silo_timeout_s=120.0) as (coord, _silos):
        # Act
        await coord.wait_done(60)
    # Assert: both rounds carry each silo's timings; s1's transfers each take its link's delay more than s0's
    assert coord.phase == "done"
    for record in coord.history:
        fast, slow = record["timings"]["s0"], record["timings"]["s1"]
        assert slow["download_s"] - fast["download_s"] >= 0.3 and slow["upload_s"] - fast["upload_s"] >= 0.3
        for t in (fast, slow):
            assert t["transfer_s"] == pytest.approx(t["download_s"] + t["upload_s"], abs=2e-3)
            assert t["span_s"] >= t["transfer_s"] + t["train_s"] - 2e-3 and t["bytes_down"] > 0 and t["bytes_up"] > 0
    assert coord.status()["rounds"][-1]["timings"].keys() == {"s0", "s1"}  # also in /status (the console reads it)


async def test_a_slow_silo_gets_its_transfer_allowance_and_a_cut_one_still_misses_the_round(tmp_path):
    # Arrange: a 2 MB adapter (fp32). s1's link moves it in ~1 s each way: longer than the 1 s training allowance;
    # s2 is on a fast link that is cut while it trains. The coordinator assumes 16 Mbit/s links until
    # it has measured them.
    trainers = [FakeTrainer(0), FakeTrainer(1), FakeTrainer(2)]
    trainers[2].fit_delay_s = 2.0  # the cut lands while it trains
    specs = {1: LinkSpec(20, bandwidth_mbit=16), 2: LinkSpec(1)}
    async with _links(specs) as (route, links), \
            federation(tmp_path, trainers, initial=_big_state(1 << 19), rounds=2, min_silos=2, round_deadline_s=1.0,
                       assumed_link_mbit=16, transfer_slack=3, route=route) as (coord, _silos):
        await wait_for(lambda: len(trainers[2].calls) == 1, 30)
        await links[2].cut()
        # Act
        await coord.wait_done(90)
    first, second = coord.history
    # Assert: the slow silo made both rounds although its update arrived after the training allowance...
    assert first["participants"] == second["participants"] == ["s0", "s1"]
    assert first["timings"]["s1"]["span_s"] > 1.0 and first["timings"]["s1"]["transfer_s"] > 1.0
    # ...because its deadline allowed for its transfers: first from the assumed link, then from its measured one
    assert first["deadlines_s"]["s0"] == first["deadlines_s"]["s1"] > first["timings"]["s1"]["span_s"]
    assert second["deadlines_s"]["s1"] > second["timings"]["s1"]["span_s"] > 1.0
    assert second["deadlines_s"]["s1"] > second["deadlines_s"]["s0"]  # s0's loopback transfers earn it almost nothing
    # The cut silo missed the round, which completed with the others (and it was not selected once offline).
    assert first["failures"] == ["s2"] and "s2" not in second["deadlines_s"]
