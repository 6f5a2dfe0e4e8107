"""The round's TRAIN payload, encoded once and shared by every silo that is sent the global adapter.

Encoding the global adapter afresh for each silo made one payload (the adapter's size) per silo, and ZeroMQ holds
each queued message until its connection drains: at the start of a round the coordinator held `silos x adapter`
bytes. pyzmq sends frames above its copy threshold (64 KiB) without copying them, so one `bytes` payload shared
by every TRAIN of the round costs its size once, whatever the number of silos. Only the header (the silo's name,
its deadline) differs from one silo to the next. An adapter other than the global one (product aggregation's
per-rank projection) is encoded for its silo alone, as before.
"""

from __future__ import annotations

from fedllm.core.types import StateDict
from fedllm.federation.wire.payload import EncodedPayload, encode_payload

__all__ = ["TrainPayloads"]


class TrainPayloads:
    """Encodings of one round's global adapter, by method (at most one or two per round)."""

    def __init__(self) -> None:
        self._global: dict[str, tuple[StateDict, EncodedPayload]] = {}

    def get(self, state: StateDict, method: str, global_state: StateDict) -> EncodedPayload:
        """The encoding of `state` (`fedllm.federation.wire.payload.encode_payload`): shared when it is `global_state`,
        fresh otherwise."""
        if state is not global_state:
            return encode_payload(state, method)
        cached = self._global.get(method)
        if cached is None or cached[0] is not global_state:
            cached = self._global[method] = (global_state, encode_payload(global_state, method))
        return cached[1]
