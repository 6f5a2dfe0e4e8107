"""Issue 19: what bounds a silo under the default settings, what a silo's own policy enforces, and the coordinator's
message bounds; real ZeroMQ sockets on 127.0.0.1, the pure-tensor fake trainer."""

from __future__ import annotations

import asyncio
import math

import torch

from fedllm.federation.wire import frames as wire
from fedllm.federation.wire.keys import remove_silo
from fedllm.federation.wire.protocol import Hello, MsgType, SecAggStep, make_header
from fedllm.federation.runtime.silo import SiloClient
from fedllm.federation.aggregation.strategies import global_norm
from fedllm.federation.wire.transport import ClientTransport
from tests.federation.conftest import FakeTrainer, federation, initial_state, wait_for


class Times1000(FakeTrainer):
    """Trains like the fake trainer, then sends 1000x that update."""

    def fit(self, steps, config):
        start = {k: v.clone() for k, v in self.state.items()}
        n, metrics = super().fit(steps, config)
        self.state = {k: start[k] + 1000 * (self.state[k] - start[k]) for k in start}
        return n, metrics


class LyingSilo(SiloClient):
    """A real silo whose UPDATEs (and secure advertisements) claim 10**12 examples."""

    async def _send(self, header, payload=None, *, tensors=None):
        if header.type == MsgType.UPDATE:
            header = header.model_copy(update={"body": {**header.body, "num_examples": 10**12}})
        return await super()._send(header, payload, tensors=tensors)

    async def _send_step(self, round_id, step, data, tensors=None):
        if step == "advertise":
            data = {**data, "num_examples": 10**12}
        await super()._send_step(round_id, step, data, tensors)


def _change(a, b) -> float:
    return math.sqrt(sum(float(torch.sum((a[k] - b[k]) ** 2)) for k in a))


def _hostile(trainers):
    return lambda s, t: (LyingSilo if t is trainers[2] else SiloClient)(s, t)


async def test_by_default_an_outsized_update_is_clipped_to_a_multiple_of_the_median_and_named(tmp_path):
    # Arrange: default bounds; s2 claims 10**12 examples and sends 1000x its update
    init = initial_state()
    trainers = [FakeTrainer(0), FakeTrainer(1), Times1000(2)]
    async with federation(tmp_path, trainers, initial=init, rounds=1, min_silos=3, silo_cls=_hostile(trainers)) as (coord, _):
        await coord.wait_done(20)
    record = coord.history[-1]
    # Assert: the bound is 3x the median (s1's) norm; s2 is clipped to it and named with what it sent
    norms = record["update_norms"]
    assert record["norm_bound"] == 3 * sorted(norms.values())[1] == 3 * norms["s1"]
    assert set(record["clipped"]) == {"s2"} and record["clipped"]["s2"]["norm"] == norms["s2"] > 500 * norms["s1"]
    assert record["clipped"]["s2"]["clipped_to"] == record["norm_bound"]
    # the global moved by at most the bound: 0.25 s0 + 0.25 s1 + 0.5 x (s2 clipped to 3x s1's norm)
    assert _change(coord.global_state, init) <= record["norm_bound"] * (1 + 1e-5)
    assert coord.phase == "done" and record["participants"] == ["s0", "s1", "s2"]


async def test_an_explicit_max_update_norm_still_wins(tmp_path):
    trainers = [FakeTrainer(0), FakeTrainer(1), Times1000(2)]
    async with federation(tmp_path, trainers, rounds=1, min_silos=2, max_update_norm=5.0) as (coord, silos):
        await coord.wait_done(20)
    record = coord.history[-1]
    assert record["rejected"] == {"s2": "norm"} and record["norm_bound"] == 5.0 and record["clipped"] == {}
    assert silos[2].last_error["code"] == "norm"


async def test_the_floor_keeps_a_round_of_tiny_updates_from_clipping_a_normal_one(tmp_path):
    # Arrange: two silos that barely move and one normal one; the lower median is tiny
    class Tiny(FakeTrainer):
        def fit(self, steps, config):
            start = {k: v.clone() for k, v in self.state.items()}
            n, m = super().fit(steps, config)
            self.state = {k: start[k] + 1e-6 * (self.state[k] - start[k]) for k in start}
            return n, m

    trainers = [Tiny(0), Tiny(1), FakeTrainer(2)]
    async with federation(tmp_path, trainers, rounds=1, min_silos=3, update_norm_floor=10.0) as (coord, _):
        await coord.wait_done(20)
    record = coord.history[-1]
    assert record["norm_bound"] == 10.0 and record["clipped"] == {}


