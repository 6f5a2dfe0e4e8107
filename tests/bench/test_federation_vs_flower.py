"""bench/federation_vs_flower.py end to end on the tiny model: our CLI federation and Flower's deployment runtime
(its own virtualenv in .cache/venvs/flower, built on first use) both finish, learn, and are measured consistently."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_both_systems_complete_every_round_learn_and_their_bytes_add_up(tmp_path: Path) -> None:
    # Act: 2 silos (one core share each), 2 rounds x 1 local step on each system.
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "federation_vs_flower.py"), "--tiny", "--rounds", "2",
                           "--local-steps", "1", "--home", str(tmp_path / "work"), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    # Assert: one table row per system; every round of each completed with both silos (the bench checks Flower's
    # ClientApps ran one torch thread per core of their share); the final adapters beat the base model on every silo;
    # the relays saw at least every byte of every message.
    result = json.loads(out.read_text())["runs"][0]
    systems = {s["system"]: s for s in result["systems"]}
    assert set(systems) == {"ours (fedavg, bf16, keep opt)", "Flower 1.42 (FedAvg)"}
    assert all(name in done.stdout for name in systems)
    for name, s in systems.items():
        assert [r["round"] for r in s["rounds"]] == [1, 2]
        assert all(0 < r["train_loop_s"] < r["duration_s"] for r in s["rounds"])
        assert s["tcp_bytes"] >= sum(r["bytes"] for r in s["rounds"]) > 0
        assert all(result["losses"][name][org] < result["losses"]["base"][org] for org in result["losses"]["base"])


def test_the_mean_table_averages_each_system_over_the_seeds() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from federation_vs_flower import mean_table

    def run(seed: int, loss: float, wall: float) -> dict:
        return {"seed": seed, "losses": {"sys": {"a": loss, "b": loss + 0.2}},
                "systems": [{"system": "sys", "summary": {"wall_s": wall, "other_s": 1.0}}]}

    text = mean_table([run(0, 0.4, 10.0), run(1, 0.6, 30.0)], ["a", "b"])
    row = next(line for line in text.splitlines() if line.startswith("sys"))
    assert row.split()[1:] == ["20.0", "1.0", "0.5000", "0.7000", "0.6000", "0.5000..0.7000"]
