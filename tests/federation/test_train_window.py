"""The coordinator's TRAIN window: at most `train_window_bytes` of TRAINs on the way at once, each freed by its silo's
acknowledgement as it arrives (not by a timeout), over real sockets."""

from __future__ import annotations

import asyncio

import pytest

import fedllm.federation.runtime.round_runner as round_runner_module
from fedllm.federation.runtime.train_window import TrainWindow
from tests.federation.conftest import FakeTrainer, federation


async def test_the_window_admits_trains_up_to_its_budget_and_one_more_after_a_release():
    window = TrainWindow(10)
    await window.acquire("a", 4, timeout_s=60)
    await window.acquire("b", 4, timeout_s=1.0)
    third = asyncio.create_task(window.acquire("c", 4, timeout_s=1.0))
    await asyncio.sleep(0.05)
    assert not third.done() and window.in_flight_bytes() == 8  # 12 bytes would exceed the budget of 10
    window.release("a")
    await asyncio.wait_for(third, 5)
    assert window.in_flight_bytes() == 8 and window.peak_in_flight == 2
    await window.acquire("big", 100, timeout_s=60)  # bigger than the budget: it goes alone, once the others expire (1 s)
    assert window.in_flight_bytes() == 100 and window.expired == 2


async def test_a_one_train_window_sends_one_at_a_time_and_each_is_freed_by_its_silos_acknowledgement(tmp_path, monkeypatch):
    windows: list[TrainWindow] = []

    class Recording(TrainWindow):
        def __init__(self, budget_bytes: int) -> None:
            super().__init__(budget_bytes)
            windows.append(self)

    monkeypatch.setattr(round_runner_module, "TrainWindow", Recording)
    trainers = [FakeTrainer(i) for i in range(4)]
    async with federation(tmp_path, trainers, rounds=2, min_silos=4, train_window_bytes=1) as (coord, _silos):
        await coord.wait_done(60)
        assert [len(r["participants"]) for r in coord.history] == [4, 4]
    assert len(windows) == 2
    assert all(w.peak_in_flight == 1 for w in windows)  # one TRAIN on the way at a time
    assert all(w.expired == 0 for w in windows)  # each freed by the silo's got_train heartbeat, not a timeout


def test_a_silo_that_does_not_acknowledge_holds_the_window_two_heartbeats_at_most():
    from fedllm.federation.runtime.train_window import train_wait_s

    assert train_wait_s(300.0, True, 5.0) == 300.0  # it acknowledges: its allowance is only the fallback
    assert train_wait_s(300.0, False, 5.0) == 10.0  # an older silo: never its whole allowance
    assert train_wait_s(3.0, False, 5.0) == 3.0
