"""Routing policies: pure functions that order candidate workers for one request.

Nothing here touches sockets, clocks or globals; the router passes in a snapshot of each worker
(`Candidate`) and what it knows about the request (`RouteHints`), and gets back the workers to try, best first.
The first is used; the rest are the failover order.

Policies (`settings.serve.policy`):
- `round_robin`: rotate over eligible workers.
- `least_outstanding`: fewest in-flight requests relative to capacity.
- `score` (default): a cost per worker = load + latency + region mismatch + adapter not resident - affinity
  (region mismatch weighs a full worker while the worker's latency is unmeasured, 50 ms of latency once it is;
  only a worker the operator placed can match a region: a joined worker's region label is a claim),
  where affinity is consistent hashing with bounded load (Mirrokni et al., 2018): a request's affinity key
  (session, user, or prompt prefix) maps to a point on a hash ring, and the first worker clockwise whose load is
  below `load_factor` times the mean load gets the bonus, so one hot prefix spills over instead of piling up.
  Affinity only chooses among workers within `NEAR_BAND_MS` of the nearest, by distance: each worker's shortest
  recent round trip (health probes and requests), which one slow answer on a busy machine does not change.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

POLICIES = ("round_robin", "least_outstanding", "score")

# Weights of the score policy, in units of "one worker's full capacity of outstanding requests".
LATENCY_SCALE_MS = 1000.0  # 1 s of EWMA time-to-first-token costs as much as a full worker
REGION_PENALTY = 1.0  # another region, while the worker's latency is unmeasured, costs as much as a full worker
# Once a worker's latency is measured it says how far the worker really is from the router, which the client's
# region label does not: every request goes through the router, so a worker in the client's region but far from the
# router is slower for that client than a near one elsewhere (measured on the WAN test bed, bench/geo_fleet.py).
# Workers within NEAR_BAND_MS of the nearest count as equally near: region and affinity choose among those only.
NEAR_BAND_MS = 50.0
REGION_PENALTY_MEASURED = NEAR_BAND_MS / LATENCY_SCALE_MS
NOT_RESIDENT_PENALTY = 4.0  # loading an adapter first is slow: only when no holder can take the request
AFFINITY_BONUS = 0.75  # the affinity target wins unless it is much busier than another worker
VNODES = 64  # ring points per worker


@dataclass(frozen=True)
class Candidate:
    """A snapshot of one worker as the policy sees it."""

    id: str
    region: str = "local"
    outstanding: int = 0
    capacity: int = 16
    ttft_ms: float = 0.0  # EWMA of time to first byte; 0 = not measured yet
    healthy: bool = True
    draining: bool = False
    resident: bool = True  # serves the requested model, or holds the requested adapter loaded
    placed: bool = True  # the operator placed it (static or local): its region label is trusted; a joined one's is not
    distance_ms: float | None = None  # shortest recent round trip (probes and requests); None: use ttft_ms


def distance(c: Candidate) -> float:
    """How far `c` is from the router: its shortest recent round trip, which a busy moment does not lengthen (one
    slow answer moves the EWMA, not this), else its EWMA time to first byte."""
    return c.ttft_ms if c.distance_ms is None else c.distance_ms


def in_region(c: Candidate, region: str | None) -> bool:
    """Whether `c` counts as in `region`: only a worker the operator placed is believed (a joined worker's region is
    a claim, shown but not routed on; its measured latency says how near it is)."""
    return region is None or (c.placed and c.region == region)


@dataclass(frozen=True)
class RouteHints:
    """What the router knows about a request."""

    region: str | None = None
    affinity_key: str | None = None


def eligible(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Workers that may take new requests: healthy and not draining."""
    return [c for c in candidates if c.healthy and not c.draining]


def round_robin(candidates: Sequence[Candidate], counter: int) -> list[Candidate]:
    """Eligible workers rotated by `counter` (the caller increments it per request)."""
    pool = eligible(candidates)
    if not pool:
        return []
    start = counter % len(pool)
    return pool[start:] + pool[:start]


