"""bench/router_load.py with vLLM's Rust router as a peer: its row beside ours on a 1-second cell when its virtualenv
exists, or a line saying why it was skipped (the test never installs it: `--no-install`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import router_load


def test_without_its_virtualenv_and_no_install_vllm_router_is_skipped_with_how_to_add_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(router_load, "VLLM_ROUTER_VENV", tmp_path / "missing-venv")

    why = router_load.vllm_router_bin(install=False)

    assert isinstance(why, str)
    assert why.startswith("skipped:") and "--no-install" in why and "vllm-router==0.1.17" in why and str(tmp_path) in why


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vllm_router_gets_a_row_beside_ours_or_the_table_says_why_not() -> None:
    venv = Path(os.environ.get("VLLM_ROUTER_VENV", "/tmp/vllm-router-venv"))

    done = subprocess.run([sys.executable, str(REPO / "bench" / "router_load.py"), "--duration-s", "1", "--concurrency", "1",
                           "--no-litellm", "--no-install"], cwd=REPO, capture_output=True, text=True, timeout=240, check=False)

    out = done.stdout
    assert done.returncode == 0, (out + done.stderr)[-3000:]
    assert re.search(r"^our router\s+no\s+1\s+[\d.]+", out, re.MULTILINE), out
    if (venv / "bin" / "vllm-router").exists():
        for stream in ("no", "yes"):
            row = re.search(rf"^vllm-router\s+{stream}\s+1\s+([\d.]+)\s.*\s(\d+)\s*$", out, re.MULTILINE)
            assert row and float(row.group(1)) > 0 and row.group(2) == "0", out  # requests answered, no errors
    else:
        assert "vllm-router: skipped:" in out and "--no-install" in out, out
