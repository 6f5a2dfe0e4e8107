"""Aggregation strategies against hand-computed values and plain numpy references written independently."""

from __future__ import annotations

import math
import gc
import weakref

import numpy as np
import pytest
import torch

from fedllm.federation.aggregation.strategies import (
    STRATEGY_NAMES,
    Clipped,
    FedAdam,
    FedAvg,
    FedYogi,
    Strategy,
    clip_update,
    coordinate_median,
    global_norm,
    krum_select,
    make_strategy,
    trimmed_mean,
    weighted_mean,
)

KEYS = ("lora_A.weight", "lora_B.weight")


def _global(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"lora_A.weight": torch.randn(3, 4, generator=g), "lora_B.weight": torch.randn(4, 3, generator=g)}


def _updates(n: int, seed: int = 1, scale: float = 0.1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: scale * torch.randn(*v.shape, generator=g) for k, v in _global().items()} for _ in range(n)]


def _flat(update: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([update[k].double().numpy().ravel() for k in sorted(update)])


def _unflat(vec: np.ndarray, like: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    out, off = {}, 0
    for k in sorted(like):
        size = like[k].numel()
        out[k] = vec[off : off + size].reshape(like[k].shape)
        off += size
    return out


def _run_round(strategy: Strategy, global_state, updates, weights, round_id: int = 1, failures=None):
    acc = strategy.start_round(round_id, global_state)
    for i, (u, w) in enumerate(zip(updates, weights)):
        acc.add(f"silo{i}", u, w)
    return strategy.finish_round(round_id, global_state, acc, failures or [])


def _assert_close(actual: dict[str, torch.Tensor], expected: dict[str, np.ndarray], atol: float = 1e-5) -> None:
    assert sorted(actual) == sorted(expected)
    for k in expected:
        np.testing.assert_allclose(actual[k].double().numpy(), expected[k], atol=atol, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- hand-computed
def test_weighted_mean_hand_computed():
    # Arrange: weights 1 and 3
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([3.0, 6.0])}
    # Act
    mean = weighted_mean([(a, 1), (b, 3)])
    # Assert: (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5
    assert torch.allclose(mean["w"], torch.tensor([2.5, 5.0]))


def test_fedavg_applies_weighted_mean_delta_and_keeps_dtype():
    # Arrange
    g = {"w": torch.tensor([10.0, 10.0], dtype=torch.bfloat16)}
    updates = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}]
    # Act
    new = _run_round(FedAvg(), g, updates, [3, 1])
    # Assert: delta = (0.75, 0.5)
    assert new["w"].dtype == torch.bfloat16
    assert torch.allclose(new["w"].float(), torch.tensor([10.75, 10.5]), atol=0.05)
    assert torch.equal(g["w"], torch.tensor([10.0, 10.0], dtype=torch.bfloat16))  # input untouched


def test_median_and_trimmed_mean_hand_computed():
    # Arrange: one coordinate, values 1, 2, 3, 100 (even count) and 1, 2, 3, 4, 100
    four = [{"w": torch.tensor([v])} for v in (3.0, 1.0, 100.0, 2.0)]
    five = [{"w": torch.tensor([v])} for v in (3.0, 1.0, 100.0, 2.0, 4.0)]
    # Act / Assert
    assert coordinate_median(four)["w"].item() == pytest.approx(2.5)
    assert coordinate_median(five)["w"].item() == pytest.approx(3.0)
    assert trimmed_mean(five, 0.2)["w"].item() == pytest.approx(3.0)  # drops 1 and 100 -> mean(2, 3, 4)


def test_krum_hand_computed():
    # Arrange: three clustered points and one far away; f = 1 -> n - f - 2 = 2 neighbours
    pts = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])},
           {"w": torch.tensor([10.0, 10.0])}]
    # Act
    chosen = krum_select(pts, num_byzantine=1, num_selected=1)
    # Assert: scores 0:1+1=2, 1:1+2=3, 2:1+2=3, 3:181+181 -> index 0
    assert chosen == [0]
    assert krum_select(pts, 1, 3) == [0, 1, 2]


# ------------------------------------------------------------------------------------------ vs numpy references
def test_fedavg_and_fedprox_match_reference():
    g, ups, w = _global(), _updates(5), [3, 1, 7, 2, 5]
    reference = _flat(g) + np.average(np.stack([_flat(u) for u in ups]), axis=0, weights=w)
    for name in ("fedavg", "fedprox"):
        _assert_close(_run_round(make_strategy(name), g, ups, w), _unflat(reference, g))


