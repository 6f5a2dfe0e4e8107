"""A silo stops when the run is over even if the coordinator's final BYE never reaches it, and never earlier: a
coordinator that is restarted (within `end_silence_s` in the last round, at any time before it) keeps its silos."""

from __future__ import annotations

import asyncio

from fedllm.federation.runtime.coordinator import Coordinator
from fedllm.federation.aggregation.strategies import make_strategy
from fedllm.testbed.link import Link, LinkSpec
from tests.federation.conftest import FakeTrainer, fed_settings, federation, initial_state, wait_for


async def test_a_silo_whose_bye_is_lost_stops_once_the_coordinator_falls_silent_after_the_last_round(tmp_path):
    # Arrange: s1 connects through a link; once it has the last round's TRAIN, everything the coordinator sends it is
    # lost (its update still goes up): the round's end, and the BYE after it, never reach it
    links: list[Link] = []

    async def route(i: int, address: str) -> str:
        if i == 0:
            return address
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        links.append(Link((host, int(port)), LinkSpec(0), name="s1"))
        lhost, lport = await links[0].start()
        return f"tcp://{lhost}:{lport}"

    trainers = [FakeTrainer(0), FakeTrainer(1)]
    trainers[1].fit_delay_s = 0.5
    try:
        async with federation(tmp_path, trainers, rounds=2, min_silos=2, end_silence_s=1.5, route=route) as (coord, silos):
            await wait_for(lambda: len(trainers[1].calls) == 2, 20)
            links[0].drop("down")
            await coord.wait_done(20)
            await coord.stop()  # says BYE (done) to both
            # Act: s0 hears the BYE; s1 hears nothing more
            await asyncio.wait_for(silos[0].finished.wait(), 10)
            await asyncio.wait_for(silos[1].finished.wait(), 20)
            # Assert: both rounds had both silos; s1 stopped on the coordinator's silence, s0 on its BYE
            assert [r["participants"] for r in coord.history] == [["s0", "s1"], ["s0", "s1"]]
            assert silos[1].ended_by_silence and not silos[0].ended_by_silence
            assert links[0].dropped["down"] > 0 and silos[1].rounds_done == [1, 2]
    finally:
        for link in links:
            await link.stop()


async def test_a_coordinator_restarted_in_the_last_round_and_one_down_longer_before_keep_their_silos(tmp_path):
    # Arrange: three rounds on a fixed ipc endpoint; silos stop after 4 s of silence once they had the last TRAIN (more
    # than ZeroMQ's reconnect backoff after a short outage)
    endpoint = f"ipc://{tmp_path}/coord.sock"
    fed = dict(rounds=3, min_silos=2, bind_address=endpoint, end_silence_s=4.0)
    settings = fed_settings(tmp_path / "c", plaintext=True, **fed)
    trainers = [FakeTrainer(0), FakeTrainer(1)]
    for t in trainers:
        t.fit_delay_s = 1.0  # rounds last long enough to stop the coordinator inside the one it wants
    async with federation(tmp_path, trainers, strategy=make_strategy("fedavg"), **fed) as (coord, silos):
        # Act 1: in round 2 the coordinator is gone for 5 s, longer than end_silence_s (not the last round: no end)
        await wait_for(lambda: coord.round >= 1, 20)
        assert coord.current is None or coord.current.round_id == 2
        await coord.stop()
        await asyncio.sleep(5.0)
        assert not any(s.finished.is_set() for s in silos)
        coord2 = Coordinator(settings, make_strategy("fedavg"), initial_state=initial_state(), exporter=False)
        await coord2.start()
        try:
            # Act 2: while the silos train the last round, the coordinator dies and is back 0.5 s later
            await wait_for(lambda: coord2.current is not None and coord2.current.round_id == 3, 30)
            await coord2.stop()
            await asyncio.sleep(0.5)
            coord3 = Coordinator(settings, make_strategy("fedavg"), initial_state=initial_state(), exporter=False)
            await coord3.start()
            try:
                await coord3.wait_done(30)
            finally:
                await coord3.stop()
        finally:
            await coord2.stop()
        # Assert: the last round completed with both silos, which then stopped on the BYE, not on silence
        assert coord3.phase == "done" and coord3.history[-1]["round"] == 3
        assert coord3.history[-1]["participants"] == ["s0", "s1"]
        await asyncio.wait_for(asyncio.gather(*(s.finished.wait() for s in silos)), 10)
        assert not any(s.ended_by_silence for s in silos)
