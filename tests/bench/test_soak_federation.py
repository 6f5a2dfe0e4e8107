"""bench/soak_federation.py, its short version: the real coordinator over CURVE for up to 300 rounds (3 minutes at
most) while simulated silos leave and come back; its memory, descriptors, threads and checkpoints stay flat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_coordinator_stays_flat_over_hundreds_of_rounds_with_silos_leaving_and_rejoining(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"

    done = subprocess.run([sys.executable, str(REPO / "bench" / "soak_federation.py"), "--minutes", "3", "--rounds", "300",
                           "--silos", "6", "--churn-every-s", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)

    assert out.exists(), (done.stdout + done.stderr)[-4000:]
    result = json.loads(out.read_text())
    checks = result["verdict"]["checks"]
    assert result["rounds_completed"] >= 100, done.stdout  # enough rounds to see growth (about 2 a second here)
    assert result["rounds_failed"] == 0, result["failure_reasons"]
    assert result["silos_report"]["leaves"] >= 10 and result["silos_report"]["rejoins"] >= 10  # churn all run long
    assert all(c["flat"] for c in checks.values()), (checks, done.stdout)
    assert done.returncode == 0 and "verdict: flat" in done.stdout


def test_the_coordinator_keeps_only_the_newest_round_records_in_memory(tmp_path: Path) -> None:
    import asyncio

    from fedllm.federation.demo.simulate import simulate

    report = asyncio.run(simulate(tmp_path, 2, 4, history_in_memory=2, timeout_s=300))
    log = [json.loads(line) for line in (tmp_path / "federation" / "sim" / "rounds.jsonl").read_text().splitlines()]

    assert [r["round"] for r in report["history"]] == [3, 4]
    assert [r["round"] for r in log] == [1, 2, 3, 4]
