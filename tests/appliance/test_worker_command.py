"""`appliance worker start|join` input errors (the real runs are in tests/integration)."""

from __future__ import annotations

from typer.testing import CliRunner

from fedllm.appliance.cli import app


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


def test_worker_join_takes_no_token_on_the_command_line(tmp_path):
    # `ps` shows command lines: the join token comes from a file or the environment only.
    on_argv = CliRunner().invoke(app, ["--home", str(tmp_path), "worker", "join", "--router", "http://127.0.0.1:1",
                                       "--token", "secret", "--url", "http://127.0.0.1:1"])
    without = CliRunner().invoke(app, ["--home", str(tmp_path), "worker", "join", "--router", "http://127.0.0.1:1",
                                       "--url", "http://127.0.0.1:1"], env={"APPLIANCE_JOIN_TOKEN": ""})
    empty = tmp_path / "token"
    empty.write_text("\n")
    empty_file = CliRunner().invoke(app, ["--home", str(tmp_path), "worker", "join", "--router", "http://127.0.0.1:1",
                                          "--token-file", str(empty), "--url", "http://127.0.0.1:1"])
    assert on_argv.exit_code == 2 and "--token" in on_argv.output
    assert without.exit_code == 2 and "APPLIANCE_JOIN_TOKEN" in without.output
    assert empty_file.exit_code == 2 and "is empty" in " ".join(empty_file.output.split())


def test_worker_start_refuses_a_public_bind_without_an_api_key(tmp_path):
    result = CliRunner().invoke(app, ["--home", str(tmp_path), "worker", "start", "--host", "0.0.0.0", "--port", "1"],
                                env={"VLLM_API_KEY": ""})
    assert result.exit_code == 2 and "without an API key" in " ".join(result.output.split())


def test_worker_join_of_a_running_worker_needs_its_api_key(tmp_path):
    # The router refuses a worker without a key: joining a running one without it fails here, before any call.
    result = CliRunner().invoke(app, ["--home", str(tmp_path), "worker", "join", "--router", "http://127.0.0.1:1",
                                      "--url", "http://127.0.0.1:1"],
                                env={"APPLIANCE_JOIN_TOKEN": "join-token-0123456789", "VLLM_API_KEY": ""})
    assert result.exit_code == 2 and "worker API key is needed" in result.output
