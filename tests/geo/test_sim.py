"""`appliance sim geo` end to end: the fleet under load with a region cut, then one federation round."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fedllm.appliance.cli import app

pytestmark = pytest.mark.slow  # starts a router, two joined workers, a coordinator and two silos


def test_sim_geo_runs_a_fleet_and_a_federation_across_regions_and_survives_a_cut(tmp_path, tiny_model_dir):
    # The model: the tiny Llama by path (APPLIANCE_MODEL may name a model folder)
    result = CliRunner().invoke(app, ["--home", str(tmp_path / "home"), "sim", "geo", "--regions", "eu:5ms,us:40ms/50mbit",
                                      "--duration-s", "4", "--cut", "us", "--rounds", "1", "--out", str(tmp_path / "sim")],
                                env={"APPLIANCE_MODEL": str(tiny_model_dir)})
    assert result.exit_code == 0, result.output
    assert "cut us off" in result.output and "us restored and re-admitted" in result.output
    table = result.output[result.output.index("client region"):]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:3]}
    assert set(rows) == {"eu", "us"} and all(int(row[1]) > 0 for row in rows.values())
    assert "served by: worker-eu" in result.output
    # the federation part: one round with a silo per region, and where each silo's time went
    assert "round 1 done:" in result.output
    federation = result.output[result.output.index("participants"):]
    assert federation.splitlines()[1].split()[0] == "1"
    silos = federation[federation.index("silo (round 1)"):].splitlines()[1:3]
    assert sorted(line.split()[0].rsplit("-", 1)[1] for line in silos) == ["eu", "us"]


def test_sim_geo_refuses_a_bad_region_list(tmp_path):
    result = CliRunner().invoke(app, ["--home", str(tmp_path), "sim", "geo", "--regions", "eu"])
    assert result.exit_code == 2 and "expected NAME:" in result.output
