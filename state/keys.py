"""Every name runctx gives to a thing in Redis or in a cache, built and parsed here and nowhere else.

Cache keys name routine definitions and configurations in L1 and L2, and in change events:

    routine:<name>                the newest version of a routine
    routine:<name>@<version>      one stored version
    config:<kind>:<name>          a configuration (bot, team, ...)
    context:<context id>          (change events only) a context changed in L3

Redis keys, under the key prefix P (``RUNCTX_KEY_PREFIX``). The part in braces is the hash tag: on
a Redis Cluster every key of one tag lives in one slot, so a script may touch them together.

    P:{c<k>}:ctx:<context id>     hash {v, e, c, d, o}: a context in L2 (version, epoch, checksum,
                                  payload without its applied steps, origin)
    P:{c<k>}:applied:<context id> sorted set: the steps the context holds (score: the version each made)
    P:{c<k>}:wb:due               sorted set: shard k's contexts waiting for their L3 write, by due time
    P:{c<k>}:wb:first             hash: context id -> time of its oldest unwritten change
                                  (k = the context's shard, `context_shard`, one of L2_SHARDS)
    P:cfg:<cache key>             hash {v, c, d}: a routine definition or configuration in L2
    P:{<run id>}:run:<part>       run records: attempts, step_attempts, failed, l3_writes, done,
                                  progress (when a step of the run last finished or showed it was alive)
    P:{<run id>#<m>}:run:steps    the run's step records, spread over STEP_RECORD_SHARDS hashes (m from
                                  the step id) so that a long run's records do not all load one node
    P:lease:<name>                who holds a lease (the watchdog's leader)
    P:control                     the control channel (pub/sub) every worker process subscribes to
    P:ev:<event identity>         "this change event was relayed" (one process relays each)
    P:probe:<probe id>            replies to a diagnostics probe
    P:trace:<event identity>      when each process dropped a traced configuration

Context ids are ``<run id>`` for a run's root context and ``<run id>/<path>`` for its children.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal

RUN_RECORD_PARTS = ("attempts", "step_attempts", "steps", "failed", "hidden_error", "l3_writes", "done", "progress", "fan_outs")

# Contexts and their write-behind schedule are spread over this many hash tags (a cluster's slots).
L2_SHARDS = 16
STEP_RECORD_SHARDS = 4

# ---- cache keys -----------------------------------------------------------------------------------


def routine_key(name: str, version: int | None = None) -> str:
    return f"routine:{name}" if version is None else f"routine:{name}@{version}"


def config_key(kind: str, name: str) -> str:
    return f"config:{kind}:{name}"


@dataclass(frozen=True)
class CacheKey:
    """A parsed cache key: a routine (``version`` None: the newest) or a configuration."""

    kind: Literal["routine", "config"]
    name: str
    version: int | None = None
    config_kind: str | None = None

    @classmethod
    def parse(cls, key: str) -> CacheKey:
        kind, _, rest = key.partition(":")
        if kind == "routine" and rest:
            name, at, version = rest.partition("@")
            return cls("routine", name, int(version) if at else None)
        if kind == "config":
            config_kind, sep, name = rest.partition(":")
            if sep and config_kind and name:
                return cls("config", name, config_kind=config_kind)
        raise ValueError(f"not a cache key: {key!r}")

    def __str__(self) -> str:
        if self.kind == "routine":
            return routine_key(self.name, self.version)
        assert self.config_kind is not None
        return config_key(self.config_kind, self.name)


def context_change_key(context_id: str) -> str:
    """How a change event names a changed context (not a cache key: contexts are cached by id)."""
    return f"context:{context_id}"


def run_of_context(context_id: str) -> str:
    """The run a context belongs to."""
    return context_id.split("/", 1)[0]


def context_id(run_id: str, path: str) -> str:
    """A run's root context (path "") or one of its sub-routine contexts."""
    return run_id if not path else f"{run_id}/{path}"


# ---- Redis keys -----------------------------------------------------------------------------------


