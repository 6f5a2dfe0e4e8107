"""After a round the promotion gate held back, the next round trains from the promoted version, not from the held-back
global adapter (`federation.gate_resume`, on by default with a gate on gate data).

A round that made the adapter worse (a silo with a rate far too high, a poisoned update within the bounds) moves the
global adapter far from where it was; later rounds at a sane rate start from there and take many rounds to come back.
So before each round (`before_round`, called by the coordinator) the coordinator asks its gate publisher for the
decision on the previous round's version, waiting up to `federation.gate_wait_s` while the gate measures it (not while
the router is unreachable: then the run goes on from the current global). When it was held back, the global adapter
becomes the promoted version's weights (read from the registry) and the round record says so (`started_from`).
The held-out gate (no gate data) decides a version only with the next round's figures, so it never resumes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedllm.federation.runtime.coordinator import Coordinator

logger = logging.getLogger(__name__)


def _gate_publisher(coordinator: Coordinator) -> Any:
    """The publisher whose promotion gate decides now (not deferred to a later run), if any."""
    for publisher in coordinator.on_publish:
        gate = getattr(publisher, "gate", None)  # the callbacks are plain callables; a RouterPublisher has a gate
        if gate is not None and not gate.deferred:
            return publisher
    return None


async def before_round(coordinator: Coordinator) -> str | None:
    """Restore the promoted version's weights when the previous round's version was held back; returns its served name
    (also kept as `coordinator.started_from`), else None."""
    coordinator.started_from = None
    cfg = coordinator.cfg
    publisher = _gate_publisher(coordinator)
    previous = next((r.get("adapter") for r in reversed(coordinator.history) if r.get("adapter")), None)
    if publisher is None or not cfg.gate_resume or previous is None:
        return None
    from fedllm.federation.publishing.heldout import served_name

    decision = await asyncio.to_thread(publisher.wait_decided, served_name(previous), cfg.gate_wait_s)
    if decision is None or decision.get("decision") != "held back" or not decision.get("current"):
        return None
    promoted = decision["current"]
    name, _, number = promoted.rpartition("-v")
    try:
        from fedllm import train

        version = coordinator.registry.get(f"{name}:{number}")
        state = await asyncio.to_thread(train.load_adapter_state, version.path)
    except Exception as exc:  # the run goes on from the current global rather than stop
        logger.error(
            "gate resume: cannot read the promoted version %s: %s; going on from the current global", promoted, exc
        )
        return None
    if set(state) != set(coordinator.global_state):
        logger.error(
            "gate resume: %s's tensors differ from the global adapter's; going on from the current global", promoted
        )
        return None
    coordinator.global_state = {k: v.detach().float().contiguous() for k, v in state.items()}
    coordinator.started_from = promoted
    logger.warning(
        "round %d starts from the promoted version %s: %s was held back by the gate",
        coordinator.round + 1,
        promoted,
        served_name(previous),
    )
    return promoted