def test_fedprox_plans_mu():
    assert make_strategy("fedprox", prox_mu=0.05).plan_round(3) == {"prox_mu": 0.05}
    assert make_strategy("fedavg").plan_round(3) == {}


def _reference_server_opt(kind: str, rounds, lr, b1=0.9, b2=0.99, tau=1e-3, momentum=0.9):
    """Plain numpy FedAvgM / FedAdam / FedYogi over several rounds of (global, updates, weights)."""
    w = _flat(rounds[0][0])
    m = np.zeros_like(w)
    v = np.full_like(w, tau**2)
    out = []
    for _, ups, weights in rounds:
        d = sum(wt * _flat(u) for u, wt in zip(ups, weights)) / sum(weights)
        if kind == "fedavgm":
            m = momentum * m + d
            w = w + lr * m
        else:
            m = b1 * m + (1 - b1) * d
            if kind == "fedadam":
                v = b2 * v + (1 - b2) * d**2
            else:
                v = v - (1 - b2) * d**2 * np.sign(v - d**2)
            w = w + lr * m / (np.sqrt(v) + tau)
        out.append(w.copy())
    return out


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_server_optimisers_match_reference_over_rounds(name):
    # Arrange: three rounds with different silo updates
    g = _global()
    # large, then small updates: the second moment then sits above d^2, where Yogi and Adam differ most
    rounds = [(g, _updates(3, seed=s, scale=sc), [1, 2, 3]) for s, sc in ((1, 0.1), (2, 0.1), (3, 1e-3), (4, 1e-3))]
    lr = 1.0 if name == "fedavgm" else 0.05
    params = {"server_lr": lr} if name != "fedavgm" else {"server_momentum": 0.9}
    strategy = make_strategy(name, **params)
    expected = _reference_server_opt(name, rounds, lr)
    # Act / Assert: the strategy's globals follow the reference round by round
    state = g
    for r, (_, ups, weights) in enumerate(rounds):
        state = _run_round(strategy, state, ups, weights, round_id=r)
        _assert_close(state, _unflat(expected[r], g), atol=2e-6)


def test_robust_strategies_match_reference():
    g, ups = _global(), _updates(7)
    stacked = np.stack([_flat(u) for u in ups])  # (7, numel)
    base = _flat(g)
    # median
    _assert_close(_run_round(make_strategy("median"), g, ups, [1] * 7), _unflat(base + np.median(stacked, 0), g))
    # trimmed mean, trimming 1 each side, written as a loop over coordinates
    trimmed = np.array([np.mean(sorted(stacked[:, j])[1:-1]) for j in range(stacked.shape[1])])
    _assert_close(_run_round(make_strategy("trimmed_mean", trim_ratio=0.2), g, ups, [1] * 7),
                  _unflat(base + trimmed, g))
    # (multi-)Krum with f = 2: score = sum of the n - f - 2 = 3 smallest squared distances
    dists = np.array([[np.sum((a - b) ** 2) for b in stacked] for a in stacked])
    scores = [np.sort(np.delete(dists[i], i))[:3].sum() for i in range(7)]
    order = np.argsort(scores, kind="stable")
    _assert_close(_run_round(make_strategy("krum", num_byzantine=2), g, ups, [1] * 7),
                  _unflat(base + stacked[order[0]], g))
    _assert_close(_run_round(make_strategy("multikrum", num_byzantine=2), g, ups, [1] * 7),
                  _unflat(base + stacked[order[:5]].mean(0), g))


# --------------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("name", ["fedavg", "fedprox", "median", "trimmed_mean", "krum", "multikrum"])
def test_identical_updates_aggregate_to_that_update(name):
    g, u = _global(), _updates(1)[0]
    new = _run_round(make_strategy(name), g, [u] * 5, [1, 4, 2, 9, 3])
    _assert_close(new, {k: (g[k] + u[k]).numpy() for k in g})


def test_clip_never_increases_norm_and_bounds_it():
    for seed in range(20):
        u = _updates(1, seed=seed, scale=float(seed + 1))[0]
        clipped, norm = clip_update(u, max_norm=2.0)
        assert norm == pytest.approx(global_norm(u))
        assert global_norm(clipped) <= min(norm, 2.0) + 1e-5
    small = {"w": torch.tensor([0.3, 0.4])}
    clipped, norm = clip_update(small, 1.0)
    assert norm == pytest.approx(0.5) and torch.equal(clipped["w"], small["w"])


