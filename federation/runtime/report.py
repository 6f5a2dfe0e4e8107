"""Reading and printing the coordinator's status document (docs/CONTRACTS.md) for the CLI."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedllm.core.errors import ApplianceError


def fetch_status(
    url: str,
    timeout_s: float = 5.0,
    token: str | None = None,
    ca_file: Path | str | None = None,
    allow_plain_http: bool = False,
) -> dict[str, Any]:
    """GET the coordinator's `/status` (with its status token, which it needs when bound beyond loopback); an HTTPS
    URL's certificate is verified (against `ca_file` for a private CA). The token never goes over plain HTTP beyond
    loopback unless `allow_plain_http`.

    Raises:
        ApplianceError: the coordinator is unreachable or answered an error.
        ConfigError: the token would go over plain HTTP beyond loopback.
    """
    import httpx

    from fedllm.core.tls import client_context, refuse_plain_http_token

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if token:
        refuse_plain_http_token(url, allow_plain_http)
    try:
        resp = httpx.get(url, timeout=timeout_s, headers=headers, verify=client_context(ca_file))
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        raise ApplianceError(f"coordinator status at {url} unavailable: {exc}") from exc
    return resp.json()


def format_status(status: dict[str, Any], now: float | None = None) -> str:
    """A plain-text report: run line, a silo table and a round table."""
    now = time.time() if now is None else now
    from fedllm.federation.publishing.heldout import gate_text

    lines = [
        f"run {status['run']}: round {status['round']}/{status['rounds_total']}, phase {status['phase']}, "
        f"strategy {status['strategy']}",
        "",
        f"{'silo':<16}{'online':<8}{'last seen':<12}{'rounds':>7}{'examples':>10}",
    ]
    for s in status.get("silos", []):
        seen = f"{now - s['last_seen']:.0f} s ago" if s.get("last_seen") else "-"
        lines.append(f"{s['id']:<16}{'yes' if s['online'] else 'no':<8}{seen:<12}{s['rounds']:>7}{s['examples']:>10}")
    lines += [
        "",
        f"{'round':<7}{'participants':<30}{'train_loss':>11}{'eval_loss':>10}"
        f"{'bytes_in':>12}{'bytes_out':>12}{'secs':>8}  adapter",
    ]
    for r in status.get("rounds", []):
        if "failed" in r:
            lines.append(f"{r['round']:<7}FAILED: {r['failed']}")
            continue
        m = r.get("metrics", {})
        fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        lines.append(
            f"{r['round']:<7}{','.join(r['participants']):<30}{fmt(m.get('train_loss')):>11}{fmt(m.get('eval_loss')):>10}"
            f"{r['bytes_in']:>12}{r['bytes_out']:>12}{r['duration_s']:>8.1f}  {r.get('adapter') or '-'}"
            + (f"  {gate_text(r['gate'])}" if r.get("gate") else "")
        )  # the promotion gate (federation/publishing/heldout.py)
    return "\n".join(lines)
