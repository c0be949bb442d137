"""L2 on Redis (one server, or a Redis Cluster), shared by every worker process: a piece per concern,
each its own module over one connection (`connection`), key names from `state.keys`, scripts from
`state/tiers/lua/`.

    contexts.py   contexts and their write-behind schedule   (L2Contexts)
    configs.py    routine definitions and configurations     (L2Configs)
    records.py    run records                                (L2RunRecords)
    bus.py        the control bus                            (L2Bus)
    leases.py     named leases                               (L2Leases)

On a cluster every script touches the keys of one hash tag (a context's shard); a step's record,
which on one server rides in its commit, is then written beside it.
"""

from __future__ import annotations

from state.tiers.data import CommitReply, CommitRequest, CommitStatus
from state.tiers.redis.configs import RedisConfigs
from state.tiers.redis.connection import connect, is_cluster
from state.tiers.redis.contexts import RedisContexts
from state.tiers.redis.leases import RedisLeases
from state.tiers.redis.records import RedisRunRecords

__all__ = ["RedisTier", "connect", "is_cluster"]


class RedisTier(RedisContexts, RedisConfigs, RedisRunRecords, RedisLeases):
    """L2 on one Redis (`L2Tier`): owns the keys of one prefix; every multi-key change is one Lua script.

    Promises: a commit is a compare-and-set (a stale writer is told so, never a lost update); an
    entry that fails its checksum raises ContextCorruption instead of being served; Redis errors
    leave as CommunicationFailure.
    """

    def commit(self, request: CommitRequest, *, now: float) -> CommitReply:
        report = request.report
        if report is None or not self.cluster:
            return super().commit(request, now=now)
        # On a cluster the run's records live on other slots than the context: checked and written beside it.
        if self.run_failed(report.run_id):
            return CommitReply(CommitStatus.RUN_FAILED)
        reply = super().commit(request, now=now)
        if reply.committed:
            self.finish_step(report.run_id, report.step_id, record=report.record(now))
        return reply
