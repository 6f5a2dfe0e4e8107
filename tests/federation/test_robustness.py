"""Dropouts, coordinator restarts, unenrolled keys and bad updates, over real sockets."""

from __future__ import annotations

import asyncio
import json
import logging

import torch

from fedllm.federation.wire import frames as wire
from fedllm.federation.wire.payload import encode_payload
from fedllm.federation.runtime.checkpoint import load_latest
from fedllm.federation.runtime.coordinator import Coordinator
from fedllm.federation.wire.protocol import Hello, MsgType, UpdateResult, make_header
from fedllm.federation.aggregation.strategies import make_strategy
from fedllm.federation.wire.transport import ClientTransport
from tests.federation.conftest import SHAPES, FakeTrainer, fed_settings, federation, initial_state, wait_for


async def test_killed_silo_round_completes_with_the_rest(tmp_path):
    # Arrange: three silos, one slow; min_silos=2
    trainers = [FakeTrainer(0), FakeTrainer(1), FakeTrainer(2)]
    trainers[2].fit_delay_s = 3.0
    async with federation(tmp_path, trainers, rounds=1, min_silos=2) as (coord, silos):
        await wait_for(lambda: coord.current is not None and len(trainers[2].calls) == 1)
        # Act: the slow silo dies mid-round, without a BYE
        await silos[2].stop(say_bye=False)
        await coord.wait_done(20)
    # Assert
    assert coord.phase == "done"
    assert coord.history[-1]["participants"] == ["s0", "s1"]
    assert coord.history[-1]["failures"] == ["s2"]


async def test_round_fails_cleanly_below_min_silos(tmp_path, caplog):
    # Arrange: min_silos=3, one of three silos dies mid-round
    trainers = [FakeTrainer(0), FakeTrainer(1), FakeTrainer(2)]
    trainers[2].fit_delay_s = 3.0
    async with federation(tmp_path, trainers, rounds=1, min_silos=3, start_timeout_s=0.5) as (coord, silos):
        before = {k: v.clone() for k, v in coord.global_state.items()}
        with caplog.at_level(logging.ERROR, logger="fedllm.federation.runtime.round_runner"):
            await wait_for(lambda: len(trainers[2].calls) == 1)
            await silos[2].stop(say_bye=False)
            await coord.wait_done(20)
    # Assert: the run stops as failed, with the reason logged, and the global adapter untouched
    assert coord.phase == "failed" and coord.round == 0
    assert any("round 1 failed" in r.getMessage() and "min_silos=3" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(before[k], coord.global_state[k]) for k in before)
    assert load_latest(coord.run_dir) is None


async def test_restarted_coordinator_resumes_with_identical_state(tmp_path):
    # Arrange: FedAdam (server optimiser state) on a fixed ipc endpoint, so silos can reconnect to the new process
    endpoint = f"ipc://{tmp_path}/coord.sock"
    settings = fed_settings(tmp_path / "c", plaintext=True, rounds=4, min_silos=2, bind_address=endpoint)
    async with federation(tmp_path, [FakeTrainer(0), FakeTrainer(1)], strategy=make_strategy("fedadam"), rounds=4,
                          min_silos=2, bind_address=endpoint) as (coord, silos):
        await wait_for(lambda: coord.round >= 2, 20)
        # Act: kill the coordinator (no graceful end of the round), then start a new one on the same home
        await coord.stop()
        ckpt = load_latest(coord.run_dir)
        strategy2 = make_strategy("fedadam")
        coord2 = Coordinator(settings, strategy2, initial_state=initial_state(seed=99), exporter=False)
        await coord2.start()
        # Assert: it resumes after the last checkpointed round with the checkpoint's exact state
        assert coord2.round == ckpt.round_id >= 2
        assert all(torch.equal(coord2.global_state[k], ckpt.global_state[k]) for k in ckpt.global_state)
        s1, s2 = strategy2.state_dict(), ckpt.strategy_state
        assert s1.keys() == s2.keys() and s1 and all(torch.equal(s1[k], s2[k]) for k in s1)
        assert [r["round"] for r in coord2.history] == list(range(1, ckpt.round_id + 1))
        try:
            await coord2.wait_done(30)
        finally:
            await coord2.stop()
        assert coord2.phase == "done" and [r["round"] for r in coord2.history] == [1, 2, 3, 4]
        assert all(4 in s.rounds_done for s in silos)


async def test_bad_updates_get_error_and_round_continues(tmp_path):
    # Arrange: two honest silos and a raw client that answers each TRAIN with a different bad update
    good = {k: torch.zeros(s) for k, s in SHAPES.items()}
    first = next(iter(SHAPES))
    bad_updates = {
        1: ("bad_shape", {**good, first: torch.zeros(3, 3)}, 0),
        2: ("non_finite", {**good, first: torch.full(SHAPES[first], float("nan"))}, 0),
        3: ("oversized", {**good, "padding": torch.zeros(1 << 19)}, 0),
        4: ("stale_round", good, -1),
    }
    errors: dict[int, str] = {}

    async def play_evil(evil):
        await evil.send(wire.encode(make_header(MsgType.HELLO, Hello(), silo_id="evil")))
        while len(errors) < 4:
            frames = await evil.recv(timeout_s=20)
            header = wire.decode_header(frames)
            if header.type == MsgType.TRAIN:
                _code, tensors, shift = bad_updates[header.round_id]
                encoded = encode_payload(tensors, "fp32")
                body = UpdateResult(num_examples=5, encoding=encoded.meta)
                await evil.send(encoded.frames(make_header(MsgType.UPDATE, body, round_id=header.round_id + shift, silo_id="evil")))
                current = header.round_id
            elif header.type == MsgType.ERROR:
                errors[current] = header.body["code"]

    async with federation(tmp_path, [FakeTrainer(0), FakeTrainer(1)], rounds=4, min_silos=2, silo_timeout_s=1.0) as (coord, _):
        evil = ClientTransport(coord.address, server_key=None, keypair=None, plaintext=True)
        evil.connect()
        try:
            # Act
            await asyncio.wait_for(play_evil(evil), 40)
            await coord.wait_done(30)
        finally:
            evil.close()
    # Assert
    assert errors == {r: code for r, (code, _, _) in bad_updates.items()}
    assert coord.phase == "done"
    assert [r["participants"] for r in coord.history] == [["s0", "s1"]] * 4
    assert all(torch.isfinite(v).all() for v in coord.global_state.values())


class _FailingTrainer(FakeTrainer):
    def fit(self, steps, config):
        raise RuntimeError(f"disk full writing /srv/hospital/private/notes.jsonl line 3: {self.data[0]['text']}")


async def test_silo_training_failure_is_reported_as_a_code_and_round_goes_on(tmp_path):
    # Arrange: a long deadline, so only the silo's ERROR can end its wait
    trainers = [FakeTrainer(0), FakeTrainer(1), _FailingTrainer(2)]
    async with federation(tmp_path, trainers, rounds=1, min_silos=2, round_deadline_s=600, silo_timeout_s=600) as (coord, _):
        # Act
        await coord.wait_done(30)
    # Assert: the failure travels and is recorded as a code; the exception text (a path, a row) stays at the silo
    record = coord.history[-1]
    assert record["participants"] == ["s0", "s1"] and record["failures"] == ["s2"]
    assert record["rejected"] == {"s2": "train_failed"}
    document = json.dumps(coord.status())
    assert "/srv/hospital" not in document and "PATIENT" not in document and "disk full" not in document
