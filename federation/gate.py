"""The promotion gate: a federated round's new adapter version moves the alias (`NAME-latest`) only if it is not
worse than the version the alias names now.

With `federation.gate_data` set, `PromotionGate.check(version)` measures the version's loss on that data set (the
base model plus the adapter, `train.evaluate_adapter`) and compares it with the loss of the version last promoted: the
new one is promoted when `loss <= current_loss + federation.gate_tolerance`, else held back. A held-back version is
still registered and published under its own name (`NAME-vN`); only the alias stays. `federation.publish.
RouterPublisher` asks the gate before each publish (in its own thread: the rounds never wait for it). Each decision is
appended to `HOME/federation/RUN/gate.jsonl` (`{"round", "adapter", "loss", "current", "current_loss", "tolerance",
"decision": "promoted" | "held back", "time"}`), which also tells a restarted coordinator which version is current.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.core.atomic import append_jsonl
from appliance.core.errors import ConfigError

if TYPE_CHECKING:
    from appliance.core.adapter_registry import AdapterVersion
    from appliance.core.settings import ApplianceSettings

logger = logging.getLogger(__name__)


class PromotionGate:
    """Decides, per registered version, whether the alias moves to it (see the module docstring)."""

    def __init__(self, settings: ApplianceSettings, data: Path, tolerance: float, log_path: Path, model_dir: Path | None = None):
        if not Path(data).is_file():
            raise ConfigError(f"federation.gate_data {data} is not a file; give a JSONL data set (same formats as training data)")
        self.settings, self.data, self.tolerance, self.log_path = settings, Path(data), tolerance, log_path
        self.model_dir = model_dir or settings.models_dir / settings.model
        self._lock = threading.Lock()
        self._decisions: dict[str, dict[str, Any]] = {}
        self.current: str | None = None  # served name of the version last promoted
        self.current_loss: float | None = None
        for row in _read_jsonl(log_path):
            if row.get("decision") == "promoted":
                self.current, self.current_loss = row["adapter"], row["loss"]

    def loss(self, version: AdapterVersion) -> float:
        """The version's eval loss on the gate data (inf when not finite)."""
        import train

        metrics = train.evaluate_adapter(self.settings.train, self.model_dir, train.load_adapter_state(version.path), self.data)
        loss = float(metrics["eval_loss"])
        return loss if math.isfinite(loss) else math.inf

    def check(self, version: AdapterVersion) -> dict[str, Any]:
        """The decision for `version` (measured once; asking again answers the same)."""
        with self._lock:
            if version.served_name in self._decisions:
                return self._decisions[version.served_name]
            loss = self.loss(version)
            promoted = math.isfinite(loss) and (self.current_loss is None or loss <= self.current_loss + self.tolerance)
            decision = {"round": version.meta.get("round"), "adapter": version.served_name, "loss": loss,
                        "current": self.current, "current_loss": self.current_loss, "tolerance": self.tolerance,
                        "decision": "promoted" if promoted else "held back", "time": time.time()}
            append_jsonl(self.log_path, decision)
            self._decisions[version.served_name] = decision
            if promoted:
                self.current, self.current_loss = version.served_name, loss
            log = logger.info if promoted else logger.warning
            log("gate: %s %s (loss %.4f, current %s %s, tolerance %s)", version.served_name, decision["decision"], loss,
                decision["current"], decision["current_loss"], self.tolerance)
            return decision


def gate_for(settings: ApplianceSettings) -> PromotionGate | None:
    """The gate of this federation run, or None when `federation.gate_data` is not set or `federation.gate` is off."""
    cfg = settings.federation
    if cfg.gate_data is None or not cfg.gate:
        return None
    return PromotionGate(settings, cfg.gate_data, cfg.gate_tolerance, settings.federation_dir / cfg.run_name / "gate.jsonl")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a crash: the rest still counts
            continue
    return rows