def least_outstanding(candidates: Sequence[Candidate], counter: int = 0) -> list[Candidate]:
    """Eligible workers by outstanding/capacity, ties rotated by `counter`."""
    pool = eligible(candidates)
    n = len(pool)
    return (
        [c for _, _, c in sorted((c.outstanding / c.capacity, (i - counter) % n, c) for i, c in enumerate(pool))]
        if n
        else []
    )


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@lru_cache(maxsize=256)
def _ring(ids: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    points = sorted((_hash64(f"{wid}#{v}"), wid) for wid in ids for v in range(VNODES))
    return tuple(p for p, _ in points), tuple(w for _, w in points)


def affinity_target(candidates: Sequence[Candidate], key: str, load_factor: float = 1.25) -> str | None:
    """The worker id that `key` sticks to under consistent hashing with bounded load, or None if no worker.

    A worker is skipped while its outstanding requests are at or above `ceil(load_factor * (total + 1) / n)`,
    so no worker carries more than about `load_factor` times the mean load because of affinity.
    """
    pool = eligible(candidates)
    if not pool:
        return None
    by_id = {c.id: c for c in pool}
    points, owners = _ring(tuple(sorted(by_id)))
    total = sum(c.outstanding for c in pool)
    bound = math.ceil(load_factor * (total + 1) / len(pool))
    start = bisect.bisect(points, _hash64(key))
    seen: set[str] = set()
    for i in range(len(points)):
        wid = owners[(start + i) % len(points)]
        if wid in seen:
            continue
        seen.add(wid)
        if by_id[wid].outstanding < bound:
            return wid
        if len(seen) == len(by_id):
            break
    return None


def cost(c: Candidate, hints: RouteHints, target: str | None) -> float:
    """The score policy's cost of sending the request to `c` (lower is better)."""
    value = c.outstanding / c.capacity + c.ttft_ms / LATENCY_SCALE_MS
    if not in_region(c, hints.region):
        # A joined worker's region is a claim, no evidence either way: it always weighs as if measured, so that an
        # unmeasured one is still tried (and measured) but never preferred to a placed worker of the client's region.
        value += REGION_PENALTY if c.ttft_ms == 0.0 and c.placed else REGION_PENALTY_MEASURED
    if not c.resident:
        value += NOT_RESIDENT_PENALTY
    if target is not None and c.id == target:
        value -= AFFINITY_BONUS
    return value


def score(
    candidates: Sequence[Candidate], hints: RouteHints, counter: int = 0, load_factor: float = 1.25
) -> list[Candidate]:
    """Eligible workers by cost (load, latency, region, residency, affinity), ties rotated by `counter`."""
    pool = eligible(candidates)
    if not pool:
        return []
    target = None
    if hints.affinity_key is not None:
        # Affinity only among workers that hold the model/adapter already, are about as near as the nearest of them
        # (a cached prefix never saves a WAN round trip), and are in the client's region if any of those are.
        resident = [c for c in pool if c.resident] or pool
        fastest = min(distance(c) for c in resident)
        near = [c for c in resident if distance(c) - fastest <= NEAR_BAND_MS]
        local = [c for c in near if in_region(c, hints.region)] or near
        target = affinity_target(local, hints.affinity_key, load_factor)
    n = len(pool)
    ranked = sorted((cost(c, hints, target), (i - counter) % n, c) for i, c in enumerate(pool))
    return [c for _, _, c in ranked]


def rank(
    policy: str, candidates: Sequence[Candidate], hints: RouteHints, counter: int = 0, load_factor: float = 1.25
) -> list[Candidate]:
    """Order `candidates` by the named policy (see the module docstring). Unknown names raise ValueError."""
    if policy == "score":
        return score(candidates, hints, counter, load_factor)
    if policy == "least_outstanding":
        # Residency still matters: a worker that must load an adapter first goes last.
        ranked = least_outstanding(candidates, counter)
        return [c for c in ranked if c.resident] + [c for c in ranked if not c.resident]
    if policy == "round_robin":
        ranked = round_robin(candidates, counter)
        return [c for c in ranked if c.resident] + [c for c in ranked if not c.resident]
    raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")
