"""The router's errors: each carries the HTTP status and message the client sees, in OpenAI's shape."""

from __future__ import annotations

from fedllm.core.errors import ApplianceError


class RouterError(ApplianceError):
    """An error answered to the client as `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, *, retry_after_s: float | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s
        self.param = param


class UpstreamError(ApplianceError):
    """A worker failed before the first byte (connection error, timeout or 5xx): retry elsewhere."""

    def __init__(self, worker_id: str, reason: str):
        super().__init__(f"worker {worker_id}: {reason}")
        self.worker_id = worker_id
        self.reason = reason
