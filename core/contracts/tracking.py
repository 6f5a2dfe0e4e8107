"""Run tracking in the tools people already read: TensorBoard event files and an MLflow tracking server.

A `Tracker` is opened per training run (`runs/ID/tb/`) or federation run (`federation/RUN/tb/`, one step per round).
It writes finite numeric metrics as TensorBoard scalars (torch's `SummaryWriter`, which needs the `tensorboard`
package) and, when `tracking.mlflow_uri` is set, logs params, metrics and the final status to that MLflow server
through its REST API (`/api/2.0/mlflow/...`: a thin httpx client, so the appliance does not depend on the `mlflow`
package). Tracking never stops the work it reports on: an MLflow server that fails is logged once and then left alone.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedllm.core.sections.tracking import TrackingSettings

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_BATCH = 100  # params per log-batch call (MLflow's limit; metrics allow 1000)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as `a.b.c` keys with string values (None as "None", lists as their repr), cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:MAX_PARAM_CHARS]
    return out


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers among `metrics` (bools, text, NaN and infinities are left out)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


class MlflowRun:
    """One MLflow run on a tracking server, over its REST API.

    Raises (from the constructor):
        httpx.HTTPError: the server cannot be reached or refuses to create the run.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        *,
        timeout_s: float = 10.0,
        tags: Mapping[str, str] | None = None,
    ):
        import httpx

        self._http = httpx.Client(base_url=uri.rstrip("/") + "/api/2.0/mlflow/", timeout=timeout_s)
        try:
            self.experiment_id = self._experiment_id(experiment)
            body = {
                "experiment_id": self.experiment_id,
                "run_name": run_name,
                "start_time": _now_ms(),
                "tags": [{"key": k, "value": v} for k, v in (tags or {}).items()],
            }
            self.run_id = self._post("runs/create", body)["run"]["info"]["run_id"]
        except BaseException:
            self._http.close()
            raise

    def _experiment_id(self, name: str) -> str:
        import httpx

        r = self._http.get("experiments/get-by-name", params={"experiment_name": name})
        if r.status_code == 404:
            try:
                return self._post("experiments/create", {"name": name})["experiment_id"]
            except httpx.HTTPStatusError:  # created meanwhile by another run
                r = self._http.get("experiments/get-by-name", params={"experiment_name": name})
        r.raise_for_status()
        return r.json()["experiment"]["experiment_id"]

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self._http.post(path, json=body)
        r.raise_for_status()
        return r.json()

    def log_params(self, params: Mapping[str, str]) -> None:
        items = [{"key": k, "value": v} for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self._post("runs/log-batch", {"run_id": self.run_id, "params": items[i : i + _BATCH]})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = _now_ms()
        self._post(
            "runs/log-batch",
            {
                "run_id": self.run_id,
                "metrics": [{"key": k, "value": v, "timestamp": now, "step": step} for k, v in metrics.items()],
            },
        )

    def finish(self, status: str) -> None:
        """Mark the run FINISHED / FAILED / KILLED and close the connection."""
        try:
            self._post("runs/update", {"run_id": self.run_id, "status": status, "end_time": _now_ms()})
        finally:
            self._http.close()


class Tracker:
    """TensorBoard event files in `tb_dir` (None: none) and, with `cfg.mlflow_uri`, an MLflow run; see the module
    doc."""

    def __init__(
        self,
        cfg: "TrackingSettings",
        tb_dir: Path | None,
        *,
        run_name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ):
        self._tb = None
        self._mlflow: MlflowRun | None = None
        flat = flatten(params or {})
        if cfg.tensorboard and tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tb_dir))
            if flat:
                self._tb.add_text("params", "\n".join(f"    {k} = {v}" for k, v in sorted(flat.items())), 0)
        if uri := cfg.mlflow_uri:
            self._call("start", lambda: self._start_mlflow(uri, cfg, run_name, flat, tags))

    def _start_mlflow(
        self, uri: str, cfg: "TrackingSettings", run_name: str, flat: dict[str, str], tags: Mapping[str, str] | None
    ) -> None:
        run = MlflowRun(uri, cfg.mlflow_experiment, run_name, timeout_s=cfg.mlflow_timeout_s, tags=tags)
        self._mlflow = run
        run.log_params(flat)
        log.info(
            "tracking run %s in MLflow %s (experiment %s, run id %s)",
            run_name,
            cfg.mlflow_uri,
            cfg.mlflow_experiment,
            run.run_id,
        )

    def _call(self, what: str, fn: Any) -> None:
        import httpx

        try:
            fn()
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            log.warning("MLflow tracking stopped for this run: %s failed (%s: %s)", what, type(exc).__name__, exc)
            if self._mlflow is not None:
                self._mlflow._http.close()
            self._mlflow = None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record the finite numeric values of `metrics` at `step` (others are skipped)."""
        values = scalars(metrics)
        if not values:
            return
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._mlflow is not None:
            self._call("logging metrics", lambda: self._mlflow.log_metrics(values, step))

    def close(self, ok: bool = True) -> None:
        """Flush and close; the MLflow run ends FINISHED (ok) or FAILED."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._mlflow is not None:
            run = self._mlflow
            self._call("finishing the run", lambda: run.finish("FINISHED" if ok else "FAILED"))
            self._mlflow = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(ok=exc_type is None)


def _now_ms() -> int:
    return int(time.time() * 1000)
