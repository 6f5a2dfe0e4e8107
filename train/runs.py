"""Training runs as the CLI and console see them: a run folder under runs/ID, then a registered adapter version.

`start_run` writes runs/ID/config.json (`fedllm.train.run_folder.run_config`: resolved settings, secrets redacted, the
data and the output name), trains with `fit_adapter`, registers the adapter in the registry with its lineage, and
records the adapter in status.json. `resume_run` re-reads config.json and continues from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.core.adapter_registry import AdapterRegistry, AdapterVersion, check_name
from fedllm.core.atomic import write_json_atomic
from fedllm.core.contracts.lineage import base_model_hash
from fedllm.core.contracts.tracking import Tracker
from fedllm.core.errors import ConfigError
from fedllm.core.model_store import resolve_model
from fedllm.core.sections.train import TrainSettings
from fedllm.train import data as datamod
from fedllm.train.engine import FitResult, per_rank_batch
from fedllm.train.run_folder import run_config
from fedllm.train.trainer import fit_adapter

if TYPE_CHECKING:
    from fedllm.core.settings import ApplianceSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOutcome:
    """A finished run: its id and folder, the registered adapter version, and the fit result."""

    run_id: str
    run_dir: Path
    adapter: AdapterVersion
    result: FitResult


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus 6 random hex digits."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def start_run(
    settings: "ApplianceSettings",
    data: Path,
    *,
    eval_data: Path | None = None,
    model: str | None = None,
    output: str | None = None,
    max_steps: int | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    run_id: str | None = None,
) -> RunOutcome:
    """Validate, train, and register a new adapter version (see the module docstring).

    Raises:
        DataError: invalid data, before any training. ModelNotFound: unknown model. ConfigError: bad settings.
    """
    from fedllm.core.settings import redacted_dump

    model_name = model or settings.model
    model_dir = resolve_model(settings.models_dir, model_name)
    datamod.load_data(Path(data))  # fail before creating a run folder
    if eval_data is not None:
        datamod.load_data(Path(eval_data))
    if settings.train.ranks > 1 and not settings.train.hostfile:
        per_rank_batch(settings.train.batch_size, settings.train.ranks)  # refuse before a run folder or rank exists
    name = check_name(output or f"{Path(data).stem}-lora")
    run_id = run_id or new_run_id()
    run_dir = settings.runs_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    write_json_atomic(
        run_dir / "config.json",
        run_config(
            settings.train,
            model_dir,
            data,
            eval_data=eval_data,
            max_steps=max_steps,
            model=model_name,
            output=name,
            settings=redacted_dump(settings),
        ),
    )
    return _run(settings, run_id, run_dir, resume=False, progress=progress)


def job_run(settings: "ApplianceSettings", job_id: str) -> tuple[str, bool]:
    """The run of training job `job_id` (`runs/job-<id>`, the same on every attempt) and whether to resume it.

    A retried job (its node died) continues from the checkpoint its earlier attempt left when the run folder is
    reachable (shared storage, or the same node). A folder without a checkpoint (the attempt died before its first
    one) is kept under another name, its log and metrics intact, and the run starts again.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", job_id):
        raise ConfigError(f"APPLIANCE_JOB_ID {job_id!r} is not a job id (letters, digits, '.', '_', '-')")
    run_id = f"job-{job_id}"
    run_dir = settings.runs_dir / run_id
    if not run_dir.exists():
        return run_id, False
    if (run_dir / "config.json").is_file() and (run_dir / "checkpoints" / "latest").is_file():
        return run_id, True
    n = 1
    while (kept := run_dir.with_name(f"{run_id}.attempt-{n}")).exists():
        n += 1
    run_dir.rename(kept)
    log.warning(
        "run %s had no checkpoint to resume; its folder is kept as %s and the run starts again", run_id, kept.name
    )
    return run_id, False


def resume_run(
    settings: "ApplianceSettings", run_id: str, progress: Callable[[dict[str, Any]], None] | None = None
) -> RunOutcome:
    """Continue run `run_id` from its latest checkpoint with the settings it started with.

    Raises:
        ConfigError: no such run, or it has no checkpoint.
    """
    run_dir = settings.runs_dir / run_id
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"unknown run {run_id!r}: {run_dir}/config.json does not exist")
    return _run(settings, run_id, run_dir, resume=True, progress=progress)


