"""The closed loop: publish each new global adapter version to the router as soon as its round is checkpointed.

`RouterPublisher` is a coordinator `on_publish` callback `(AdapterVersion) -> None`. The call only queues the
version and returns at once; a background thread publishes it with `RouterClient.publish_version` (served as
`NAME-vVERSION`, the alias `NAME-latest` moves to it), retrying with exponential backoff. A failed
publish is logged and kept in `status()`, and never blocks or fails the federation. When a newer version of the same
adapter arrives while an older one is still being retried, the older one is dropped: the alias must reach the newest.

With a promotion gate (federation/publishing/gate.py) a version is published under its own name first; the gate then
measures it (gate data) and its answers to the gate prompts are checked through the router
(federation/publishing/gate_prompts.py); the version is published again with the alias (promoted) or as held back. A
held-out gate (no gate data) decides a version when the next version arrives carrying the silos' held-out loss of it
(`received_eval` in its meta).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from fedllm.core.adapter_registry import AdapterVersion
from fedllm.core.contracts.router_client import RouterClient, ServiceUnavailable, latest_alias

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
    gate: dict[str, Any] | None = (
        None  # the promotion gate's decision (federation/publishing/gate.py), if there is a gate
    )


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
        gate: a `federation.gate` gate (None: every version moves the alias at once).
        gate_prompts: prompts sent to each version the gate would promote (federation/publishing/gate_prompts.py);
            none: skipped.
        api_key: the router API key the gate prompts use when the router requires keys.
        regions: the regions the adapter may be served in (`federation.serve_regions`; None or empty: anywhere).
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
        gate_prompts: list[str] | None = None,
        api_key: str | None = None,
        regions: list[str] | None = None,
    ) -> None:
        self.router_url = router_url.rstrip("/")
        self._client = RouterClient(self.router_url, admin_token, timeout_s=timeout_s, verify=verify)
        self._path_map = path_map
        self._gate = gate  # a federation.gate gate: held-back versions are published without their alias
        self._gate_prompts = list(gate_prompts or [])
        self._api_key = api_key
        self._regions = list(regions or []) or None
        self._versions: dict[str, AdapterVersion] = {}  # ref -> version seen (the held-out gate decides one late)
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
            self._versions[version.ref] = version
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

    @property
    def gate(self) -> Any:
        """The promotion gate (None: none)."""
        return self._gate

    def wait_decided(self, served_name: str, timeout_s: float) -> dict[str, Any] | None:
        """The gate's decision on `served_name`, waiting up to `timeout_s` while it is measured; None when there is none
        by then, or at once while the router is unreachable (its last attempt failed)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                record = self._records.get(served_name)
                if record is not None and record.gate is not None:
                    return dict(record.gate)
                if record is not None and record.last_error is not None and record.gate is None:
                    return None
                left = deadline - time.monotonic()
                if left <= 0 or record is None and not self._pending:
                    return None
                self._cond.wait(min(left, 0.2))

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
            logger.error(
                "giving up publishing %s after %d attempts: %s", record.served_name, record.attempts, record.last_error
            )
            return True
        return False

    def _attempt(self, version: AdapterVersion, record: PublishRecord) -> bool:
        path = self._path_map(version.path) if self._path_map else None
        with self._cond:
            record.attempts += 1
        try:
            if self._gate is None or (self._gate.deferred and _received_loss(version) is None):
                # No gate, or a held-out gate without figures (no silo has eval data): the alias moves at once.
                self._client.publish_version(version, path=path, regions=self._regions)
            elif self._gate.deferred:
                self._client.publish_version(
                    version, path=path, promote=False, regions=self._regions
                )  # its own name now; decided next round
                self._decide_previous(version)
            else:
                if record.gate is None:
                    self._client.publish_version(
                        version, path=path, promote=False, regions=self._regions
                    )  # versioned name first
                    record.gate = self._gate_decision(version)
                self._finish(version, path, record.gate)
        except ServiceUnavailable as exc:
            return self._failed(record, str(exc))
        with self._cond:
            record.published = True
            record.published_at = time.time()
            record.last_error = None
            record.history.append("published")
        logger.info(
            "published %s to %s (%s)",
            version.served_name,
            self.router_url,
            (record.gate or {}).get("decision")
            or (
                "pending: decided with the next round"
                if self._gate is not None and self._gate.deferred
                else f"alias {record.alias}"
            ),
        )
        return True

    def _finish(self, version: AdapterVersion, path: Any, gate: dict[str, Any]) -> None:
        """Move the alias to `version` (promoted) or record it as held back in the alias history."""
        self._client.publish_version(
            version, path=path, promote=gate.get("decision") == "promoted", gate=gate, regions=self._regions
        )

    def _answers(self, version: AdapterVersion):
        """The gate prompts' check for `version` (None when no prompts are configured)."""
        if not self._gate_prompts:
            return None
        from fedllm.federation.publishing.gate_prompts import prompt_problem

        return lambda: prompt_problem(
            self.router_url, version.served_name, self._gate_prompts, api_key=self._api_key, verify=self._client.verify
        )

    def _gate_decision(self, version: AdapterVersion) -> dict[str, Any]:
        """The gate's decision; a gate that fails holds the version back (and says why) rather than promote blindly."""
        try:
            return self._gate.check(version, self._answers(version))
        except Exception as exc:  # the gate must never stop the publisher thread
            logger.error("promotion gate failed for %s: %s; held back", version.served_name, exc, exc_info=True)
            return {"adapter": version.served_name, "decision": "held back", "error": str(exc)}

    def _decide_previous(self, version: AdapterVersion) -> None:
        """Held-out gate: `version`'s meta carries the silos' held-out loss of the version before it (the global adapter
        they received this round); decide that one now and move the alias or record it held back."""
        figure = version.meta["received_eval"]
        ref = figure.get("adapter")
        if not ref:
            return  # round 1: the figure is the initial adapter's, which is not a published version
        previous = self._versions.get(ref)
        if previous is None:
            from fedllm.core.adapter_registry import AdapterRegistry

            previous = AdapterRegistry(version.path.parents[1]).get(ref)  # a restarted coordinator
        decision = self._gate.decided(previous.served_name)
        if decision is None:
            try:
                decision = self._gate.decide(previous, float(figure["loss"]), self._answers(previous))
            except Exception as exc:  # the gate must never stop the publisher thread
                logger.error("promotion gate failed for %s: %s; held back", previous.served_name, exc, exc_info=True)
                decision = {"adapter": previous.served_name, "decision": "held back", "error": str(exc)}
        path = self._path_map(previous.path) if self._path_map else None
        self._finish(previous, path, decision)
        with self._cond:
            if previous.served_name in self._records:
                self._records[previous.served_name].gate = decision

    def _failed(self, record: PublishRecord, error: str) -> bool:
        with self._cond:
            record.last_error = error
            record.history.append(error)
        logger.warning("publish of %s failed (attempt %d): %s; will retry", record.served_name, record.attempts, error)
        return False


def _received_loss(version: AdapterVersion) -> float | None:
    """The silos' held-out loss of the previous version carried by `version`'s meta (federation/publishing/heldout.py),
    or None."""
    figure = version.meta.get("received_eval")
    return figure.get("loss") if isinstance(figure, dict) and isinstance(figure.get("loss"), (int, float)) else None
