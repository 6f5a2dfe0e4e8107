"""Client-level DP: noise scale, clipping, the CentralDP wrapper, and the RDP accountant vs published numbers."""

from __future__ import annotations

import math

import pytest
import torch

from fedllm.federation.aggregation.privacy import (
    CentralDP,
    RDPAccountant,
    add_gaussian_noise,
    compute_rdp,
    privatize_update,
    rdp_to_epsilon,
)
from fedllm.federation.aggregation.strategies import global_norm, make_strategy


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------------- noise
def test_zero_noise_is_identity():
    # Arrange
    u = {"a": torch.tensor([0.3, -0.4]), "b": torch.tensor([[1e-3]])}
    # Act
    out = privatize_update(u, clip_norm=10.0, noise_multiplier=0.0, generator=_gen())
    # Assert
    assert all(torch.equal(out[k], u[k]) for k in u)
    assert out is not u


def test_privatize_clips_to_c():
    u = {"a": torch.full((100,), 3.0)}
    out = privatize_update(u, clip_norm=1.5, noise_multiplier=0.0, generator=_gen())
    assert global_norm(out) == pytest.approx(1.5, rel=1e-5)


@pytest.mark.parametrize("num_silos", [1, 4])
def test_silo_noise_has_configured_std(num_silos):
    # Arrange: a zero update of 200k coordinates, C = 2, z = 1.5
    u = {"a": torch.zeros(200_000)}
    # Act
    out = privatize_update(u, clip_norm=2.0, noise_multiplier=1.5, generator=_gen(1), num_silos=num_silos)
    # Assert: std z*C/sqrt(n) within 1 % (the std estimate's own error is ~0.16 %)
    expected = 1.5 * 2.0 / math.sqrt(num_silos)
    assert float(out["a"].std()) == pytest.approx(expected, rel=0.01)
    assert abs(float(out["a"].mean())) < 0.01 * expected


def test_noise_is_reproducible_with_a_seed_and_differs_without():
    u = {"a": torch.zeros(10), "b": torch.zeros(3)}
    first = add_gaussian_noise(u, 1.0, _gen(7))
    again = add_gaussian_noise(dict(reversed(list(u.items()))), 1.0, _gen(7))
    other = add_gaussian_noise(u, 1.0, _gen(8))
    assert all(torch.equal(first[k], again[k]) for k in u)
    assert not torch.equal(first["a"], other["a"])


# -------------------------------------------------------------------------------------------------- CentralDP
def _central_round(dp: CentralDP, updates, round_id: int = 1):
    g = {"w": torch.zeros_like(updates[0]["w"])}
    acc = dp.start_round(round_id, g)
    for i, u in enumerate(updates):
        acc.add(f"s{i}", u, 100 * (i + 1))
    return dp.finish_round(round_id, g, acc, [])


def test_central_dp_noise_on_the_mean_has_std_z_c_over_n():
    # Arrange: four silos, identical update well inside the clip bound
    n, c, z = 4, 1e6, 0.5
    u = {"w": torch.full((100_000,), 0.25)}
    dp = CentralDP(make_strategy("fedavg"), clip_norm=c, noise_multiplier=z, seed=3)
    # Act
    new = _central_round(dp, [u] * n)
    # Assert: mean is the update, noise std z*C/n
    noise = new["w"] - 0.25
    assert float(noise.std()) == pytest.approx(z * c / n, rel=0.02)
    assert abs(float(noise.mean())) < 0.02 * z * c / n


def test_central_dp_clips_and_weights_silos_equally():
    # Arrange: a huge update from the silo with most examples; no noise
    small = {"w": torch.tensor([1.0, 0.0])}
    huge = {"w": torch.tensor([0.0, 1000.0])}
    dp = CentralDP(make_strategy("fedavg"), clip_norm=1.0, noise_multiplier=0.0, seed=0)
    # Act
    new = _central_round(dp, [small, huge])
    # Assert: (clip(small) + clip(huge)) / 2 = (0.5, 0.5), whatever the example counts
    assert torch.allclose(new["w"], torch.tensor([0.5, 0.5]), atol=1e-6)


def test_central_dp_accounts_each_round_and_checkpoints():
    u = {"w": torch.zeros(10)}
    dp = CentralDP(make_strategy("fedadam"), clip_norm=1.0, noise_multiplier=1.0, seed=0)
    assert dp.epsilon() == 0.0
    _central_round(dp, [u, u], round_id=1)
    eps1 = dp.epsilon()
    _central_round(dp, [u, u], round_id=2)
    eps2 = dp.epsilon()
    assert 0 < eps1 < eps2
    # q = 1: same as the accountant stepped twice by hand
    ref = RDPAccountant()
    ref.step(1.0, 1.0, steps=2)
    assert eps2 == pytest.approx(ref.get_epsilon(1e-5))
    restored = CentralDP(make_strategy("fedadam"), clip_norm=1.0, noise_multiplier=1.0)
    restored.load_state_dict(dp.state_dict())
    assert restored.epsilon() == pytest.approx(eps2)
    assert set(dp.inner.state_dict()) == {k[len("inner."):] for k in dp.state_dict() if k.startswith("inner.")}


