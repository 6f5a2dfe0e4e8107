"""The `Strategy` interface is complete: every strategy the factory and `build_strategy` can build (each name, bare
and under each wrapper) is a `Strategy` and answers every member the protocol declares, with the defaults or its
wrappers' answers; `SiloTrainer` declares what the silo reads from a trainer."""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable

import pytest
import torch

from fedllm.core.errors import ConfigError
from fedllm.federation.aggregation.accumulators import RoundAccumulator
from fedllm.federation.aggregation.server_strategies import ProductAggregation, Strategy
from fedllm.federation.runtime.service import build_strategy
from fedllm.federation.aggregation.strategy_factory import STRATEGY_NAMES, make_strategy, mean_strategy_names
from fedllm.testing.factories import make_settings

RANK, ALPHA = 4, 8.0
SHAPES = {"m.q_proj.lora_A.weight": (RANK, 6), "m.q_proj.lora_B.weight": (5, RANK)}


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(*s, generator=g) for k, s in SHAPES.items()}


def _declared() -> set[str]:
    """The members the `Strategy` protocol declares (methods, properties and attributes)."""
    return {n for n in vars(Strategy) if not n.startswith("_")} | set(Strategy.__annotations__)


def _round(strategy: Any) -> Any:
    g = _state(0)
    acc = strategy.start_round(1, g)
    assert isinstance(acc, RoundAccumulator)
    for i in range(3):
        acc.add(f"s{i}", {k: v * 0.1 for k, v in _state(i + 1).items()}, 10 + i)
    new = strategy.finish_round(1, g, acc, [])
    return new is None or set(new) == set(g)


# name -> (call on a strategy, check of the answer); the test fails if the protocol declares a member not listed here
CALLS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], bool]]] = {
    "name": (lambda s: s.name, lambda v: isinstance(v, str) and v != ""),
    "plan_round": (lambda s: s.plan_round(1), lambda v: isinstance(v, dict)),
    "start_round": (_round, lambda v: v is True),
    "finish_round": (_round, lambda v: v is True),
    "state_dict": (lambda s: s.state_dict(), lambda v: all(isinstance(t, torch.Tensor) for t in v.values())),
    "load_state_dict": (lambda s: s.load_state_dict(s.state_dict()), lambda v: v is None),
    "state_for_silo": (lambda s: s.state_for_silo(g := _state(0), None, None)[0] is g, lambda v: v is True),
    "epsilon": (lambda s: s.epsilon(1e-5), lambda v: v is None or isinstance(v, float)),
    "mean_based": (lambda s: s.mean_based, lambda v: isinstance(v, bool)),
    "central_dp": (lambda s: s.central_dp, lambda v: isinstance(v, bool)),
    "clip_norm": (lambda s: s.clip_norm, lambda v: v is None or v > 0),
    "change_bound": (lambda s: s.change_bound(1.0), lambda v: v is None or v >= 1.0),
}


def _built(tmp_path) -> list[tuple[str, Any]]:
    """Every strategy `build_strategy` accepts over names x LoRA aggregation x DP mode x per-update clipping."""
    out = []
    for name, aggregation, dp, clip in itertools.product(STRATEGY_NAMES, ("factors", "product", "frozen_a"),
                                                         ("off", "central", "silo"), (None, 0.5)):
        fed = {"strategy": name, "lora_aggregation": aggregation, "dp_mode": dp, "dp_noise_multiplier": 0.5,
               "strategy_params": {} if clip is None else {"clip_norm": clip}}
        try:
            out.append((f"{name}/{aggregation}/{dp}/{clip}",
                        build_strategy(make_settings(tmp_path, federation=fed).federation, lora_alpha=ALPHA)))
        except ConfigError:
            continue  # a combination the settings refuse (product under DP or with clipping, central DP on a median)
    return out


