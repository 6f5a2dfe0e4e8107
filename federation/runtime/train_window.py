"""How many TRAIN messages the coordinator has on the way at once, so a round's start does not cost a copy per silo.

Under CURVE, libzmq encrypts each message into a fresh buffer as it starts writing it to a connection and holds that
buffer until the connection has taken every byte. Sending the round's TRAIN to N silos at once therefore costs N
encrypted copies of the adapter (measured: about 1.5 x the payload per connection), for as long as the slowest link
takes. The window admits a TRAIN only while the TRAINs on the way total at most `federation.train_window_bytes`
(always at least one); a TRAIN stops counting when its silo acknowledges it (a HEARTBEAT with `got_train` = the
round, sent by the silo as the TRAIN arrives), answers the round, is no longer waited for, or after its transfer
allowance (`train_wait_s`; two heartbeats for an older silo that said nothing of `acks_train` in its HELLO). So the
coordinator's memory at a round's start is about the window, not silos x adapter; the price is that at most window /
payload silos download at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

__all__ = ["TrainWindow", "acknowledges", "train_wait_s"]


class TrainWindow:
    """TRAINs on the way: silo -> (bytes, when it stops counting at the latest).

    Args:
        budget_bytes: the most TRAIN bytes on the way at once (a TRAIN bigger than that goes alone).
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._open: dict[str, tuple[int, float]] = {}
        self._changed = asyncio.Event()
        self.peak_in_flight = 0  # the most TRAINs on the way at once (tests, reports)
        self.expired = 0  # TRAINs that stopped counting by timeout, not by an acknowledgement

    def in_flight_bytes(self) -> int:
        """Bytes of the TRAINs still on the way."""
        self._expire()
        return sum(size for size, _ in self._open.values())

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, (_, until) in self._open.items() if until <= now]:
            del self._open[sid]
            self.expired += 1

    async def acquire(self, silo_id: str, size: int, timeout_s: float) -> None:
        """Wait until a TRAIN of `size` bytes fits in the window, then count it for at most `timeout_s` seconds."""
        self.release(silo_id)
        while True:
            self._expire()
            if not self._open or self.in_flight_bytes() + size <= self.budget_bytes:
                break
            self._changed.clear()
            wait = min(until for _, until in self._open.values()) - time.monotonic()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=max(0.01, wait))
            except asyncio.TimeoutError:
                pass
        self._open[silo_id] = (size, time.monotonic() + timeout_s)
        self.peak_in_flight = max(self.peak_in_flight, len(self._open))

    def release(self, silo_id: str) -> None:
        """The silo's TRAIN no longer counts (acknowledged, answered, gone, or sent again)."""
        if self._open.pop(silo_id, None) is not None:
            self._changed.set()


def acknowledges(header: Any, round_id: int) -> bool:
    """Whether a silo's message ends the wait for its TRAIN of `round_id`: a HEARTBEAT saying it got it, or an answer
    (UPDATE, ERROR, SECAGG) or BYE."""
    from fedllm.federation.wire.protocol import MsgType

    if header.type == MsgType.HEARTBEAT:
        return header.body.get("got_train") == round_id
    return header.type in (MsgType.UPDATE, MsgType.ERROR, MsgType.SECAGG, MsgType.BYE)


def train_wait_s(allowance_s: float, acks: bool, heartbeat_s: float) -> float:
    """How long a TRAIN counts at most: the silo's transfer allowance when it acknowledges TRAINs (HELLO
    `acks_train`), else two heartbeats (an older silo never acknowledges: the window must not wait out its
    allowance)."""
    return allowance_s if acks else min(allowance_s, 2 * heartbeat_s)
