"""LoRA-aware aggregation maths: pure float32 functions on adapter state dicts (no sockets, files or clocks).

A LoRA module adapts a weight W (out, in) by dW = s * B @ A, with A (r, in), B (out, r) and s = lora_alpha / r
(PEFT's scaling). Averaging A and B separately (plain FedAvg) is inexact: mean(B_i) mean(A_i) != mean(B_i A_i).
Two exact alternatives live here:

- product aggregation (FlexLoRA-style): average the dense products s_i B_i A_i, then re-factorise the mean to
  the global rank by truncated SVD (the best rank-r approximation in Frobenius norm, Eckart-Young), so the
  result is again an ordinary PEFT LoRA state. Silos may train at different ranks: each gets the global
  product truncated to its own rank (`project_state`), and what it learned is the difference of its local
  product and the product it was sent.
- frozen A (FFA-LoRA-style): every silo keeps A at the shared seeded init and trains B only, so
  mean_i(B_i) A = mean_i(B_i A) exactly; `zero_lora_a` drops whatever A deltas arrive.

Keys are the adapter-name-free keys of `peft.get_peft_model_state_dict`
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`). Dense matrices are keyed by the module
prefix (the key without `.lora_A.weight`). Memory: a dense dict holds one (out, in) float32 matrix per adapted
module (for SmolLM2-135M with q/k/v/o: 26.5 M floats, 106 MB; for a 7B Llama with q/k/v/o about 2 G floats).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import cast

import torch

from fedllm.core.types import StateDict

A_SUFFIX = "lora_A.weight"
B_SUFFIX = "lora_B.weight"
_DEAD = 1e-6  # singular values below this share of the largest are treated as zero directions

__all__ = [
    "A_SUFFIX",
    "B_SUFFIX",
    "lora_modules",
    "lora_rank",
    "lora_scale",
    "dense_products",
    "product_delta",
    "factorize",
    "refactorize",
    "project_state",
    "weighted_dense_mean",
    "zero_lora_a",
]


def lora_modules(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Module prefix -> (A key, B key) for every LoRA module of `state`.

    Raises:
        ValueError: a key that is not a lora_A/lora_B weight, or an A without its B (or the reverse).
    """
    prefixes: dict[str, dict[str, str]] = {}
    for key in state:
        for suffix, slot in ((A_SUFFIX, "A"), (B_SUFFIX, "B")):
            if key.endswith(suffix):
                prefixes.setdefault(key[: -len(suffix)], {})[slot] = key
                break
        else:
            raise ValueError(f"LoRA-aware aggregation needs lora_A/lora_B weight pairs only; found {key!r}")
    unpaired = sorted(p for p, slots in prefixes.items() if len(slots) != 2)
    if unpaired:
        raise ValueError(
            f"LoRA module {unpaired[0]!r} has no {'lora_B' if 'A' in prefixes[unpaired[0]] else 'lora_A'} weight"
        )
    return {p: (slots["A"], slots["B"]) for p, slots in sorted(prefixes.items())}


def lora_rank(state: Mapping[str, torch.Tensor]) -> int:
    """The rank r of a LoRA state (rows of A).

    Raises:
        ValueError: modules of different ranks, or A/B shapes that do not multiply.
    """
    ranks = set()
    for prefix, (a_key, b_key) in lora_modules(state).items():
        a, b = state[a_key], state[b_key]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"LoRA module {prefix!r}: B {tuple(b.shape)} @ A {tuple(a.shape)} does not multiply")
        ranks.add(int(a.shape[0]))
    if len(ranks) != 1:
        raise ValueError(f"LoRA state mixes ranks {sorted(ranks)}")
    return ranks.pop()


def lora_scale(lora_alpha: float, rank: int) -> float:
    """PEFT's LoRA scaling s = lora_alpha / r (not rsLoRA)."""
    return float(lora_alpha) / rank


def dense_products(state: Mapping[str, torch.Tensor], scale: float) -> StateDict:
    """`{prefix: scale * B @ A}` (out, in) in float32: the weight change each LoRA module applies."""
    return {
        p: scale * (state[b].to(torch.float32) @ state[a].to(torch.float32))
        for p, (a, b) in lora_modules(state).items()
    }