def _run(settings: "ApplianceSettings", run_id: str, run_dir: Path, *, resume: bool, progress: Any) -> RunOutcome:
    conf = json.loads((run_dir / "config.json").read_text())
    if not conf.get("output"):
        raise ConfigError(
            f"run {run_id!r} was not started by `appliance train` (its config.json names no adapter to register)"
        )
    cfg = TrainSettings(**conf["train"])
    model_dir = Path(conf["model_dir"])
    data = Path(conf["data"])
    eval_data = Path(conf["eval_data"]) if conf.get("eval_data") else None
    with Tracker(
        settings.tracking,
        run_dir / "tb",
        run_name=f"train-{run_id}",
        tags={"appliance.kind": "train"},
        params={
            "run_id": run_id,
            "model": conf["model"],
            "data": str(data),
            "max_steps": conf.get("max_steps"),
            "train": conf["train"],
        },
    ) as tracker:

        def on_step(record: dict[str, Any]) -> None:
            tracker.log(
                {k: v for k, v in record.items() if k not in ("step", "total_steps", "time")}, int(record["step"])
            )
            if progress is not None:
                progress(record)

        if cfg.ranks > 1 or cfg.hostfile:
            result = _launch(run_dir, cfg, resume=resume, progress=on_step)
        else:
            result = fit_adapter(
                cfg,
                model_dir,
                data,
                max_steps=conf.get("max_steps"),
                run_dir=run_dir,
                progress=on_step,
                eval_data=eval_data,
                resume=resume,
            )
        tracker.log({f"final/{k}": v for k, v in result.metrics.items()}, int(result.metrics["steps"]))
    status = json.loads((run_dir / "status.json").read_text())
    try:
        adapter = register_result(
            settings,
            result,
            cfg,
            model_dir,
            conf["output"],
            meta={
                "base_model": conf["model"],
                "base_model_dir": str(model_dir),
                "base_model_hash": base_model_hash(model_dir),
                "data_sha256": datamod.data_sha256(data),
                "data": str(data),
                "config": conf["train"],
                "metrics": result.metrics,
                "num_examples": result.num_examples,
                "run_id": run_id,
            },
        )
    except Exception as exc:  # training finished but the adapter is not registered: say so in the run folder
        write_json_atomic(
            run_dir / "status.json",
            {**status, "state": "failed", "exit_code": 1, "error": f"registering the adapter failed: {exc}"},
        )
        raise
    write_json_atomic(run_dir / "status.json", {**status, "adapter": adapter.ref})
    return RunOutcome(run_id, run_dir, adapter, result)


def _launch(run_dir: Path, cfg: TrainSettings, *, resume: bool, progress: Any) -> FitResult:
    """Train on cfg.ranks ranks (per node of cfg.hostfile) under DeepSpeed's launcher (fedllm.train.distributed)."""
    from fedllm.train.distributed import launch_run

    try:
        out = launch_run(
            run_dir, cfg.ranks, resume=resume, hostfile=Path(cfg.hostfile) if cfg.hostfile else None, progress=progress
        )
    except BaseException as exc:  # the ranks may have died before rank 0 could record it
        status_path = run_dir / "status.json"
        status = json.loads(status_path.read_text()) if status_path.is_file() else {}
        if status.get("state") in (None, "running"):
            stopped = isinstance(exc, KeyboardInterrupt)
            write_json_atomic(
                status_path,
                {
                    "pid": os.getpid(),
                    "adapter": None,
                    **status,
                    "state": "stopped" if stopped else "failed",
                    "exit_code": 130 if stopped else 1,
                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                },
            )
        raise
    return FitResult(state=out.state, num_examples=out.num_examples, metrics=out.metrics)


def register_result(
    settings: "ApplianceSettings",
    result: FitResult,
    cfg: TrainSettings,
    model_dir: Path,
    name: str,
    meta: dict[str, Any],
) -> AdapterVersion:
    """Write the state as a PEFT folder and register it as the next version of `name`."""
    from fedllm.train import save_adapter_dir

    with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
        save_adapter_dir(result.state, cfg, model_dir, Path(tmp))
        return AdapterRegistry(settings.adapters_dir).register(name, Path(tmp), meta)


def adapter_base_dir(settings: "ApplianceSettings", adapter: AdapterVersion) -> Path:
    """The base model folder of a registered adapter (its meta, else its adapter_config, else the default model)."""
    base = adapter.meta.get("base_model_dir")
    if base and (Path(base) / "config.json").exists():
        return Path(base)
    base_name = adapter.meta.get("base_model")
    if base_name:
        return resolve_model(settings.models_dir, base_name)
    conf = json.loads((adapter.path / "adapter_config.json").read_text())
    if conf.get("base_model_name_or_path") and (Path(conf["base_model_name_or_path"]) / "config.json").exists():
        return Path(conf["base_model_name_or_path"])
    return resolve_model(settings.models_dir, settings.model)


def adapter_train_settings(settings: "ApplianceSettings", adapter: AdapterVersion) -> TrainSettings:
    """The train settings a registered adapter was made with (LoRA shape from its adapter_config.json)."""
    conf = json.loads((adapter.path / "adapter_config.json").read_text())
    return settings.train.model_copy(
        update={
            "lora_r": conf["r"],
            "lora_alpha": conf["lora_alpha"],
            "target_modules": sorted(conf["target_modules"]),
        }
    )
