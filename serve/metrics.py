"""Prometheus metrics of the router, in a registry of its own (so several routers can live in one process)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedllm.core.contracts import router_metrics as names  # the names, shared with the console

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class RouterMetrics:
    """The router's counters, histograms and gauges."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            names.REQUESTS,
            "Requests answered, by route, model, worker and status.",
            ["route", "model", "worker", "status"],
            registry=r,
        )
        self.errors = Counter(
            names.ERRORS,
            "Errors by kind "
            "(auth, rate_limit, too_large, bad_request, unknown_model, no_worker, upstream, stream_broken).",
            ["kind"],
            registry=r,
        )
        self.latency = Histogram(
            names.LATENCY,
            "Time from request to last byte, per route, model and worker.",
            ["route", "model", "worker"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            names.TTFT,
            "Time to the worker's first byte, per model and worker.",
            ["model", "worker"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.outstanding = Gauge(names.OUTSTANDING, "Requests in flight per worker.", ["worker"], registry=r)
        self.client_aborts = Counter(
            names.CLIENT_ABORTS,
            "Requests whose client disconnected before the answer was complete "
            "(the upstream request was aborted), per route.",
            ["route"],
            registry=r,
        )
        self.retries = Counter(names.RETRIES, "Requests retried on another worker before the first byte.", registry=r)
        self.hedges = Counter(
            names.HEDGES,
            "Hedges sent (serve.hedge), by result: won (the hedge answered first), lost (the first worker did), "
            "failed (neither answered), aborted (the client left).",
            ["result"],
            registry=r,
        )
        self.adapter_loads = Counter(
            names.ADAPTER_LOADS, "Adapter loads on workers, by result.", ["result"], registry=r
        )
        self.adapter_loads_when = Counter(
            names.ADAPTER_LOADS_WHEN,
            "Adapter load attempts, by when: ahead (publish, promotion, a worker coming up) "
            "or request (a request waited on it).",
            ["when"],
            registry=r,
        )
        self.workers_healthy = Gauge(names.WORKERS_HEALTHY, "Healthy workers.", registry=r)

    def forget_worker(self, worker_id: str) -> None:
        """Drop every labelled series of a removed worker (requests, latency, time to first byte, outstanding), so
        that workers coming and going do not grow the exposition without bound."""
        for metric in (self.requests, self.latency, self.ttft, self.outstanding):
            position = list(metric._labelnames).index("worker")
            # prometheus_client has no "remove by one label": list the children (its own dict, under its lock).
            with metric._lock:
                stale = [values for values in metric._metrics if values[position] == worker_id]
            for values in stale:
                metric.remove(*values)

    def error(self, kind: str) -> None:
        """Count one error of `kind`."""
        self.errors.labels(kind).inc()

    def render(self) -> bytes:
        """The text exposition format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
