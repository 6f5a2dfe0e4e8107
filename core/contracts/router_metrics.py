"""The router's Prometheus metrics: their names (one definition, used by the router's `serve/metrics.py` and read by
the console) and pure functions that read them back from the text format (no prometheus_client, no torch).

A `FleetSnapshot` is what the console needs from one scrape of `GET /metrics`; two snapshots give rates over the
interval between them (`interval_rates`): requests and errors per second, and time-to-first-token quantiles per
worker from the histogram buckets that filled in that interval (Prometheus' `histogram_quantile` interpolation).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

REQUESTS = "router_requests"  # counter: route, model, worker, status
ERRORS = "router_errors"  # counter: kind
LATENCY = "router_request_seconds"  # histogram: route, model, worker (request to last byte)
TTFT = "router_ttft_seconds"  # histogram: model, worker (time to the worker's first byte)
OUTSTANDING = "router_outstanding"  # gauge: worker
CLIENT_ABORTS = "router_client_aborts"  # counter: route
RETRIES = "router_retries"  # counter
HEDGES = "router_hedges"  # counter: result (won, lost, failed, aborted)
ADAPTER_LOADS = "router_adapter_loads"  # counter: result
ADAPTER_LOADS_WHEN = "router_adapter_loads_when"  # counter: when (ahead, request)
WORKERS_HEALTHY = "router_workers_healthy"  # gauge

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    """One line of the text format: metric name (with its _total/_bucket/... suffix), labels, value."""

    name: str
    labels: dict[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    """The samples of a Prometheus text exposition (comments and malformed lines skipped)."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append(Sample(m.group(1), dict(_LABEL.findall(m.group(2) or "")), value))
    return out


@dataclass(frozen=True)
class FleetSnapshot:
    """The router's counters at one time: totals, and the TTFT histogram per worker (`{le: cumulative count}`)."""

    time_s: float
    requests: float
    errors: float
    latency_sum_s: float
    latency_count: float
    ttft_buckets: dict[str, dict[float, float]] = field(default_factory=dict)

    @property
    def mean_latency_ms(self) -> float | None:
        return 1000 * self.latency_sum_s / self.latency_count if self.latency_count else None


def snapshot(text: str, time_s: float) -> FleetSnapshot:
    """Read one scrape of the router's /metrics."""
    requests = errors = lat_sum = lat_count = 0.0
    buckets: dict[str, dict[float, float]] = {}
    for s in parse(text):
        if s.name == f"{REQUESTS}_total":
            requests += s.value
        elif s.name == f"{ERRORS}_total":
            errors += s.value
        elif s.name == f"{LATENCY}_sum":
            lat_sum += s.value
        elif s.name == f"{LATENCY}_count":
            lat_count += s.value
        elif s.name == f"{TTFT}_bucket":
            per = buckets.setdefault(s.labels.get("worker", "-"), {})
            le = float(s.labels.get("le", "+Inf"))
            per[le] = per.get(le, 0.0) + s.value  # summed over models
    return FleetSnapshot(time_s, requests, errors, lat_sum, lat_count, buckets)


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile of a histogram given as `{upper bound: cumulative count}` (linear within a bucket, as
    Prometheus' histogram_quantile); None when it holds no observation. In the unit of the bounds."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bound: its value is all that is known
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def ttft_quantiles(
    buckets: dict[str, dict[float, float]], qs: tuple[float, ...] = (0.5, 0.99)
) -> dict[str, dict[float, float | None]]:
    """Per worker: {q: seconds} of the TTFT histogram."""
    return {worker: {q: quantile(b, q) for q in qs} for worker, b in buckets.items()}


def interval_rates(before: FleetSnapshot, after: FleetSnapshot) -> dict[str, Any]:
    """What happened between two snapshots: requests/s, errors/s, and per worker the TTFT p50/p99 (seconds) of the
    requests answered in the interval (a counter reset, i.e. a restarted router, counts from zero)."""
    dt = after.time_s - before.time_s
    if dt <= 0:
        raise ValueError("the second snapshot must be later than the first")

    def delta(a: float, b: float) -> float:
        return b - a if b >= a else b

    window = {}
    for worker, now in after.ttft_buckets.items():
        then = before.ttft_buckets.get(worker, {})
        window[worker] = {le: delta(then.get(le, 0.0), c) for le, c in now.items()}
    return {
        "requests_per_s": delta(before.requests, after.requests) / dt,
        "errors_per_s": delta(before.errors, after.errors) / dt,
        "ttft": ttft_quantiles(window),
    }
