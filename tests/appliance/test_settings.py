"""Settings: source order, nested env, field-naming errors, placeholder secrets, and `config show` masking."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from fedllm.appliance.cli import app
from fedllm.core.errors import ConfigError
from fedllm.core.settings import load_settings, redacted_dump


def test_yaml_then_env_then_overrides(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"serve": {"port": 9001, "policy": "round_robin"}, "worker": {"count": 3}}))

    assert load_settings(cfg).serve.port == 9001
    monkeypatch.setenv("APPLIANCE_SERVE__PORT", "9002")
    s = load_settings(cfg)
    assert (s.serve.port, s.serve.policy, s.worker.count) == (9002, "round_robin", 3)  # env wins only where set
    assert load_settings(cfg, {"serve": {"port": 9003}}).serve.port == 9003


def test_config_file_from_env_and_from_home(tmp_path, monkeypatch, isolated_home):
    isolated_home.mkdir()
    (isolated_home / "config.yaml").write_text("model: from-home\n")
    assert load_settings().model == "from-home"
    other = tmp_path / "other.yaml"
    other.write_text("model: from-env-file\n")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(other))
    assert load_settings().model == "from-env-file"


def test_nested_env_and_home(monkeypatch, isolated_home):
    monkeypatch.setenv("APPLIANCE_WORKER__BASE_PORT", "8200")
    monkeypatch.setenv("APPLIANCE_WORKER__KV_CACHE_GIB", "1")
    s = load_settings()
    assert (s.worker.base_port, s.worker.kv_cache_gib) == (8200, 1.0)
    assert s.home == isolated_home and s.logs_dir == isolated_home / "logs" and s.keys_dir == isolated_home / "keys"


@pytest.mark.parametrize("env, field", [
    ({"APPLIANCE_SERVE__PORT": "not-a-port"}, "port"),
    ({"APPLIANCE_WORKER__BASE_PORT": "70000"}, "base_port"),
    ({"APPLIANCE_ENV": "staging"}, "env"),
])
def test_invalid_values_name_the_field(monkeypatch, env, field):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=field):
        load_settings()


def test_unknown_yaml_keys_and_bad_yaml_are_refused(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("modle: x\n")
    with pytest.raises(ConfigError, match="modle"):
        load_settings(bad_key)
    bad_key.write_text("worker:\n  base_prot: 1\n")
    with pytest.raises(ConfigError, match="base_prot"):
        load_settings(bad_key)
    broken = tmp_path / "b.yaml"
    broken.write_text("serve: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")


def test_placeholder_secrets_are_refused_in_prod_only():
    overrides = {"serve": {"admin_token": "changeme", "api_keys": ["a-real-long-key", "password"]}}
    assert load_settings(overrides=overrides).serve.admin_token.get_secret_value() == "changeme"  # dev: allowed
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={"env": "prod", **overrides})
    assert "serve.admin_token" in str(info.value) and "serve.api_keys[1]" in str(info.value)
    assert "serve.api_keys[0]" not in str(info.value)
    load_settings(overrides={"env": "prod", "serve": {"admin_token": "x7Gv9-a-real-token"}})


def test_redacted_dump_masks_every_secret():
    s = load_settings(overrides={"serve": {"admin_token": "tok-123456", "api_keys": ["key-abcdef"]}})
    dump = redacted_dump(s)
    assert dump["serve"]["admin_token"] == "**********" and dump["serve"]["api_keys"] == ["**********"]
    assert dump["serve"]["join_token"] is None or dump["serve"]["join_token"] == ""


def test_config_show_masks_secrets(monkeypatch, tmp_path):
    monkeypatch.setenv("APPLIANCE_SERVE__ADMIN_TOKEN", "super-secret-admin-value")
    monkeypatch.setenv("APPLIANCE_SERVE__PORT", "9123")

    result = CliRunner().invoke(app, ["--home", str(tmp_path / "h"), "config", "show"])

    assert result.exit_code == 0, result.output
    assert "super-secret-admin-value" not in result.output
    shown = yaml.safe_load(result.output)
    assert shown["serve"]["port"] == 9123 and shown["serve"]["admin_token"] == "**********"
    assert shown["home"] == str(tmp_path / "h")


def test_config_show_with_a_bad_value_exits_2_naming_it(monkeypatch):
    monkeypatch.setenv("APPLIANCE_SERVE__PORT", "nope")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 2
    assert "port" in result.output


def test_the_strategy_names_of_the_settings_are_those_the_federation_builds():
    from fedllm.core.sections.federation import STRATEGY_NAMES
    from fedllm.federation.aggregation.strategies import STRATEGY_NAMES as BUILT

    assert set(STRATEGY_NAMES) == set(BUILT)
