"""What the coordinator keeps of a run: the checkpoint (and the restore after a restart), the tracker, the round log
(`rounds.jsonl`), the adapter registry and the `on_publish` callbacks.

After each round the checkpoint comes first (a registered, published version always has its checkpoint on disk), then
the registration of the global adapter as the next version of the run, the round log, and the callbacks. A restarted
coordinator resumes after its last checkpointed round, and registers it if the crash came before.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from fedllm.core.adapter_registry import AdapterRegistry, AdapterVersion
from fedllm.core.atomic import append_jsonl
from fedllm.core.contracts.tracking import Tracker
from fedllm.core.types import StateDict
from fedllm.federation.runtime.checkpoint import Checkpoint, load_latest, prune_checkpoints, save_checkpoint
from fedllm.federation.runtime.lineage import round_meta
from fedllm.federation.runtime.sessions import SiloInfo

if TYPE_CHECKING:
    from fedllm.federation.runtime.coordinator import Coordinator

logger = logging.getLogger(__name__)

Exporter = Callable[[StateDict, Path], None]  # writes a PEFT folder for a state dict


class Recorder:
    """The coordinator's records: `restore()` at start, `open_tracker()`, then per round `checkpoint`, `register`,
    `append_round_log`, `prune` and `notify`; `close(ok)` at the end.

    Args:
        coord: the coordinator whose state is recorded.
        exporter: writes a PEFT folder for a state dict (None: `train.save_adapter_dir`; False: no registration).
        initial_state: the round-0 global adapter (None: `train.initial_adapter_state`).
    """

    def __init__(
        self, coord: Coordinator, exporter: Exporter | None | Literal[False], initial_state: StateDict | None
    ) -> None:
        self.coord = coord
        self.settings, self.cfg, self.run_dir = coord.settings, coord.cfg, coord.run_dir
        self.registry = AdapterRegistry(coord.settings.adapters_dir)
        self._exporter = exporter
        self._initial_state = initial_state
        self._tracker: Tracker | None = None

    def close(self, ok: bool) -> None:
        """Close the tracker (`ok`: the run finished)."""
        if self._tracker is not None:
            self._tracker.close(ok=ok)
            self._tracker = None

    def prune(self) -> None:
        """Remove the checkpoints beyond `federation.keep_checkpoints`."""
        prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)

    def _restored_history(self, ckpt: Checkpoint) -> list[dict[str, Any]]:
        """The run's records from `rounds.jsonl`, plus the checkpointed round's own record when the crash came before
        it reached the log (an older checkpoint's full `history` is read as it is)."""
        from fedllm.federation.runtime.checkpoint import read_round_log

        if "history" in ckpt.state:  # written before the history moved out of state.json
            return list(ckpt.state["history"])
        history = read_round_log(self.run_dir)
        last = ckpt.state.get("record")
        if isinstance(last, dict) and not any(r.get("round") == ckpt.round_id and "failed" not in r for r in history):
            history.append(last)
        return history

    def restore(self) -> None:
        """Load the last checkpoint into the coordinator (registering its round if the crash came before), or the
        initial state when there is none."""
        ckpt = load_latest(self.run_dir)
        if ckpt is not None:
            self.coord.global_state, self.coord.round = ckpt.global_state, ckpt.round_id
            self.coord.strategy.load_state_dict(ckpt.strategy_state)
            self.coord.history = deque(self._restored_history(ckpt), maxlen=self.cfg.history_in_memory)
            for sid, info in ckpt.state.get("silos", {}).items():
                self.coord.silos[sid] = SiloInfo(sid, b"", 0.0, info.get("rounds", 0), info.get("examples", 0))
            logger.info("resuming run %s after round %d from %s", self.cfg.run_name, self.coord.round, self.run_dir)
            self._register_missing()
            return
        if self._initial_state is None:
            from fedllm import train

            self._initial_state = train.initial_adapter_state(
                self.settings.train, self.settings.models_dir / self.settings.model
            )
        self.coord.global_state = {k: v.detach().clone().float() for k, v in self._initial_state.items()}

    def record(self, record: dict[str, Any]) -> None:
        """Keep a record that has no checkpoint (a failed round): in the history and the round log."""
        self.coord.history.append(record)
        append_jsonl(self.run_dir / "rounds.jsonl", record)

    def open_tracker(self) -> None:
        """TensorBoard files in federation/RUN/tb/ (and an MLflow run with tracking.mlflow_uri): one step per round."""
        from fedllm.core.settings import redacted_dump

        dump = redacted_dump(self.settings)
        self._tracker = Tracker(
            self.settings.tracking,
            self.run_dir / "tb",
            run_name=f"federation-{self.cfg.run_name}",
            params={"federation": dump["federation"], "train": dump["train"], "strategy": self.coord.strategy.name},
            tags={"appliance.kind": "federation"},
        )

    def _track(self, record: dict[str, Any]) -> None:
        if self._tracker is None:
            return
        per_silo = {f"silo/{silo}/{k}": v for silo, m in record.get("per_silo", {}).items() for k, v in m.items()}
        self._tracker.log(
            {
                **record["metrics"],
                **per_silo,
                "participants": len(record["participants"]),
                **{
                    k: record.get(k)
                    for k in ("examples", "bytes_in", "bytes_out", "duration_s", "non_training_share", "epsilon")
                },
            },
            record["round"],
        )

    def checkpoint(self, record: dict[str, Any]) -> None:
        """Keep the round in `record` (history, tracker) and checkpoint the coordinator's state atomically."""
        self.coord.history.append(record)
        self._track(record)
        silos = {s.id: {"rounds": s.rounds, "examples": s.examples} for s in self.coord.silos.values()}
        # The round's own record only: the history is the append-only rounds.jsonl, so state.json stays bounded.
        save_checkpoint(
            self.run_dir,
            Checkpoint(
                self.coord.round,
                self.coord.global_state,
                self.coord.strategy.state_dict(),
                {"record": record, "silos": silos, "run": self.cfg.run_name},
            ),
        )
        logger.info(
            "round %d checkpointed: participants %s, metrics %s",
            self.coord.round,
            record["participants"],
            record["metrics"],
        )

    def append_round_log(self, record: dict[str, Any]) -> None:
        """Append `record` to the run's round log (rounds.jsonl)."""
        append_jsonl(self.run_dir / "rounds.jsonl", record)

    def _register_missing(self) -> None:
        """After a restart: register the checkpointed round if the crash came between its checkpoint and its
        registration, and fill the adapter reference into its record."""
        if self._exporter is False or not self.coord.history:
            return
        record = self.coord.history[-1]
        numbers = self.registry.versions(self.cfg.run_name)
        latest = self.registry.get(f"{self.cfg.run_name}:{numbers[-1]}") if numbers else None
        if latest is not None and latest.meta.get("round") == self.coord.round:
            record["adapter"] = latest.ref
            return
        logger.info("round %d was checkpointed but not registered: registering it now", self.coord.round)
        version = self.register(record)
        if version is not None:
            self.notify(version)

    def register(self, record: dict[str, Any]) -> AdapterVersion | None:
        """Export the global adapter as a PEFT folder and register it as the next version of the run."""
        exporter = self._exporter
        if exporter is False:
            return None
        if exporter is None:
            exporter = self._default_exporter
        staging = Path(tempfile.mkdtemp(prefix=".export.", dir=self.run_dir))
        try:
            exporter(self.coord.global_state, staging)
            meta = round_meta(self.coord, record)  # federation/runtime/lineage.py
            version = self.registry.register(self.cfg.run_name, staging, meta)
        except Exception as exc:  # publishing must never fail the federation
            logger.error("round %d: could not register the global adapter: %s", self.coord.round, exc, exc_info=True)
            return None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        record["adapter"] = version.ref
        return version

    def notify(self, version: AdapterVersion) -> None:
        """Call the `on_publish` callbacks with `version` (their errors are logged)."""
        for callback in self.coord.on_publish:
            try:
                callback(version)
            except Exception as exc:  # a callback's failure is its own business
                logger.error("on_publish callback %r failed for %s: %s", callback, version.ref, exc, exc_info=True)

    def _default_exporter(self, state: StateDict, out_dir: Path) -> None:
        from fedllm import train

        train.save_adapter_dir(state, self.settings.train, self.settings.models_dir / self.settings.model, out_dir)
