"""The routing policies are pure: checked on hand-built worker snapshots."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest

from fedllm.serve.policy import Candidate, RouteHints, affinity_target, rank, score


def _workers(n: int, **kw) -> list[Candidate]:
    return [Candidate(f"w{i}", **kw) for i in range(n)]


@pytest.mark.parametrize("policy", ["round_robin", "least_outstanding", "score"])
def test_unhealthy_and_draining_never_chosen(policy):
    ws = [Candidate("sick", healthy=False), Candidate("drain", draining=True), Candidate("ok", outstanding=50)]
    for counter in range(20):
        assert [c.id for c in rank(policy, ws, RouteHints(affinity_key=f"k{counter}"), counter)] == ["ok"]
    assert rank(policy, ws[:2], RouteHints(), 0) == []


def test_round_robin_rotates_evenly():
    ws = _workers(3)
    firsts = Counter(rank("round_robin", ws, RouteHints(), i)[0].id for i in range(30))
    assert firsts == {"w0": 10, "w1": 10, "w2": 10}


def test_least_outstanding_prefers_relative_load():
    ws = [Candidate("a", outstanding=4, capacity=4), Candidate("b", outstanding=6, capacity=16)]
    assert rank("least_outstanding", ws, RouteHints())[0].id == "b"


def test_score_prefers_client_region_until_it_is_busy():
    # Arrange: same load, one in the client's region
    ws = [Candidate("us", region="us"), Candidate("eu", region="eu")]
    # Act / Assert
    assert rank("score", ws, RouteHints(region="eu"))[0].id == "eu"
    assert rank("score", ws, RouteHints(region="us"))[0].id == "us"
    busy_eu = [ws[0], replace(ws[1], outstanding=40)]  # 2.5x its capacity: another region is cheaper
    assert rank("score", busy_eu, RouteHints(region="eu"))[0].id == "us"


def test_score_prefers_a_measured_nearer_worker_over_the_clients_region():
    # Arrange: the client is in ap; ap's worker is far from the router (measured), eu's is near
    far_ap, near_eu = Candidate("ap", region="ap", ttft_ms=250.0), Candidate("eu", region="eu", ttft_ms=15.0)
    # Act / Assert: measured latency beats the region label...
    assert rank("score", [far_ap, near_eu], RouteHints(region="ap"))[0].id == "eu"
    # ...which still breaks the tie between workers within about 50 ms of each other
    assert rank("score", [replace(far_ap, ttft_ms=40.0), near_eu], RouteHints(region="ap"))[0].id == "ap"
    # ...also when the request has an affinity key (a cached prefix does not save a WAN round trip)
    assert rank("score", [far_ap, near_eu], RouteHints(region="ap", affinity_key="same prompt"))[0].id == "eu"
    # ...and weighs a full worker while latency is unmeasured
    assert rank("score", [replace(far_ap, ttft_ms=0.0), replace(near_eu, ttft_ms=0.0)], RouteHints(region="ap"))[0].id == "ap"


def test_score_prefers_adapter_residency():
    ws = [Candidate("cold", resident=False), Candidate("warm", resident=True, outstanding=8)]
    assert rank("score", ws, RouteHints())[0].id == "warm"
    assert rank("least_outstanding", ws, RouteHints())[0].id == "warm"
    assert rank("round_robin", ws, RouteHints(), 0)[0].id == "warm"


def test_score_prefers_low_latency():
    ws = [Candidate("slow", ttft_ms=900), Candidate("fast", ttft_ms=50)]
    assert rank("score", ws, RouteHints())[0].id == "fast"


def test_affinity_is_sticky_and_spread_over_keys():
    ws = _workers(4)
    targets = {k: affinity_target(ws, f"session-{k}") for k in range(200)}
    assert all(affinity_target(ws, f"session-{k}") == t for k, t in targets.items())  # deterministic
    spread = Counter(targets.values())
    assert set(spread) == {"w0", "w1", "w2", "w3"} and min(spread.values()) > 20
    # Removing one worker moves only the keys it owned (consistent hashing).
    fewer = [w for w in ws if w.id != "w3"]
    moved = sum(1 for k, t in targets.items() if t != "w3" and affinity_target(fewer, f"session-{k}") != t)
    assert moved == 0


def test_bounded_load_holds_under_a_hot_prefix():
    # Arrange: 4 idle workers; 200 requests share one prefix and none finishes.
    load_factor = 1.25
    ws = {f"w{i}": Candidate(f"w{i}") for i in range(4)}
    # Act
    for counter in range(200):
        best = rank("score", list(ws.values()), RouteHints(affinity_key="hot system prompt"), counter, load_factor)[0]
        ws[best.id] = replace(best, outstanding=best.outstanding + 1)
    # Assert: no worker exceeds the bound of ceil(c * mean) (+1 for the request that reached the bound)
    loads = sorted(w.outstanding for w in ws.values())
    assert sum(loads) == 200
    assert loads[-1] <= math.ceil(load_factor * 200 / 4) + 1, loads


def test_affinity_sticks_while_under_the_bound():
    ws = [Candidate(f"w{i}", outstanding=1) for i in range(3)]
    target = affinity_target(ws, "conversation-42")
    first = [rank("score", ws, RouteHints(affinity_key="conversation-42"), counter)[0].id for counter in range(10)]
    assert set(first) == {target}


def test_unknown_policy_raises():
    with pytest.raises(ValueError, match="unknown routing policy"):
        rank("random", _workers(2), RouteHints())


def test_a_joined_workers_region_claim_is_not_routed_on_its_measured_latency_is():
    # The client is in eu. A joined worker claims eu but measures 100 ms; a placed worker in us measures 60 ms.
    claimed = Candidate("joined-eu", region="eu", ttft_ms=100.0, placed=False)
    placed = Candidate("static-us", region="us", ttft_ms=60.0)
    assert [c.id for c in score([claimed, placed], RouteHints(region="eu"))] == ["static-us", "joined-eu"]
    # Unmeasured, a claim alone does not beat a placed worker of the client's region either (nor tie with it).
    fresh = Candidate("joined-eu", region="eu", placed=False)
    home = Candidate("static-eu", region="eu")
    for counter in range(4):
        assert score([fresh, home], RouteHints(region="eu"), counter)[0].id == "static-eu"
    # A joined worker not measured yet is still tried before a measured, farther one (so that it gets measured).
    far = Candidate("joined-measured", region="us", ttft_ms=80.0, placed=False)
    assert score([far, fresh], RouteHints(region="eu"))[0].id == "joined-eu"
    # The same worker placed by the operator in eu keeps its region bonus.
    assert score([Candidate("placed-eu", region="eu", ttft_ms=100.0), placed], RouteHints(region="eu"))[0].id == "placed-eu"


def test_affinity_chooses_by_distance_so_one_slow_answer_does_not_move_it_to_a_farther_worker():
    # eu is 10 ms away but its EWMA took one slow answer (33 ms); us is 80 ms away. By EWMA the two are within the
    # 50 ms near band and a prefix could stick to us; by distance only eu is near (the geo fleet's CI failure).
    eu = Candidate("eu", ttft_ms=33.0, distance_ms=10.0, placed=False)
    us = Candidate("us", ttft_ms=82.0, distance_ms=80.0, placed=False)
    firsts = {score([eu, us], RouteHints(affinity_key=f"prefix {i}"))[0].id for i in range(50)}
    assert firsts == {"eu"}