def product_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], scale: float) -> StateDict:
    """What a silo learned, as dense weight changes: `s * (B + dB)(A + dA) - s * B A` per module.

    Args:
        base: the LoRA state the silo was sent (its rank).
        delta: its update `local - base` (same keys and shapes).
        scale: the silo's lora_alpha / r.
    """
    out: StateDict = {}
    for p, (a_key, b_key) in lora_modules(base).items():
        a, b = base[a_key].to(torch.float32), base[b_key].to(torch.float32)
        da, db = delta[a_key].to(torch.float32), delta[b_key].to(torch.float32)
        # (B + dB)(A + dA) - B A = B dA + dB A + dB dA: no cancellation of two large products
        out[p] = scale * (b @ da + db @ a + db @ da)
    return out


def factorize(dense: torch.Tensor, rank: int, scale: float, *, fill_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A (rank, in), B (out, rank)) with `scale * B @ A` the best rank-`rank` approximation of `dense`.

    Truncated SVD, singular values split evenly: B = U sqrt(S / s), A = sqrt(S / s) Vh. Directions the matrix
    does not fill (zero singular values, or rank > min(out, in)) get B = 0 and a seeded random row of A (PEFT's
    kaiming-uniform bound 1/sqrt(in)): they add nothing to the product but stay trainable, where A = B = 0
    would give both a zero gradient forever.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    out_dim, in_dim = dense.shape
    u, s, vh = torch.linalg.svd(dense.to(torch.float32), full_matrices=False)  # (out, k), (k,), (k, in)
    k = min(rank, s.numel())
    root = torch.sqrt(s[:k] / scale)
    a = torch.zeros(rank, in_dim, dtype=torch.float32)
    b = torch.zeros(out_dim, rank, dtype=torch.float32)
    live = s[:k] > _DEAD * float(s[0]) if k else torch.zeros(0, dtype=torch.bool)
    a[:k] = root[:, None] * vh[:k]
    b[:, :k] = u[:, :k] * root[None, :]
    dead = [i for i in range(rank) if i >= k or not bool(live[i])]
    if dead:
        g = torch.Generator().manual_seed(fill_seed)
        bound = 1.0 / math.sqrt(in_dim)
        a[dead] = (torch.rand(len(dead), in_dim, generator=g) * 2 - 1) * bound
        b[:, dead] = 0.0
    return a, b


def refactorize(
    dense: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor], rank: int, scale: float
) -> StateDict:
    """A LoRA state of rank `rank` whose products approximate `dense`; keys and dtypes follow `like`'s modules.

    Args:
        dense: `{prefix: (out, in)}` weight changes (as `dense_products` gives).
        like: any LoRA state with the same modules (its keys name the result; dtypes are cast back to its dtypes).
        rank: the rank of the result.
        scale: the result's lora_alpha / rank.
    """
    out: StateDict = {}
    for i, (p, (a_key, b_key)) in enumerate(lora_modules(like).items()):
        a, b = factorize(dense[p], rank, scale, fill_seed=i)
        out[a_key], out[b_key] = a.to(like[a_key].dtype), b.to(like[b_key].dtype)
    return out


def project_state(state: Mapping[str, torch.Tensor], scale: float, rank: int, new_scale: float) -> StateDict:
    """`state` at another rank: each product truncated (or zero-padded) to `rank`, factored for `new_scale`.

    Keys stay the same; A becomes (rank, in) and B (out, rank). At the state's own rank and scale this returns
    copies of the same factors (no SVD round trip).
    """
    if rank == lora_rank(state) and math.isclose(scale, new_scale):
        return {k: v.detach().to(torch.float32).clone() for k, v in state.items()}
    products = dense_products(state, scale)
    out: StateDict = {}
    for i, (p, (a_key, b_key)) in enumerate(lora_modules(state).items()):
        out[a_key], out[b_key] = factorize(products[p], rank, new_scale, fill_seed=i)
    return out


def weighted_dense_mean(items: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> StateDict:
    """Example-weighted mean `sum(n_i d_i) / sum(n_i)` of dense dicts with the same keys (float32)."""
    if not items:
        raise ValueError("weighted_dense_mean needs at least one item")
    total = float(sum(n for _, n in items))
    if total <= 0:
        raise ValueError("weights must sum to > 0")
    return {
        k: cast(torch.Tensor, sum(float(n) * d[k].to(torch.float32) for d, n in items)) / total for k in items[0][0]
    }


def zero_lora_a(state: Mapping[str, torch.Tensor]) -> StateDict:
    """A copy of `state` with every lora_A tensor zeroed (frozen-A rounds: the server keeps A fixed)."""
    return {k: torch.zeros_like(v) if k.endswith(A_SUFFIX) else v for k, v in state.items()}
