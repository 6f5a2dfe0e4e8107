"""The head's HTTP API (Ray's dashboard, on loopback) with the cluster token: nodes, resource use, and Ray's job client.

Every failure to reach the head becomes `HeadUnavailable` naming the URL and what to start.
"""

from __future__ import annotations

from typing import Any

import httpx

from fedllm.core.errors import ApplianceError


class HeadUnavailable(ApplianceError):
    """The head's job API does not answer, or refuses the token."""


class HeadAPI:
    """Reads the head's state over HTTP, and hands out Ray's `JobSubmissionClient` for the same head."""

    def __init__(self, base_url: str, token: str, timeout_s: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self.timeout_s = timeout_s
        self._jobs = None

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """GET `path` and return the JSON `data` field of Ray's answer.

        Raises:
            HeadUnavailable: the head cannot be reached, refuses the token, or answers an error.
        """
        url = f"{self.base_url}{path}"
        try:
            resp = httpx.get(url, params=params, headers=self._headers, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise HeadUnavailable(
                f"the cluster head does not answer at {self.base_url} ({exc.__class__.__name__}); "
                "start it with `appliance up` (or set cluster.dashboard_url)"
            ) from exc
        if resp.status_code in (401, 403):
            raise HeadUnavailable(
                f"the cluster head at {self.base_url} refused the token (HTTP {resp.status_code}); "
                "use the head's keys/ray_token"
            )
        if resp.status_code >= 400:
            raise HeadUnavailable(f"the cluster head at {url} answered HTTP {resp.status_code}: {resp.text[:200]}")
        body = resp.json()
        if isinstance(body, dict) and body.get("result") is False:
            raise HeadUnavailable(f"the cluster head at {url} answered an error: {body.get('msg')}")
        return body.get("data", body) if isinstance(body, dict) else body

    def ready(self) -> bool:
        """Whether the job API answers with this token."""
        try:
            self.get("/api/version")
            return True
        except HeadUnavailable:
            return False

    def node_records(self) -> list[dict[str, Any]]:
        """Every node Ray knows, alive or dead (`node_id`, `state`, `labels`, `resources_total`, ...)."""
        data = self.get("/api/v0/nodes", {"detail": "1", "limit": "10000"})
        return list(data["result"]["result"])

    def usage_by_node(self) -> dict[str, dict[str, tuple[float, float]]]:
        """node id -> resource -> (used, total), from the autoscaler's load report (alive nodes only)."""
        data = self.get("/api/cluster_status")
        report = (data.get("clusterStatus") or {}).get("loadMetricsReport") or {}
        return {
            nid: {r: (float(v[0]), float(v[1])) for r, v in res.items()}
            for nid, res in (report.get("usageByNode") or {}).items()
        }

    def jobs(self):
        """Ray's `JobSubmissionClient` for this head (made once)."""
        if self._jobs is None:
            from ray.job_submission import JobSubmissionClient

            try:
                self._jobs = JobSubmissionClient(self.base_url, headers=self._headers)
            except (ConnectionError, RuntimeError) as exc:
                raise HeadUnavailable(f"the cluster head's job API does not answer at {self.base_url}: {exc}") from exc
        return self._jobs
