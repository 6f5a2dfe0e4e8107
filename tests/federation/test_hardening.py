"""Every silo is untrusted: counts, metrics, shapes, enrolment and errors at the coordinator, over real ZeroMQ sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys

import httpx
import pytest
import torch
from typer.testing import CliRunner

from fedllm.federation.wire import compression, frames as wire
from fedllm.federation.wire.payload import encode_payload
from fedllm.federation.wire.keys import enroll_silo, ensure_keypair
from fedllm.federation.wire.protocol import Hello, MsgType, UpdateResult, make_header
from fedllm.federation.runtime.silo import SiloClient
from fedllm.federation.aggregation.strategies import make_strategy
from fedllm.federation.wire.transport import ClientTransport
from fedllm.testing.factories import make_settings
from tests.federation.conftest import SHAPES, FakeTrainer, federation, initial_state, silo_settings, wait_for


class LyingSilo(SiloClient):
    """A real silo whose UPDATEs claim `claim` examples, whatever it trained on."""

    claim = 10**12

    async def _send(self, header, tensors=None):
        if header.type == MsgType.UPDATE:
            header = header.model_copy(update={"body": {**header.body, "num_examples": self.claim}})
        return await super()._send(header, tensors)


def _weighted(init, trainers, weights):
    return {k: init[k] + sum((t.state[k] - init[k]) * w for t, w in zip(trainers, weights)) / sum(weights) for k in init}


async def test_a_silo_cannot_outweigh_its_share_of_a_round(tmp_path):
    # Arrange: s2 claims 10^12 examples; the others 10 each; by default no silo weighs more than half of a round
    init = initial_state()
    trainers = [FakeTrainer(0, examples=10), FakeTrainer(1, examples=10), FakeTrainer(2, examples=10)]
    async with federation(tmp_path, trainers, initial=init, rounds=1, min_silos=3,
                          silo_cls=lambda s, t: (LyingSilo if t is trainers[2] else SiloClient)(s, t)) as (coord, _):
        await coord.wait_done(20)
    # Assert: s2 gets exactly the cap (1/2), the honest two share the rest equally
    assert coord.phase == "done" and coord.history[-1]["participants"] == ["s0", "s1", "s2"]
    assert coord.history[-1]["shares"] == {"s0": 0.25, "s1": 0.25, "s2": 0.5}
    expected = _weighted(init, trainers, [0.25, 0.25, 0.5])
    for k in init:
        torch.testing.assert_close(coord.global_state[k], expected[k], rtol=1e-5, atol=1e-6)


async def test_the_count_declared_at_enrolment_bounds_what_a_round_claims(curve_homes):
    # Arrange: gamma was enrolled declaring 10 examples, then claims 10^12 in its round; no share cap
    coord_home, _, silo_homes = curve_homes
    gamma_key = ensure_keypair(make_settings(silo_homes["gamma"]).keys_dir, "silo").public
    enroll_silo(make_settings(coord_home).keys_dir, "gamma", gamma_key, num_examples=10)
    init = initial_state()
    trainers = [FakeTrainer(0, examples=10), FakeTrainer(1, examples=30), FakeTrainer(2, examples=10)]
    async with federation(None, trainers, curve=curve_homes, initial=init, rounds=1, min_silos=3, max_silo_share=1.0,
                          silo_cls=lambda s, t: (LyingSilo if t is trainers[2] else SiloClient)(s, t)) as (coord, _):
        await coord.wait_done(20)
    # Assert: weights 10, 30, 10
    expected = _weighted(init, trainers, [10, 30, 10])
    for k in init:
        torch.testing.assert_close(coord.global_state[k], expected[k], rtol=1e-5, atol=1e-6)


async def test_a_huge_example_count_is_refused_and_the_global_stays_finite(curve_homes):
    # Arrange: gamma claims 10^40 examples (float32 overflows at 3.4e38)
    class HugeClaim(LyingSilo):
        claim = 10**40

    trainers = [FakeTrainer(0), FakeTrainer(1), FakeTrainer(2)]
    async with federation(None, trainers, curve=curve_homes, rounds=1, min_silos=2,
                          silo_cls=lambda s, t: (HugeClaim if t is trainers[2] else SiloClient)(s, t)) as (coord, silos):
        await coord.wait_done(20)
    # Assert
    assert coord.phase == "done" and coord.history[-1]["participants"] == ["alpha", "beta"]
    assert coord.history[-1]["rejected"] == {"gamma": "malformed"}
    assert all(bool(torch.isfinite(v).all()) for v in coord.global_state.values())
    assert silos[2].last_error["code"] == "malformed"


class _StillTrainer(FakeTrainer):
    """Sends a zero update: with FedAdam at tau=0 the server step is 0/0."""

    def fit(self, steps, config):
        self.calls.append({"steps": steps})
        return self.examples, {"train_loss": 1.0}


async def test_a_non_finite_aggregate_fails_the_round_and_is_never_registered(tmp_path):
    from fedllm.core.adapter_registry import AdapterRegistry
    from fedllm.federation.runtime.checkpoint import load_latest
    from fedllm.testing.exporters import write_exporter

    init = initial_state()
    strategy = make_strategy("fedadam", tau=0.0)
    async with federation(tmp_path, [_StillTrainer(0), _StillTrainer(1)], strategy=strategy, initial=init,
                          exporter=write_exporter, rounds=1, min_silos=2) as (coord, _):
        await coord.wait_done(30)
    # Assert: every try failed with the reason recorded; the previous global kept; nothing checkpointed or registered
    assert coord.phase == "failed" and coord.round == 0
    assert coord.history and all("non_finite" in r["failed"] for r in coord.history)
    assert all(torch.equal(coord.global_state[k], init[k]) for k in init)
    assert load_latest(coord.run_dir) is None
    assert AdapterRegistry(coord.settings.adapters_dir).versions("testrun") == []
    assert strategy.state_dict() == {}  # the server optimiser's moments were rolled back


async def test_an_aggregate_beyond_the_norm_bound_fails_the_round(tmp_path):
    init = initial_state()
    async with federation(tmp_path, [FakeTrainer(0), FakeTrainer(1)], initial=init, rounds=1, min_silos=2,
                          max_aggregate_norm=1e-6) as (coord, _):
        await coord.wait_done(30)
    assert coord.phase == "failed" and all(r["failed"].startswith("aggregate rejected") and "norm" in r["failed"]
                                           for r in coord.history)
    assert all(torch.equal(coord.global_state[k], init[k]) for k in init)


class _StringMetricSilo(SiloClient):
    """A real silo that advertises a text metric in a secure round."""

    async def _send_step(self, round_id, step, data, tensors=None):
        if step == "advertise":
            data = {**data, "metrics": {"train_loss": "the patient in bed 4"}}
        await super()._send_step(round_id, step, data, tensors)


async def test_secure_round_refuses_a_text_metric_and_completes(tmp_path):
    trainers = [FakeTrainer(0), FakeTrainer(1), FakeTrainer(2)]
    async with federation(tmp_path, trainers, rounds=2, min_silos=2, secure_aggregation=True, silo_timeout_s=1.0,
                          silo_cls=lambda s, t: (_StringMetricSilo if t is trainers[2] else SiloClient)(s, t)) as (coord, silos):
        await coord.wait_done(30)
    assert coord.phase == "done"
    assert [r["participants"] for r in coord.history] == [["s0", "s1"]] * 2
    assert all(r["rejected"] == {"s2": "bad_metrics"} for r in coord.history)
    assert all(isinstance(v, float) for r in coord.history for v in r["metrics"].values())
    assert silos[2].last_error["code"] == "bad_metrics"
    assert list(coord.secure_inputs) == [2]  # per-round secure state is not kept past the next round


class _Zeros:
    """torch, but `zeros` records how many elements each call allocates."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def zeros(self, *shape, **kw):
        self.sizes.append(math.prod(shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape))
        return torch.zeros(*shape, **kw)


