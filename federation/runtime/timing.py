"""Per-silo round timings (download, train, upload) and the transfer allowance of a silo's round deadline.

Pure functions and one small estimator; no sockets, no clocks of their own (callers pass the times).

How the timings are measured without trusting the two clocks to agree (docs/CONTRACTS.md, "Per-silo timings"):
the coordinator knows when it handed a silo its TRAIN and when the silo's UPDATE arrived (its clock: the span);
the silo knows when the TRAIN arrived, how long it trained, and when it handed over the UPDATE (its clock: the
hold). `span - hold` is the time on the wire both ways, exact whatever the offset between the clocks. It is split
into download and upload with the offset the silo estimates from its HEARTBEAT echoes (NTP's way, keeping the
echo of the shortest round trip): the split is off by at most half that round trip.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class ClockOffset:
    """The offset `coordinator clock - silo clock`, from heartbeat echoes; the sample of the shortest round trip
    among the last `window` wins (a queued echo, e.g. behind a large TRAIN, only lengthens its round trip)."""

    def __init__(self, window: int = 16) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=window)  # (rtt_s, offset_s)

    def add(self, sent_at: float, remote_at: float, received_at: float) -> None:
        """One echo: sent at `sent_at` and received at `received_at` (silo clock), stamped `remote_at` by the
        coordinator in between. A sample with a negative round trip (a clock step) is ignored."""
        rtt = received_at - sent_at
        if rtt >= 0:
            self._samples.append((rtt, remote_at - (sent_at + received_at) / 2))

    @property
    def best(self) -> tuple[float, float] | None:
        """(rtt_s, offset_s) of the shortest round trip, or None before the first echo."""
        return min(self._samples) if self._samples else None


def silo_timings(
    *,
    train_sent: float,
    update_received: float,
    train_received: float | None,
    update_sent: float | None,
    train_s: float,
    offset_s: float | None,
    bytes_down: int,
    bytes_up: int,
) -> dict[str, Any]:
    """One silo's timings of one round.

    Args:
        train_sent: coordinator clock, when the round's first TRAIN to this silo went to the socket.
        update_received: coordinator clock, when its UPDATE arrived.
        train_received, update_sent: silo clock, when the TRAIN arrived and the UPDATE left (None: an older silo).
        train_s: the silo's local training time (its report).
        offset_s: the silo's estimate of `coordinator clock - silo clock` (None: no echo yet).
        bytes_down, bytes_up: the TRAIN's and the UPDATE's size on the wire.

    Returns:
        `{"download_s", "train_s", "upload_s", "transfer_s", "span_s", "bytes_down", "bytes_up"}`: seconds (rounded to
        ms); `transfer_s = download_s + upload_s = span_s - the silo's hold`; download/upload are None when the
        silo gave no timestamps or no offset (transfer_s then is None too without timestamps).
    """
    span = max(0.0, update_received - train_sent)
    out: dict[str, Any] = {
        "download_s": None,
        "train_s": round(train_s, 3),
        "upload_s": None,
        "transfer_s": None,
        "span_s": round(span, 3),
        "bytes_down": bytes_down,
        "bytes_up": bytes_up,
    }
    if train_received is None or update_sent is None:
        return out
    hold = max(0.0, update_sent - train_received)
    transfer = max(0.0, span - hold)
    out["transfer_s"] = round(transfer, 3)
    if offset_s is not None:
        download = min(max(train_received + offset_s - train_sent, 0.0), transfer)
        out["download_s"], out["upload_s"] = round(download, 3), round(transfer - download, 3)
    return out


def throughput_bps(nbytes: int, seconds: float | None) -> float | None:
    """Bytes per second of one measured transfer (None when not measured; a transfer under 1 ms counts as 1 ms)."""
    if seconds is None or nbytes <= 0:
        return None
    return nbytes / max(seconds, 1e-3)


def connection_timeout_s(
    heartbeat_s: float, silo_timeout_s: float, max_message_bytes: int, assumed_mbit: float
) -> float:
    """How long a federation connection may bring no whole message before ZeroMQ drops it (ZMTP heartbeat timeout).

    ZeroMQ hears a peer's heartbeat only between messages, so while the largest message (`max_message_bytes`) crosses
    a link of `assumed_mbit` Mbit/s the peer seems mute; three heartbeats alone would cut such a transfer every time.
    """
    return max(3 * heartbeat_s, silo_timeout_s) + max_message_bytes * 8 / (assumed_mbit * 1e6)


def connection_timeout(cfg: Any, max_message_bytes: int | None = None) -> float:
    """`connection_timeout_s` of a `FederationSettings` for messages up to `max_message_bytes` (default:
    `cfg.max_message_bytes`, or a silo's bound when that is derived)."""
    from fedllm.federation.aggregation.bounds import SILO_MAX_MESSAGE_BYTES

    size = max_message_bytes or cfg.max_message_bytes or SILO_MAX_MESSAGE_BYTES
    return connection_timeout_s(cfg.heartbeat_interval_s, cfg.silo_timeout_s, size, cfg.assumed_link_mbit)


def transfer_allowance_s(
    bytes_down: int, bytes_up: int, *, down_bps: float | None, up_bps: float | None, assumed_mbit: float, slack: float
) -> float:
    """Seconds a silo's round deadline adds for moving the adapter both ways on its link.

    `slack` times the expected transfer time: each direction's bytes over that direction's throughput measured in an
    earlier round (`down_bps`, `up_bps`, which include the link's latency), or over `assumed_mbit` Mbit/s where it was
    not measured yet.
    """
    assumed_bps = assumed_mbit * 1e6 / 8
    expected = bytes_down / (down_bps or assumed_bps) + bytes_up / (up_bps or assumed_bps)
    return slack * expected
