"""Settings of run tracking: TensorBoard event files next to every run, and an optional MLflow server."""

from __future__ import annotations

from pydantic import Field

from fedllm.core.sections.base import Section


class TrackingSettings(Section):
    """Where training runs and federation rounds report their params and metrics besides their own files."""

    tensorboard: bool = Field(True, description="Write TensorBoard event files (runs/ID/tb/, federation/RUN/tb/).")
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking server (http://HOST:PORT); None logs to no MLflow."
    )
    mlflow_experiment: str = Field(
        "fedllm-appliance", description="MLflow experiment the runs are logged under (created if missing)."
    )
    mlflow_timeout_s: float = Field(30.0, gt=0, description="Timeout of one call to the MLflow server.")
