"""Client-level differential privacy: clipping, Gaussian noise, a central-DP wrapper strategy, an RDP accountant.

DP-FedAvg (McMahan et al. 2018): each silo's update is clipped to L2 norm `C`, every silo counts equally, and
Gaussian noise with standard deviation `z * C / n` is added to the mean of the `n` clipped updates (equivalently
`z * C` on their sum), where `z` is the noise multiplier. The guarantee is about whole silos (a silo's entire
data set), not single records.

Two places to add the noise:
  * at the coordinator: `CentralDP(inner, clip_norm, noise_multiplier)` wraps a mean-based strategy;
  * at the silo: `privatize_update(update, clip_norm, noise_multiplier, generator, num_silos=n)` clips and adds
    `z * C / sqrt(n)` per silo, so that the SUM of `n` silos carries `z * C` (use with secure aggregation, where
    the coordinator sees only the sum). With `num_silos=1` each update alone is `(C, z)`-Gaussian (local DP).

Accounting: Renyi DP of the (sub)sampled Gaussian mechanism (Mironov et al. 2019), composed over rounds, converted
to `(epsilon, delta)` with Balle et al. 2020 (Thm. 21), as Opacus does; `method="classic"` gives the original
`rdp + log(1/delta) / (alpha - 1)`. The sampling rate `q` is the probability that a silo takes part in a round;
amplification by subsampling only holds if silos are picked at random, so the default is `q = 1`.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from fedllm.core.types import StateDict
from fedllm.federation.aggregation.accumulators import ClippedAccumulator, RoundAccumulator
from fedllm.federation.aggregation.aggregate import clip_update
from fedllm.federation.aggregation.server_strategies import FedAvg, Strategy
from fedllm.federation.aggregation.strategy_wrappers import StrategyWrapper

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ORDERS",
    "add_gaussian_noise",
    "privatize_update",
    "compute_rdp",
    "rdp_to_epsilon",
    "RDPAccountant",
    "CentralDP",
    "SiloDPAccounting",
]

DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)])


# --------------------------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------------------------
def add_gaussian_noise(update: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> StateDict:
    """`update + N(0, std^2)` per coordinate (float32 maths, cast back). A new dict; keys are noised in sorted order
    so a seeded generator gives the same noise whatever the dict order."""
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    out: StateDict = {}
    for key in sorted(update):
        tensor = update[key]
        base = tensor.detach().to(torch.float32)
        if std > 0:
            base = base + std * torch.randn(base.shape, generator=generator, dtype=torch.float32)
        out[key] = base.to(tensor.dtype)
    return out


def privatize_update(
    update: Mapping[str, torch.Tensor],
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
    *,
    num_silos: int = 1,
) -> StateDict:
    """Silo-side DP: clip `update` to L2 norm `clip_norm`, then add Gaussian noise.

    Args:
        update: The silo's delta (not modified).
        clip_norm: `C`, the L2 bound.
        noise_multiplier: `z`.
        generator: Source of the noise (seed it from the OS in production).
        num_silos: `n`, the silos whose updates will be summed; each adds std `z * C / sqrt(n)` so the sum carries
            `z * C` (distributed DP with secure aggregation). 1 = local DP (std `z * C` on this update alone).

    Returns:
        A new, clipped and noised state dict.
    """
    if num_silos < 1:
        raise ValueError(f"num_silos must be >= 1, got {num_silos}")
    clipped, _ = clip_update(update, clip_norm)
    return add_gaussian_noise(clipped, noise_multiplier * clip_norm / math.sqrt(num_silos), generator)


# --------------------------------------------------------------------------------------------------------------
# RDP accounting (sampled Gaussian mechanism, Mironov, Talwar & Zhang 2019, Section 3.3)
# --------------------------------------------------------------------------------------------------------------
def _log_add(a: float, b: float) -> float:
    lo, hi = min(a, b), max(a, b)
    if lo == -math.inf:
        return hi
    return hi + math.log1p(math.exp(lo - hi))


def _log_sub(a: float, b: float) -> float:
    if a < b:
        raise ValueError("log-space subtraction would be negative")
    if b == -math.inf:
        return a
    if a == b:
        return -math.inf
    try:
        return b + math.log(math.expm1(a - b))
    except OverflowError:
        return a


def _log_erfc(x: float) -> float:
    """log(erfc(x)), accurate also where erfc underflows (asymptotic series for large x)."""
    if x < 20:
        return math.log(math.erfc(x))
    x2 = x * x
    series = 1 - 1 / (2 * x2) + 3 / (4 * x2**2) - 15 / (8 * x2**3) + 105 / (16 * x2**4)
    return -x2 - math.log(x) - 0.5 * math.log(math.pi) + math.log(series)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    log_a = -math.inf
    for i in range(alpha + 1):
        log_binom = math.lgamma(alpha + 1) - math.lgamma(i + 1) - math.lgamma(alpha - i + 1)
        term = log_binom + i * math.log(q) + (alpha - i) * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
        log_a = _log_add(log_a, term)
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    # Split the integral at z0 and sum both halves as binomial series with real-valued binomial coefficients.
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    coef = 1.0  # binom(alpha, 0), updated by the recurrence binom(a, i+1) = binom(a, i) * (a - i) / (i + 1)
    i = 0
    while True:
        j = alpha - i
        log_coef = math.log(abs(coef))
        log_t0 = log_coef + i * math.log(q) + j * math.log1p(-q)
        log_t1 = log_coef + j * math.log(q) + i * math.log1p(-q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        if coef > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        if max(log_s0, log_s1) < -30:
            break
        coef = coef * (alpha - i) / (i + 1)
        i += 1
    return _log_add(log_a0, log_a1)


def _rdp_one(q: float, sigma: float, alpha: float) -> float:
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1.0:
        return alpha / (2 * sigma**2)
    if math.isinf(alpha):
        return math.inf
    log_a = _log_a_int(q, sigma, int(alpha)) if float(alpha).is_integer() else _log_a_frac(q, sigma, alpha)
    return log_a / (alpha - 1)


def compute_rdp(q: float, noise_multiplier: float, steps: int, orders: Sequence[float]) -> list[float]:
    """RDP of the sampled Gaussian mechanism repeated `steps` times, at each order.

    Args:
        q: Sampling rate in [0, 1] (1 = every silo every round: plain Gaussian, `alpha / (2 z^2)`).
        noise_multiplier: `z`, noise std over the L2 sensitivity.
        steps: Number of compositions (rounds).
        orders: RDP orders `alpha > 1`.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"sampling rate q must be in [0, 1], got {q}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    return [steps * _rdp_one(q, noise_multiplier, float(a)) for a in orders]


