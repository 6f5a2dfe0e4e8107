"""`appliance adapters publish --gate FILE`: the promotion gate for a publish by hand.

The version is published under its own name first; then its loss on FILE is compared with the loss of the version
the alias (`NAME-latest`) names now (both measured here, on the base model of the settings), and its answers to the
gate prompts (`federation.gate_prompts`) are checked through the router. The alias moves only when both pass;
otherwise the version stays served under its own name and the alias history records it as held back with the two
losses. Each decision is appended to `HOME/router/gate/NAME.jsonl`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.core.contracts.router_client import ServiceUnavailable, latest_alias

if TYPE_CHECKING:
    from fedllm.core.adapter_registry import AdapterRegistry, AdapterVersion
    from fedllm.core.contracts.router_client import RouterClient
    from fedllm.core.settings import ApplianceSettings


def gated_publish(
    settings: ApplianceSettings, client: RouterClient, registry: AdapterRegistry, version: AdapterVersion, data: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Publish `version` through the gate on `data`; returns (the router's answer, the gate's decision)."""
    from fedllm.federation.publishing.gate import PromotionGate
    from fedllm.federation.publishing.gate_prompts import prompt_problem

    cfg = settings.federation
    gate = PromotionGate(
        settings, data, cfg.gate_tolerance, settings.home / "router" / "gate" / f"{version.name}.jsonl", resume=False
    )
    client.publish_version(version, promote=False, regions=cfg.serve_regions or None)  # its own name first
    try:
        current = client.history(latest_alias(version.name)).get("current")
    except ServiceUnavailable as exc:
        if exc.status != 404:
            raise
        current = None  # the alias names nothing yet
    if current and current != version.served_name:
        name, _, number = current.rpartition("-v")
        gate.current, gate.current_loss = current, gate.loss(registry.get(f"{name}:{number}"))
    api_key = cfg.gate_api_key.get_secret_value() if cfg.gate_api_key else None
    answers = (
        (
            lambda: prompt_problem(
                client.base_url, version.served_name, cfg.gate_prompts, api_key=api_key, verify=client.verify
            )
        )
        if cfg.gate_prompts
        else None
    )
    decision = gate.decide(version, gate.loss(version), answers)
    out = client.publish_version(
        version, promote=decision["decision"] == "promoted", gate=decision, regions=cfg.serve_regions or None
    )
    return out, decision
