"""One settings section per package, each in its own module so its owner can grow it alone."""

from appliance.core.sections.cluster import ClusterSettings
from appliance.core.sections.federation import FederationSettings
from appliance.core.sections.serve import ServeSettings, WorkerSettings, WorkerSpec
from appliance.core.sections.tracking import TrackingSettings
from appliance.core.sections.train import TrainSettings
from appliance.core.sections.ui import UISettings

__all__ = ["ClusterSettings", "FederationSettings", "ServeSettings", "TrackingSettings", "TrainSettings", "UISettings", "WorkerSettings", "WorkerSpec"]