@pytest.mark.parametrize("name,params", [("median", {}), ("krum", {"num_byzantine": 1}),
                                         ("multikrum", {"num_byzantine": 1}), ("trimmed_mean", {"trim_ratio": 0.2}),
                                         ("fedavg", {"clip_norm": 1.0})])
def test_poisoned_update_is_neutralised(name, params):
    # Arrange: four honest silos near +0.1 everywhere, one silo sending 1e6
    g = {k: torch.zeros_like(v) for k, v in _global().items()}
    honest = [{k: 0.1 + 0.01 * v for k, v in u.items()} for u in _updates(4)]
    poison = {k: torch.full_like(v, 1e6) for k, v in g.items()}
    # Act
    new = _run_round(make_strategy(name, **params), g, honest + [poison], [10, 10, 10, 10, 1000])
    # Assert: the global moves by about an honest update, not towards 1e6
    assert all(float(v.abs().max()) < 1.0 for v in new.values())
    assert global_norm(new) < 2.0


def test_streaming_accumulator_keeps_no_update():
    # Arrange
    g = _global()
    acc = make_strategy("fedavg").start_round(1, g)
    refs = []
    # Act: add updates and drop our own references to them
    for i in range(5):
        u = {k: torch.randn(*v.shape) for k, v in g.items()}
        refs += [weakref.ref(t) for t in u.values()]
        acc.add(f"s{i}", u, 1)
        del u
    gc.collect()
    # Assert: memory does not grow with silos: no update tensor is still alive
    assert all(r() is None for r in refs)


