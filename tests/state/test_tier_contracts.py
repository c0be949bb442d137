"""The tier contracts, checked against every implementation: one test body per promise.

Each L2 test runs against the in-memory twin (`MemoryL2`) and Redis (`RedisTier`, i.e. the Lua
scripts); each L3 test against the twin (`MemoryL3`) and PostgreSQL (`PostgresTier`, i.e. the SQL).
A test passes for both or the twin has drifted from what it stands in for; the real tier is the
reference.

L1 has one implementation (`LocalCache`); its section checks it against the `L1Tier` Protocol.

The write-behind schedule is tested with explicit ``now`` values (T0 and later), never the clock.
Memory cases need no server.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from state import bus
from state.errors import (
    ContextCorruption,
    InvalidValue,
    NotFound,
    RefusedByDatabase,
    RunEnded,
    RunExists,
    SignalRefused,
    VersionConflict,
)
from state.models import RunContext, RunContextInit, StateCacheConfig
from state.schema import blackboard_entries, exports
from state.tiers.contracts import L1Tier, L2Tier, L3Tier
from state.tiers.data import (
    CommitReply,
    CommitRequest,
    CommitStatus,
    ConfigEntry,
    ExportRecord,
    NewBlob,
    Outbox,
    RunRow,
    StepReport,
    StepStart,
    WaitRow,
)
from state.tiers.local import LocalCache
from state.tiers.memory import MemoryL2, MemoryL3
from state.tiers.postgres import PostgresTier
from state.tiers.redis import RedisTier

T0 = 1_000.0  # "now" of the write-behind tests
DEBOUNCE = 5.0
MAX_DELAY = 12.0
LEASE = 30.0
WRITTEN_AT = 1_700_000_000.5


# ---- helpers ----------------------------------------------------------------------------------------


def context(context_id: str = "run-1", version: int = 1, **variables: Any) -> RunContext:
    """A context at ``version``; its variables default to {"n": version}, so versions differ in content."""
    ctx = RunContext.from_init(
        RunContextInit(
            run_id=context_id.split("/")[0], routine_id="r", context_id=context_id, variables=variables or {"n": version}
        )
    )
    ctx.version = version
    ctx.written_at = dict.fromkeys(ctx.written_at, WRITTEN_AT)  # two calls with equal arguments: equal contexts
    return ctx


def data(ctx: RunContext | None) -> dict[str, Any] | None:
    """What a context holds (pydantic's == also compares private size caches, which a decoded copy lacks)."""
    return None if ctx is None else ctx.model_dump(mode="json")


def commit(l2: L2Tier, ctx: RunContext, expected_version: int, now: float = T0) -> CommitReply:
    """A commit that is not a step's (the tiers take DEBOUNCE and MAX_DELAY from ``cache_config``)."""
    return l2.commit(CommitRequest(ctx, expected_version), now=now)


def damage(l2: L2Tier, context_id: str) -> None:
    """Overwrite a stored context's payload with bytes that do not match its checksum."""
    if isinstance(l2, RedisTier):
        l2.client.hset(l2.keys.context(context_id), "d", b"garbage")
    else:
        l2.raw_context(context_id).payload = b"garbage"


def ttl(l2: L2Tier, context_id: str) -> float | None:
    """Seconds until a stored context expires; None when it has no TTL (the entry must exist)."""
    assert l2.get_context(context_id) is not None
    if isinstance(l2, RedisTier):
        seconds = l2.client.ttl(l2.keys.context(context_id))
        return None if seconds == -1 else seconds
    return l2.expires_in(context_id)


def exported(l3: L3Tier) -> dict[str, dict]:
    """Every blackboard entry and persistent export L3 holds, in one normalized shape."""
    if isinstance(l3, MemoryL3):
        board = {key: dict(entry) for key, entry in l3.blackboard.items()}
        kept = {key: dict(entry) for key, entry in l3.exports.items()}
    else:
        bb, ex = blackboard_entries.c, exports.c
        board_rows = l3.read(lambda conn: conn.execute(select(bb.scope, bb.key, bb.value, bb.sensitivity, bb.run_id, bb.version)).all())
        kept_rows = l3.read(lambda conn: conn.execute(select(ex.run_id, ex.key, ex.scope, ex.variable, ex.value, ex.sensitivity)).all())
        board = {
            (row.scope, row.key): {"value": row.value, "sensitivity": row.sensitivity, "run_id": row.run_id, "version": row.version}
            for row in board_rows
        }
        kept = {
            (row.run_id, row.key, row.scope): {"variable": row.variable, "value": row.value, "sensitivity": row.sensitivity}
            for row in kept_rows
        }
    return {"blackboard": board, "persistent": kept}


def run_row(run_id: str = "run-1", **fields: Any) -> RunRow:
    values = dict(routine_name="greet", routine_version=2, root_context_id=run_id, status="running", meta={"by": "test"})
    return RunRow(run_id=run_id, **{**values, **fields})


def finish(l3: L3Tier, run_id: str = "run-1", **fields: Any) -> bool:
    values = dict(status="succeeded", error=None, meta={}, contexts=[], exports=[])
    return l3.finish_run(run_id, **{**values, **fields})


# ---- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def cache_config() -> StateCacheConfig:
    """The tiers under test schedule their write-behind with the DEBOUNCE and MAX_DELAY used below."""
    return StateCacheConfig(write_behind_debounce_s=DEBOUNCE, write_behind_max_delay_s=MAX_DELAY)


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def l2(request: pytest.FixtureRequest, cache_config: StateCacheConfig) -> Iterator[L2Tier]:
    if request.param == "memory":
        yield MemoryL2(prefix=f"rctxtest:{uuid.uuid4().hex[:12]}", config=cache_config)
        return
    if request.param == "redis-cluster":  # the same URL form: runctx finds out it names a cluster node
        url = request.getfixturevalue("redis_cluster").url
        tier = RedisTier.from_url(url, prefix=f"rctxtest:{uuid.uuid4().hex[:12]}", config=cache_config)
        assert tier.cluster
    else:
        servers = request.getfixturevalue("servers")
        tier = RedisTier.from_url(servers.redis_url, prefix=request.getfixturevalue("key_prefix"), config=cache_config)
        assert not tier.cluster
    yield tier
    tier.close()


@pytest.fixture(params=["memory", "postgres"])
def l3(request: pytest.FixtureRequest, cache_config: StateCacheConfig) -> Iterator[L3Tier]:
    if request.param == "memory":
        yield MemoryL3()
        return
    tier = PostgresTier.from_url(request.getfixturevalue("database_url"), config=cache_config)
    yield tier
    tier.close()


# ==== L2: the shared cache (MemoryL2 | RedisTier) ======================================================


def test_l2_implements_the_protocol(l2: L2Tier) -> None:
    assert isinstance(l2, L2Tier)
    assert l2.ping() is True


# ---- contexts ---------------------------------------------------------------------------------------


def test_l2_get_of_a_missing_context_is_none(l2: L2Tier) -> None:
    assert l2.get_context("nope") is None
    assert l2.due_time("nope") is None


def test_l2_fill_then_get_returns_a_clean_copy(l2: L2Tier) -> None:
    ctx = context(version=3, greeting="hello", items=[1, {"a": None}])
    assert l2.fill_context(ctx) is True
    stored = l2.get_context("run-1")
    assert (stored.version, stored.dirty) == (3, False)
    assert data(stored.context) == data(ctx)
    assert stored.context is not ctx


def test_l2_fill_never_replaces_an_equal_or_newer_version(l2: L2Tier) -> None:
    l2.fill_context(context(version=3))
    assert l2.fill_context(context(version=3, n="other")) is False
    assert l2.fill_context(context(version=2)) is False
    assert data(l2.get_context("run-1").context) == data(context(version=3))
    assert l2.fill_context(context(version=4)) is True
    assert data(l2.get_context("run-1").context) == data(context(version=4))


def test_l2_fill_leaves_a_dirty_entry_of_the_same_version(l2: L2Tier) -> None:
    commit(l2, context(version=1), 0)
    assert l2.fill_context(context(version=1, n="from L3")) is False
    stored = l2.get_context("run-1")
    assert (stored.context.variables, stored.dirty) == ({"n": 1}, True)
    assert ttl(l2, "run-1") is None


def test_l2_commit_over_version_0_creates_a_dirty_entry(l2: L2Tier) -> None:
    ctx = context(version=1)
    assert commit(l2, ctx, 0).status is CommitStatus.COMMITTED
    stored = l2.get_context("run-1")
    assert (stored.version, stored.dirty) == (1, True)
    assert data(stored.context) == data(ctx)
    assert l2.due_time("run-1") == T0 + DEBOUNCE
    assert l2.pending_flushes() == 1


def test_l2_commit_with_the_expected_version_succeeds(l2: L2Tier) -> None:
    l2.fill_context(context(version=1))
    assert commit(l2, context(version=2), 1).status is CommitStatus.COMMITTED
    stored = l2.get_context("run-1")
    assert (stored.version, stored.dirty, stored.context.variables) == (2, True, {"n": 2})


def test_l2_stale_commit_is_refused_as_stale_and_changes_nothing(l2: L2Tier) -> None:
    commit(l2, context(version=1), 0)
    commit(l2, context(version=2), 1, now=T0 + 1)
    refused = commit(l2, context(version=2, n="stale"), 1, now=T0 + 2)
    assert (refused.status, refused.actual_version, refused.committed) == (CommitStatus.STALE, 2, False)
    assert l2.get_context("run-1").context.variables == {"n": 2}
    assert l2.due_time("run-1") == T0 + 1 + DEBOUNCE


def test_l2_a_step_commit_records_its_step_in_the_same_write_and_a_refused_one_records_nothing(l2: L2Tier) -> None:
    commit(l2, context(version=1), 0)
    report = StepReport(run_id="run-1", step_id="s1", worker="w1", duration_s=0.25)
    assert l2.commit(CommitRequest(context(version=2), 1, report=report), now=T0).status is CommitStatus.COMMITTED
    stale = StepReport(run_id="run-1", step_id="s2", worker="w2", duration_s=0.5)
    assert l2.commit(CommitRequest(context(version=2, n="stale"), 1, report=stale), now=T0).status is CommitStatus.STALE
    steps = l2.run_summary("run-1")["steps"]
    assert [(step["id"], step["status"], step["worker"], step["duration_s"], step["finished_at"]) for step in steps] == [
        ("s1", "succeeded", "w1", 0.25, T0)
    ]
    assert l2.progress_of(["run-1"]) == {"run-1": T0}


def test_l2_commit_over_version_0_of_an_existing_entry_is_stale(l2: L2Tier) -> None:
    l2.fill_context(context(version=4))
    refused = commit(l2, context(version=1), 0)
    assert (refused.status, refused.actual_version) == (CommitStatus.STALE, 4)
    assert l2.get_context("run-1").version == 4
    assert l2.pending_flushes() == 0


def test_l2_commit_expecting_a_version_of_a_missing_entry_finds_no_entry(l2: L2Tier) -> None:
    reply = commit(l2, context(version=3), 2)
    assert reply.status is CommitStatus.NO_ENTRY and not reply.committed
    assert l2.get_context("run-1") is None
    assert l2.pending_flushes() == 0


def test_l2_debounce_moves_the_due_time_but_never_past_the_max_delay(l2: L2Tier) -> None:
    commit(l2, context(version=1), 0, now=T0)
    assert l2.due_time("run-1") == T0 + DEBOUNCE
    commit(l2, context(version=2), 1, now=T0 + 4)
    assert l2.due_time("run-1") == T0 + 4 + DEBOUNCE
    commit(l2, context(version=3), 2, now=T0 + 8)
    assert l2.due_time("run-1") == T0 + MAX_DELAY  # not T0 + 8 + DEBOUNCE
    commit(l2, context(version=4), 3, now=T0 + 11)
    assert l2.due_time("run-1") == T0 + MAX_DELAY


def test_l2_debounce_keeps_full_time_precision(l2: L2Tier) -> None:
    now = time.time()
    commit(l2, context(version=1), 0, now=now)
    assert l2.due_time("run-1") == now + DEBOUNCE


def test_l2_mark_flushed_of_the_current_version_makes_it_clean(l2: L2Tier) -> None:
    commit(l2, context(version=1), 0)
    commit(l2, context(version=2), 1, now=T0 + 1)
    assert l2.mark_flushed("run-1", 2, now=T0 + 7) is True
    assert l2.pending_flushes() == 0
    assert l2.due_time("run-1") is None
    assert l2.get_context("run-1").dirty is False


def test_l2_mark_flushed_of_an_older_version_reschedules_the_newer_one(l2: L2Tier) -> None:
    commit(l2, context(version=1), 0, now=T0)
    commit(l2, context(version=2), 1, now=T0 + 1)
    assert l2.mark_flushed("run-1", 1, now=T0 + 20) is False
    assert l2.due_time("run-1") == T0 + 20 + DEBOUNCE
    assert l2.get_context("run-1").dirty is True
    # the newer changes got a window of their own, starting at the flush
    commit(l2, context(version=3), 2, now=T0 + 29)
    assert l2.due_time("run-1") == T0 + 20 + MAX_DELAY


def test_l2_mark_flushed_after_a_clean_flush_starts_a_new_window(l2: L2Tier) -> None:
    commit(l2, context(version=1), 0, now=T0)
    l2.mark_flushed("run-1", 1, now=T0 + 6)
    commit(l2, context(version=2), 1, now=T0 + 50)
    assert l2.due_time("run-1") == T0 + 50 + DEBOUNCE


def test_l2_mark_flushed_of_a_missing_entry_unschedules_it(l2: L2Tier) -> None:
    assert l2.mark_flushed("nope", 1, now=T0) is True
    assert l2.pending_flushes() == 0


def test_l2_claim_due_claims_each_due_id_once_per_lease(l2: L2Tier) -> None:
    commit(l2, context("run-a", 1), 0, now=T0)  # due T0 + 5
    commit(l2, context("run-b", 1), 0, now=T0 + 2)  # due T0 + 7
    commit(l2, context("run-c", 1), 0, now=T0 + 100)  # due T0 + 105
    now = T0 + 8
    assert sorted(l2.claim_due(now, lease_s=LEASE)) == ["run-a", "run-b"]
    assert l2.due_time("run-a") == now + LEASE
    assert l2.claim_due(now, lease_s=LEASE) == []
    assert l2.claim_due(now + LEASE - 1, lease_s=LEASE) == []
    assert sorted(l2.claim_due(now + LEASE + 1, lease_s=LEASE)) == ["run-a", "run-b"]
    assert l2.pending_flushes() == 3  # a claim is a lease, not a removal


def test_l2_heartbeat_count_goes_up_and_the_first_note_of_a_loss_stays(l2: L2Tier) -> None:
    first = l2.count_heartbeat()
    assert [l2.count_heartbeat() for _ in range(3)] == [first + 1, first + 2, first + 3]
    assert l2.loss_noted() is None
    l2.note_loss(T0, ttl_s=60)
    l2.note_loss(T0 + 5, ttl_s=60)  # another process noticing the same loss later
    assert l2.loss_noted() == T0


def test_l2_claim_due_takes_at_most_the_limit_and_the_rest_next_time(l2: L2Tier) -> None:
    # Due sets are sharded (Redis Cluster): the limit holds across shards, order only within one.
    ids = [f"run-{n}" for n in range(12)]
    for n, context_id in enumerate(ids):
        commit(l2, context(context_id, 1), 0, now=T0 + n)
    first = l2.claim_due(T0 + 100, lease_s=LEASE, limit=5)
    second = l2.claim_due(T0 + 100, lease_s=LEASE, limit=100)
    assert len(first) == 5 and len(set(first)) == 5
    assert sorted(first + second) == sorted(ids)
    assert l2.claim_due(T0 + 100, lease_s=LEASE, limit=100) == []


def test_l2_next_due_is_the_earliest(l2: L2Tier) -> None:
    assert l2.next_due() is None
    commit(l2, context("run-a", 1), 0, now=T0 + 3)
    commit(l2, context("run-b", 1), 0, now=T0 + 1)
    commit(l2, context("run-c", 1), 0, now=T0 + 2)
    assert l2.next_due() == T0 + 1 + DEBOUNCE


def test_l2_forget_run_drops_its_records(l2: L2Tier) -> None:
    l2.start_step("run-9", "task-1", "a")
    l2.finish_step("run-9", "a", status="succeeded", worker="w", duration_s=0.1)
    l2.mark_failed("run-9", "boom")
    l2.count_l3_write("run-9")
    l2.forget_run("run-9")
    assert l2.failure_of("run-9") is None
    summary = l2.run_summary("run-9")
    assert not summary["steps"] and not summary["l3_writes"]


def test_l2_oldest_unwritten_is_the_first_change_not_yet_in_l3(l2: L2Tier) -> None:
    assert l2.oldest_unwritten() is None
    commit(l2, context("run-a", 1), 0, now=T0 + 3)
    commit(l2, context("run-b", 1), 0, now=T0 + 1)
    commit(l2, context("run-b", 2), 1, now=T0 + 4)  # a later change keeps its context's first time
    assert l2.oldest_unwritten() == T0 + 1
    l2.mark_flushed("run-b", 2, now=T0 + 6)
    assert l2.oldest_unwritten() == T0 + 3
    l2.mark_flushed("run-a", 1, now=T0 + 6)
    assert l2.oldest_unwritten() is None


def test_l2_evict_up_to_a_version_spares_a_newer_entry(l2: L2Tier) -> None:
    commit(l2, context(version=1), 0)
    commit(l2, context(version=2), 1)
    assert l2.evict_context("run-1", up_to_version=1) is False
    assert l2.get_context("run-1").version == 2
    assert l2.pending_flushes() == 1


def test_l2_evict_up_to_a_version_drops_an_older_or_equal_entry_and_its_pending_write(l2: L2Tier) -> None:
    commit(l2, context("run-a", 1), 0)
    commit(l2, context("run-b", 1), 0)
    assert l2.evict_context("run-a", up_to_version=1) is True
    assert l2.evict_context("run-b", up_to_version=5) is True
    assert l2.get_context("run-a") is None and l2.get_context("run-b") is None
    assert l2.due_time("run-a") is None and l2.pending_flushes() == 0
    assert l2.evict_context("run-a") is False


def test_l2_evict_without_a_version_drops_any_entry(l2: L2Tier) -> None:
    commit(l2, context(version=7), 0)
    assert l2.evict_context("run-1") is True
    assert l2.get_context("run-1") is None
    # a commit after eviction starts over: the first-change time went with the entry
    commit(l2, context(version=1), 0, now=T0 + 50)
    assert l2.due_time("run-1") == T0 + 50 + DEBOUNCE


def test_l2_damaged_payload_raises_context_corruption(l2: L2Tier) -> None:
    l2.fill_context(context(version=1))
    damage(l2, "run-1")
    with pytest.raises(ContextCorruption) as raised:
        l2.get_context("run-1")
    assert raised.value.key == l2.keys.context("run-1")


# ---- TTLs: a dirty entry never expires, a clean one does ------------------------------------------------


def test_l2_filled_entry_has_the_context_ttl(l2: L2Tier, cache_config: StateCacheConfig) -> None:
    l2.fill_context(context(version=1))
    assert 0 < ttl(l2, "run-1") <= cache_config.l2_context_ttl_s


def test_l2_committed_entry_has_no_ttl(l2: L2Tier) -> None:
    l2.fill_context(context(version=1))
    commit(l2, context(version=2), 1)
    assert ttl(l2, "run-1") is None


def test_l2_flushed_entry_gets_the_ttl_back(l2: L2Tier, cache_config: StateCacheConfig) -> None:
    commit(l2, context(version=1), 0)
    commit(l2, context(version=2), 1)
    l2.mark_flushed("run-1", 1, now=T0 + 6)
    assert ttl(l2, "run-1") is None  # version 2 is still unwritten
    l2.mark_flushed("run-1", 2, now=T0 + 12)
    assert 0 < ttl(l2, "run-1") <= cache_config.l2_context_ttl_s


# ---- routine definitions and configurations -------------------------------------------------------------


def test_l2_config_round_trip(l2: L2Tier) -> None:
    assert l2.get_config("config:bot:a") is None
    entry = ConfigEntry(key="config:bot:a", version=3, data={"model": "m", "tools": ["x", {"y": 1.5}], "on": True})
    l2.put_config(entry)
    assert l2.get_config("config:bot:a") == entry
    l2.put_config(ConfigEntry(key="config:bot:a", version=4, data={"model": "n"}))
    assert l2.get_config("config:bot:a") == ConfigEntry(key="config:bot:a", version=4, data={"model": "n"})
    assert l2.evict_config("config:bot:a") is True
    assert l2.get_config("config:bot:a") is None
    assert l2.evict_config("config:bot:a") is False


# ---- a step's commit: applied steps beside the context -------------------------------------------------


def step_commit(l2: L2Tier, ctx: RunContext, expected_version: int, step_id: str, **kwargs: Any) -> CommitReply:
    return l2.commit(CommitRequest(ctx, expected_version, step_id=step_id, **kwargs), now=T0)


def test_l2_a_step_commit_adds_its_step_to_what_a_read_gives(l2: L2Tier) -> None:
    commit(l2, context(version=1), 0)
    for version in (2, 3, 4):
        ctx = context(version=version)
        assert step_commit(l2, ctx, version - 1, f"s{version}").status is CommitStatus.COMMITTED
    stored = l2.get_context("run-1")
    assert stored is not None and stored.context.applied_steps == ["s2", "s3", "s4"]


def test_l2_a_step_already_applied_is_refused_whatever_version_the_writer_read(l2: L2Tier) -> None:
    commit(l2, context(version=1), 0)
    step_commit(l2, context(version=2), 1, "s1")
    assert step_commit(l2, context(version=2, n="again"), 1, "s1").status is CommitStatus.ALREADY_APPLIED  # stale and a duplicate
    assert step_commit(l2, context(version=3, n="again"), 2, "s1").status is CommitStatus.ALREADY_APPLIED
    stored = l2.get_context("run-1")
    assert stored is not None and stored.version == 2 and stored.context.variables == {"n": 2}


def test_l2_a_step_commit_of_a_failed_run_writes_nothing(l2: L2Tier) -> None:
    commit(l2, context(version=1), 0)
    l2.mark_failed("run-1", "boom")
    report = StepReport(run_id="run-1", step_id="s1", worker="w1", duration_s=0.1)
    assert step_commit(l2, context(version=2), 1, "s1", report=report).status is CommitStatus.RUN_FAILED
    assert l2.get_context("run-1").version == 1
    assert l2.run_summary("run-1")["steps"] == []


# ---- the outbox: a message that rides in a step's commit ------------------------------------------


def pushed(l2: L2Tier, queue: str) -> list[bytes]:
    """What commits pushed onto ``queue``, oldest first (the queue is emptied)."""
    if isinstance(l2, MemoryL2):
        return l2.take_pushed(queue)
    assert isinstance(l2, RedisTier)
    messages = l2.client.lrange(queue, 0, -1)
    l2.client.delete(queue)
    return list(reversed(messages))


def test_l2_a_step_commit_pushes_its_outbox_message_only_when_it_commits(l2: L2Tier) -> None:
    if not l2.carries_outbox:  # a cluster: the broker's queue is on no context's shard
        assert isinstance(l2, RedisTier) and l2.cluster
        return
    queue = f"{l2.prefix}.steps"

    def with_outbox(version: int, expected_version: int, step_id: str, message: bytes) -> CommitStatus:
        report = StepReport(run_id="run-1", step_id=step_id, worker="w1", duration_s=0.1)
        return step_commit(l2, context(version=version), expected_version, step_id, report=report, outbox=Outbox(queue, message)).status

    commit(l2, context(version=1), 0)
    assert with_outbox(2, 1, "s1", b"after s1") is CommitStatus.COMMITTED
    assert with_outbox(3, 2, "s2", b"after s2") is CommitStatus.COMMITTED
    assert pushed(l2, queue) == [b"after s1", b"after s2"]  # in commit order, as the broker delivers

    # A duplicate, a stale write and a commit of a failed run push nothing.
    assert with_outbox(4, 3, "s1", b"dup") is CommitStatus.ALREADY_APPLIED
    assert with_outbox(3, 1, "s3", b"stale") is CommitStatus.STALE
    l2.mark_failed("run-1", "boom")
    assert with_outbox(4, 3, "s3", b"failed") is CommitStatus.RUN_FAILED
    assert pushed(l2, queue) == []
    assert l2.get_context("run-1").version == 3


def test_l2_a_commit_stores_the_payload_encode_state_gave_and_decode_state_reads_it_back(l2: L2Tier) -> None:
    commit(l2, context(version=1), 0)
    ctx = context(version=2, n=2, label="two")
    payload, payload_checksum = l2.encode_state(ctx)
    report = StepReport(run_id="run-1", step_id="s1", worker="w1", duration_s=0.1)
    assert step_commit(l2, ctx, 1, "s1", report=report, encoded=(payload, payload_checksum)).committed
    stored = l2.get_context("run-1")
    assert data(stored.context) == data(ctx.model_copy(update={"applied_steps": ["s1"]}))
    # The payload travels (a step's message carries it): whoever holds it decodes the same context.
    assert data(l2.decode_state(payload, payload_checksum, ["s1"], key="run-1")) == data(stored.context)
    with pytest.raises(ContextCorruption):
        l2.decode_state(payload.replace(b'"two"', b'"owt"'), payload_checksum, ["s1"], key="run-1")


def test_l2_an_outbox_message_rides_only_in_a_step_commit(l2: L2Tier) -> None:
    commit(l2, context(version=1), 0)
    with pytest.raises(ValueError, match="outbox"):
        step_commit(l2, context(version=2), 1, "s1", outbox=Outbox(f"{l2.prefix}.steps", b"no report"))
    assert l2.get_context("run-1").version == 1


def test_l2_a_read_gives_the_steps_of_the_last_commits_that_led_to_the_version(l2: L2Tier) -> None:
    from state.models import LAST_STEPS_KEPT

    commit(l2, context(version=1), 0)
    for version in range(2, 5):
        step_commit(l2, context(version=version), version - 1, f"s{version}")
    assert l2.get_context("run-1").context.last_steps() == ("s2", "s3", "s4")
    for version in range(5, 6 + LAST_STEPS_KEPT):
        step_commit(l2, context(version=version), version - 1, f"s{version}")
    newest = 5 + LAST_STEPS_KEPT
    assert l2.get_context("run-1").context.last_steps() == tuple(f"s{v}" for v in range(newest - LAST_STEPS_KEPT + 1, newest + 1))
    commit(l2, context(version=newest + 1), newest)  # a commit without a step
    assert l2.get_context("run-1").context.last_steps() == ()
    filled = context(version=30)
    filled.applied_steps = [f"f{n}" for n in range(29)]  # as many as a context of version 30 can hold
    assert l2.fill_context(filled, live=True)
    assert l2.get_context("run-1").context.last_steps() == ()  # a fill knows no versions of its steps
    step_commit(l2, context(version=31), 30, "next")
    assert l2.get_context("run-1").context.last_steps() == ("next",)


def test_l2_a_stale_step_commit_is_told_the_state_that_beat_it_and_the_steps_since(l2: L2Tier) -> None:
    commit(l2, context(version=1), 0)
    for version in (2, 3):  # two commits the stale writer did not see
        step_commit(l2, context(version=version), version - 1, f"s{version}", expected_epoch=1, require_live=True)
    refused = step_commit(l2, context(version=2, n=99), 1, "late", expected_epoch=1, require_live=True)
    newer = refused.newer
    assert (refused.status, refused.actual_version, newer.version, newer.steps) == (CommitStatus.STALE, 3, 3, ("s2", "s3"))
    assert data(l2.decode_state(newer.payload, newer.checksum, ["s2", "s3"], key="run-1")) == data(l2.get_context("run-1").context)
    # A commit without a step came between: the steps since no longer lead there, and nothing is told.
    commit(l2, context(version=4), 3)
    refused = step_commit(l2, context(version=3, n=99), 2, "late", expected_epoch=1, require_live=True)
    assert (refused.status, refused.actual_version, refused.newer) == (CommitStatus.STALE, 4, None)


def test_l2_fill_keeps_the_applied_steps_and_a_step_commit_goes_on_from_them(l2: L2Tier) -> None:
    ctx = context(version=5)
    ctx.applied_steps = ["a", "b", "c"]
    assert l2.fill_context(ctx, live=True)
    assert l2.get_context("run-1").context.applied_steps == ["a", "b", "c"]
    step_commit(l2, context(version=6), 5, "d")
    assert l2.get_context("run-1").context.applied_steps == ["a", "b", "c", "d"]


def test_l2_a_context_whose_applied_steps_were_lost_is_corrupt_not_served(l2: L2Tier) -> None:
    commit(l2, context(version=1), 0)
    step_commit(l2, context(version=2), 1, "s1")
    if isinstance(l2, RedisTier):
        l2.client.delete(l2.keys.applied("run-1"))
    else:
        l2.raw_context("run-1").applied = []
    with pytest.raises(ContextCorruption):
        l2.get_context("run-1")


def test_l2_decode_state_checks_the_checksum(l2: L2Tier) -> None:
    from state.codec import DEFAULT_CODEC, checksum

    payload = DEFAULT_CODEC.dump_state(context(version=3))
    ctx = l2.decode_state(payload, checksum(payload), ["x"], key="run-1")
    assert ctx.version == 3 and ctx.applied_steps == ["x"]
    with pytest.raises(ContextCorruption):
        l2.decode_state(payload + b" ", checksum(payload), [], key="run-1")


# ---- run records ----------------------------------------------------------------------------------------


def test_l2_start_step_counts_the_starts_after_a_messages_first(l2: L2Tier) -> None:
    # A message's first start is never counted (it costs no round trip): the first counted is its 2nd.
    assert l2.start_step("run-1", "task-1", "step-a") == StepStart(attempt=2, run_failed=False)
    assert l2.start_step("run-1", "task-1", "step-a") == StepStart(attempt=3, run_failed=False)
    assert l2.start_step("run-1", "task-2", "step-b") == StepStart(attempt=2, run_failed=False)
    assert l2.start_step("run-2", "task-1", "step-a") == StepStart(attempt=2, run_failed=False)


def test_l2_start_step_reports_a_failed_run(l2: L2Tier) -> None:
    l2.start_step("run-1", "task-1", "step-a")
    assert l2.mark_failed("run-1", "boom") is True
    assert l2.start_step("run-1", "task-2", "step-b") == StepStart(attempt=2, run_failed=True)
    assert l2.run_failed("run-1") is True and l2.run_failed("run-2") is False
    assert l2.start_step("run-2", "task-3", "step-b").run_failed is False


def test_l2_mark_failed_is_true_only_the_first_time(l2: L2Tier) -> None:
    assert l2.mark_failed("run-1", "first") is True
    assert l2.mark_failed("run-1", "second") is False
    assert l2.mark_failed("run-2", "other run") is True


def test_l2_run_summary_lists_finished_steps(l2: L2Tier) -> None:
    assert l2.run_summary("run-1") == {"steps": [], "l3_writes": 0}
    l2.start_step("run-1", "task-1", "step-a")
    l2.start_step("run-1", "task-2", "step-a")  # redelivered under another task id: same step
    l2.start_step("run-1", "task-3", "step-b")
    l2.finish_step("run-1", "step-a", status="succeeded", worker="w1", duration_s=0.5)
    l2.finish_step("run-1", "step-b", status="failed", worker="w2", duration_s=0.25)
    summary = l2.run_summary("run-1")
    steps = [{key: value for key, value in step.items() if key != "finished_at"} for step in summary["steps"]]
    assert steps == [
        {"id": "step-a", "status": "succeeded", "worker": "w1", "duration_s": 0.5, "attempts": 3},
        {"id": "step-b", "status": "failed", "worker": "w2", "duration_s": 0.25, "attempts": 2},
    ]
    assert all(isinstance(step["finished_at"], float) for step in summary["steps"])


def test_l2_count_l3_write_sums(l2: L2Tier) -> None:
    l2.count_l3_write("run-1")
    l2.count_l3_write("run-1", 3)
    l2.count_l3_write("run-2", 5)
    assert l2.run_summary("run-1")["l3_writes"] == 4
    assert l2.run_summary("run-2")["l3_writes"] == 5


def test_l2_wait_done_wakes_on_announce_done(l2: L2Tier) -> None:
    l2.announce_done("run-1")
    assert l2.wait_done("run-1", 1.0) is True


def test_l2_wait_done_times_out_without_an_announcement(l2: L2Tier) -> None:
    started = time.monotonic()
    assert l2.wait_done("run-1", 0.05) is False
    assert time.monotonic() - started < 2.0


# ==== L3: the authoritative record (MemoryL3 | PostgresTier) ============================================


def test_l3_implements_the_protocol(l3: L3Tier) -> None:
    assert isinstance(l3, L3Tier)
    assert l3.ping() is True


# ---- contexts ---------------------------------------------------------------------------------------


def test_l3_missing_context_is_none(l3: L3Tier) -> None:
    assert l3.get_context("nope") is None
    assert l3.context_version("nope") is None


def test_l3_create_then_get_returns_the_context_at_its_version(l3: L3Tier) -> None:
    ctx = context(version=1, greeting="hello", items=[1, {"a": None}], ratio=0.25)
    assert l3.create_context(ctx) is None
    assert data(l3.get_context("run-1")) == data(ctx)
    assert l3.get_context("run-1").version == 1
    assert l3.context_version("run-1") == 1


def test_l3_create_of_an_existing_id_raises_version_conflict(l3: L3Tier) -> None:
    l3.create_context(context(version=1))
    l3.write_context(context(version=3))
    with pytest.raises(VersionConflict) as raised:
        l3.create_context(context(version=1, n="again"))
    assert (raised.value.tier, raised.value.expected, raised.value.actual) == ("L3", 0, 3)
    assert data(l3.get_context("run-1")) == data(context(version=3))


def test_l3_write_context_writes_only_a_newer_version(l3: L3Tier) -> None:
    assert l3.write_context(context(version=2)) is True  # the first write creates it
    assert l3.write_context(context(version=4)) is True
    assert l3.write_context(context(version=4, n="same version")) is False
    assert l3.write_context(context(version=3)) is False
    assert l3.context_version("run-1") == 4
    assert data(l3.get_context("run-1")) == data(context(version=4))


def test_l3_child_context_keeps_its_parent(l3: L3Tier) -> None:
    parent = context(version=1)
    child = parent.create_child("sub", context_id="run-1/sub")
    child.version = 1
    l3.create_context(parent)
    l3.create_context(child)
    got = l3.get_context("run-1/sub")
    assert (got.parent_id, got.run_id, got.depth) == ("run-1", "run-1", 1)
    assert data(got) == data(child)


# ---- the run ledger -------------------------------------------------------------------------------------


def test_l3_create_run_stores_the_run_and_its_root(l3: L3Tier) -> None:
    root = context(version=1)
    l3.create_run(run_row(), root)
    run = l3.get_run("run-1")
    assert (run.run_id, run.routine_name, run.routine_version, run.root_context_id) == ("run-1", "greet", 2, "run-1")
    assert (run.status, run.error, run.meta, run.finished_at) == ("running", None, {"by": "test"}, None)
    assert run.created_at is not None
    assert data(l3.get_context("run-1")) == data(root)
    assert l3.get_run("nope") is None


def test_l3_create_run_with_an_existing_root_raises_and_stores_no_run(l3: L3Tier) -> None:
    l3.create_context(context("run-2", 1, n="first"))
    with pytest.raises(VersionConflict) as raised:
        l3.create_run(run_row("run-2"), context("run-2", 1, n="second"))
    assert (raised.value.tier, raised.value.expected, raised.value.actual) == ("L3", 0, 1)
    assert l3.get_run("run-2") is None
    assert l3.get_context("run-2").variables == {"n": "first"}


def test_l3_a_run_holding_an_idempotency_key_makes_another_create_with_it_create_nothing(l3: L3Tier) -> None:
    keyed = dataclasses.replace(run_row("run-1"), idempotency_key="order-42", request_digest="d1")
    l3.create_run(keyed, context("run-1", 1))
    assert l3.run_by_key("order-42").run_id == "run-1" and l3.run_by_key("order-7") is None
    with pytest.raises(RunExists) as raised:
        l3.create_run(dataclasses.replace(keyed, run_id="run-2", request_digest="d2"), context("run-2", 1))
    assert (raised.value.key, raised.value.run_id, raised.value.request_digest) == ("order-42", "run-1", "d1")
    assert l3.get_run("run-2") is None and l3.get_context("run-2") is None  # its root was not kept either
    l3.create_run(run_row("run-3"), context("run-3", 1))  # runs without a key never clash
    l3.create_run(run_row("run-4"), context("run-4", 1))
    # A pruned run frees its key.
    assert finish(l3, "run-1") is True
    time.sleep(0.05)  # the point: real time passes, on the clock that decides what is old (PostgreSQL's now())
    assert "run-1" in l3.prune_runs(0.01)
    l3.create_run(dataclasses.replace(keyed, run_id="run-5"), context("run-5", 1))
    assert l3.run_by_key("order-42").run_id == "run-5"


def test_l3_finish_run_writes_status_contexts_and_exports(l3: L3Tier) -> None:
    l3.create_run(run_row(), context(version=1))
    l3.create_context(context("run-1/sub", 4))
    finished = finish(
        l3,
        status="failed",
        error="step x failed",
        meta={"steps": 3, "by": "test"},
        contexts=[context(version=2, n="final"), context("run-1/sub", 3, n="older")],
        exports=[
            ExportRecord("blackboard", "run-1", "answer", "answer", "team:ops", 42, "internal"),
            ExportRecord("persistent", "run-1", "report", "summary", "default", {"lines": ["a", "b"]}, "public"),
        ],
    )
    assert finished is True
    run = l3.get_run("run-1")
    assert (run.status, run.error, run.meta) == ("failed", "step x failed", {"steps": 3, "by": "test"})
    assert run.finished_at is not None
    assert (l3.context_version("run-1"), l3.get_context("run-1").variables) == (2, {"n": "final"})
    assert (l3.context_version("run-1/sub"), l3.get_context("run-1/sub").variables) == (4, {"n": 4})  # not older
    assert exported(l3) == {
        "blackboard": {("team:ops", "answer"): {"value": 42, "sensitivity": "internal", "run_id": "run-1", "version": 1}},
        "persistent": {
            ("run-1", "summary", "default"): {"variable": "report", "value": {"lines": ["a", "b"]}, "sensitivity": "public"}
        },
    }


def test_l3_prune_deletes_finished_runs_and_their_contexts_and_keeps_exports(l3: L3Tier) -> None:
    l3.create_run(run_row("run-old"), context("run-old", 1))
    l3.create_context(context("run-old/sub", 1))
    record = ExportRecord("persistent", "run-old", "report", "summary", "default", "kept", "public")
    assert finish(l3, "run-old", contexts=[context("run-old", 2)], exports=[record]) is True
    l3.create_run(run_row("run-live"), context("run-live", 1))  # still running: never pruned
    time.sleep(0.05)  # the point: real time passes, on the clock that decides what is old (PostgreSQL's now())

    assert l3.prune_runs(3600) == {}  # finished, but not that long ago
    pruned = l3.prune_runs(0.01)
    assert {run_id: sorted(ids) for run_id, ids in pruned.items()} == {"run-old": ["run-old", "run-old/sub"]}
    assert l3.get_run("run-old") is None and l3.get_context("run-old") is None and l3.get_context("run-old/sub") is None
    assert l3.get_run("run-live") is not None and l3.get_context("run-live") is not None
    assert ("run-old", "summary", "default") in exported(l3)["persistent"]
    assert l3.prune_runs(0.01) == {}


def test_l3_prune_takes_at_most_the_limit(l3: L3Tier) -> None:
    for n in range(3):
        l3.create_run(run_row(f"run-{n}"), context(f"run-{n}", 1))
        assert finish(l3, f"run-{n}", contexts=[], exports=[]) is True
    time.sleep(0.05)  # the point: real time passes, on the clock that decides what is old (PostgreSQL's now())
    first = l3.prune_runs(0.01, limit=2)
    assert len(first) == 2
    assert len(l3.prune_runs(0.01, limit=2)) == 1


def test_l3_finish_run_a_second_time_returns_false_and_changes_nothing(l3: L3Tier) -> None:
    l3.create_run(run_row(), context(version=1))
    record = ExportRecord("blackboard", "run-1", "answer", "answer", "team:ops", 42, "internal")
    assert finish(l3, meta={"steps": 3}, contexts=[context(version=2)], exports=[record]) is True
    before = (l3.get_run("run-1"), exported(l3))
    again = finish(
        l3,
        status="failed",
        error="late",
        meta={"steps": 99},
        contexts=[context(version=9)],
        exports=[
            ExportRecord("blackboard", "run-1", "answer", "answer", "team:ops", 0, "public"),
            ExportRecord("persistent", "run-1", "report", "report", "default", "late", "public"),
        ],
    )
    assert again is False
    assert (l3.get_run("run-1"), exported(l3)) == before
    assert (l3.get_run("run-1").status, l3.get_run("run-1").meta) == ("succeeded", {"by": "test", "steps": 3})  # created with, finished with
    assert l3.context_version("run-1") == 2


def test_l3_finish_run_of_an_unknown_run_returns_false(l3: L3Tier) -> None:
    record = ExportRecord("persistent", "nope", "report", "report", "default", 1, "public")
    assert finish(l3, "nope", contexts=[context("nope", 1)], exports=[record]) is False
    assert l3.get_run("nope") is None
    assert l3.get_context("nope") is None
    assert exported(l3) == {"blackboard": {}, "persistent": {}}


def test_l3_blackboard_export_replaces_and_persistent_export_keeps_the_first(l3: L3Tier) -> None:
    for run_id, value in (("run-1", "one"), ("run-2", "two")):
        l3.create_run(run_row(run_id), context(run_id, 1))
        finish(
            l3,
            run_id,
            exports=[
                ExportRecord("blackboard", run_id, "answer", "answer", "swarm:1", value, "public"),
                ExportRecord("persistent", run_id, "report", "report", "default", value, "public"),
                ExportRecord("persistent", run_id, "other", "report", "default", "dropped", "secret"),
            ],
        )
    assert exported(l3) == {
        "blackboard": {("swarm:1", "answer"): {"value": "two", "sensitivity": "public", "run_id": "run-2", "version": 2}},
        "persistent": {
            (run_id, "report", "default"): {"variable": "report", "value": value, "sensitivity": "public"}
            for run_id, value in (("run-1", "one"), ("run-2", "two"))
        },
    }


# ---- routine definitions and configurations -------------------------------------------------------------


def test_l3_put_config_counts_versions_and_get_returns_the_newest(l3: L3Tier) -> None:
    assert l3.get_config("bot", "a") is None
    assert l3.put_config("bot", "a", {"model": "m1"}) == 1
    assert l3.put_config("bot", "a", {"model": "m2", "tools": [1, 2]}) == 2
    assert l3.get_config("bot", "a") == ConfigEntry(key="config:bot:a", version=2, data={"model": "m2", "tools": [1, 2]})
    assert l3.get_config("team", "a") is None


def test_l3_put_config_with_a_wrong_expected_version_raises(l3: L3Tier) -> None:
    l3.put_config("bot", "a", {"model": "m1"})
    l3.put_config("bot", "a", {"model": "m2"})
    with pytest.raises(VersionConflict) as raised:
        l3.put_config("bot", "a", {"model": "stale"}, expected_version=1)
    assert (raised.value.tier, raised.value.expected, raised.value.actual) == ("L3", 1, 2)
    assert l3.get_config("bot", "a").data == {"model": "m2"}
    assert l3.put_config("bot", "a", {"model": "m3"}, expected_version=2) == 3
    assert l3.put_config("bot", "new", {}, expected_version=0) == 1
    with pytest.raises(VersionConflict) as raised:
        l3.put_config("bot", "missing", {}, expected_version=1)
    assert (raised.value.expected, raised.value.actual) == (1, None)
    assert l3.get_config("bot", "missing") is None


def test_l3_put_routine_versions_and_get_routine(l3: L3Tier) -> None:
    assert l3.put_routine("greet", {"steps": ["a"]}) == 1
    assert l3.put_routine("greet", {"steps": ["a", "b"]}) == 2
    assert l3.get_routine("greet") == ConfigEntry(key="routine:greet", version=2, data={"steps": ["a", "b"]})
    assert l3.get_routine("greet", 1) == ConfigEntry(key="routine:greet@1", version=1, data={"steps": ["a"]})
    assert l3.get_routine("greet", 3) is None
    assert l3.get_routine("other") is None
    assert l3.put_routine("other", {"steps": []}) == 1


def test_l3_a_routine_version_is_its_content(l3: L3Tier) -> None:
    first = l3.put_routine("greet", {"steps": ["a"], "n": 1})
    assert l3.put_routine("greet", {"n": 1, "steps": ["a"]}) == first  # the same definition: the same version
    second = l3.put_routine("greet", {"steps": ["b"]})
    assert second == first + 1
    assert l3.put_routine("greet", {"steps": ["a"], "n": 1}) == first  # runs of it keep meaning one thing


def test_postgres_hashes_every_stored_version_and_refuses_to_change_one(database_url: str) -> None:
    import hashlib

    import psycopg

    from state.change_events import libpq_url

    tier = PostgresTier.from_url(database_url, config=StateCacheConfig())
    try:
        tier.put_routine("hashed", {"steps": ["a"]})
        with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
            conn.execute("""INSERT INTO routines (name, version, definition) VALUES ('hashed', 2, '{"steps": ["b"]}')""")
            rows = conn.execute("SELECT version, definition::text, content_hash FROM routines WHERE name = 'hashed' ORDER BY version").fetchall()
            assert [row[2] for row in rows] == [hashlib.sha256(row[1].encode()).hexdigest() for row in rows]
            with pytest.raises(psycopg.errors.RestrictViolation, match="immutable"):
                conn.execute("UPDATE routines SET definition = '{}' WHERE name = 'hashed' AND version = 1")
        assert tier.get_routine("hashed", 1).data == {"steps": ["a"]}
    finally:
        tier.close()


# ---- where a careless twin would differ: copies, refusals and number types --------------------------------


def test_l3_create_run_of_an_existing_run_id_refuses_and_changes_nothing(l3: L3Tier) -> None:
    l3.create_run(run_row(), context(version=1))
    finish(l3, meta={"steps": 1})
    other_root = context("run-1/again", 1)  # a root of another id, so the root's own check does not catch it
    with pytest.raises(RefusedByDatabase):
        l3.create_run(run_row(root_context_id="run-1/again", meta={}), other_root)
    run = l3.get_run("run-1")
    assert (run.status, run.root_context_id, run.meta) == ("succeeded", "run-1", {"by": "test", "steps": 1})
    assert l3.get_context("run-1/again") is None


def test_l3_refuses_a_string_holding_a_nul_character(l3: L3Tier) -> None:
    ctx = context(version=1)
    ctx.variables["text"] = "a\x00b"  # past set_variable, which refuses NUL before any tier sees it
    with pytest.raises(RefusedByDatabase) as raised:
        l3.create_context(ctx)
    assert raised.value.sqlstate == "22P05"
    assert l3.get_context("run-1") is None


def test_l3_refuses_a_run_id_longer_than_100_characters(l3: L3Tier) -> None:
    run_id = "r" * 101  # the engine's check_run_id refuses it first; the tier must refuse it too
    with pytest.raises(RefusedByDatabase) as raised:
        l3.create_run(run_row(run_id), context(run_id, 1))
    assert raised.value.sqlstate == "22001"
    assert l3.get_run(run_id) is None
    assert l3.get_context(run_id) is None


def test_l3_gives_numbers_back_as_jsonb_does(l3: L3Tier) -> None:
    l3.create_context(context(version=1, big=1e16, one=1.0, small=1.5e-7))
    variables = l3.get_context("run-1").variables
    assert variables == {"big": 10**16, "one": 1.0, "small": 1.5e-7}
    assert {name: type(value) for name, value in variables.items()} == {"big": int, "one": float, "small": float}


def test_l3_keeps_its_own_copies_of_what_it_is_given(l3: L3Tier) -> None:
    row = run_row(meta={"tags": ["created"]})
    l3.create_run(row, context(version=1))
    row.meta["tags"].append("changed after create_run")
    meta_after_create = copy.deepcopy(l3.get_run("run-1").meta)

    meta, value = {"tags": ["finished"]}, {"items": [1]}
    finish(l3, meta=meta, exports=[ExportRecord("blackboard", "run-1", "v", "v", "team:ops", value, "public")])
    meta["tags"].append("changed after finish_run")
    value["items"].append("changed after finish_run")
    assert {
        "create_run meta": meta_after_create,
        "finish_run meta": l3.get_run("run-1").meta,
        "export value": exported(l3)["blackboard"][("team:ops", "v")]["value"],
    } == {"create_run meta": {"tags": ["created"]}, "finish_run meta": {"tags": ["finished"]}, "export value": {"items": [1]}}


def test_l3_get_run_gives_a_copy(l3: L3Tier) -> None:
    l3.create_run(run_row(meta={"by": "test"}), context(version=1))
    l3.get_run("run-1").meta["by"] = "changed by a reader"
    assert l3.get_run("run-1").meta == {"by": "test"}


# ==== L1: one process's LRU (LocalCache, the only implementation) =========================================


@pytest.fixture
def l1(cache_config: StateCacheConfig) -> LocalCache:
    return LocalCache(cache_config)


def test_l1_implements_the_protocol(l1: LocalCache) -> None:
    assert isinstance(l1, L1Tier)


def test_l1_an_entry_older_than_at_least_is_a_miss(l1: LocalCache) -> None:
    ctx = context(version=2)
    l1.put_context(ctx)
    assert l1.get_context("run-1") is ctx
    assert l1.get_context("run-1", at_least=2) is ctx
    assert l1.get_context("run-1", at_least=3) is None
    assert l1.context_version("run-1") == 2  # a miss does not drop it
    assert l1.get_context("nope") is None and l1.context_version("nope") is None


def test_l1_put_never_replaces_a_newer_version(l1: LocalCache) -> None:
    l1.put_context(context(version=3))
    l1.put_context(context(version=2))
    assert l1.get_context("run-1").variables == {"n": 3}
    l1.put_context(context(version=4))
    assert l1.get_context("run-1").variables == {"n": 4}


def test_l1_evict_up_to_a_version(l1: LocalCache) -> None:
    l1.put_context(context(version=3))
    assert l1.evict_context("run-1", up_to_version=2) is False
    assert l1.context_version("run-1") == 3
    assert l1.evict_context("run-1", up_to_version=3) is True
    assert l1.get_context("run-1") is None
    assert l1.evict_context("run-1") is False
    l1.put_context(context(version=9))
    assert l1.evict_context("run-1") is True


def test_l1_config_entries_expire_after_their_ttl() -> None:
    l1 = LocalCache(StateCacheConfig(l1_config_ttl_s=0.05))
    entry = ConfigEntry(key="config:bot:a", version=1, data={"model": "m"})
    l1.put_config(entry)
    assert l1.get_config("config:bot:a") == entry
    time.sleep(0.1)  # the point: the TTL runs out in real time (LocalCache takes no clock)
    assert l1.get_config("config:bot:a") is None


def test_l1_evict_config_and_clear(l1: LocalCache) -> None:
    l1.put_config(ConfigEntry(key="config:bot:a", version=1, data={}))
    assert l1.evict_config("config:bot:a") is True
    assert l1.evict_config("config:bot:a") is False
    l1.put_config(ConfigEntry(key="config:bot:b", version=1, data={}))
    l1.put_context(context(version=1))
    l1.clear()
    assert l1.get_config("config:bot:b") is None and l1.get_context("run-1") is None


def test_l2_a_step_commit_over_lost_applied_steps_asks_for_a_rewind(l2: L2Tier) -> None:
    from state.errors import LineageLost

    commit(l2, context(version=1), 0)
    step_commit(l2, context(version=2), 1, "s1")
    if isinstance(l2, RedisTier):
        l2.client.delete(l2.keys.applied("run-1"))
    else:
        l2.raw_context("run-1").applied = []
    with pytest.raises(LineageLost):
        step_commit(l2, context(version=3), 2, "s1")  # never applied twice for want of the record
    assert l2.get_context("run-1") is None


def test_redis_a_forked_child_commits_on_a_connection_of_its_own(servers, key_prefix: str, cache_config: StateCacheConfig) -> None:
    tier = RedisTier.from_url(servers.redis_url, prefix=key_prefix, config=cache_config)
    try:
        commit(tier, context(version=1), 0)  # the parent now keeps a connection for its commits
        parent = tier._committing.connection
        pid = os.fork()
        if pid == 0:  # the child: exits 0 only if its commit went through a socket of its own
            code = 1
            try:
                code = 0 if commit(tier, context(version=2), 1).committed and tier._committing.connection is not parent else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert tier.get_context("run-1").version == 2 and commit(tier, context(version=3), 2).committed  # the parent's still works
    finally:
        tier.close()


@pytest.mark.parametrize("sensitivity", ["public", "secret"])
def test_redis_a_step_commit_broadcasts_a_small_context_unless_it_holds_sensitive_values(
    servers, key_prefix: str, cache_config: StateCacheConfig, sensitivity: str
) -> None:
    tier = RedisTier.from_url(servers.redis_url, prefix=key_prefix, config=cache_config)
    pubsub = tier.client.pubsub()
    try:
        pubsub.subscribe(tier.keys.control_channel)
        assert pubsub.get_message(timeout=2)["type"] == "subscribe"
        ctx = context(version=1)
        ctx.set_variable("token", "tok-value-123", sensitivity=sensitivity)
        commit(tier, ctx, 0)
        nxt = ctx.working_copy()
        nxt.version = 2
        assert step_commit(tier, nxt, 1, "s1").committed
        messages = [pubsub.get_message(timeout=2) for _ in range(2)]
        events = [json.loads(message["data"]) for message in messages if message]
        assert [event["version"] for event in events] == [1, 2]
        # What the script publishes is a control-bus message as `state.bus` reads it.
        heard = bus.decode(messages[1]["data"])
        assert isinstance(heard, bus.ContextCommitted) and (heard.context_id, heard.version) == ("run-1", 2)
        assert heard.carries_state is (sensitivity == "public")
        if sensitivity == "public":
            assert events[1]["step"] == "s1" and "tok-value-123" in events[1]["d"]
        else:  # pub/sub is in clear: only the version travels
            assert "d" not in events[1] and all("tok-value-123" not in message["data"].decode() for message in messages)
        # A commit that pushes its successor's message is not broadcast: that message carries the
        # state to the one process that runs the successor (or that process reads it).
        last = nxt.working_copy()
        last.version = 3
        report = StepReport(run_id="run-1", step_id="s2", worker="w1", duration_s=0.1)
        outbox = Outbox(f"{key_prefix}.steps", b"the successor")
        assert step_commit(tier, last, 2, "s2", report=report, outbox=outbox).committed
        assert pubsub.get_message(timeout=1) is None
        assert tier.client.rpop(f"{key_prefix}.steps") == b"the successor"
    finally:
        pubsub.close()
        tier.close()


def committed(version: int, steps: tuple[str, ...] | None = None, context_id: str = "run-1", payload: bytes | None = None):
    """Another process's commit of ``context(version)``, led to by ``steps`` (by default its one step)."""
    from state.codec import DEFAULT_CODEC, checksum
    from state.tiers.data import CommittedState

    payload = DEFAULT_CODEC.dump_state(context(context_id, version=version)) if payload is None else payload
    return CommittedState(context_id, version, 1, steps or (f"s{version}",), payload, checksum(payload))


def decoder(decoded: list[int] | None = None):
    from state.codec import DEFAULT_CODEC, checksum

    def decode(payload: bytes, payload_checksum: str, known: RunContext) -> RunContext:
        assert checksum(payload) == payload_checksum
        ctx = DEFAULT_CODEC.load_state(payload, [], known=known)
        if decoded is not None:
            decoded.append(ctx.version)
        return ctx

    return decode


def test_l1_follows_commits_heard_from_other_processes_and_decodes_only_when_read(l1: LocalCache) -> None:
    decoded: list[int] = []
    base = context(version=1)
    base.applied_steps = ["s0"]
    l1.put_context(base)
    for version in (2, 3, 4):  # three commits by another process, each one step
        assert l1.follow(committed(version), decoder(decoded)) is True
    assert decoded == [] and l1.context_version("run-1") == 4  # nothing decoded yet
    ctx = l1.get_context("run-1", at_least=4, epoch=1)
    assert decoded == [4]  # only the newest, once
    assert ctx.variables == {"n": 4} and ctx.applied_steps == ["s0", "s2", "s3", "s4"] and ctx.has_applied("s3")
    assert ctx.last_steps() == ("s2", "s3", "s4")  # what it passes on, if it commits next
    assert l1.get_context("run-1", at_least=4) is ctx and decoded == [4]


def test_l1_follows_a_state_whose_steps_lead_from_the_version_it_holds(l1: LocalCache) -> None:
    l1.put_context(context(version=2))
    # Versions 3 and 4 were committed elsewhere, unheard of here; version 5 names the steps of all three.
    assert l1.follow(committed(5, ("z", "a", "b", "c")), decoder()) is True
    ctx = l1.get_context("run-1", at_least=5)
    assert ctx.applied_steps == ["a", "b", "c"] and ctx.last_steps() == ("a", "b", "c")
    # A state that names too few steps to lead from the version held: the copy is dropped and the
    # next read goes to L2.
    assert l1.follow(committed(8, ("f", "g")), decoder()) is False
    assert l1.get_context("run-1") is None


def test_l1_a_commit_it_cannot_follow_drops_the_older_copy(l1: LocalCache) -> None:
    l1.put_context(context(version=1))
    assert l1.follow(committed(3), decoder()) is False
    assert l1.get_context("run-1") is None  # a version was missed: the next read goes to L2
    assert l1.follow(committed(2, context_id="run-2"), decoder()) is False


def test_l1_a_damaged_followed_commit_is_a_miss(l1: LocalCache) -> None:
    def broken(payload: bytes, payload_checksum: str) -> RunContext:
        raise ContextCorruption("run-1", "checksum does not match payload")

    l1.put_context(context(version=1))
    assert l1.follow(committed(2, payload=b"garbage"), broken) is True
    assert l1.get_context("run-1", at_least=2) is None and l1.context_version("run-1") is None




# ---- waits and signals ------------------------------------------------------------------------------


def _waiting_run(l3: L3Tier, run_id: str = "run-1") -> None:
    l3.create_run(run_row(run_id), context(run_id))


def test_l3_a_signal_to_a_waiting_step_resolves_its_wait_once(l3: L3Tier) -> None:
    _waiting_run(l3)
    armed = l3.arm_wait(WaitRow("run-1", "each[2]/approve", "approve-c", 7, (2,)), timeout_s=3600)
    assert (armed.resolution, armed.items, armed.node) == (None, (2,), 7)
    assert armed.deadline is not None and 3500 < armed.deadline - time.time() < 3700
    assert [w.step_id for w in l3.open_waits(["run-1", "run-2"])] == ["each[2]/approve"]
    receipt = l3.send_signal("run-1", "approve-c", {"ok": True}, "public")
    assert receipt.wait is not None and receipt.wait.resolution == "signal" and receipt.wait.payload == {"ok": True}
    assert receipt.wait.early is False
    assert l3.open_waits(["run-1"]) == []
    again = l3.arm_wait(WaitRow("run-1", "each[2]/approve", "approve-c", 7, (2,)), timeout_s=3600)  # a rebuilt run
    assert again.resolution == "signal" and again.payload == {"ok": True}
    with pytest.raises(SignalRefused, match="consumed it"):
        l3.send_signal("run-1", "approve-c", {"ok": False}, "public")
    assert l3.wait_of("run-1", "each[2]/approve").payload == {"ok": True}  # type: ignore[union-attr]


def test_l3_a_signal_before_the_wait_is_kept_and_consumed_by_the_wait(l3: L3Tier) -> None:
    _waiting_run(l3)
    kept = l3.send_signal("run-1", "go", [1, 2], "public")
    assert kept.wait is None
    with pytest.raises(SignalRefused, match="kept until a step waits for it"):
        l3.send_signal("run-1", "go", [3], "public")
    armed = l3.arm_wait(WaitRow("run-1", "wait", "go", 1), timeout_s=None)
    assert (armed.resolution, armed.payload, armed.early, armed.deadline) == ("signal", [1, 2], True, None)
    with pytest.raises(InvalidValue, match="waited for by step 'wait' already"):
        l3.arm_wait(WaitRow("run-1", "other", "go", 2), timeout_s=None)


def test_l3_deadlines_expire_once_and_a_signal_after_is_refused(l3: L3Tier) -> None:
    _waiting_run(l3)
    l3.arm_wait(WaitRow("run-1", "late", "late", 1), timeout_s=0.001)
    l3.arm_wait(WaitRow("run-1", "later", "later", 2), timeout_s=3600)
    time.sleep(0.01)  # the deadline is the database's clock: a millisecond after arming
    assert [w.step_id for w in l3.expire_waits()] == ["late"]
    assert l3.expire_waits() == []
    assert l3.wait_of("run-1", "late").resolution == "timeout"  # type: ignore[union-attr]
    with pytest.raises(SignalRefused, match="timed out"):
        l3.send_signal("run-1", "late", 1, "public")
    assert [w.step_id for w in l3.open_waits(["run-1"])] == ["later"]


def test_l3_signals_for_unknown_or_ended_runs_store_nothing(l3: L3Tier) -> None:
    with pytest.raises(NotFound):
        l3.send_signal("no-run", "go", 1, "public")
    _waiting_run(l3)
    l3.arm_wait(WaitRow("run-1", "wait", "go", 1), timeout_s=0.001)
    assert finish(l3, status="failed", error="boom")
    time.sleep(0.01)
    assert l3.expire_waits() == []  # an ended run's deadline does not fire
    with pytest.raises(RunEnded, match="has ended \\(failed\\)"):
        l3.send_signal("run-1", "go", 1, "public")
    assert l3.reopen_run("run-1") is not None  # resumed: it waits afresh
    assert l3.wait_of("run-1", "wait") is None
    assert l3.send_signal("run-1", "go", 2, "public").wait is None


def test_l3_prune_removes_waits_and_signals(l3: L3Tier) -> None:
    _waiting_run(l3)
    l3.arm_wait(WaitRow("run-1", "wait", "go", 1), timeout_s=None)
    l3.send_signal("run-1", "go", 1, "public")
    assert finish(l3)
    time.sleep(0.01)
    assert l3.prune_runs(0.001) == {"run-1": ["run-1"]}
    assert l3.wait_of("run-1", "wait") is None


# ---- large values kept beside the payload (state.detached) ------------------------------------------

BIG = "x" * 40_000  # over DETACH_BYTES
OTHER_BIG = "y" * 50_000


def _stored_fields(l2: L2Tier, context_id: str) -> dict[str, bytes]:
    if isinstance(l2, RedisTier):
        raw = l2.client.hgetall(l2.keys.context(context_id))
        return {field.decode(): data for field, data in raw.items() if field.startswith(b"x:")}
    return dict(l2.raw_context(context_id).fields)


def test_l2_a_commit_stores_only_the_large_values_it_changed(l2: L2Tier) -> None:
    ctx = context("run-d", 1, n=1, doc=BIG, notes=OTHER_BIG)
    assert l2.fill_context(ctx, live=True)
    assert set(_stored_fields(l2, "run-d")) == {"x:v:doc", "x:v:notes"}
    before = _stored_fields(l2, "run-d")

    working = l2.get_context("run-d").context.working_copy()
    working.set_variable("n", 2)
    working.version = 2
    l2.encode_state(working)
    assert l2.codec.pending_fields(working).empty  # the large values did not change: nothing of them is sent
    assert commit(l2, working, 1).status is CommitStatus.COMMITTED
    assert _stored_fields(l2, "run-d") == before

    changed = working.working_copy()
    changed.set_variable("doc", OTHER_BIG + "!")
    changed.delete_variable("notes")
    changed.version = 3
    l2.encode_state(changed)
    pending = l2.codec.pending_fields(changed)
    assert set(pending.write) == {"x:v:doc"} and pending.drop == ("x:v:notes",)
    assert commit(l2, changed, 2).status is CommitStatus.COMMITTED
    assert set(_stored_fields(l2, "run-d")) == {"x:v:doc"}
    read = l2.get_context("run-d").context
    assert (read.get("doc"), read.get("n"), "notes" in read.variables) == (OTHER_BIG + "!", 2, False)


def test_l2_a_payload_names_its_large_values_and_a_reader_takes_them_from_the_version_before(l2: L2Tier) -> None:
    from state.errors import DetachedNotHeld

    first = context("run-e", 1, n=1, doc=BIG)
    l2.fill_context(first, live=True)
    base = l2.get_context("run-e").context
    working = base.working_copy()
    working.set_variable("n", 2)
    working.version = 2
    payload, checksum = l2.encode_state(working)
    assert len(payload) < 2_000 and BIG not in payload.decode()  # what a message carries: the mark
    followed = l2.decode_state(payload, checksum, [], key="run-e", known=base)
    assert followed.get("doc") is base.get("doc") and followed.get("n") == 2  # the same object: nothing decoded
    with pytest.raises(DetachedNotHeld):
        l2.decode_state(payload, checksum, [], key="run-e")
    if isinstance(l2, RedisTier):  # a field that does not match the digest its payload names is refused
        l2.client.hset(l2.keys.context("run-e"), "x:v:doc", b'"forged"')
    else:
        l2.raw_context("run-e").fields["x:v:doc"] = b'"forged"'
    with pytest.raises(ContextCorruption, match="does not match its digest"):
        l2.get_context("run-e")


# ---- blobs: values stored once by reference ----------------------------------------------------------


def test_l3_a_blob_is_stored_once_and_goes_with_the_last_run_that_holds_it(l3: L3Tier) -> None:
    assert l3.put_blobs("run-1", [NewBlob("b-1", b'"value"', 7)]) == 1
    assert l3.put_blobs("run-2", [NewBlob("b-1", b'"value"', 7)]) == 0  # the same address: stored once, held by both
    assert l3.get_blob("b-1") == b'"value"' and l3.get_blob("b-none") is None
    assert l3.blob_usage() == (1, 7)
    for run_id in ("run-1", "run-2"):
        l3.create_run(run_row(run_id), context(run_id))
        assert finish(l3, run_id)
    time.sleep(0.01)
    l3.hold_blobs("run-3", ["b-1"])  # a run still kept (a fork of them) holds it too
    assert set(l3.prune_runs(0.001)) == {"run-1", "run-2"}
    assert l3.get_blob("b-1") == b'"value"'
    l3.create_run(run_row("run-3"), context("run-3"))
    assert finish(l3, "run-3")
    time.sleep(0.01)
    assert set(l3.prune_runs(0.001)) == {"run-3"}
    assert l3.get_blob("b-1") is None and l3.blob_usage() == (0, 0)
