"""The appliance's Ray cluster: a head with token authentication, nodes in device groups, and jobs placed on a group.

Ray does the scheduling (resources, label selectors, queueing of what does not fit, logs, stop); this package adds what
the appliance promises on top: a token under keys/, groups as node labels, a refusal at submit for what a group can
never hold, a per-group limit on concurrent jobs, re-submission after a node dies, and threads that follow a job's CPUs.
"""

from fedllm.appliance.cluster.jobs import JobRequest, JobView
from fedllm.appliance.cluster.nodes import NodeView

__all__ = ["JobRequest", "JobView", "NodeView"]
