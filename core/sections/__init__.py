"""One settings section per package, each in its own module so its owner can grow it alone."""

from fedllm.core.sections.cluster import ClusterSettings
from fedllm.core.sections.federation import FederationSettings
from fedllm.core.sections.serve import ServeSettings, WorkerSettings, WorkerSpec
from fedllm.core.sections.tracking import TrackingSettings
from fedllm.core.sections.train import TrainSettings
from fedllm.core.sections.ui import UISettings

__all__ = [
    "ClusterSettings",
    "FederationSettings",
    "ServeSettings",
    "TrackingSettings",
    "TrainSettings",
    "UISettings",
    "WorkerSettings",
    "WorkerSpec",
]
