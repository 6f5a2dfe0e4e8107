"""`appliance sim silos N` and the shapes behind it: real silo agents over CURVE against the real coordinator."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fedllm.appliance.cli import app
from fedllm.federation.demo import simulate as sim


def test_lora_shapes_from_a_config_match_the_known_parameter_counts():
    embedded = sim.lora_shapes(sim.EMBEDDED_CONFIG, 8, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert sim.parameter_count(embedded) == 921_600 and len(embedded) == 240  # peft's count on the real model
    assert embedded["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] == (192, 8)  # 3 kv heads x 64
    big, _ = sim.preset_shapes("7b")
    assert sim.parameter_count(big) == 39_976_960  # Llama-2-7B r=16 on all linear layers: ~40M


def test_sim_silos_runs_rounds_and_reports_them(tmp_path):
    report = tmp_path / "report.json"
    r = CliRunner().invoke(app, ["--home", str(tmp_path / "user"), "sim", "silos", "6", "--rounds", "2",
                                 "--sim-dir", str(tmp_path / "sim"), "--report", str(report)])
    assert r.exit_code == 0, r.output
    result = json.loads(report.read_text())
    assert [row["participants"] for row in result["rounds"]] == [6, 6]
    assert result["parameters"] == 921_600 and result["peak_rss_bytes"] > 0
    assert "6 silos" in r.output and "peak resident memory" in r.output


def test_sim_silos_refuses_bad_options_by_name(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["--home", str(tmp_path), "sim", "silos", "3", "--adapter", "70b"])
    assert r.exit_code != 0 and "--adapter must be one of embedded, 7b" in r.output
    r = runner.invoke(app, ["--home", str(tmp_path), "sim", "silos", "3", "--part", "silos"])
    assert r.exit_code != 0 and "needs --sim-dir" in r.output
