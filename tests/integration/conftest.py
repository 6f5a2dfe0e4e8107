"""Helpers for the integration tests: processes found by command line, waiting on `appliance up`'s state file."""

from __future__ import annotations

import os
from pathlib import Path


def pids_with(fragment: str) -> list[int]:
    """Pids of live processes whose command line contains `fragment`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ")[-1][:1]
        except OSError:
            continue
        if fragment in cmdline and state != "Z":
            found.append(int(entry.name))
    return found

