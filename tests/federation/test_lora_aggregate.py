"""LoRA-aware aggregation (product / FlexLoRA-style, frozen A / FFA-LoRA-style, heterogeneous ranks) against
dense references written independently in float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedllm.federation.aggregation import lora_aggregate as la
from fedllm.federation.aggregation.strategies import FedAdam, FedAvg, FrozenA, ProductAggregation, make_strategy

MODULES = {"m.layers.0.q_proj.": (24, 16), "m.layers.0.v_proj.": (8, 16)}  # prefix -> (out, in)
ALPHA = 16.0


def _state(rank: int, seed: int, b_scale: float = 0.3, a: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p, (o, i) in MODULES.items():
        out[p + "lora_A.weight"] = a[p + "lora_A.weight"].clone() if a else torch.randn(rank, i, generator=g) / i**0.5
        out[p + "lora_B.weight"] = b_scale * torch.randn(o, rank, generator=g)
    return out


def _np_product(state, prefix: str, scale: float) -> np.ndarray:
    return scale * state[prefix + "lora_B.weight"].double().numpy() @ state[prefix + "lora_A.weight"].double().numpy()


def _np_truncate(m: np.ndarray, rank: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _round(strategy, global_state, locals_, weights, bases=None):
    acc = strategy.start_round(1, global_state)
    for i, (local, n) in enumerate(zip(locals_, weights)):
        base, scale = bases[i] if bases else (global_state, None)
        if bases:
            acc.set_base(f"s{i}", base, scale)
        acc.add(f"s{i}", {k: local[k] - base[k] for k in local}, n)
    return strategy.finish_round(1, global_state, acc, [])


def test_product_aggregation_matches_truncated_svd_of_the_dense_mean():
    # Arrange: three silos at rank 4 that moved away from one global adapter, unequal example counts
    rank, scale = 4, ALPHA / 4
    g = _state(rank, 0)
    locals_ = [_state(rank, 10 + i) for i in range(3)]
    weights = [10, 30, 60]
    # Act
    new = _round(make_strategy("flexlora", lora_alpha=ALPHA), g, locals_, weights)
    # Assert: scale * B A is the best rank-4 approximation of the weighted mean of the products
    for p in MODULES:
        mean = sum(w * _np_product(s, p, scale) for s, w in zip(locals_, weights)) / sum(weights)
        np.testing.assert_allclose(_np_product(new, p, scale), _np_truncate(mean, rank), atol=2e-5, rtol=1e-4)
        assert new[p + "lora_A.weight"].shape == (rank, MODULES[p][1]) and new[p + "lora_B.weight"].shape == (MODULES[p][0], rank)


def test_product_aggregation_is_exact_when_the_mean_fits_the_rank_and_fedavg_of_factors_is_not():
    # Arrange: two silos at rank 2, global rank 4: the mean of the products has rank <= 4
    g4 = _state(4, 0, b_scale=0.0)
    locals_2 = [_state(2, 20 + i) for i in range(2)]
    bases = [(la.project_state(g4, ALPHA / 4, 2, ALPHA / 2), ALPHA / 2)] * 2
    # Act
    new = _round(make_strategy("fedavg", lora_aggregation="product", lora_alpha=ALPHA), g4, locals_2, [1, 3], bases)
    # Assert: the product is the dense mean itself
    for p in MODULES:
        mean = (1 * _np_product(locals_2[0], p, ALPHA / 2) + 3 * _np_product(locals_2[1], p, ALPHA / 2)) / 4
        np.testing.assert_allclose(_np_product(new, p, ALPHA / 4), mean, atol=1e-5)
    # and averaging the factors of two rank-4 silos separately misses the mean of their products
    locals_4 = [_state(4, 30 + i) for i in range(2)]
    avg = _round(FedAvg(), g4, locals_4, [1, 1])
    p = next(iter(MODULES))
    mean4 = (_np_product(locals_4[0], p, 4.0) + _np_product(locals_4[1], p, 4.0)) / 2
    assert np.abs(_np_product(avg, p, 4.0) - mean4).max() > 1e-2


def test_frozen_a_averaging_equals_the_dense_mean_exactly_and_keeps_a():
    # Arrange: every silo trained B only from the same seeded A
    g = _state(8, 0, b_scale=0.0)
    locals_ = [_state(8, 40 + i, a=g) for i in range(3)]
    weights = [5, 7, 11]
    strategy = make_strategy("ffa")
    # Act
    new = _round(strategy, g, locals_, weights)
    # Assert
    assert isinstance(strategy, FrozenA) and strategy.plan_round(1)["lora_freeze_a"] is True
    for p in MODULES:
        assert torch.equal(new[p + "lora_A.weight"], g[p + "lora_A.weight"])
        mean = sum(w * _np_product(s, p, 2.0) for s, w in zip(locals_, weights)) / sum(weights)
        np.testing.assert_allclose(_np_product(new, p, 2.0), mean, rtol=1e-6, atol=1e-7)


def test_frozen_a_drops_a_deltas_and_composes_with_a_server_optimiser():
    # Arrange: one silo ignored the freeze (its A moved); FedAdam as the server optimiser
    g = _state(4, 0)
    moved = _state(4, 50, a=g)
    moved["m.layers.0.q_proj.lora_A.weight"] += 0.5
    strategy = FrozenA(FedAdam(server_lr=0.1))
    # Act
    new = _round(strategy, g, [moved, _state(4, 51, a=g)], [1, 1])
    new2 = _round(strategy, new, [_state(4, 52, a=g)], [1])
    # Assert: A never moves; the Adam moments of A stay zero
    for p in MODULES:
        assert torch.equal(new2[p + "lora_A.weight"], g[p + "lora_A.weight"])
        assert not torch.equal(new2[p + "lora_B.weight"], g[p + "lora_B.weight"])
    assert all(float(v.abs().max()) == 0 for k, v in strategy.state_dict().items() if k.startswith("m.") and "lora_A" in k)


def test_product_aggregation_composes_with_fedadam_on_the_dense_pseudo_gradient():
    # Arrange
    rank, scale, lr, b1, b2, tau = 4, ALPHA / 4, 0.05, 0.9, 0.99, 1e-3
    g = _state(rank, 0)
    locals_ = [_state(rank, 60 + i) for i in range(2)]
    # Act
    new = _round(ProductAggregation(FedAdam(server_lr=lr, beta_1=b1, beta_2=b2, tau=tau), lora_alpha=ALPHA), g, locals_, [2, 1])
    # Assert: one Adam step (Reddi et al., m0 = 0, v0 = tau^2) on the dense products, then rank-4 truncation
    for p in MODULES:
        G = _np_product(g, p, scale)
        d = (2 * _np_product(locals_[0], p, scale) + _np_product(locals_[1], p, scale)) / 3 - G
        m = (1 - b1) * d
        v = b2 * tau**2 + (1 - b2) * d * d
        expected = _np_truncate(G + lr * m / (np.sqrt(v) + tau), rank)
        np.testing.assert_allclose(_np_product(new, p, scale), expected, atol=5e-5, rtol=1e-3)


def test_heterogeneous_ranks_get_their_own_rank_and_the_best_projection():
    # Arrange: a rank-8 global; silos at 4, 8 and 16 with alpha 16 (scales 4, 2, 1)
    g = _state(8, 0)
    strategy = make_strategy("flexlora", lora_alpha=ALPHA)
    p = next(iter(MODULES))
    for r in (4, 8, 16):
        # Act
        sent, s = strategy.state_for_silo(g, r, ALPHA)
        # Assert
        assert s == ALPHA / r and la.lora_rank(sent) == r
        assert sent[p + "lora_A.weight"].shape == (r, MODULES[p][1])
        expected = _np_truncate(_np_product(g, p, 2.0), r)  # rank >= 8 reproduces the global product exactly
        np.testing.assert_allclose(_np_product(sent, p, s), expected, atol=1e-5, rtol=1e-4)


def test_heterogeneous_round_aggregates_what_each_silo_learned():
    # Arrange: silos of ranks 4, 8, 16 each sent the global product at their rank, each learning a change
    g = _state(8, 0)
    strategy = make_strategy("flexlora", lora_alpha=ALPHA)
    bases, locals_ = [], []
    for i, r in enumerate((4, 8, 16)):
        sent, s = strategy.state_for_silo(g, r, ALPHA)
        bases.append((sent, s))
        gen = torch.Generator().manual_seed(70 + i)
        locals_.append({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in sent.items()})
    # Act
    new = _round(strategy, g, locals_, [1, 1, 2], bases)
    # Assert: global product = truncation of G + mean(local product - sent product)
    for p in MODULES:
        G = _np_product(g, p, 2.0)
        d = sum(w * (_np_product(loc, p, s) - _np_product(base, p, s)) for loc, (base, s), w in zip(locals_, bases, [1, 1, 2])) / 4
        np.testing.assert_allclose(_np_product(new, p, 2.0), _np_truncate(G + d, 8), atol=5e-5, rtol=1e-3)
        assert new[p + "lora_A.weight"].shape[0] == 8


def test_factorize_keeps_unfilled_directions_trainable():
    a, b = la.factorize(torch.zeros(6, 5), 3, 2.0)
    assert torch.equal(b, torch.zeros(6, 3)) and bool((a.abs().sum(dim=1) > 0).all())
    a, b = la.factorize(torch.ones(6, 5), 3, 2.0)  # rank 1: two unfilled directions
    np.testing.assert_allclose((2.0 * b @ a).numpy(), np.ones((6, 5)), atol=1e-5)
    assert bool((a[1:].abs().sum(dim=1) > 0).all()) and float(b[:, 1:].abs().max()) == 0


def test_lora_aggregation_errors_name_the_problem():
    with pytest.raises(ValueError, match="mean-based"):
        make_strategy("median", lora_aggregation="product")
    with pytest.raises(ValueError, match="unknown lora_aggregation"):
        make_strategy("fedavg", lora_aggregation="svd")
    with pytest.raises(ValueError, match="lora_B"):
        la.lora_modules({"x.lora_A.weight": torch.zeros(2, 2)})
    acc = make_strategy("flexlora", lora_alpha=ALPHA).start_round(1, _state(4, 0))
    with pytest.raises(ValueError, match="silo 'bad'.*shape"):
        acc.add("bad", _state(8, 1), 1)


def test_settings_pick_the_lora_aggregation_and_refuse_product_under_dp(tmp_path):
    from fedllm.core.errors import ConfigError
    from fedllm.federation.runtime.service import build_strategy
    from fedllm.testing.factories import make_settings

    fed = lambda **kw: make_settings(tmp_path, federation=kw).federation  # noqa: E731
    assert isinstance(build_strategy(fed(strategy="fedadam", lora_aggregation="product")), ProductAggregation)
    assert build_strategy(fed(strategy="fedadam", lora_aggregation="product")).name == "fedadam+product"
    assert isinstance(build_strategy(fed(strategy="fedavgm", lora_aggregation="frozen_a")), FrozenA)
    assert isinstance(build_strategy(fed(strategy="flexlora")), ProductAggregation)  # factors = the strategy's own
    with pytest.raises(ConfigError, match="dp_mode=central"):
        build_strategy(fed(strategy="flexlora", dp_mode="central"))
    with pytest.raises(ConfigError, match="secure aggregation"):
        build_strategy(fed(strategy="flexlora", secure_aggregation=True))


def test_frozen_a_under_central_dp_keeps_a_and_reports_epsilon(tmp_path):
    from fedllm.federation.runtime.service import build_strategy
    from fedllm.testing.factories import make_settings

    strategy = build_strategy(make_settings(tmp_path, federation={"strategy": "ffa", "dp_mode": "central", "min_silos": 2,
                                                                 "dp_noise_multiplier": 0.5, "dp_clip_norm": 1.0}).federation)
    g = _state(4, 0, b_scale=0.0)
    moved = [{k: v + 0.1 for k, v in g.items()} for _ in range(3)]  # these silos also moved A
    new = _round(strategy, g, moved, [1, 1, 1])
    for p in MODULES:
        assert torch.equal(new[p + "lora_A.weight"], g[p + "lora_A.weight"])
        assert not torch.equal(new[p + "lora_B.weight"], g[p + "lora_B.weight"])
    assert strategy.epsilon(1e-5) > 0 and strategy.plan_round(2)["lora_freeze_a"] is True
