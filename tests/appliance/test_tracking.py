"""Run tracking: training runs and federation rounds write TensorBoard event files (read back with tensorboard's own
event reader) and, with `tracking.mlflow_uri`, log to a real local MLflow server (read back with MLflow's client)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from fedllm.core.sections.tracking import TrackingSettings
from fedllm.core.contracts.tracking import Tracker, flatten, scalars
from fedllm.testing.factories import free_port, make_settings
from tests.train.conftest import arithmetic_records, write_jsonl


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files under `tb_dir`, as tensorboard's EventAccumulator reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_flatten_and_scalars_keep_what_each_backend_accepts() -> None:
    assert flatten({"train": {"lora_r": 8, "target_modules": ["q_proj"]}, "model": None}) == {
        "train.lora_r": "8", "train.target_modules": "['q_proj']", "model": "None"}
    assert scalars({"loss": 1.5, "steps": 3, "ok": True, "note": "x", "bad": float("nan"), "eps": None}) == {"loss": 1.5, "steps": 3.0}


def test_tracker_writes_tensorboard_scalars(tmp_path: Path) -> None:
    with Tracker(TrackingSettings(), tmp_path / "tb", run_name="t", params={"lr": 0.1}) as tracker:
        tracker.log({"loss": 2.0, "note": "skipped"}, 1)
        tracker.log({"loss": 1.0}, 2)

    assert read_scalars(tmp_path / "tb") == {"loss": [(1, 2.0), (2, 1.0)]}


def test_a_training_run_writes_tensorboard_events(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedllm.train.runs import start_run

    settings = make_settings(tmp_path / "home", train={"max_seq_len": 64, "batch_size": 2, "zero_stage": 0, "warmup_steps": 0})
    outcome = start_run(settings, write_jsonl(tmp_path / "d.jsonl", arithmetic_records(4)), model=str(tiny_model_dir), max_steps=3)

    series = read_scalars(outcome.run_dir / "tb")
    lines = [json.loads(line) for line in (outcome.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert series["loss"] == [(r["step"], pytest.approx(r["loss"])) for r in lines if "loss" in r]
    assert [s for s, _ in series["lr"]] == [1, 2, 3]
    assert series["final/train_loss"] == [(3, pytest.approx(outcome.result.metrics["train_loss"]))]


async def test_federation_rounds_write_tensorboard_events(tmp_path: Path) -> None:
    from tests.federation.conftest import FakeTrainer, federation

    async with federation(tmp_path, [FakeTrainer(0), FakeTrainer(1)], rounds=2, min_silos=2) as (coord, _):
        await coord.wait_done(30)

    series = read_scalars(tmp_path / "c" / "federation" / "testrun" / "tb")
    assert series["participants"] == [(1, 2.0), (2, 2.0)]
    assert [s for s, _ in series["train_loss"]] == [1, 2]
    assert series["silo/s1/train_loss"] == [(1, 0.5), (2, 0.5)]  # FakeTrainer(1) reports 1 / (1 + 1)
    assert [s for s, _ in series["bytes_in"]] == [1, 2] and all(v > 0 for _, v in series["bytes_in"])


# ---------------------------------------------------------------- MLflow, a real server in its own virtualenv


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """`mlflow server` on 127.0.0.1 with its SQLite store in a temp folder; yields (uri, venv)."""
    from fedllm.testing.tool_venvs import tool_venv

    venv = tool_venv("mlflow", "mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([str(venv / "bin" / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--default-artifact-root", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri, venv
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        log.close()


def mlflow_runs(venv: Path, uri: str, experiment: str) -> dict[str, dict]:
    """The experiment's runs as MLflow's own client sees them: {run name: {status, params, metrics: {key: [(step, value)]}}}."""
    script = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
exp = client.get_experiment_by_name(sys.argv[2])
out = {}
for run in client.search_runs([exp.experiment_id]):
    metrics = {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}
    out[run.info.run_name] = {"status": run.info.status, "params": run.data.params, "metrics": metrics}
print(json.dumps(out))
"""
    done = subprocess.run([str(venv / "bin" / "python"), "-c", script, uri, experiment], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
async def test_training_and_federation_log_to_a_real_mlflow_server(mlflow_server, tiny_model_dir: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    import asyncio

    from tests.federation.conftest import FakeTrainer, federation
    from fedllm.train.runs import start_run

    uri, venv = mlflow_server
    settings = make_settings(tmp_path / "home", train={"max_seq_len": 64, "batch_size": 2, "zero_stage": 0},
                             tracking={"mlflow_uri": uri, "mlflow_experiment": "appliance-test", "mlflow_timeout_s": 120})
    outcome = await asyncio.to_thread(start_run, settings, write_jsonl(tmp_path / "d.jsonl", arithmetic_records(4)),
                                      model=str(tiny_model_dir), max_steps=2)
    monkeypatch.setenv("APPLIANCE_TRACKING__MLFLOW_URI", uri)
    monkeypatch.setenv("APPLIANCE_TRACKING__MLFLOW_EXPERIMENT", "appliance-test")
    monkeypatch.setenv("APPLIANCE_TRACKING__MLFLOW_TIMEOUT_S", "120")
    async with federation(tmp_path, [FakeTrainer(0), FakeTrainer(1)], rounds=2, min_silos=2) as (coord, _):
        await coord.wait_done(30)

    runs = await asyncio.to_thread(mlflow_runs, venv, uri, "appliance-test")
    train_run = runs[f"train-{outcome.run_id}"]
    assert train_run["status"] == "FINISHED"
    assert train_run["params"]["train.lora_r"] == str(settings.train.lora_r) and train_run["params"]["max_steps"] == "2"
    assert [s for s, _ in train_run["metrics"]["loss"]] == [1, 2]
    assert train_run["metrics"]["final/train_loss"] == [[2, pytest.approx(outcome.result.metrics["train_loss"])]]
    fed_run = runs["federation-testrun"]
    assert fed_run["status"] == "FINISHED" and fed_run["params"]["federation.rounds"] == "2"
    assert fed_run["metrics"]["participants"] == [[1, 2.0], [2, 2.0]]


def test_an_unreachable_mlflow_server_does_not_stop_the_work(tmp_path: Path, caplog) -> None:
    cfg = TrackingSettings(mlflow_uri=f"http://127.0.0.1:{free_port()}", mlflow_timeout_s=2)

    with Tracker(cfg, tmp_path / "tb", run_name="t") as tracker:
        tracker.log({"loss": 1.0}, 1)

    assert read_scalars(tmp_path / "tb") == {"loss": [(1, 1.0)]}
    assert "MLflow tracking stopped for this run: start failed" in caplog.text