async def test_under_secure_aggregation_silos_clip_to_the_issued_bound_before_masking(tmp_path):
    # Arrange: secure aggregation with defaults; s2's trainer produces 1000x updates, its silo software is honest
    init = initial_state()
    trainers = [FakeTrainer(0), FakeTrainer(1), Times1000(2)]
    async with federation(tmp_path, trainers, initial=init, rounds=1, min_silos=3, secure_aggregation=True,
                          secagg_clip_range=100.0, silo_cls=_hostile(trainers)) as (coord, silos):
        await coord.wait_done(30)
    record = coord.history[-1]
    # Assert: the coordinator issued the bound (3x the median advertised norm); s2 masked an update clipped to it
    assert coord.phase == "done" and record["secure_aggregation"] and record["participants"] == ["s0", "s1", "s2"]
    bound = record["norm_bound"]
    assert bound == 3 * sorted(record["update_norms"].values())[1]
    masked_norm = global_norm(silos[2].secure_masked_update) / record["shares"]["s2"]  # it pre-scaled by its weight
    assert masked_norm <= bound * (1 + 1e-5) < record["update_norms"]["s2"] / 100
    assert _change(coord.global_state, init) <= bound * 1.01


class SkipsTheClip(LyingSilo):
    """A hostile secure silo: drops the issued bound (does not clip) and claims 10**12 examples."""

    async def _secagg_step(self, round_id, st, body):
        if body.step == "roster":
            body = SecAggStep(step="roster", data={**body.data, "norm_bound": None})
        await super()._secagg_step(round_id, st, body)


async def test_a_secure_silo_that_skips_its_clip_fails_the_round_instead_of_moving_the_global(tmp_path):
    init = initial_state()
    trainers = [FakeTrainer(0), FakeTrainer(1), Times1000(2)]
    async with federation(tmp_path, trainers, initial=init, rounds=1, min_silos=3, secure_aggregation=True,
                          secagg_clip_range=100.0,
                          silo_cls=lambda s, t: (SkipsTheClip if t is trainers[2] else SiloClient)(s, t)) as (coord, _):
        await coord.wait_done(60)
    # Assert: every try failed on the aggregate's norm; the global adapter never moved
    assert coord.phase == "failed" and coord.round == 0
    assert all(r["failed"].startswith("aggregate rejected") and "norm" in r["failed"] for r in coord.history)
    assert all(torch.equal(coord.global_state[k], init[k]) for k in init)


