"""Sticky quarantine: a worker that failed a canary check stays out until an operator clears it.

A record binds the worker's identity (the hash of its own API key, when it joined with one) and its addresses (its
normalised `host:port`, plus the same port on every IP its host resolves to), so that neither leaving
(`DELETE /admin/workers/{id}`), nor joining again under the same key, nor another spelling of its URL
(`http://LOCALHOST:8101/`, `http://127.0.0.1:8101`) sheds it. Records live in `keys/quarantine.json` (mode 0600,
written atomically), so a router restart keeps them. A join that matches a record is refused (403). Only the
operator clears one: `POST /admin/workers/{id}/clear` while the worker is there, `DELETE /admin/quarantine/{address}`
after it is gone (`appliance fleet unquarantine ADDRESS`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedllm.core.atomic import write_text_atomic
from fedllm.core.errors import DataError
from fedllm.serve.worker_address import normalised_address

logger = logging.getLogger(__name__)

QUARANTINE_FILE = "quarantine.json"
RESOLVE_TIMEOUT_S = 2.0


@dataclass
class QuarantineRecord:
    """One quarantined worker: how to recognise it again, and why it is out."""

    address: str  # normalised host:port it joined under
    addresses: list[str] = field(default_factory=list)  # every host:port spelling it is known by (resolved IPs too)
    key_hash: str | None = None  # hash of its own API key, when it had one
    worker_id: str = ""
    url: str = ""
    reason: str = ""
    since: int = 0  # unix seconds

    def describe(self) -> dict[str, Any]:
        """The row of `GET /admin/quarantine` (never the key's hash)."""
        return {
            "address": self.address,
            "addresses": self.addresses,
            "worker_id": self.worker_id,
            "url": self.url,
            "reason": self.reason,
            "since": self.since,
            "by_key": self.key_hash is not None,
        }


async def addresses_of(url: str) -> set[str]:
    """The normalised `host:port` of `url`, plus `ip:port` for each address its host resolves to (best effort).

    Raises:
        ValueError: `url` is not a worker URL (fedllm.serve.worker_address).
    """
    address = normalised_address(url)
    host, _, port = address.rpartition(":")
    found = {address}
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM),
            RESOLVE_TIMEOUT_S,
        )
    except (OSError, asyncio.TimeoutError, UnicodeError):
        return found
    for info in infos:
        ip = str(info[4][0]).lower()
        found.add(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    return found


class QuarantineBook:
    """The quarantine records of one router, persisted in `keys_dir/quarantine.json`."""

    def __init__(self, keys_dir: Path):
        """Read the records.

        Raises:
            DataError: the file exists but cannot be read or is not a quarantine file.
        """
        self.path = Path(keys_dir) / QUARANTINE_FILE
        self.records: list[QuarantineRecord] = self._load()

    def _load(self) -> list[QuarantineRecord]:
        if not self.path.exists():
            return []
        try:
            rows = json.loads(self.path.read_text(encoding="utf-8"))["records"]
            return [QuarantineRecord(**row) for row in rows]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # The router does not start: going on without the records would let every quarantined worker back in.
            raise DataError(
                f"{self.path} is not a valid quarantine file ({exc}); fix it, or remove it to clear every quarantine"
            ) from exc

    def _save(self) -> None:
        write_text_atomic(self.path, json.dumps({"records": [asdict(r) for r in self.records]}, indent=2) + "\n")
        os.chmod(self.path, 0o600)

    def match(self, addresses: set[str], key_hash: str | None) -> QuarantineRecord | None:
        """The record of a worker known by any of `addresses` or by its API key's hash, or None."""
        for record in self.records:
            if addresses & {record.address, *record.addresses} or (
                key_hash is not None and record.key_hash == key_hash
            ):
                return record
        return None

    def add(
        self, addresses: set[str], address: str, key_hash: str | None, *, worker_id: str, url: str, reason: str
    ) -> QuarantineRecord:
        """Quarantine a worker (merged into its existing record if it has one); saved at once."""
        record = self.match(addresses, key_hash)
        if record is None:
            record = QuarantineRecord(address, worker_id=worker_id, url=url, reason=reason, since=int(time.time()))
            self.records.append(record)
        record.addresses = sorted({*record.addresses, *addresses})
        record.key_hash = record.key_hash or key_hash
        record.worker_id, record.reason = worker_id, reason
        self._save()
        return record

    def clear(self, addresses: set[str], api_key_hash: str | None = None) -> list[QuarantineRecord]:
        """Drop the records of a worker known by any of `addresses` or by the key hash; returns them."""
        gone = [
            r
            for r in self.records
            if addresses & {r.address, *r.addresses} or (api_key_hash is not None and r.key_hash == api_key_hash)
        ]
        if gone:
            self.records = [r for r in self.records if r not in gone]
            self._save()
        return gone
