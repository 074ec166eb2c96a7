"""Several pyheadscale instances on one PostgreSQL database (docs/high-availability.md).

`member.ClusterMember` keeps this instance's place in the cluster: a control connection that
LISTENs for change-log ids and messages, holds the instance's liveness lock and, when it wins
it, the leader lock; heartbeats; and, as leader, sweeps instances that died and prunes the log.

This package's top level stays light on purpose: a single instance (SQLite) only asks
`is_clustered` and never imports `member` (psycopg and its pool, about 5 MiB resident).
"""

from sqlalchemy import Engine


def is_clustered(engine: Engine) -> bool:
    """Several instances may share this database: PostgreSQL always runs the cluster
    machinery (a second instance started later must find the log kept)."""
    return engine.dialect.name == "postgresql"


__all__ = ["is_clustered"]
