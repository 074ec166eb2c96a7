"""The statements the cluster runtime sends on its control connection (async psycopg)."""

from __future__ import annotations

# Advisory lock keys: the leader lock (one bigint) and the two-int namespace of instance
# liveness locks (second int: the instance id's hash, kept non-negative).
LEADER_LOCK = 0x7079_6873_2D6C_6472  # "pyhs-ldr"
INSTANCE_NS = 0x7079_6873  # "pyhs"
MESSAGES = "pyheadscale_messages"

TAKE_INSTANCE_LOCK = "SELECT pg_advisory_lock(%s, hashtext(%s) & 2147483647)"
TRY_LEADER = "SELECT pg_try_advisory_lock(%s)"
HEARTBEAT = ("UPDATE cluster_instances SET heartbeat_at = now(), applied_id = %s "
             "WHERE id = %s")
# Instances whose liveness lock nobody holds, and instance ids presence rows still name
# without an instance row (left from before a restart of every instance).
UNLOCKED = """
SELECT i.id FROM cluster_instances i
WHERE NOT EXISTS (
  SELECT 1 FROM pg_locks l
  WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
    AND l.classid::bigint = %s AND l.objid::bigint = (hashtext(i.id) & 2147483647))
UNION
SELECT DISTINCT p.instance_id FROM cluster_presence p
WHERE NOT EXISTS (SELECT 1 FROM cluster_instances i WHERE i.id = p.instance_id)
"""
# Log entries every live instance has applied, older than the retention.
PRUNE = """
DELETE FROM cluster_changes
WHERE id < (SELECT COALESCE(MIN(applied_id), 0) FROM cluster_instances)
  AND created_at < now() - make_interval(secs => %s)
"""
# Registrations nobody completed, past their expiry (every instance ignores them already).
PRUNE_REGISTRATIONS = "DELETE FROM cluster_registrations WHERE expires_at < now()"
