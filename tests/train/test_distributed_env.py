"""A process that trained in-process must not hand its torch.distributed port to the children it starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedllm.testing.factories import REPO, free_port


@pytest.mark.slow
def test_a_child_process_gets_its_own_master_port_after_the_parent_initialised() -> None:
    # Arrange: the parent (this test process) initialises a single-process group, which holds MASTER_PORT.
    from fedllm.train.engine import init_distributed

    init_distributed()
    parent_port = os.environ["MASTER_PORT"]
    code = "import os; from fedllm.train.engine import init_distributed; init_distributed(); print(os.environ['MASTER_PORT'])"

    # Act: a child inherits the parent's environment (as an `appliance train` subprocess does) and initialises too.
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)

    # Assert: it starts (no EADDRINUSE) on a port of its own.
    assert proc.returncode == 0, proc.stderr[-2000:]
    child_port = proc.stdout.strip().splitlines()[-1]
    assert child_port.isdigit() and child_port != parent_port


@pytest.mark.slow
def test_a_launcher_assigned_port_is_kept() -> None:
    # Arrange: variables as the `deepspeed` launcher sets them (no self-assigned marker).
    env = {k: v for k, v in os.environ.items() if k != "FEDLLM_SELF_ASSIGNED_DIST"}
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    code = "import os; from fedllm.train.engine import init_distributed; init_distributed(); print(os.environ['MASTER_PORT'])"

    # Act
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)

    # Assert
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == env["MASTER_PORT"]

