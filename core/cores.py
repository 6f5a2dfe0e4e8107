"""The cores of this machine, divided among trainings that run at once (several silo processes on one machine).

Two silos that each size their torch/OpenMP pool to every core of a 2-core machine run 4 threads on 2 cores and
spend much of a round preempting each other. Whatever starts several trainings at once (a bench, the geo test bed,
a test) gives each its own share: `divide_cores(n)` splits the cores this process may use into `n` disjoint groups,
and a `CoreShare` pins a child process to its group (`taskset`, so it also works through `ip netns exec` and from a
threaded parent) and sets `OMP_NUM_THREADS`. The training engine then sizes torch's pool from the child's CPU
affinity (`fedllm.train.engine.set_threads`), so nothing else needs configuring.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Sequence

logger = logging.getLogger(__name__)

__all__ = ["CoreShare", "available_cores", "divide_cores", "usable_cores"]


def available_cores() -> tuple[int, ...]:
    """The ids of the cores this process may run on (its CPU affinity; all of `os.cpu_count` where unknown)."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API (macOS): every core
        return tuple(range(max(1, os.cpu_count() or 1)))


def usable_cores() -> int:
    """How many cores this process may run on."""
    return len(available_cores())


@dataclass(frozen=True)
class CoreShare:
    """The cores one of several concurrent processes may use.

    `shared` is True when there were more processes than cores, so this core also serves another process.
    """

    cores: tuple[int, ...]
    shared: bool = False

    @property
    def threads(self) -> int:
        """Threads a training in this share should run: one per core."""
        return len(self.cores)

    def env(self) -> dict[str, str]:
        """Environment for the child: OpenMP and MKL pools sized to the share (before torch sizes its own)."""
        n = str(self.threads)
        return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` pinned to the share's cores with `taskset -c`; unchanged (with a log line) where taskset is
        missing."""
        taskset = shutil.which("taskset")
        if taskset is None:
            logger.warning("taskset not found: %s runs unpinned (OMP_NUM_THREADS still limits its threads)", argv[0])
            return list(argv)
        return [taskset, "-c", ",".join(map(str, self.cores)), *argv]


def divide_cores(parts: int, cores: Sequence[int] | None = None) -> list[CoreShare]:
    """Split `cores` (default: `available_cores()`) into `parts` shares, one per concurrent process.

    With at least as many cores as parts, the shares are disjoint and contiguous and differ in size by at most one
    (the first ones get the extra cores). With more parts than cores, each part gets one core, dealt round-robin,
    so no core serves more than ceil(parts / cores) processes; those shares say `shared`.

    Raises:
        ValueError: `parts` < 1 or no cores.
    """
    cores = tuple(available_cores() if cores is None else cores)
    if parts < 1:
        raise ValueError(f"cannot divide cores among {parts} processes; need at least 1")
    if not cores:
        raise ValueError("no cores to divide")
    if parts > len(cores):
        dealt = [cores[i % len(cores)] for i in range(parts)]
        return [CoreShare((c,), shared=dealt.count(c) > 1) for c in dealt]
    base, extra = divmod(len(cores), parts)
    shares, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        shares.append(CoreShare(cores[start : start + size]))
        start += size
    return shares