def context_shard(context_id: str) -> int:
    """The shard of a context: its entry, applied steps and write-behind schedule share its hash tag."""
    return zlib.crc32(context_id.encode()) % L2_SHARDS


def step_record_shard(step_id: str) -> int:
    return zlib.crc32(step_id.encode()) % STEP_RECORD_SHARDS


class RedisKeys:
    """The Redis names of one key prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.control_channel = f"{prefix}:control"
        self.watch_channel = f"{prefix}:watch"  # what run changed: for whoever watches runs live

    def _shard(self, context_id: str) -> str:
        return f"{self.prefix}:{{c{context_shard(context_id)}}}"

    def context(self, context_id: str) -> str:
        return f"{self._shard(context_id)}:ctx:{context_id}"

    def applied(self, context_id: str) -> str:
        return f"{self._shard(context_id)}:applied:{context_id}"

    def history(self, context_id: str) -> str:
        """The context's history entries not yet moved to L3 (a list, oldest first)."""
        return f"{self._shard(context_id)}:hist:{context_id}"

    def write_behind_due(self, context_id: str) -> str:
        """The due set of the context's shard."""
        return f"{self._shard(context_id)}:wb:due"

    def write_behind_first(self, context_id: str) -> str:
        return f"{self._shard(context_id)}:wb:first"

    def due_sets(self) -> list[str]:
        """Every shard's due set."""
        return [f"{self.prefix}:{{c{shard}}}:wb:due" for shard in range(L2_SHARDS)]

    def first_change_sets(self) -> list[str]:
        """Every shard's hash of oldest unwritten changes."""
        return [f"{self.prefix}:{{c{shard}}}:wb:first" for shard in range(L2_SHARDS)]

    def config(self, cache_key: str) -> str:
        return f"{self.prefix}:cfg:{cache_key}"

    def run_record(self, run_id: str, part: str, step_id: str = "") -> str:
        """A run record; the step records' hash is the one of ``step_id``'s shard."""
        if part not in RUN_RECORD_PARTS:
            raise ValueError(f"unknown run record {part!r}")
        if part == "steps":
            return self.step_records(run_id)[step_record_shard(step_id)]
        if part == "fan_outs":  # one hash per fan-out (``step_id``: its concrete id and epoch)
            return f"{self.prefix}:{{{run_id}}}:run:fan_outs:{step_id}"
        return f"{self.prefix}:{{{run_id}}}:run:{part}"

    def step_records(self, run_id: str) -> list[str]:
        return [f"{self.prefix}:{{{run_id}#{m}}}:run:steps" for m in range(STEP_RECORD_SHARDS)]

    def run_records(self, run_id: str) -> list[str]:
        """Every record key of a run."""
        return [self.run_record(run_id, part) for part in RUN_RECORD_PARTS if part not in ("steps", "fan_outs")] + self.step_records(run_id)

    def lease(self, name: str) -> str:
        return f"{self.prefix}:lease:{name}"

    def continuity(self) -> str:
        """The heartbeat counter every process increments: a count that goes back says Redis did."""
        return f"{self.prefix}:continuity"

    def loss(self, run_id: str = "") -> str:
        """When a process found that Redis lost or went back on what it held; with ``run_id``: that
        the run was resumed for it."""
        return f"{self.prefix}:lost-at" + (f":{run_id}" if run_id else "")

    def relayed_event(self, identity: str) -> str:
        return f"{self.prefix}:ev:{identity}"

    def probe_reply(self, probe_id: str) -> str:
        return f"{self.prefix}:probe:{probe_id}"

    def server_token(self, token: str) -> str:
        """A short-lived key written through one client and looked for through another."""
        return f"{self.prefix}:server-token:{token}"

    def trace(self, identity: str) -> str:
        return f"{self.prefix}:trace:{identity}"

    def pattern(self) -> str:
        """A SCAN pattern matching every key of this prefix."""
        return f"{self.prefix}:*"
