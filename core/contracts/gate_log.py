"""A federation run's promotion-gate log (`federation/RUN/gate.jsonl`, docs/CONTRACTS.md): one decision per line,
written by the coordinator's publisher, read by the coordinator's status and by the console."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_gate_log(path: Path) -> dict[str, dict[str, Any]]:
    """The newest decision for each adapter (its served name, `NAME-vN`) in the gate log at `path`; empty when there
    is none. A torn or foreign line is skipped."""
    if not path.is_file():
        return {}
    rows: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("adapter"):
            rows[row["adapter"]] = row
    return rows