async def test_topk_metadata_cannot_make_the_coordinator_allocate(tmp_path, monkeypatch):
    # Arrange: a raw silo sends a top-k update whose metadata declares a 4096 x 4096 tensor (64 MiB dense)
    spy = _Zeros()
    monkeypatch.setattr(compression, "torch", spy)
    adapter_numel = sum(math.prod(s) for s in SHAPES.values())
    first = next(iter(SHAPES))
    codes: list[str] = []
    async with federation(tmp_path, [FakeTrainer(0, examples=10)], rounds=1, min_silos=2, silo_timeout_s=2.0) as (coord, _):
        evil = ClientTransport(coord.address, server_key=None, keypair=None, plaintext=True)
        evil.connect()
        try:
            await evil.send(wire.encode(make_header(MsgType.HELLO, Hello(), silo_id="evil")))
            while not codes:
                header = wire.decode_header(await evil.recv(timeout_s=20))
                if header.type == MsgType.TRAIN:
                    good = {k: torch.zeros(s) for k, s in SHAPES.items()}
                    encoded = encode_payload(good, "topk")
                    encoded.meta["shapes"][first] = [4096, 4096]
                    body = UpdateResult(num_examples=5, encoding=encoded.meta)
                    await evil.send(encoded.frames(make_header(MsgType.UPDATE, body, round_id=header.round_id, silo_id="evil")))
                elif header.type == MsgType.ERROR:
                    codes.append(header.body["code"])
        finally:
            evil.close()
    # Assert: refused on the declared shape, before anything was decoded
    assert codes == ["bad_shape"]
    assert max(spy.sizes, default=0) <= adapter_numel


