"""The closed loop: publish each new global adapter version to the router as soon as its round is checkpointed.

`RouterPublisher` is a coordinator `on_publish` callback `(AdapterVersion) -> None`. The call only queues the
version and returns at once; a background thread publishes it with `RouterClient.publish_version` (served as
`NAME-vVERSION`, the alias `NAME-latest` moves to it), retrying with exponential backoff. A failed
publish is logged and kept in `status()`, and never blocks or fails the federation. When a newer version of the same
adapter arrives while an older one is still being retried, the older one is dropped: the alias must reach the newest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from appliance.core.adapter_registry import AdapterVersion
from appliance.core.router_client import RouterClient, ServiceUnavailable, latest_alias

logger = logging.getLogger(__name__)


@dataclass
class PublishRecord:
    """What happened to one version: attempts so far, the last error, and whether it is served."""

    served_name: str
    alias: str
    attempts: int = 0
    published: bool = False
    superseded: bool = False
    last_error: str | None = None
    published_at: float | None = None
    history: list[str] = field(default_factory=list)
    gate: dict[str, Any] | None = None  # the promotion gate's decision (federation/gate.py), if there is a gate


class RouterPublisher:
    """Publish adapter versions to a router in the background; usable as a coordinator `on_publish` callback.

    Args:
        router_url: Base URL of the router, e.g. `http://127.0.0.1:8000`.
        admin_token: Bearer token for the router's `/admin/*` API (never logged).
        path_map: Optional function turning the registry folder into the path the workers can read (remote workers).
        initial_backoff_s: First retry delay; doubles after each failure up to `max_backoff_s`.
        max_backoff_s: Largest retry delay.
        max_attempts: Attempts before a version is given up (0 = retry until superseded or closed).
        timeout_s: HTTP timeout of one attempt (loading an adapter on a worker can take a few seconds).
        verify: TLS verification of an https router: True (system store) or an `ssl.SSLContext` (a private CA).
    """

    def __init__(
        self,
        router_url: str,
        admin_token: str,
        *,
        path_map: Any = None,
        initial_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        max_attempts: int = 0,
        timeout_s: float = 120.0,
        verify: Any = True,
        gate: Any = None,
    ) -> None:
        self.router_url = router_url.rstrip("/")
        self._client = RouterClient(self.router_url, admin_token, timeout_s=timeout_s, verify=verify)
        self._path_map = path_map
        self._gate = gate  # a federation.gate.PromotionGate: held-back versions are published without their alias
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._max_attempts = max_attempts
        self._pending: OrderedDict[str, AdapterVersion] = OrderedDict()  # adapter name -> newest waiting version
        self._records: dict[str, PublishRecord] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="router-publisher", daemon=True)
        self._thread.start()

    # -- the callback --
    def __call__(self, version: AdapterVersion) -> None:
        """Queue `version` for publishing and return at once (never raises into the federation)."""
        alias = latest_alias(version.name)
        with self._cond:
            older = self._pending.pop(version.name, None)
            if older is not None and older.served_name in self._records:
                self._records[older.served_name].superseded = True
                logger.info("publish of %s superseded by %s", older.served_name, version.served_name)
            self._pending[version.name] = version
            self._records.setdefault(version.served_name, PublishRecord(version.served_name, alias))
            self._cond.notify_all()

    # -- observers --
    def status(self) -> dict[str, dict[str, Any]]:
        """Every version seen, by served name: attempts, published, superseded, last_error."""
        with self._cond:
            return {k: dict(vars(r)) for k, r in self._records.items()}

    def wait_published(self, served_name: str, timeout_s: float) -> bool:
        """Block until `served_name` is published (True) or `timeout_s` passes (False). For tests and the CLI."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                record = self._records.get(served_name)
                if record is not None and record.published:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)

    def close(self, timeout_s: float = 10.0) -> None:
        """Give pending versions up to `timeout_s` to get through (a federation's last round publishes just before
        it ends), then stop the background thread; what is still pending is logged as not published."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            self._closed = True
            self._cond.notify_all()
        self._thread.join(max(0.1, deadline - time.monotonic()))
        for name in self._pending:
            logger.warning("router publisher closed before %s was published", self._pending[name].served_name)

    # -- the worker thread --
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                name, version = next(iter(self._pending.items()))
                record = self._records[version.served_name]
            ok = self._attempt(version, record)
            with self._cond:
                if ok or self._gave_up(record):
                    if self._pending.get(name) is version:
                        del self._pending[name]
                    self._cond.notify_all()
                    continue
                delay = min(self._max_backoff_s, self._initial_backoff_s * 2 ** (record.attempts - 1))
                # Sleep, but wake early for close() or a newer version (which replaces this one).
                deadline = time.monotonic() + delay
                while not self._closed and self._pending.get(name) is version:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)

    def _gave_up(self, record: PublishRecord) -> bool:
        if self._max_attempts and record.attempts >= self._max_attempts:
            logger.error("giving up publishing %s after %d attempts: %s", record.served_name, record.attempts, record.last_error)
            return True
        return False

    def _attempt(self, version: AdapterVersion, record: PublishRecord) -> bool:
        path = self._path_map(version.path) if self._path_map else None
        with self._cond:
            record.attempts += 1
        try:
            if self._gate is not None and record.gate is None:
                record.gate = self._gate_decision(version)
            promote = record.gate is None or record.gate["decision"] == "promoted"
            self._client.publish_version(version, path=path, promote=promote, gate=record.gate)
        except ServiceUnavailable as exc:
            return self._failed(record, str(exc))
        with self._cond:
            record.published = True
            record.published_at = time.time()
            record.last_error = None
            record.history.append("published")
        logger.info("published %s to %s as %s", version.served_name, self.router_url, record.alias)
        return True

    def _gate_decision(self, version: AdapterVersion) -> dict[str, Any]:
        """The gate's decision; a gate that fails holds the version back (and says why) rather than promote blindly."""
        try:
            return self._gate.check(version)
        except Exception as exc:  # the gate must never stop the publisher thread
            logger.error("promotion gate failed for %s: %s; held back", version.served_name, exc, exc_info=True)
            return {"adapter": version.served_name, "decision": "held back", "error": str(exc)}

    def _failed(self, record: PublishRecord, error: str) -> bool:
        with self._cond:
            record.last_error = error
            record.history.append(error)
        logger.warning("publish of %s failed (attempt %d): %s; will retry", record.served_name, record.attempts, error)
        return False

