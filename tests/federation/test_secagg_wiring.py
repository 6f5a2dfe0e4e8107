"""Secure aggregation in live rounds: real sockets on 127.0.0.1, the pure-tensor fake trainer, three silos."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from fedllm.core.errors import ConfigError
from fedllm.federation.aggregation import secagg
from fedllm.federation.runtime.coordinator import Coordinator
from fedllm.federation.runtime.service import build_strategy
from fedllm.federation.runtime.silo import SiloClient
from fedllm.federation.aggregation.strategies import make_strategy
from tests.federation.conftest import FakeTrainer, fed_settings, federation, initial_state, wait_for

EXAMPLES = (10, 20, 40)


class GatedTrainer(FakeTrainer):
    """The fake trainer, whose training waits for the test to open a gate."""

    def __init__(self, index: int, gate: threading.Event, **kw) -> None:
        super().__init__(index, **kw)
        self.gate = gate

    def fit(self, steps, config):
        assert self.gate.wait(20), "the test never opened the training gate"
        return super().fit(steps, config)


class DroppingSilo(SiloClient):
    """A silo that crashes (no BYE, heartbeats stop) at a chosen point of the secure round."""

    def __init__(self, *args, drop_at: str, **kw) -> None:
        super().__init__(*args, **kw)
        self.drop_at = drop_at  # "before_masked": after sharing keys; "after_masked": before answering unmask

    async def _secagg_step(self, round_id, st, body):
        if (self.drop_at, body.step) in (("before_masked", "shares"), ("after_masked", "survivors")):
            asyncio.get_running_loop().create_task(self.stop(say_bye=False))
            return
        await super()._secagg_step(round_id, st, body)


def _deltas(trainers, start):
    """Each fake silo's round-1 update (its state after training minus the round's global adapter)."""
    return [{k: t.state[k] - start[k] for k in start} for t in trainers]


def _fedavg(start, deltas, examples):
    """The plain FedAvg of the same updates, through the same strategy code as the plain path."""
    strategy = make_strategy("fedavg")
    acc = strategy.start_round(1, start)
    for i, (d, n) in enumerate(zip(deltas, examples)):
        acc.add(f"s{i}", d, n)
    return strategy.finish_round(1, start, acc, [])


async def _secure_round(tmp_path, drop: dict[int, str] | None = None, **fed):
    start = initial_state()
    gate = threading.Event()
    trainers = [GatedTrainer(i, gate, examples=n) for i, n in enumerate(EXAMPLES)]

    def make_silo(settings, trainer):
        kind = (drop or {}).get(trainers.index(trainer))
        return DroppingSilo(settings, trainer, drop_at=kind) if kind else SiloClient(settings, trainer)

    async with federation(tmp_path, trainers, initial=start, silo_cls=make_silo, rounds=1, min_silos=2,
                          secure_aggregation=True, silo_timeout_s=1.0, max_silo_share=1.0, **fed) as (coord, silos):
        # No silo finishes training before all three are online: a silo that connects after the round started is
        # picked up while the round still collects keys, so all three take part.
        await wait_for(lambda: len(coord.online()) == 3)
        gate.set()
        await coord.wait_done(25)
    return coord, silos, trainers, start


def _close(a, b, tol):
    return all(float((a[k] - b[k]).abs().max()) <= tol for k in a)


async def test_secure_round_equals_plain_fedavg_and_coordinator_sees_only_masked_vectors(tmp_path):
    coord, silos, trainers, start = await _secure_round(tmp_path)
    assert coord.phase == "done" and coord.history[-1]["participants"] == ["s0", "s1", "s2"]
    assert coord.history[-1]["secure_aggregation"] is True and coord.history[-1]["examples"] == sum(EXAMPLES)
    # The global update equals the plain example-weighted FedAvg of the same updates within quantisation error.
    expected = _fedavg(start, _deltas(trainers, start), EXAMPLES)
    assert _close(coord.global_state, expected, 1e-6)
    assert not _close(coord.global_state, start, 1e-3)  # and it did move
    # What the coordinator received is masked: not any silo's quantised (weighted) update, not even close.
    received = coord.secure_inputs[1]
    assert sorted(received) == ["s0", "s1", "s2"]
    config = secagg.SecAggConfig(threshold=2)
    for silo in silos:
        update = silo.secure_masked_update
        plain = secagg._quantise(update, secagg.flat_layout(update), config, 3)
        for got in received.values():
            words = np.frombuffer(got, dtype="<u4")
            assert words.shape == plain.shape
            assert np.mean(words == plain) < 0.01


async def test_silo_dropping_after_its_masked_input_is_still_in_the_sum(tmp_path):
    # s2's masked vector arrives, then it dies before the unmask step: s0 and s1 (threshold 2) rebuild its self-mask
    # seed from their shares, so the sum covers all three updates.
    coord, _, trainers, start = await _secure_round(tmp_path, drop={2: "after_masked"})
    assert coord.phase == "done" and coord.history[-1]["participants"] == ["s0", "s1", "s2"]
    expected = _fedavg(start, _deltas(trainers, start), EXAMPLES)
    assert _close(coord.global_state, expected, 1e-6)


async def test_silo_dropping_before_its_masked_input_is_excluded_and_its_masks_removed(tmp_path):
    # s2 shared keys (so s0 and s1 folded pairwise masks with it into their vectors), then died before masking:
    # the sum covers s0 and s1 only; s2's pairwise masks are removed with its key seed rebuilt from their shares.
    coord, _, trainers, start = await _secure_round(tmp_path, drop={2: "before_masked"})
    record = coord.history[-1]
    assert coord.phase == "done" and record["participants"] == ["s0", "s1"] and record["failures"] == ["s2"]
    expected = _fedavg(start, _deltas(trainers[:2], start), EXAMPLES[:2])
    assert _close(coord.global_state, expected, 1e-6)


@pytest.mark.parametrize("fed", [{"strategy": "median"}, {"strategy": "krum"}, {"strategy": "trimmed_mean"},
                                 {"strategy": "fedavg", "dp_mode": "central"},
                                 {"strategy": "fedavg", "strategy_params": {"clip_norm": 1.0}}])
def test_secure_aggregation_refuses_strategies_that_need_individual_updates(tmp_path, fed):
    settings = fed_settings(tmp_path, plaintext=True, secure_aggregation=True, **fed)
    with pytest.raises(ConfigError, match="secure aggregation"):
        build_strategy(settings.federation)
    # The coordinator refuses it too, whoever built the strategy.
    plain_strategy = build_strategy(fed_settings(tmp_path / "p", plaintext=True, **fed).federation)
    with pytest.raises(ConfigError, match="secure aggregation"):
        Coordinator(settings, plain_strategy, initial_state=initial_state(), exporter=False)


async def test_secure_rounds_over_curve_with_enrolled_names_and_a_server_optimiser(curve_homes):
    # Silos are known by their enrolled names (ZAP), which the secure round must use for its roster.
    trainers = [FakeTrainer(i) for i in range(3)]
    async with federation(None, trainers, curve=curve_homes, rounds=2, min_silos=3, secure_aggregation=True,
                          strategy="fedadam") as (coord, silos):
        await coord.wait_done(25)
    assert coord.phase == "done"
    assert [r["participants"] for r in coord.history] == [["alpha", "beta", "gamma"]] * 2
    assert all(r["secure_aggregation"] and r["bytes_in"] > 0 for r in coord.history)
    assert sorted(coord.secure_inputs) == [2] and all(s.rounds_done == [1, 2] for s in silos)  # the last round's only
    assert coord.strategy.state_dict()  # FedAdam's moments were updated from the secure mean