def rdp_to_epsilon(
    orders: Sequence[float], rdp: Sequence[float], delta: float, method: str = "balle"
) -> tuple[float, float]:
    """Smallest epsilon over the orders for the given delta.

    Args:
        orders: RDP orders.
        rdp: RDP values at those orders.
        delta: Target delta in (0, 1).
        method: "balle" (Balle et al. 2020, Thm. 21; what Opacus uses) or "classic" (Mironov 2017, Prop. 3:
            `rdp + log(1/delta) / (alpha - 1)`).

    Returns:
        `(epsilon, best_order)`; `(inf, nan)` if every order is infinite.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if len(orders) != len(rdp):
        raise ValueError(f"{len(orders)} orders but {len(rdp)} RDP values")
    best = (math.inf, math.nan)
    for alpha, r in zip(orders, rdp):
        if alpha <= 1 or math.isinf(r) or math.isnan(r):
            continue
        if method == "balle":
            eps = r - (math.log(delta) + math.log(alpha)) / (alpha - 1) + math.log((alpha - 1) / alpha)
        elif method == "classic":
            eps = r + math.log(1 / delta) / (alpha - 1)
        else:
            raise ValueError(f"unknown conversion method {method!r}; expected 'balle' or 'classic'")
        if eps < best[0]:
            best = (eps, float(alpha))
    return (max(best[0], 0.0) if not math.isinf(best[0]) else best[0]), best[1]


class RDPAccountant:
    """Composes the RDP of every DP round; the running RDP vector is its whole state.

    Args:
        orders: RDP orders searched for the best conversion (Opacus' defaults).
    """

    def __init__(self, orders: Iterable[float] = DEFAULT_ORDERS) -> None:
        self.orders: tuple[float, ...] = tuple(float(a) for a in orders)
        self.rdp: list[float] = [0.0] * len(self.orders)
        self.rounds = 0

    def step(self, noise_multiplier: float, sample_rate: float = 1.0, steps: int = 1) -> None:
        """Record `steps` rounds of the Gaussian mechanism with multiplier `z` and sampling rate `q`."""
        added = compute_rdp(sample_rate, noise_multiplier, steps, self.orders)
        self.rdp = [a + b for a, b in zip(self.rdp, added)]
        self.rounds += steps

    def get_epsilon(self, delta: float, method: str = "balle") -> float:
        """Epsilon spent so far for `delta` (0 before any round)."""
        if self.rounds == 0:
            return 0.0
        return rdp_to_epsilon(self.orders, self.rdp, delta, method)[0]

    def state_dict(self) -> StateDict:
        """Tensors only: `orders`, `rdp` (float64) and `rounds`."""
        return {
            "orders": torch.tensor(self.orders, dtype=torch.float64),
            "rdp": torch.tensor(self.rdp, dtype=torch.float64),
            "rounds": torch.tensor(self.rounds, dtype=torch.int64),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a `state_dict`."""
        self.orders = tuple(float(a) for a in state["orders"].tolist())
        self.rdp = [float(r) for r in state["rdp"].tolist()]
        self.rounds = int(state["rounds"])


# --------------------------------------------------------------------------------------------------------------
# Central DP wrapper strategy
# --------------------------------------------------------------------------------------------------------------
class _AccountedWrapper(StrategyWrapper):
    """What both DP wrappers share: epsilon so far, and checkpoints of the inner strategy plus the accountant."""

    accountant: "RDPAccountant"
    delta: float

    def epsilon(self, delta: float | None = None) -> float | None:
        """Epsilon spent so far at `delta` (default: the configured one); inf without noise."""
        return self.accountant.get_epsilon(self.delta if delta is None else delta)

    def change_bound(self, update_bound: float) -> float | None:
        """None: DP noise is not bounded by the round's updates."""
        return None

    def state_dict(self) -> StateDict:
        """Inner state under `inner.`, accountant under `dp.`."""
        state = {f"inner.{k}": v for k, v in self.inner.state_dict().items()}
        state.update({f"dp.{k}": v for k, v in self.accountant.state_dict().items()})
        return state

    def load_state_dict(self, state: StateDict) -> None:
        """Restore what `state_dict` returned."""
        inner: dict[str, Any] = {k[6:]: v for k, v in state.items() if k.startswith("inner.")}
        dp = {k[3:]: v for k, v in state.items() if k.startswith("dp.")}
        self.inner.load_state_dict(inner)
        if dp:
            self.accountant.load_state_dict(dp)


class CentralDP(_AccountedWrapper):
    """Wraps a mean-based strategy (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi) with central client-level DP.

    Each update is clipped to `clip_norm` and counted with weight 1 (so one silo moves the mean by at most
    `C / n`); Gaussian noise of std `z * C / n` is added to the mean before the inner strategy's server step.
    Every round that produces a new global state is recorded in `accountant`.

    Args:
        inner: The strategy to wrap (must aggregate by a mean: a `FedAvg` or subclass).
        clip_norm: `C`.
        noise_multiplier: `z`.
        seed: Noise seed, for tests only (noise is then reproducible, which weakens privacy); None = OS entropy.
        population: Total number of silos; if given, `q = participants / population` per round (only valid if
            the coordinator samples silos at random), else `q = 1`.
        delta: The delta `epsilon()` reports for by default.
    """

    inner: FedAvg  # checked in __init__

    def __init__(
        self,
        inner: Strategy,
        clip_norm: float,
        noise_multiplier: float,
        seed: int | None = None,
        *,
        population: int | None = None,
        delta: float = 1e-5,
    ) -> None:
        if not isinstance(inner, FedAvg):
            raise ValueError(
                f"CentralDP needs a mean-based strategy (fedavg, fedprox, fedavgm, fedadam, fedyogi), got "
                f"{inner.name!r}: its sensitivity is not C/n"
            )
        if clip_norm <= 0 or noise_multiplier < 0:
            raise ValueError(f"need clip_norm > 0 and noise_multiplier >= 0, got {clip_norm}, {noise_multiplier}")
        super().__init__(inner)
        self._clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.seed = seed
        self.population = population
        self.delta = delta
        self.accountant = RDPAccountant()

    @property
    def central_dp(self) -> bool:
        """True: this wrapper adds the noise."""
        return True

    @property
    def clip_norm(self) -> float | None:
        """`C`: every update is clipped to it."""
        return self._clip_norm

    def start_round(self, round_id: int, global_state: StateDict) -> RoundAccumulator:
        """An accumulator that clips each update to C and weighs it 1."""
        return ClippedAccumulator(self.inner.start_round(round_id, global_state), self._clip_norm, uniform_weights=True)

    def _generator(self, round_id: int) -> torch.Generator:
        gen = torch.Generator()
        if self.seed is None:
            gen.manual_seed(secrets.randbits(63))
        else:
            gen.manual_seed((self.seed * 1_000_003 + round_id) % (2**63))
        return gen

    def finish_round(
        self, round_id: int, global_state: StateDict, acc: RoundAccumulator, failures: list[str]
    ) -> StateDict | None:
        """Mean of the clipped updates + noise `N(0, (z C / n)^2)`, then the inner server step; accounted."""
        if not self.inner.round_counts(round_id, acc, failures):
            return None
        n = acc.count  # type: ignore[attr-defined]
        mean = self.inner.aggregate(acc)
        noisy = add_gaussian_noise(mean, self.noise_multiplier * self._clip_norm / n, self._generator(round_id))
        q = min(1.0, n / self.population) if self.population else 1.0
        self.accountant.step(self.noise_multiplier, q)
        logger.info(
            "round %d: DP noise std %.3g on the mean of %d clipped updates; epsilon %.3f at delta %g",
            round_id,
            self.noise_multiplier * self._clip_norm / n,
            n,
            self.epsilon(),
            self.delta,
        )
        return self.inner.apply_delta(round_id, global_state, noisy)


class SiloDPAccounting(_AccountedWrapper):
    """Wraps any strategy when the silos add the noise themselves (`privatize_update`): accounts, changes nothing.

    Each round that produces a new global state is recorded as one Gaussian mechanism with multiplier `z`
    (every silo's own update is `(C, z)`-Gaussian; `q` = 1), so `epsilon()` is each silo's guarantee.
    """

    def __init__(self, inner: Strategy, noise_multiplier: float, *, delta: float = 1e-5) -> None:
        super().__init__(inner)
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.accountant = RDPAccountant()

    def finish_round(
        self, round_id: int, global_state: StateDict, acc: RoundAccumulator, failures: list[str]
    ) -> StateDict | None:
        """The inner result; a round that counts is accounted."""
        new_state = self.inner.finish_round(round_id, global_state, acc, failures)
        if new_state is not None:
            self.accountant.step(self.noise_multiplier, 1.0)
        return new_state
