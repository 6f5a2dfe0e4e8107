"""The demo's wiring on the tiny model (the real run on SmolLM2 is `appliance demo federation`), and its data."""

from __future__ import annotations

import math
import json
import math
from pathlib import Path

import pytest

from fedllm.federation.demo.demo import DEMO_FEDERATION, DemoResult, run_demo
from fedllm.federation.demo.data import generate
from fedllm.testing.factories import make_settings


def test_recovered_share_is_the_share_of_the_centralized_gain():
    from fedllm.federation.demo.demo import recovered_share

    losses = {"base": {"a": 4.0, "b": 2.0}, "centralized": {"a": 2.0, "b": 2.0}, "federated": {"a": 2.5, "b": 1.0}}
    shares = recovered_share(losses, ["a", "b"], "federated")
    assert shares["a"] == 0.75 and math.isnan(shares["b"])  # no centralized gain on b: undefined, not a division by 0


def test_second_bundled_set_shares_facts_across_registers_and_sizes():
    from fedllm.federation.demo.data import generate_registers

    data = generate_registers()
    assert [len(d["train"]) for d in data.values()] == [40, 20, 10] and generate_registers() == data
    facts = [{r["messages"][1]["content"].split(" ", 6)[-1][:30] for r in d["train"]} for d in data.values()]
    assert all(len(f) == 10 for f in facts)
    styles = [d["train"][0]["messages"][1]["content"][:8] for d in data.values()]
    assert len(set(styles)) == 3


def test_demo_data_is_deterministic_and_org_specific():
    a, b = generate(seed=0), generate(seed=0)
    assert a == b and generate(seed=1) != a
    assert set(a) == {"northbridge", "lakeside", "redwood"}
    for org, splits in a.items():
        answers = {r["messages"][1]["content"] for r in splits["train"]}
        assert {r["messages"][1]["content"] for r in splits["eval"]} <= answers  # eval asks known facts, new wording
        assert not {r["messages"][0]["content"] for r in splits["eval"]} & {r["messages"][0]["content"] for r in splits["train"]}
        others = {r["messages"][1]["content"] for o, s in a.items() if o != org for r in s["train"]}
        assert not answers & others  # knowledge the other silos lack


@pytest.mark.slow  # ~25 engine calls (7 fits, 18 evals): ~30 s quiet, ~100 s on a busy 2-core box
def test_demo_runs_end_to_end_on_the_tiny_model(tmp_path: Path, tiny_model_dir: Path):
    lines: list[str] = []
    result = run_demo(make_settings(tmp_path / "home"), rounds=1, local_steps=1, out_dir=tmp_path / "demo",
                      echo=lines.append, model_dir=tiny_model_dir)
    assert isinstance(result, DemoResult)
    assert set(result.losses) == {"base", "local:northbridge", "local:lakeside", "local:redwood", "federated", "centralized"}
    assert all(set(v) == set(result.orgs) for v in result.losses.values())
    assert all(v > 0 and math.isfinite(v) for per_org in result.losses.values() for v in per_org.values())
    verdict = "YES" if result.federated_beats_local_cross_silo() else "NO"
    assert result.table().splitlines()[-2].endswith(f": {verdict}")
    assert len(result.federation) == 1 and result.federation[0]["participants"] == ["lakeside", "northbridge", "redwood"]
    assert (tmp_path / "demo" / "coordinator" / "adapters" / "demo-federation" / "1" / "meta.json").exists()
    # the recovered share of the centralized gain, per silo, in the table and in result.json (the console reads it)
    doc = json.loads((tmp_path / "demo" / "result.json").read_text())
    for org in result.orgs:
        base, fed, central = (result.losses[k][org] for k in ("base", "federated", "centralized"))
        assert math.isclose(doc["recovered"][org], (base - fed) / (base - central), rel_tol=1e-9)
    assert "recovered (fed)" in result.table() and doc["method"] == DEMO_FEDERATION


def _result(federated: float) -> DemoResult:
    orgs = ["a", "b"]
    losses = {"base": {"a": 3.0, "b": 3.0}, "local:a": {"a": 1.0, "b": 2.5}, "local:b": {"a": 2.5, "b": 1.0},
              "federated": {"a": federated, "b": federated}}
    return DemoResult(orgs, losses, {"federation": 1.0})


def test_demo_verdict_follows_the_figures():
    # federated 2.0 beats each local-only adapter on the other silo (2.5); 2.6 does not
    yes, no = _result(2.0), _result(2.6)
    assert yes.federated_beats_local_cross_silo() and not no.federated_beats_local_cross_silo()
    assert yes.table().splitlines()[-2].endswith(": YES") and no.table().splitlines()[-2].endswith(": NO")
    row = next(line for line in yes.table().splitlines() if line.startswith("federated "))
    assert row.split()[1:] == ["2.0000", "2.0000", "2.0000"]  # eval:a, eval:b, mean
