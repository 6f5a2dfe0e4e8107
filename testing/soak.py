"""What the soaks (bench/soak_router.py, bench/soak_federation.py) share: a process's sample from /proc, the
flat-after-warm-up check, the run-wide lock, and the figures table."""

from __future__ import annotations

import contextlib
import fcntl
import os
import statistics
from collections.abc import Iterator
from pathlib import Path

FLAT = 0.10  # allowed growth after warm-up


def proc_sample(pid: int) -> dict[str, int]:
    """Resident memory (VmRSS, KiB), threads and open file descriptors of process `pid`."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {
        "rss_kb": int(status["VmRSS"].split()[0]),
        "threads": int(status["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def flat_checks(
    samples: list[dict], keys: tuple[str, ...], warmup_fraction: float = 1 / 3, slack: dict[str, float] | None = None
) -> tuple[dict, dict, dict]:
    """(warm-up figures, end figures, checks): for each of `keys`, the end (the median of the last tenth of samples)
    against the warm-up (the median of the tenth around the end of the warm-up); flat when it grew by at most FLAT,
    plus `slack[key]` (absolute: what a bigger fleet at the end may hold, for small counts such as tasks or fds).

    Raises:
        ValueError: too few samples for a verdict.
    """
    n = len(samples)
    if n < 6:
        raise ValueError(f"{n} samples are too few for a verdict; run longer")
    cut, tenth = int(n * warmup_fraction), max(1, n // 10)
    scalar = [k for k in samples[0] if not isinstance(samples[0][k], dict)]

    def median(window: list[dict]) -> dict:
        return {k: statistics.median(s[k] for s in window) for k in scalar}

    warm, end = median(samples[max(0, cut - tenth // 2) : cut + tenth // 2 + 1]), median(samples[-tenth:])
    checks = {}
    for key in keys:
        growth = end[key] / max(warm[key], 1) - 1
        checks[key] = {
            "growth": round(growth, 4),
            "flat": end[key] <= (1 + FLAT) * warm[key] + (slack or {}).get(key, 0.0),
        }
    return warm, end, checks


@contextlib.contextmanager
def locked(path: str | None) -> Iterator[None]:
    """Hold the flock at `path` (none: nothing) for the whole run: a shared machine runs one heavy job at a time."""
    if not path:
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def figures_table(verdict: dict, rows: tuple[tuple[str, str, float], ...]) -> str:
    """Start, warm-up and end of each (key, label, scale) of a verdict, with the growth after warm-up where checked."""
    table = [("", "start", "warm-up", "end", "growth after warm-up")]
    for key, label, scale in rows:
        growth = verdict["checks"].get(key, {}).get("growth")
        table.append(
            (
                label,
                f"{verdict['start'][key] / scale:.1f}",
                f"{verdict['warm'][key] / scale:.1f}",
                f"{verdict['end'][key] / scale:.1f}",
                f"{growth:+.1%}" if isinstance(growth, float) else "",
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in table)
