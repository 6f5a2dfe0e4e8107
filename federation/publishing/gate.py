"""The promotion gate: a federated round's new adapter version moves the alias (`NAME-latest`) only if it is not
worse than the version the alias names now.

With `federation.gate_data` set, `PromotionGate.check(version)` measures the version's loss on that data set (the
base model plus the adapter, `train.evaluate_adapter`) and compares it with the loss of the version last promoted: the
new one is promoted when `loss <= current_loss + federation.gate_tolerance`, else held back. A held-back version is
still registered and published under its own name (`NAME-vN`); only the alias stays.
`fedllm.federation.publishing.publish.RouterPublisher` asks the gate before each publish (in its own thread: the rounds
never wait for it). Each decision is appended to `HOME/federation/RUN/gate.jsonl` (`{"round", "adapter", "loss",
"current", "current_loss", "tolerance", "source", "prompts", "decision": "promoted" | "held back", "time"}`), which also
tells a restarted coordinator which version is current. A version that passes on loss must also answer the gate prompts
(federation/publishing/gate_prompts.py). Without gate data, `HeldOutGate` decides on the silos' own held-out losses, one
round late (federation/publishing/heldout.py).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fedllm.core.atomic import append_jsonl
from fedllm.core.errors import ConfigError

if TYPE_CHECKING:
    from fedllm.core.adapter_registry import AdapterVersion
    from fedllm.core.settings import ApplianceSettings

logger = logging.getLogger(__name__)


class _Gate:
    """What both gates share: the decision log, the current (last promoted) version and the decision rule."""

    deferred = False  # True: a version's figure arrives with the next round (HeldOutGate)
    source = ""

    def __init__(self, tolerance: float, log_path: Path, *, resume: bool = True):
        self.tolerance, self.log_path = tolerance, log_path
        self._lock = threading.Lock()
        self._decisions: dict[str, dict[str, Any]] = {}
        self.current: str | None = None  # served name of the version last promoted
        self.current_loss: float | None = None
        for row in _read_jsonl(log_path) if resume else []:
            if not isinstance(row.get("adapter"), str):
                continue  # a line without the version it decided on decides nothing
            self._decisions[row["adapter"]] = row
            if row.get("decision") == "promoted":
                self.current, self.current_loss = row["adapter"], row["loss"]

    def decided(self, served_name: str) -> dict[str, Any] | None:
        """The decision already taken for `served_name` (this run, restarts included), or None."""
        with self._lock:
            return self._decisions.get(served_name)

    def decide(
        self, version: AdapterVersion, loss: float, answers: Callable[[], str | None] | None = None
    ) -> dict[str, Any]:
        """Promote `version` when `loss` is finite and within `tolerance` of the current version's, and the gate
        prompts (`answers()`: None when they passed, else the problem) pass; record and return the decision. Asked
        again, it answers the same."""
        with self._lock:
            if version.served_name in self._decisions:
                return self._decisions[version.served_name]
            loss = float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else math.inf
            promoted = math.isfinite(loss) and (self.current_loss is None or loss <= self.current_loss + self.tolerance)
            prompts = None
            if promoted and answers is not None:
                prompts = answers() or "ok"
                promoted = prompts == "ok"
            decision = {
                "round": version.meta.get("round"),
                "adapter": version.served_name,
                "loss": loss if math.isfinite(loss) else None,
                "current": self.current,
                "current_loss": self.current_loss,
                "tolerance": self.tolerance,
                "source": self.source,
                "prompts": prompts,
                "decision": "promoted" if promoted else "held back",
                "time": time.time(),
            }
            append_jsonl(self.log_path, decision)
            self._decisions[version.served_name] = decision
            if promoted:
                self.current, self.current_loss = version.served_name, loss
            log = logger.info if promoted else logger.warning
            log(
                "gate: %s %s (loss %s, current %s %s, tolerance %s, prompts %s)",
                version.served_name,
                decision["decision"],
                decision["loss"],
                decision["current"],
                decision["current_loss"],
                self.tolerance,
                prompts,
            )
            return decision


class PromotionGate(_Gate):
    """Decides, per registered version, whether the alias moves to it, from its loss on the gate data (see the module
    docstring)."""

    source = "gate data"

    def __init__(
        self,
        settings: ApplianceSettings,
        data: Path,
        tolerance: float,
        log_path: Path,
        model_dir: Path | None = None,
        *,
        resume: bool = True,
    ):
        if not Path(data).is_file():
            raise ConfigError(
                f"federation.gate_data {data} is not a file; give a JSONL data set (same formats as training data)"
            )
        super().__init__(tolerance, log_path, resume=resume)
        self.settings, self.data = settings, Path(data)
        self.model_dir = model_dir or settings.models_dir / settings.model

    def loss(self, version: AdapterVersion) -> float:
        """The version's eval loss on the gate data (inf when not finite)."""
        from fedllm import train

        metrics = train.evaluate_adapter(
            self.settings.train, self.model_dir, train.load_adapter_state(version.path), self.data
        )
        loss = float(metrics["eval_loss"])
        return loss if math.isfinite(loss) else math.inf

    def check(self, version: AdapterVersion, answers: Callable[[], str | None] | None = None) -> dict[str, Any]:
        """The decision for `version` (measured once; asking again answers the same)."""
        done = self.decided(version.served_name)
        return done if done is not None else self.decide(version, self.loss(version), answers)


class HeldOutGate(_Gate):
    """The gate of a federation without gate data: a version's figure is the silos' own held-out loss of it, which
    they measure when they receive it as the next round's global adapter, before training
    (federation/publishing/heldout.py). So round r's version is decided when round r+1's updates have arrived
    (`RouterPublisher` reads the figure from round r+1's version's meta, `received_eval`); the last round's version of a
    run has no next round and stays under its own name."""

    deferred = True
    source = "silos' held-out loss"


def gate_for(settings: ApplianceSettings) -> _Gate | None:
    """The gate of this federation run: on gate data when `federation.gate_data` is set, else on the silos' held-out
    losses; None when `federation.gate` is off."""
    cfg = settings.federation
    if not cfg.gate:
        return None
    log = settings.federation_dir / cfg.run_name / "gate.jsonl"
    if cfg.gate_data is None:
        return HeldOutGate(cfg.gate_tolerance, log)
    return PromotionGate(settings, cfg.gate_data, cfg.gate_tolerance, log)


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
