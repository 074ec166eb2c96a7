"""Several pyheadscale instances on one PostgreSQL database (docs/high-availability.md).

`ClusterMember` keeps this instance's place in the cluster: a control connection that
LISTENs for change-log ids and messages, holds the instance's liveness lock and, when it wins
it, the leader lock; heartbeats; and, as leader, sweeps instances that died and prunes the log.
"""

from pyheadscale.cluster.member import ClusterMember, InstanceInfo, is_clustered

__all__ = ["ClusterMember", "InstanceInfo", "is_clustered"]
