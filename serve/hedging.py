"""Hedged requests (`serve.hedge: on`): when a worker's first byte is late, ask the next-best worker too.

A request whose first byte has not come after the worker's learned `serve.hedge_percentile` of time to first byte
(never less than `serve.hedge_min_delay_s`) is sent again to the next worker in the policy's order; the first answer
to start wins and the other is aborted (Dean and Barroso, "The Tail at Scale", 2013). Extra load is bounded: at most
`serve.hedge_max_extra` hedges per request on average (a token bucket), never onto a full worker.

This module is the bookkeeping only, with no sockets or clocks: the forwarder passes in the times it measured.
Each worker's percentile comes from its last `WINDOW` first-byte times, streamed and non-streamed requests apart (a
non-streamed answer's first byte comes with its last, after the whole generation). A primary that loses to its hedge
never shows its own first byte; the time it had waited when it was aborted is recorded instead (a lower bound, already
at or past the percentile), so the tail keeps its weight and the learned percentile does not drift down as hedges win.
The forwarder folds that wait into the worker's latency EWMA too, so the routing policy still sees a worker's slow
answers when hedges hide them from the client (a lower bound again: on the WAN bed it changed p99 little,
bench/hedging.py).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable

WINDOW = 256  # first-byte times kept per worker
MIN_SAMPLES = 20  # a worker with fewer measured first bytes is not hedged (its percentile is unknown)
RECOMPUTE_EVERY = 8  # the percentile is re-sorted after this many new samples (cheap, not per request)
BURST = 5.0  # hedges that may fire back to back after a quiet spell (the budget's cap)


@dataclass
class FirstByteWindow:
    """One worker's recent first-byte times (seconds) and their `percentile` (nearest rank)."""

    percentile: float
    samples: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    _value: float | None = None
    _stale: int = 0

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)
        self._stale += 1

    def value(self) -> float | None:
        """The percentile in seconds, or None before `MIN_SAMPLES` samples."""
        if len(self.samples) < MIN_SAMPLES:
            return None
        if self._value is None or self._stale >= RECOMPUTE_EVERY:
            ordered = sorted(self.samples)
            self._value = ordered[min(len(ordered), max(1, math.ceil(self.percentile / 100 * len(ordered)))) - 1]
            self._stale = 0
        return self._value


class Hedger:
    """Learns when to hedge per worker and keeps the extra load within budget.

    Args:
        percentile: the per-worker percentile of time to first byte after which a request is hedged (e.g. 95).
        min_delay_s: the floor of that delay.
        max_extra: hedges per request on average, at most (0.1 = at most 10% extra requests).
    """

    def __init__(self, percentile: float, min_delay_s: float, max_extra: float) -> None:
        self.percentile = percentile
        self.min_delay_s = min_delay_s
        self.max_extra = max_extra
        self.credit = 0.0
        self.windows: dict[Hashable, FirstByteWindow] = {}

    def observe(self, key: Hashable, seconds: float) -> None:
        """A first byte after `seconds` (or an abort after that long: a lower bound) for `key` (the forwarder's key is
        the worker's id and whether the request streams)."""
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = FirstByteWindow(self.percentile)
        window.add(seconds)

    def forget(self, worker_id: str) -> None:
        """Drop what was learned about a removed worker (keys whose first part is its id)."""
        for key in [k for k in self.windows if isinstance(k, tuple) and k and k[0] == worker_id]:
            del self.windows[key]

    def delay_s(self, key: Hashable) -> float | None:
        """How long to wait for the first byte of `key` before hedging; None: do not hedge (not learned yet)."""
        window = self.windows.get(key)
        value = window.value() if window is not None else None
        return None if value is None else max(self.min_delay_s, value)

    def request(self) -> None:
        """A request that may be hedged has started: it earns the budget `max_extra` hedges."""
        self.credit = min(BURST, self.credit + self.max_extra)

    def take(self) -> bool:
        """Spend one hedge from the budget; False when it is spent."""
        if self.credit < 1.0 - 1e-9:  # (sums of 0.1 fall just short of 1.0)
            return False
        self.credit -= 1.0
        return True
