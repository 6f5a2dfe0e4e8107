"""What a silo sends (only the manifest's tensors), compression on the wire, and the CLI commands."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fedllm.federation.wire import frames as wire
from fedllm.federation.wire.payload import decode_payload
from fedllm.federation.wire.protocol import MsgType
from tests.federation.conftest import SHAPES, FakeTrainer, federation


async def test_update_payload_holds_only_the_manifest_tensors(tmp_path):
    # Arrange: a trainer whose private rows hold a patient record and which reports text from them in its metrics;
    # int8 compression on the wire
    secret = "PATIENT Jane Roe, MRN 00471123"
    trainer = FakeTrainer(0, data=[{"text": f"{secret} was admitted"}, {"text": "second row"}])
    async with federation(tmp_path, [trainer], rounds=1, min_silos=1, compression="int8") as (coord, silos):
        await coord.wait_done(20)
    # Act
    frames = silos[0].sent_frames
    header = wire.decode_header(frames)
    tensors = wire.decode_payload(header, frames)  # as sent: the encoded tensors
    update = decode_payload(header, frames)
    # Assert: the trainer did see the secret and reported it; none of it left the silo
    assert secret in trainer.fit(1, {})[1]["sample"]
    assert header.type == MsgType.UPDATE and len(frames) == 2
    assert {t.name for t in header.manifest} == set(tensors)
    assert set(update) == set(SHAPES) and all(tuple(update[k].shape) == SHAPES[k] for k in SHAPES)
    assert all(secret.encode() not in f and b"PATIENT" not in f and b"MRN" not in f for f in frames)
    timings = {"train_s", "received_at", "sent_at"}  # numbers only (round timings)
    clock = {"clock_offset_s", "clock_rtt_s"}  # numbers, or null before the first heartbeat echo came back
    assert set(header.body) == {"num_examples", "metrics", "encoding"} | timings | clock
    assert all(isinstance(header.body[k], (int, float)) for k in timings)
    assert all(header.body[k] is None or isinstance(header.body[k], (int, float)) for k in clock)
    # the text metric was dropped; received_eval_loss: its held-out loss of the global it received (a number)
    assert set(header.body["metrics"]) == {"train_loss", "note_len", "received_eval_loss"}
    assert "PATIENT" not in json.dumps(coord.status())
    # the update travelled int8-quantised
    assert header.body["encoding"]["method"] == "int8" and any(t.dtype == "int8" for t in header.manifest)


def test_cli_init_enroll_keygen_and_status(tmp_path):
    from fedllm.appliance.cli import app

    runner = CliRunner()
    coord_home, silo_home = tmp_path / "coord", tmp_path / "silo"
    # Act / Assert: keys
    r = runner.invoke(app, ["--home", str(coord_home), "federation", "init"])
    assert r.exit_code == 0 and "coordinator public key:" in r.output
    coord_key = r.output.split("coordinator public key:")[1].split()[0]
    r2 = runner.invoke(app, ["--home", str(coord_home), "federation", "init"])
    assert coord_key in r2.output  # idempotent
    r = runner.invoke(app, ["--home", str(silo_home), "silo", "keygen"])
    assert r.exit_code == 0
    silo_key = r.output.split("silo public key:")[1].split()[0]
    assert len(silo_key) == 40 and silo_key != coord_key
    r = runner.invoke(app, ["--home", str(coord_home), "federation", "enroll", "--", "hospital-a", silo_key])
    assert r.exit_code == 0 and "enrolled silo hospital-a" in r.output
    enrolled = json.loads((coord_home / "keys" / "federation" / "enrolled.json").read_text())
    assert enrolled == {"hospital-a": silo_key}
    # a Z85 key may start with "-": after `--` it is the key, not an option (1 key in 85 does)
    import zmq

    dash_key = next(k for k in (zmq.curve_keypair()[0].decode() for _ in range(100_000)) if k.startswith("-"))
    r = runner.invoke(app, ["--home", str(coord_home), "federation", "enroll", "--", "hospital-d", dash_key])
    assert r.exit_code == 0, r.output
    assert json.loads((coord_home / "keys" / "federation" / "enrolled.json").read_text())["hospital-d"] == dash_key
    secret_file = coord_home / "keys" / "federation" / "coordinator.key_secret"
    assert secret_file.stat().st_mode & 0o077 == 0
    # bad input exits 2
    r = runner.invoke(app, ["--home", str(coord_home), "federation", "enroll", "bad name!", silo_key])
    assert r.exit_code == 2
    r = runner.invoke(app, ["--home", str(coord_home), "federation", "enroll", "b", "short"])
    assert r.exit_code == 2
    # status of a coordinator that is not running: a clear failure
    from fedllm.testing.factories import free_port

    r = runner.invoke(app, ["--home", str(coord_home), "federation", "status", "--url", f"http://127.0.0.1:{free_port()}/status"])
    assert r.exit_code == 1 and "unavailable" in r.output


async def test_status_endpoint_and_report(tmp_path):
    import httpx

    from fedllm.federation.runtime.report import format_status

    async with federation(tmp_path, [FakeTrainer(0)], rounds=2, min_silos=1) as (coord, _):
        await coord.wait_done(20)
        async with httpx.AsyncClient() as client:
            doc = (await client.get(coord.status_url)).json()
    assert doc["run"] == "testrun" and doc["phase"] == "done" and doc["rounds_total"] == 2
    assert [s["id"] for s in doc["silos"]] == ["s0"] and doc["silos"][0]["rounds"] == 2
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert {"participants", "metrics", "per_silo", "bytes_in", "bytes_out", "duration_s", "epsilon", "adapter"} <= set(doc["rounds"][0])
    text = format_status(doc)
    assert "s0" in text and "done" in text


def test_keygen_prints_a_key_with_brackets_intact(tmp_path, monkeypatch):
    """Z85 keys contain '[' and ']': printed through rich markup, '[...]' vanished and operators copied a wrong key."""
    import zmq

    from fedllm.appliance.cli import app

    bracketed = (b"ab[cd]ef" + b"x" * 32, b"s" * 40)
    monkeypatch.setattr(zmq, "curve_keypair", lambda: bracketed)
    r = CliRunner().invoke(app, ["--home", str(tmp_path), "silo", "keygen"])
    assert r.exit_code == 0, r.output
    assert "ab[cd]ef" + "x" * 32 in r.output