def test_every_built_strategy_is_a_strategy_and_answers_every_declared_member(tmp_path):
    # Arrange
    built = _built(tmp_path)
    kinds = {type(s).__name__ for _, s in built}
    # Assert: the grid reached every wrapper and every name, and the table covers the whole protocol
    assert {"FrozenA", "Clipped", "CentralDP", "SiloDPAccounting", "ProductAggregation"} <= kinds
    assert {label.split("/")[0] for label, _ in built} == set(STRATEGY_NAMES)
    assert _declared() == set(CALLS), "a member of Strategy has no check here"
    for label, strategy in built:
        assert isinstance(strategy, Strategy), label
        for member, (call, ok) in CALLS.items():
            assert ok(call(strategy)), f"{label}: {member}"


def test_the_declared_answers_follow_the_wrappers(tmp_path):
    # Arrange
    built = dict(_built(tmp_path))
    # Assert: DP, clipping and the mean-based flag are answered through every wrapper
    for label, strategy in built.items():
        name, aggregation, dp, clip = label.split("/")
        assert strategy.central_dp is (dp == "central"), label
        assert (strategy.epsilon(1e-5) is None) is (dp == "off"), label
        expected_clip = 1.0 if dp == "central" else (None if clip == "None" else 0.5)  # dp_clip_norm defaults to 1
        assert strategy.clip_norm == expected_clip, label
        product = isinstance(strategy, ProductAggregation)  # a name's own default, or the settings' choice
        assert strategy.mean_based is (name in mean_strategy_names() + ("ffa", "flexlora") and not product), label
        if name in ("fedavg", "fedprox", "ffa", "flexlora") and not product and dp == "off":
            assert strategy.change_bound(2.0) == 2.0, label  # server_lr 1: a mean of updates within 2 moves by <= 2
        else:
            assert strategy.change_bound(2.0) is None, label


def test_product_aggregation_takes_the_lora_alpha_it_is_built_with(tmp_path):
    # Arrange
    fed = make_settings(tmp_path, federation={"strategy": "flexlora"}).federation
    g = _state(0)
    # Act
    strategy = build_strategy(fed, lora_alpha=ALPHA)
    state, scale = strategy.state_for_silo(g, RANK // 2, ALPHA)
    # Assert: the global scale is alpha / r, and a silo at rank 2 gets a rank-2 projection at its own scale
    assert strategy.state_for_silo(g, None, None) == (g, ALPHA / RANK)
    assert scale == ALPHA / (RANK // 2) and state["m.q_proj.lora_A.weight"].shape[0] == RANK // 2
    # strategy_params' own lora_alpha wins over the train section's
    own = make_settings(tmp_path, federation={"strategy": "flexlora", "strategy_params": {"lora_alpha": 2.0}}).federation
    assert math.isclose(build_strategy(own, lora_alpha=ALPHA).state_for_silo(g, None, None)[1], 2.0 / RANK)


def test_make_strategy_builds_every_name_as_a_strategy():
    for name in STRATEGY_NAMES:
        strategy = make_strategy(name, lora_alpha=ALPHA)
        assert isinstance(strategy, Strategy) and strategy.name == name


def test_a_silo_refuses_a_trainer_without_the_declared_members(tmp_path):
    # Arrange
    from fedllm.federation.runtime.silo import SiloClient, SiloTrainer
    from tests.federation.conftest import silo_settings

    class Bare:  # the four methods, but not lora_r / lora_alpha
        def get_state(self):
            return {}

        def set_state(self, state):
            pass

        def fit(self, steps, config):
            return 1, {}

        def evaluate(self):
            return {}

    class Declared(Bare, SiloTrainer):
        pass

    settings = silo_settings(tmp_path, "tcp://127.0.0.1:5555", "s", plaintext=True)
    # Act / Assert
    with pytest.raises(ConfigError, match="lacks lora_r, lora_alpha"):
        SiloClient(settings, Bare())
    silo = SiloClient(settings, Declared())
    assert (silo.trainer.lora_r, silo.trainer.lora_alpha) == (None, None)