def test_central_dp_refuses_non_mean_strategies():
    with pytest.raises(ValueError, match="mean-based"):
        CentralDP(make_strategy("median"), clip_norm=1.0, noise_multiplier=1.0)


# ------------------------------------------------------------------------------------------------- accountant
def test_plain_gaussian_rdp_is_alpha_over_2z2():
    assert compute_rdp(1.0, 2.0, 3, [2.0, 10.0]) == pytest.approx([3 * 2 / 8, 3 * 10 / 8])


def test_rdp_matches_tensorflow_privacy_reference_values():
    # Values from TensorFlow Privacy's rdp_accountant_test.py (test_compute_rdp).
    assert compute_rdp(0.1, 2, 10, [5])[0] == pytest.approx(0.07737, abs=1e-5)
    got = compute_rdp(0.01, 2.5, 50, [1.5, 2.5, 5, 50, 100])
    for value, ref in zip(got, [0.00065, 0.001085, 0.00218075, 0.023846, 167.416307]):
        assert value == pytest.approx(ref, abs=1e-5)


def test_epsilon_matches_tensorflow_privacy_classic_conversion():
    # TF Privacy test_get_privacy_spent and test_compute_privacy_loss (classic conversion).
    orders = list(range(2, 33))
    eps, order = rdp_to_epsilon(orders, compute_rdp(0.01, 4, 10000, orders), 1e-5, method="classic")
    assert eps == pytest.approx(1.258575, abs=1e-5) and order == 20
    orders2 = [1.25, 1.5, 1.75, 2., 2.5, 3., 4., 5., 6., 7., 8., 10., 12., 14., 16., 20., 24., 28., 32., 64., 256.]
    rdp = [a + b for a, b in zip(compute_rdp(0.01, 4, 10000, orders2), compute_rdp(0.1, 2, 100, orders2))]
    eps2, order2 = rdp_to_epsilon(orders2, rdp, 1e-5, method="classic")
    assert eps2 == pytest.approx(3.276237, abs=1e-5) and order2 == 8


def test_epsilon_matches_opacus_reference_values():
    # Opacus tests/accountants_test.py::test_rdp_accountant: z=1.5, q=0.04, 90 epochs, delta=1e-5.
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.5, sample_rate=0.04, steps=int(90 / 0.04))
    assert acc.get_epsilon(1e-5) == pytest.approx(7.32911117143, abs=1e-6)
    # Opacus accountants/analysis/rdp.py docstring example: (0.336, 23).
    orders = list(range(2, 33))
    rdp = [a + b for a, b in zip(compute_rdp(1e-5, 1.0, 10, orders), compute_rdp(1e-4, 3.0, 4, orders))]
    eps, order = rdp_to_epsilon(orders, rdp, 1e-5)
    assert eps == pytest.approx(0.336, abs=5e-4) and order == 23


def test_build_strategy_wraps_for_each_dp_mode(tmp_path):
    from fedllm.federation.aggregation.privacy import SiloDPAccounting
    from fedllm.federation.runtime.service import build_strategy
    from fedllm.testing.factories import make_settings

    def build(**fed):
        return build_strategy(make_settings(tmp_path, federation=fed).federation)

    plain = build(strategy="fedprox", strategy_params={"prox_mu": 0.1}, min_silos=3)
    assert plain.name == "fedprox" and plain.min_results == 3 and plain.plan_round(1) == {"prox_mu": 0.1}
    central = build(dp_mode="central", dp_clip_norm=0.5, dp_noise_multiplier=1.1)
    assert isinstance(central, CentralDP) and central.clip_norm == 0.5 and central.noise_multiplier == 1.1
    silo = build(strategy="median", dp_mode="silo", dp_noise_multiplier=2.0, min_silos=1)
    assert isinstance(silo, SiloDPAccounting)
    u = {"w": torch.zeros(3)}
    acc = silo.start_round(1, u)
    acc.add("a", {"w": torch.ones(3)}, 1)
    assert silo.finish_round(1, u, acc, []) is not None
    ref = RDPAccountant()
    ref.step(2.0)
    assert silo.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5))
    assert silo.epsilon(1e-5) > 0