async def test_a_second_update_does_not_fail_the_accepted_one(tmp_path):
    slow = FakeTrainer(0)
    slow.fit_delay_s = 1.0  # keeps the round open while the raw silo answers twice
    codes: list[str] = []
    async with federation(tmp_path, [slow], rounds=1, min_silos=2) as (coord, _):
        evil = ClientTransport(coord.address, server_key=None, keypair=None, plaintext=True)
        evil.connect()
        try:
            await evil.send(wire.encode(make_header(MsgType.HELLO, Hello(), silo_id="twice")))
            while True:
                header = wire.decode_header(await evil.recv(timeout_s=20))
                if header.type == MsgType.TRAIN:
                    encoded = encode_payload({k: torch.zeros(s) for k, s in SHAPES.items()}, "fp32")
                    update = make_header(MsgType.UPDATE, UpdateResult(num_examples=5, encoding=encoded.meta),
                                         round_id=header.round_id, silo_id="twice")
                    await evil.send(encoded.frames(update))
                    await evil.send(encoded.frames(update))
                elif header.type == MsgType.ERROR:
                    codes.append(header.body["code"])
                    break
            await coord.wait_done(20)
        finally:
            evil.close()
    assert codes == ["duplicate"]
    assert coord.history[-1]["participants"] == ["s0", "twice"] and coord.history[-1]["failures"] == []


async def test_a_removed_silo_loses_its_session_at_once(curve_homes):
    from fedllm.appliance.cli import app

    coord_home, _, _ = curve_homes
    trainers = [FakeTrainer(0), FakeTrainer(1), FakeTrainer(2)]
    for t in trainers:
        t.fit_delay_s = 0.3
    async with federation(None, trainers, curve=curve_homes, rounds=4, min_silos=2, silo_timeout_s=30.0,
                          heartbeat_interval_s=10.0) as (coord, silos):
        await wait_for(lambda: coord.round >= 1, 20)
        # Act: the operator removes gamma while rounds run (heartbeats are 10 s apart: only the enrolment check acts)
        result = CliRunner().invoke(app, ["--home", str(coord_home), "federation", "remove", "gamma"])
        assert result.exit_code == 0 and "removed silo gamma" in result.output
        removed_at = coord.round
        await asyncio.wait_for(silos[2].finished.wait(), 5)
        gamma = next(s for s in coord.status()["silos"] if s["id"] == "gamma")
        await coord.wait_done(30)
    # Assert: gamma was told, shown offline at once, and took part in no later round
    assert "enrol" in silos[2].refused  # told by BYE "removed" or by ERROR not_enrolled, whichever came first
    assert gamma["online"] is False
    later = [r for r in coord.history if r["round"] > removed_at + 1]
    assert later and all("gamma" not in r["participants"] for r in later)
    again = CliRunner().invoke(app, ["--home", str(coord_home), "federation", "remove", "gamma"])
    assert again.exit_code == 2


