"""`appliance sim geo` end to end (serving part; the federation part is the same GeoFederation as test_federation)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from appliance.cli import app

pytestmark = pytest.mark.slow  # starts a router and two joined workers


def test_sim_geo_runs_a_fleet_across_regions_and_survives_a_cut(tmp_path):
    result = CliRunner().invoke(app, ["--home", str(tmp_path / "home"), "sim", "geo", "--regions", "eu:5ms,us:40ms/50mbit",
                                      "--duration-s", "4", "--cut", "us", "--rounds", "0", "--out", str(tmp_path / "sim")])
    assert result.exit_code == 0, result.output
    assert "cut us off" in result.output and "us restored and re-admitted" in result.output
    table = result.output[result.output.index("client region"):]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:3]}
    assert set(rows) == {"eu", "us"} and all(int(row[1]) > 0 for row in rows.values())
    assert "served by: worker-eu" in result.output


def test_sim_geo_refuses_a_bad_region_list(tmp_path):
    result = CliRunner().invoke(app, ["--home", str(tmp_path), "sim", "geo", "--regions", "eu"])
    assert result.exit_code == 2 and "expected NAME:" in result.output
