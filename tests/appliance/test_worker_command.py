"""`appliance worker start|join` input errors (the real runs are in tests/integration)."""

from __future__ import annotations

from typer.testing import CliRunner

from appliance.cli import app


def test_worker_start_with_an_unknown_model_exits_2_naming_it(tmp_path):
    result = CliRunner().invoke(app, ["--home", str(tmp_path), "worker", "start", "--model", "no-such-model", "--port", "1"])
    assert result.exit_code == 2
    assert "unknown model 'no-such-model'" in " ".join(result.output.split())


def test_worker_start_with_an_unknown_device_exits_2(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    result = CliRunner().invoke(app, ["--home", str(tmp_path), "worker", "start", "--model", str(model), "--device", "tpu"])
    assert result.exit_code == 2 and "tpu" in result.output


def test_worker_join_needs_router_and_token(tmp_path):
    result = CliRunner().invoke(app, ["--home", str(tmp_path), "worker", "join", "--url", "http://127.0.0.1:1"])
    assert result.exit_code == 2 and "--router" in result.output