async def test_status_needs_the_status_token_beyond_loopback(curve_homes):
    from fedllm.core.tokens import coordinator_status_token, router_admin_token

    # CURVE: plaintext is refused beyond loopback
    async with federation(None, [], curve=curve_homes, rounds=1, min_silos=1, bind_host="0.0.0.0") as (coord, _):
        token = coordinator_status_token(coord.settings)
        router_token = router_admin_token(coord.settings)
        async with httpx.AsyncClient() as client:
            anonymous = await client.get(coord.status_url)
            wrong = await client.get(coord.status_url, headers={"Authorization": "Bearer nope"})
            routers = await client.get(coord.status_url, headers={"Authorization": f"Bearer {router_token}"})
            admin = await client.get(coord.status_url, headers={"Authorization": f"Bearer {token}"})
            health = await client.get(coord.status_url.replace("/status", "/health"))
        # the CLI sends the stored admin token (in a thread: this loop serves the coordinator)
        from fedllm.appliance.cli import app

        home = coord.settings.home
        shown = await asyncio.to_thread(CliRunner().invoke, app, ["--home", str(home), "federation", "status", "--url", coord.status_url])
    assert shown.exit_code == 0 and "run testrun" in shown.output
    assert anonymous.status_code == 401 and wrong.status_code == 401 and "status token" in anonymous.text
    assert token != router_token and routers.status_code == 401  # the router's admin token does not open it
    assert admin.status_code == 200 and admin.json()["run"] == "testrun"
    assert health.status_code == 200


async def test_status_on_loopback_stays_open(tmp_path):
    async with federation(tmp_path, [], rounds=1, min_silos=1) as (coord, _):
        async with httpx.AsyncClient() as client:
            assert (await client.get(coord.status_url)).status_code == 200


async def test_a_refused_key_is_reported_within_seconds(curve_homes, tmp_path):
    # Arrange: a silo with a key nobody enrolled, which even claims an enrolled name
    stranger_home = tmp_path / "stranger"
    stranger_key = ensure_keypair(make_settings(stranger_home).keys_dir, "silo").public
    async with federation(None, [FakeTrainer(0)], curve=curve_homes, rounds=1, min_silos=3) as (coord, members):
        stranger = SiloClient(silo_settings(stranger_home, coord.address, "beta", curve_homes[1].public), FakeTrainer(9))
        await stranger.start()
        try:
            # Act / Assert: the handshake's refusal reaches the silo, which says which key and what to run
            await asyncio.wait_for(stranger.finished.wait(), 10)
            await asyncio.wait_for(members[0].welcomed.wait(), 10)
        finally:
            await stranger.stop(say_bye=False)
        assert [s["id"] for s in coord.status()["silos"]] == ["alpha"]  # the stranger never became "beta"
    assert not stranger.welcomed.is_set()
    assert stranger_key in stranger.refused and f"appliance federation enroll beta {stranger_key}" in stranger.refused


@pytest.mark.slow
async def test_silo_join_with_a_refused_key_exits_non_zero(curve_homes, tmp_path):
    stranger_home = tmp_path / "stranger"
    settings = make_settings(stranger_home)
    stranger_key = ensure_keypair(settings.keys_dir, "silo").public
    (settings.models_dir / settings.model).mkdir(parents=True)  # never loaded: the silo is refused first
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    async with federation(None, [], curve=curve_homes, rounds=1, min_silos=3) as (coord, _):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fedllm.appliance", "--home", str(stranger_home), "silo", "join", "--coordinator", coord.address,
            "--coordinator-key", curve_homes[1].public, "--data", str(data), "--name", "stranger",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
    text = out.decode()
    assert proc.returncode == 1, text
    assert stranger_key in text and "appliance federation enroll stranger" in text