# ------------------------------------------------------------------------------------------------ validation etc.
def test_add_rejects_bad_updates_naming_silo_and_key():
    g = _global()
    acc = make_strategy("fedavg").start_round(1, g)
    good = _updates(1)[0]
    with pytest.raises(ValueError, match=r"silo 'eve'.*'lora_B.weight'.*shape"):
        acc.add("eve", {**good, "lora_B.weight": torch.zeros(3, 3)}, 1)
    with pytest.raises(ValueError, match=r"silo 'eve'.*'lora_A.weight'.*missing"):
        acc.add("eve", {"lora_B.weight": good["lora_B.weight"]}, 1)
    with pytest.raises(ValueError, match=r"silo 'eve'.*'extra'.*unexpected"):
        acc.add("eve", {**good, "extra": torch.zeros(1)}, 1)
    nan = {**good, "lora_A.weight": good["lora_A.weight"].clone()}
    nan["lora_A.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"silo 'eve'.*'lora_A.weight'.*NaN"):
        acc.add("eve", nan, 1)
    acc.add("ann", good, 1)
    with pytest.raises(ValueError, match="already sent"):
        acc.add("ann", good, 1)
    with pytest.raises(ValueError, match="num_examples"):
        acc.add("bob", good, 0)


def test_clipped_wrapper_rejects_bad_update_too():
    acc = make_strategy("median", clip_norm=1.0).start_round(1, _global())
    with pytest.raises(ValueError, match=r"silo 'x'.*shape"):
        acc.add("x", {"lora_A.weight": torch.zeros(1), "lora_B.weight": torch.zeros(4, 3)}, 1)


def test_min_results_and_accept_failures_keep_old_global():
    g, ups = _global(), _updates(2)
    assert _run_round(make_strategy("fedavg", min_results=3), g, ups, [1, 1]) is None
    assert _run_round(make_strategy("fedavg", accept_failures=False), g, ups, [1, 1], failures=["s9"]) is None
    assert _run_round(make_strategy("fedavg", min_results=2), g, ups, [1, 1], failures=["s9"]) is not None


def test_fedyogi_differs_from_fedadam():
    g = _global()
    rounds = [_updates(3, seed=s, scale=sc) for s, sc in ((1, 0.1), (2, 0.1), (3, 1e-3), (4, 1e-3))]
    adam, yogi, a_state, y_state = FedAdam(), FedYogi(), g, g
    for r, ups in enumerate(rounds):
        a_state = _run_round(adam, a_state, ups, [1, 2, 3], round_id=r)
        y_state = _run_round(yogi, y_state, ups, [1, 2, 3], round_id=r)
    assert max(float((a_state[k] - y_state[k]).abs().max()) for k in g) > 1e-4


def test_server_state_round_trips_through_state_dict():
    # Arrange: an uninterrupted run, and one whose strategy is rebuilt from a checkpoint after round 1
    g = _global()
    rounds = [_updates(3, seed=s) for s in (4, 5)]
    for cls in (FedAdam, FedYogi):
        straight = cls()
        s1 = _run_round(straight, g, rounds[0], [1, 2, 3])
        s2 = _run_round(straight, s1, rounds[1], [1, 2, 3])
        first = cls()
        r1 = _run_round(first, g, rounds[0], [1, 2, 3])
        resumed = cls()
        resumed.load_state_dict(first.state_dict())
        # Act
        r2 = _run_round(resumed, r1, rounds[1], [1, 2, 3])
        # Assert
        assert all(torch.equal(s2[k], r2[k]) for k in s2)
        assert all(isinstance(v, torch.Tensor) for v in first.state_dict().values())


def test_make_strategy_names_and_errors():
    for name in STRATEGY_NAMES:
        assert make_strategy(name).name == name
    assert isinstance(make_strategy("fedavg", clip_norm=2.0), Clipped)
    with pytest.raises(ValueError, match="unknown strategy 'sgd'"):
        make_strategy("sgd")
    with pytest.raises(ValueError, match="bad parameters"):
        make_strategy("fedavg", prox_mu=0.1)


# --------------------------------------------------------------------------------------------------------------
# Capped silo shares and the aggregate check
# --------------------------------------------------------------------------------------------------------------
def test_capped_weights_by_hand():
    from fedllm.federation.aggregation.strategies import capped_weights

    # 10/30/60 with a 0.5 cap: 60 is lowered to t with t / (10 + 30 + t) = 0.5, t = 40 -> 10/80, 30/80, 40/80
    assert capped_weights({"a": 10, "b": 30, "c": 60}, 0.5) == pytest.approx({"a": 0.125, "b": 0.375, "c": 0.5})
    assert capped_weights({"a": 10, "b": 30, "c": 60}, 1.0) == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    assert capped_weights({"a": 1, "b": 10**12}, 0.5) == pytest.approx({"a": 0.5, "b": 0.5})
    assert capped_weights({"a": 1, "b": 1, "c": 10**30}, 0.4) == pytest.approx({"a": 0.3, "b": 0.3, "c": 0.4})
    assert capped_weights({"a": 5, "b": 7}, 0.3) == pytest.approx({"a": 0.5, "b": 0.5})  # 2 x 0.3 < 1: the most even


@pytest.mark.parametrize("seed", range(20))
def test_capped_weights_properties(seed):
    from fedllm.federation.aggregation.strategies import capped_weights

    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 8, (1,), generator=g))
    counts = {f"s{i}": float(10 ** torch.randint(0, 15, (1,), generator=g)) for i in range(n)}
    cap = float(torch.rand(1, generator=g)) * 0.9 + 0.1
    shares = capped_weights(counts, cap)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(math.isfinite(v) and v > 0 for v in shares.values())
    if n * cap >= 1:
        assert max(shares.values()) <= cap + 1e-9
    # order is kept: more examples never means a smaller share
    ranked = sorted(counts, key=counts.get)
    assert all(shares[a] <= shares[b] + 1e-12 for a, b in zip(ranked, ranked[1:]))


def test_check_aggregate():
    from fedllm.federation.aggregation.strategies import check_aggregate

    old = {"w": torch.zeros(3)}
    assert check_aggregate({"w": torch.tensor([3.0, 4.0, 0.0])}, old, None) is None
    assert check_aggregate({"w": torch.tensor([3.0, 4.0, 0.0])}, old, 5.0) is None
    assert check_aggregate({"w": torch.tensor([3.0, 4.0, 0.1])}, old, 5.0).startswith("norm:")
    assert check_aggregate({"w": torch.tensor([float("nan"), 0.0, 0.0])}, old, None).startswith("non_finite:")
    assert check_aggregate({"v": torch.zeros(3)}, old, None).startswith("manifest:")


def test_check_update_names_the_problem_with_a_code():
    from fedllm.federation.aggregation.strategies import InvalidUpdate, check_update

    ref = {"w": torch.zeros(2, 2)}
    cases = {"manifest": {"x": torch.zeros(2, 2)}, "bad_shape": {"w": torch.zeros(3)},
             "bad_dtype": {"w": torch.zeros(2, 2, dtype=torch.int32)}, "non_finite": {"w": torch.full((2, 2), float("inf"))}}
    for code, update in cases.items():
        with pytest.raises(InvalidUpdate, match="silo 'x'") as info:
            check_update("x", update, ref)
        assert info.value.code == code
