"""The run folder `runs/ID/` (docs/CONTRACTS.md): config.json, status.json, metrics.jsonl, train.log, checkpoints/.

One schema for config.json (`run_config`), written once by whoever creates the run: `fedllm.train.runs.start_run` with
the product's settings and output name, or `fit_adapter` itself for a run folder nobody prepared. Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.core.atomic import append_jsonl, write_json_atomic, write_text_atomic
from fedllm.core.errors import ConfigError

if TYPE_CHECKING:
    from fedllm.core.sections.train import TrainSettings

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2


def _data_ref(data: Path | str | Sequence[dict[str, Any]] | None) -> str | None:
    if data is None:
        return None
    return str(Path(data).resolve()) if isinstance(data, (str, Path)) else "<records>"


def run_config(
    cfg: "TrainSettings",
    model_dir: Path,
    data: Path | str | Sequence[dict[str, Any]],
    *,
    eval_data: Path | str | Sequence[dict[str, Any]] | None = None,
    max_steps: int | None = None,
    model: str | None = None,
    output: str | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of config.json: what `fedllm.train.runs.resume_run` needs to continue the run, and its provenance.

    Args:
        cfg: the train settings the run uses.
        model_dir: the base model folder.
        data / eval_data: JSONL paths (stored resolved) or in-memory records (stored as "<records>").
        max_steps: the step budget given to `fit_adapter`, if any.
        model: the base model's store name; output: the adapter name the run registers (None: the run registers none).
        settings: the whole resolved settings, secrets redacted (`fedllm.core.settings.redacted_dump`).
    """
    return {
        "train": cfg.model_dump(mode="json"),
        "model": model,
        "model_dir": str(model_dir),
        "data": _data_ref(data),
        "eval_data": _data_ref(eval_data),
        "max_steps": max_steps,
        "output": output,
        "settings": settings,
    }


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; a torn last line (a crash mid-write) is skipped with a warning.

    Raises:
        ConfigError: a line other than the last is not JSON (the file was damaged, not cut short).
    """
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for n, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            if n < len(lines):
                raise ConfigError(f"{path}:{n} is not JSON ({exc}); the metrics file is damaged") from exc
            log.warning("%s: skipping a torn last line (the run stopped while writing it)", path)
    return records


class RunFolder:
    """The files of one run (no-ops when `path` is None)."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def start(self, config: dict[str, Any]) -> None:
        """Write config.json unless the run's creator already did, and a `running` status.json."""
        if self.path is None or _rank() != 0:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "config.json").exists():
            write_json_atomic(self.path / "config.json", config)
        write_json_atomic(
            self.path / "status.json",
            {"state": "running", "pid": os.getpid(), "exit_code": None, "adapter": None, "error": None},
        )

    def finish(self, state: str, exit_code: int, error: str | None = None) -> None:
        if self.path is None or _rank() != 0:
            return
        write_json_atomic(
            self.path / "status.json",
            {"state": state, "pid": os.getpid(), "exit_code": exit_code, "adapter": None, "error": error},
        )

    def append(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            append_jsonl(self.path / "metrics.jsonl", record)

    def attach_log(self) -> logging.Handler | None:
        if self.path is None or _rank() != 0:
            return None
        log = self.path / "train.log"
        log.touch(mode=0o600)
        log.chmod(0o600)  # owner only, like every log of the appliance
        handler = logging.FileHandler(log, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("fedllm.train").addHandler(handler)
        return handler

    def detach_log(self, handler: logging.Handler | None) -> None:
        if handler is not None:
            logging.getLogger("fedllm.train").removeHandler(handler)
            handler.close()

    def truncate_metrics(self, step: int) -> list[float]:
        """On resume: drop metrics lines after the checkpointed `step` (they will be redone); return earlier losses."""
        if self.path is None:
            return []
        kept = [
            r for r in read_metrics(self.path / "metrics.jsonl") if r.get("step", 0) <= step and "eval_loss" not in r
        ]
        write_text_atomic(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        return [r["loss"] for r in kept if "loss" in r]

    @property
    def checkpoints(self) -> Path:
        assert self.path is not None
        return self.path / "checkpoints"

    def save_checkpoint(self, engine: Any, step: int) -> None:
        """DeepSpeed checkpoint of the LoRA weights, optimizer, schedule and step; older ones are pruned."""
        tag = f"step-{step:08d}"
        engine.save_checkpoint(
            str(self.checkpoints), tag=tag, client_state={"step": step}, exclude_frozen_parameters=True
        )
        if _rank() == 0:
            tags = sorted(p for p in self.checkpoints.iterdir() if p.is_dir() and p.name.startswith("step-"))
            for old in tags[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s saved", tag)

    def load_checkpoint(self, engine: Any) -> int:
        """Load the latest checkpoint; returns the step to continue from.

        Raises:
            ConfigError: there is no run folder or no checkpoint in it.
        """
        if self.path is None or not (self.checkpoints / "latest").exists():
            raise ConfigError(f"nothing to resume: no checkpoint under {self.path}/checkpoints")
        from fedllm.train.safe_checkpoint import weights_only_engine

        # Never pickle's arbitrary code: every file of the checkpoint is loaded weights-only (train/safe_checkpoint.py).
        saving = engine.checkpoint_engine
        engine.checkpoint_engine = weights_only_engine()
        try:
            _, client = engine.load_checkpoint(str(self.checkpoints), load_module_strict=False)
        finally:
            engine.checkpoint_engine = saving
        if client is None:
            raise ConfigError(f"the latest checkpoint under {self.checkpoints} could not be loaded")
        log.info("resumed from step %d", client["step"])
        return int(client["step"])


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))