async def test_a_silo_removed_after_it_answered_is_dropped_from_the_round(curve_homes):
    # Arrange: alpha answers at once; beta and gamma take a while
    coord_home, _, _ = curve_homes
    init = initial_state()
    trainers = [FakeTrainer(0), FakeTrainer(1), FakeTrainer(2)]
    trainers[1].fit_delay_s = trainers[2].fit_delay_s = 1.5
    async with federation(None, trainers, curve=curve_homes, initial=init, rounds=1, min_silos=2,
                          heartbeat_interval_s=10.0, silo_timeout_s=30.0) as (coord, _):
        await wait_for(lambda: coord.current is not None and "alpha" in coord.current.answered, 20)
        # Act: the operator removes alpha while its update waits for the others
        from fedllm.testing.factories import make_settings

        assert remove_silo(make_settings(coord_home).keys_dir, "alpha")
        await coord.wait_done(30)
    record = coord.history[-1]
    # Assert: alpha's update is not in the aggregate, and the record says why
    assert record["participants"] == ["beta", "gamma"] and record["dropped"] == ["alpha"]
    assert record["rejected"] == {"alpha": "not_enrolled"}
    expected = {k: init[k] + ((trainers[1].state[k] - init[k]) + (trainers[2].state[k] - init[k])) / 2 for k in init}
    for k in init:
        torch.testing.assert_close(coord.global_state[k], expected[k], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------- silo policy
async def test_a_silo_that_requires_dp_refuses_a_train_without_it_and_sends_nothing(tmp_path, caplog):
    trainers = [FakeTrainer(0), FakeTrainer(1), FakeTrainer(2)]

    def make(settings, trainer):
        if trainer is trainers[2]:
            fed = settings.federation.model_copy(update={"silo_require_dp": True, "silo_min_noise_multiplier": 0.5})
            settings = settings.model_copy(update={"federation": fed})
        return SiloClient(settings, trainer)

    with caplog.at_level("ERROR"):
        async with federation(tmp_path, trainers, rounds=1, min_silos=2, silo_cls=make) as (coord, silos):
            await coord.wait_done(20)
    record = coord.history[-1]
    # Assert: s2 never trained nor sent an update; the coordinator recorded its refusal and logged which policy
    assert record["participants"] == ["s0", "s1"] and record["rejected"] == {"s2": "silo_policy"}
    assert trainers[2].calls == [] and silos[2].sent_frames == [] and silos[2].rounds_done == []
    assert "silo_require_dp" in silos[2].policy_refusals[0]
    assert any("refused round 1 by its own policy" in r.getMessage() and "silo_require_dp" in r.getMessage()
               for r in caplog.records)


async def test_a_silo_refuses_a_noise_multiplier_below_its_floor(tmp_path):
    trainers = [FakeTrainer(0), FakeTrainer(1)]

    def make(settings, trainer):
        if trainer is trainers[1]:
            fed = settings.federation.model_copy(update={"silo_require_dp": True, "silo_min_noise_multiplier": 1.0})
            settings = settings.model_copy(update={"federation": fed})
        return SiloClient(settings, trainer)

    async with federation(tmp_path, trainers, rounds=1, min_silos=1, dp_mode="silo", dp_noise_multiplier=0.3,
                          silo_cls=make) as (coord, silos):
        await coord.wait_done(20)
    assert coord.history[-1]["rejected"] == {"s1": "silo_policy"} and trainers[1].calls == []
    assert "at least 1.0" in silos[1].policy_refusals[0] and "0.3" in silos[1].policy_refusals[0]


async def test_a_silo_that_requires_secure_aggregation_takes_part_only_in_secure_rounds(tmp_path):
    trainers = [FakeTrainer(0), FakeTrainer(1), FakeTrainer(2)]

    def make(settings, trainer):
        fed = settings.federation.model_copy(update={"silo_require_secagg": True})
        return SiloClient(settings.model_copy(update={"federation": fed}), trainer)

    async with federation(tmp_path / "plain", trainers, rounds=1, min_silos=1, start_timeout_s=1.0,
                          silo_cls=make) as (plain, silos):
        await plain.wait_done(30)
    assert plain.phase == "failed" and all(t.calls == [] for t in trainers)
    assert all(s.sent_frames == [] and "silo_require_secagg" in s.policy_refusals[0] for s in silos)
    async with federation(tmp_path / "secure", trainers, rounds=1, min_silos=3, secure_aggregation=True,
                          silo_cls=make) as (secure, silos):
        await secure.wait_done(30)
    assert secure.phase == "done" and secure.history[-1]["participants"] == ["s0", "s1", "s2"]


# ------------------------------------------------------------------------------------------------------ message bounds
async def test_the_message_bound_follows_the_adapter_and_the_receive_queue_is_bounded(tmp_path):
    import zmq

    async with federation(tmp_path, [], rounds=1, min_silos=1) as (coord, _):
        sock = coord.sessions.transport.socket
        # the tiny adapter (512 bytes in fp32): 1 MiB + 4 x 512 bytes, not 256 MiB
        assert coord.message_limit == (1 << 20) + 4 * 512
        assert sock.getsockopt(zmq.MAXMSGSIZE) == 2 * coord.message_limit
        assert sock.getsockopt(zmq.RCVHWM) == coord.cfg.receive_hwm == 64
    async with federation(tmp_path / "explicit", [], rounds=1, min_silos=1, max_message_bytes=5000) as (coord, _):
        assert coord.message_limit == 5000


async def test_an_oversized_secure_aggregation_message_is_refused_by_name_before_decoding(tmp_path, monkeypatch):
    # Arrange: a raw silo sends a SECAGG message with a 1.5 MiB payload (over the bound, under the socket's wall)
    from safetensors import torch as st_torch

    loads: list[int] = []
    real_load = st_torch.load
    monkeypatch.setattr(st_torch, "load", lambda data: loads.append(len(data)) or real_load(data))
    errors: list[dict] = []
    async with federation(tmp_path, [FakeTrainer(0)], rounds=1, min_silos=2, secure_aggregation=True,
                          secagg_threshold=2) as (coord, _):
        evil = ClientTransport(coord.address, server_key=None, keypair=None, plaintext=True)
        evil.connect()
        try:
            await evil.send(wire.encode(make_header(MsgType.HELLO, Hello(), silo_id="evil")))
            while not errors:
                header = wire.decode_header(await evil.recv(timeout_s=20))
                if header.type == MsgType.TRAIN:
                    big = {"masked": torch.zeros(3 << 17, dtype=torch.int32)}  # 1.5 MiB
                    step = make_header(MsgType.SECAGG, SecAggStep(step="masked"), round_id=header.round_id, silo_id="evil")
                    await evil.send(wire.encode(step, big))
                elif header.type == MsgType.ERROR:
                    errors.append(header.body)
        finally:
            evil.close()
    # Assert: refused as oversized, naming the limit; no payload was decoded at the coordinator
    assert errors[0]["code"] == "oversized" and str(coord.message_limit) in errors[0]["message"], errors
    assert all(n < (1 << 20) for n in loads)  # only the small TRAIN payloads the honest silo decoded


# ------------------------------------------------------------------------------------------------------- state on disk
async def test_only_the_newest_checkpoints_are_kept_and_state_json_stays_bounded(tmp_path):
    import json

    from fedllm.core.adapter_registry import AdapterRegistry
    from fedllm.testing.exporters import write_exporter

    async with federation(tmp_path, [FakeTrainer(0), FakeTrainer(1)], exporter=write_exporter, rounds=6,
                          min_silos=2) as (coord, _):
        await coord.wait_done(30)
    rounds = sorted(p.name for p in (coord.run_dir / "rounds").iterdir())
    # Assert: the default keeps 3 round checkpoints, every registered version stays, no staging folder is left
    assert rounds == ["000004", "000005", "000006"]
    assert AdapterRegistry(coord.settings.adapters_dir).versions("testrun") == [1, 2, 3, 4, 5, 6]
    assert not list(coord.run_dir.glob(".export.*")) and not list((coord.run_dir / "rounds").glob(".staging.*"))
    # state.json holds the round's own record, not the history (which is rounds.jsonl)
    state = json.loads((coord.run_dir / "rounds" / "000006" / "state.json").read_text())
    assert "history" not in state and state["record"]["round"] == 6
    assert [r["round"] for r in coord.history] == [1, 2, 3, 4, 5, 6]


async def test_a_restart_restores_the_history_from_the_round_log(tmp_path):
    async with federation(tmp_path, [FakeTrainer(0), FakeTrainer(1)], rounds=4, min_silos=2, keep_checkpoints=1) as (coord, _):
        await coord.wait_done(30)
    assert sorted(p.name for p in (coord.run_dir / "rounds").iterdir()) == ["000004"]
    async with federation(tmp_path, [], rounds=4, min_silos=2) as (coord2, _):
        await coord2.wait_done(20)
    assert coord2.round == 4 and [r["round"] for r in coord2.history] == [1, 2, 3, 4]


def test_a_malformed_enrolment_fails_closed_until_fixed(tmp_path, caplog):
    from fedllm.federation.wire.keys import ENROLLED_FILE, Enrolment, enroll_silo, ensure_keypair, federation_keys_dir
    from fedllm.testing.factories import make_settings

    keys_dir = make_settings(tmp_path).keys_dir
    key = ensure_keypair(make_settings(tmp_path / "a").keys_dir, "silo").public
    enroll_silo(keys_dir, "a", key)
    enrolment = Enrolment(keys_dir)
    assert enrolment.name_of(key) == "a"
    path = federation_keys_dir(keys_dir) / ENROLLED_FILE
    good = path.read_text()
    for broken in ('{"a": ', '["a"]', '{"a": {"num_examples": 5}}'):
        path.write_text(broken)
        with caplog.at_level("ERROR", logger="fedllm.federation.wire.keys"):
            caplog.clear()
            # Assert: nobody is enrolled while the file is broken, and it is said once, with the path
            assert enrolment.name_of(key) is None and enrolment.names() == set()
            assert enrolment.name_of(key) is None
        said = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
        assert len(said) == 1 and "no silo is accepted" in said[0], (broken, said)
    path.write_text(good)
    assert enrolment.name_of(key) == "a"


async def test_plaintext_is_refused_beyond_loopback(tmp_path):
    import pytest

    from fedllm.core.errors import ConfigError

    with pytest.raises(ConfigError, match="plaintext.*loopback"):
        async with federation(tmp_path, [], rounds=1, min_silos=1, bind_host="0.0.0.0"):
            pass
    from tests.federation.conftest import silo_settings

    with pytest.raises(ConfigError, match="plaintext.*loopback"):
        SiloClient(silo_settings(tmp_path / "s", "tcp://10.0.0.9:5555", "s", plaintext=True), FakeTrainer(0))


def test_coordinator_start_refuses_plaintext_on_a_public_bind(tmp_path):
    from typer.testing import CliRunner

    from fedllm.appliance.cli import app

    result = CliRunner().invoke(app, ["--home", str(tmp_path), "coordinator", "start", "--plaintext", "--host",
                                      "0.0.0.0", "--port", "0"])
    assert result.exit_code == 2 and "loopback" in result.output, result.output


def test_enroll_without_a_declared_count_says_what_bounds_the_silo(tmp_path):
    from typer.testing import CliRunner

    from fedllm.appliance.cli import app
    from fedllm.federation.wire.keys import ensure_keypair
    from fedllm.testing.factories import make_settings

    key = ensure_keypair(make_settings(tmp_path / "s").keys_dir, "silo").public
    bare = CliRunner().invoke(app, ["--home", str(tmp_path / "c"), "federation", "enroll", "--", "a", key])
    assert bare.exit_code == 0 and "no --examples declared" in bare.output and "max_silo_share" in bare.output
    counted = CliRunner().invoke(app, ["--home", str(tmp_path / "c"), "federation", "enroll", "--examples", "50", "--", "a", key])
    assert counted.exit_code == 0 and "no --examples" not in counted.output
