"""The Fleet tab's view over time: snapshots of the router's /metrics kept for the last minutes, and the frames its
plots draw (requests/s and errors/s; time to first token p50/p99 per worker), read with the router's own metric
names (`fedllm.core.contracts.router_metrics`)."""

from __future__ import annotations

from collections import deque
from typing import Any

from fedllm.core.contracts.router_metrics import FleetSnapshot, interval_rates, ttft_quantiles


class FleetHistory:
    """Snapshots of the last `window_s` seconds (one per console refresh), oldest first."""

    def __init__(self, window_s: float = 600.0):
        self.window_s = window_s
        self.snapshots: deque[FleetSnapshot] = deque()

    def add(self, snap: FleetSnapshot) -> None:
        """Keep `snap`; forget snapshots older than the window (and any that is not older than `snap`)."""
        while self.snapshots and self.snapshots[-1].time_s >= snap.time_s:
            self.snapshots.pop()
        self.snapshots.append(snap)
        while self.snapshots and snap.time_s - self.snapshots[0].time_s > self.window_s:
            self.snapshots.popleft()

    def frames(self) -> tuple[Any, Any]:
        """(rates, ttft) DataFrames with columns `seconds ago` (<= 0), `value` and `series`: requests/s and errors/s;
        `WORKER p50` / `WORKER p99` in ms, over each interval between two snapshots."""
        import pandas as pd

        rates, ttft = [], []
        snaps = list(self.snapshots)
        latest = snaps[-1].time_s if snaps else 0.0
        for before, after in zip(snaps, snaps[1:]):
            r = interval_rates(before, after)
            x = round(after.time_s - latest, 1)
            rates += [(x, r["requests_per_s"], "requests/s"), (x, r["errors_per_s"], "errors/s")]
            for worker, qs in sorted(r["ttft"].items()):
                ttft += [(x, 1000 * v, f"{worker} p{round(q * 100)}") for q, v in qs.items() if v is not None]
        columns = ["seconds ago", "value", "series"]
        return pd.DataFrame(rates, columns=columns), pd.DataFrame(ttft, columns=columns)


def summary_markdown(snap: FleetSnapshot) -> str:
    """Totals since the router started: requests, errors, mean latency, and each worker's TTFT p50."""
    mean = snap.mean_latency_ms
    p50 = {w: q[0.5] for w, q in ttft_quantiles(snap.ttft_buckets, (0.5,)).items() if q[0.5] is not None}
    workers = " · ".join(f"`{w}` {1000 * v:.1f} ms" for w, v in sorted(p50.items()))
    return (
        f"**Requests** {int(snap.requests)} · **errors** {int(snap.errors)} · **mean latency** "
        f"{f'{mean:.1f} ms' if mean is not None else '-'}" + (f" · **TTFT p50** {workers}" if workers else "")
    )


def figures(history: FleetHistory) -> tuple[Any, Any]:
    """The two plots of the Fleet tab."""
    from fedllm.ui.plots import line_figure

    rates, ttft = history.frames()
    return (
        line_figure(
            rates, "seconds ago", "value", "Requests and errors per second", empty_text="Waiting for two samples"
        ),
        line_figure(
            ttft, "seconds ago", "value", "Time to first token (ms) per worker", empty_text="No answers in the window"
        ),
    )