def test_a_failed_run_exits_non_zero(tmp_path, monkeypatch):
    # The coordinator gives up after 3 rounds without silos; `appliance up` restarts only a child that exits non-zero.
    from fedllm import train
    from fedllm.appliance.cli import app

    settings = make_settings(tmp_path)
    (settings.models_dir / settings.model).mkdir(parents=True)
    monkeypatch.setattr(train, "initial_adapter_state", lambda *a, **k: initial_state())  # no base model to load
    for key, value in {"START_TIMEOUT_S": "0.1", "STATUS_PORT": "0", "AUTO_PUBLISH": "false"}.items():
        monkeypatch.setenv(f"APPLIANCE_FEDERATION__{key}", value)
    result = CliRunner().invoke(app, ["--home", str(tmp_path), "coordinator", "start", "--plaintext", "--port", "0",
                                      "--min-silos", "1", "--rounds", "1"])
    assert result.exit_code == 1, result.output


def test_an_unknown_local_optimizer_is_refused_by_name(tmp_path):
    from fedllm.appliance.cli import app

    result = CliRunner().invoke(app, ["--home", str(tmp_path), "coordinator", "start", "--plaintext", "--port", "0",
                                      "--local-optimizer", "sometimes"])
    assert result.exit_code != 0 and "local_optimizer" in result.output and "keep" in result.output, result.output


def test_enrolment_keeps_the_declared_count_and_follows_the_file(tmp_path):
    from fedllm.federation.wire.keys import Enrolment, declared_examples, enrolled_silos, remove_silo

    keys_dir = make_settings(tmp_path).keys_dir
    a, b = (ensure_keypair(make_settings(tmp_path / n).keys_dir, "silo").public for n in ("a", "b"))
    enroll_silo(keys_dir, "a", a)
    enrolment = Enrolment(keys_dir)
    enroll_silo(keys_dir, "b", b, num_examples=120)
    assert enrolled_silos(keys_dir) == {"a": a, "b": b} and declared_examples(keys_dir) == {"b": 120}
    assert enrolment.name_of(b) == "b" and enrolment.declared_examples("b") == 120  # re-read on change
    assert remove_silo(keys_dir, "b") and enrolment.name_of(b) is None and enrolment.names() == {"a"}


class _TwiceSilo(SiloClient):
    """A real silo that sends every secure-aggregation step twice."""

    async def _send_step(self, round_id, step, data, tensors=None):
        await super()._send_step(round_id, step, data, tensors)
        await super()._send_step(round_id, step, data, tensors)


async def test_a_repeated_secure_step_does_not_fail_the_silo(tmp_path, caplog):
    trainers = [FakeTrainer(0), FakeTrainer(1), FakeTrainer(2)]
    with caplog.at_level(logging.WARNING, logger="fedllm.federation.runtime.silo"):
        async with federation(tmp_path, trainers, rounds=1, min_silos=3, secure_aggregation=True,
                              silo_cls=lambda s, t: (_TwiceSilo if t is trainers[2] else SiloClient)(s, t)) as (coord, silos):
            await coord.wait_done(30)
    record = coord.history[-1]
    assert coord.phase == "done" and record["participants"] == ["s0", "s1", "s2"] and record["rejected"] == {}
    # Each repeat is refused as a duplicate; the repeat of the last step may arrive after the round closed, and is
    # then refused as stale instead (which of the two comes last depends on timing).
    refused = [r.getMessage() for r in caplog.records if "coordinator refused our message" in r.getMessage()]
    assert any("'code': 'duplicate'" in m for m in refused)
    assert all("'code': 'duplicate'" in m or "'code': 'stale_round'" in m for m in refused), refused
    assert silos[2].last_error["code"] in ("duplicate", "stale_round")
