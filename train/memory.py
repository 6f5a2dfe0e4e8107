"""Peak memory of a training step: this process's resident peak (VmHWM, reset before each step through
/proc/self/clear_refs on Linux) and, on a GPU, torch's peak allocation; each step's record carries them."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

_PROC = Path("/proc/self")


def reset_peak() -> bool:
    """Start a new peak: reset VmHWM to the current RSS (Linux) and torch's CUDA peak; False where the resident peak
    cannot be reset (then `step_peak` reports the process's peak so far)."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except Exception:  # no torch CUDA build: nothing to reset there
        pass
    try:
        (_PROC / "clear_refs").write_text("5")
        return True
    except OSError:
        return False


def resident_peak_bytes() -> int:
    """The resident peak since the last `reset_peak` (VmHWM), else since the process started (ru_maxrss)."""
    try:
        for line in (_PROC / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step_peak() -> dict[str, Any]:
    """`{"peak_rss_mb": ...}` (+ `"peak_gpu_mb"` on a GPU) for a step's record."""
    out: dict[str, Any] = {"peak_rss_mb": round(resident_peak_bytes() / 2**20, 1)}
    try:
        import torch

        if torch.cuda.is_available():
            out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except Exception:
        pass
    return out
