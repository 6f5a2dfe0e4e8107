"""The silos' held-out figure of each global adapter, and the gate decisions shown with the rounds.

For a federation without gate data the promotion gate (federation/publishing/gate.py `HeldOutGate`) compares the silos'
own held-out losses. Each silo with eval data evaluates the global adapter it receives, before it trains on it
(`received_metrics`), and sends the loss as the metric `received_eval_loss` with its update. The coordinator weighs
those losses with the round's (capped) shares (`received_eval`) and stores the figure in the round record and in the
registered version's meta as `received_eval: {"adapter", "loss", "silos"}`: the held-out loss of the version of the
round before (`adapter`, None in round 1: the initial adapter).

`with_gate(rounds, run_dir)` adds each round's gate decision (from `gate.jsonl`) to the rounds of the coordinator's
status: `"gate": {"decision", "loss", "current", "current_loss", "source", "prompts"}`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedllm.core.contracts.gate_log import read_gate_log

RECEIVED = "received_eval_loss"


def received_metrics(trainer: Any) -> dict[str, float]:
    """The trainer's held-out loss of the state it holds now (the global adapter just received), as
    `{"received_eval_loss": x}`; empty when the trainer has no eval data or the loss is not finite."""
    loss = (trainer.evaluate() or {}).get("eval_loss")
    return {RECEIVED: float(loss)} if isinstance(loss, (int, float)) and math.isfinite(loss) else {}


def received_eval(
    per_silo: dict[str, dict[str, Any]],
    shares: dict[str, float],
    examples: dict[str, int],
    previous_adapter: str | None,
) -> dict[str, Any] | None:
    """The round's held-out figure of the global adapter the silos received: their `received_eval_loss` weighted by
    their shares in the round (by example counts where a share is missing); None when no silo reported one."""
    reported = {s: m[RECEIVED] for s, m in per_silo.items() if isinstance(m.get(RECEIVED), (int, float))}
    if not reported:
        return None
    weights = {s: float(shares.get(s) or examples.get(s) or 1) for s in reported}
    total = sum(weights.values()) or 1.0
    loss = sum(reported[s] * weights[s] for s in reported) / total
    return {"adapter": previous_adapter, "loss": loss, "silos": sorted(reported)}


def previous_adapter(history: Sequence[dict[str, Any]]) -> str | None:
    """The registry ref of the newest completed round's adapter (the global adapter this round's silos received)."""
    return next((r.get("adapter") for r in reversed(history) if "participants" in r), None)


def served_name(ref: str) -> str:
    """`NAME:N` -> `NAME-vN` (the name the router serves a registry version under)."""
    name, _, number = ref.rpartition(":")
    return f"{name}-v{number}"


def with_gate(rounds: list[dict[str, Any]], run_dir: Path) -> list[dict[str, Any]]:
    """`rounds` with each one's gate decision (`gate.jsonl` of the run) added as `"gate"`, where there is one."""
    decisions = {
        name: {k: row.get(k) for k in ("decision", "loss", "current", "current_loss", "source", "prompts")}
        for name, row in read_gate_log(run_dir / "gate.jsonl").items()
    }
    out = []
    for r in rounds:
        gate = decisions.get(served_name(r["adapter"])) if r.get("adapter") else None
        out.append({**r, "gate": gate} if gate else r)
    return out


def gate_text(gate: dict[str, Any] | None) -> str:
    """A round's gate decision in words: 'promoted (loss 1.23 vs 1.30)' / 'held back (loss 2.50 vs 1.23)'."""
    if not gate:
        return ""

    def fmt(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, (int, float)) else "n/a"

    text = f"{gate.get('decision')} (loss {fmt(gate.get('loss'))} vs {fmt(gate.get('current_loss'))})"
    prompts = gate.get("prompts")
    return f"{text}; {prompts}" if prompts and prompts != "ok" else text
