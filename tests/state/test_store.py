"""The tiered store against real Redis and PostgreSQL: read-through, fill-back, versions, write-behind, healing."""

from __future__ import annotations

import logging
import threading

import psycopg
import pytest

from state.change_events import ChangeEvent, ChangeListener, libpq_url
from state.errors import (
    CommunicationFailure,
    NotFound,
    TransactionFailed,
    VersionConflict,
)
from state.metrics import metrics
from state.models import DataSensitivity, RunContextInit, StateCacheConfig
from state.store import TieredStore
from state.tiers.postgres import PostgresTier
from state.tiers.redis import RedisTier
from tests.support.clock import FakeClock
from tests.support.waiting import wait_for


def new_context(store: TieredStore, run_id: str = "run-1", **variables):
    return store.create_context(RunContextInit(run_id=run_id, routine_id="routine-a", variables=variables or {"n": 1}))


def l3_writes() -> float:
    """Writes to L3 this process made so far, of every kind (the store counts them in Prometheus)."""
    return sum(sample.value for family in metrics().l3_writes.collect() for sample in family.samples if sample.name.endswith("_total"))


def clocked(store: TieredStore, clock: FakeClock) -> TieredStore:
    """The same process's view of ``store``'s tiers, on a clock the test moves (commits, flushes and
    the write-behind schedule take their time from it)."""
    return TieredStore(store.l1, store.l2, store.l3, config=store.config, clock=clock)


def test_create_is_durable_in_l3_and_cached_in_l2_and_l1(store: TieredStore) -> None:
    ctx = new_context(store, greeting="hello")
    assert ctx.version == 1
    assert store.l3.get_context(ctx.context_id).variables == {"greeting": "hello"}
    assert store.l2.get_context(ctx.context_id).version == 1
    assert store.read_context(ctx.context_id) == (ctx, "L1")


def test_read_through_fills_the_faster_tiers(store: TieredStore, make_store) -> None:
    ctx = new_context(store, greeting="hello")
    other = make_store()  # another process: empty L1
    got, tier = other.read_context(ctx.context_id)
    assert tier == "L2" and got.variables == {"greeting": "hello"}
    assert other.read_context(ctx.context_id)[1] == "L1"  # filled back into L1

    third = make_store()
    third.l2.evict_context(ctx.context_id)
    got, tier = third.read_context(ctx.context_id)
    assert tier == "L3" and got.version == 1
    assert third.l2.get_context(ctx.context_id).version == 1  # filled back into L2
    assert third.read_context(ctx.context_id)[1] == "L1"


def test_missing_everywhere_is_not_found(store: TieredStore) -> None:
    with pytest.raises(NotFound, match="no-such"):
        store.get_context("no-such")


def test_at_least_version_treats_older_entries_as_misses(store: TieredStore, make_store) -> None:
    ctx = new_context(store)
    reader = make_store()
    assert reader.get_context(ctx.context_id).version == 1  # reader's L1 now holds v1

    with store.edit(ctx.context_id) as working:
        working.set_variable("n", 2)
    assert store.get_context(ctx.context_id).version == 2

    assert reader.read_context(ctx.context_id)[0].version == 1  # no minimum: the stale L1 entry is fine
    got, tier = reader.read_context(ctx.context_id, at_least=2)
    assert (got.version, got.get("n"), tier) == (2, 2, "L2")

    with pytest.raises(NotFound, match="version >= 3"):
        reader.get_context(ctx.context_id, at_least=3)


def test_stale_compare_and_set_is_refused_in_l2(store: TieredStore, make_store) -> None:
    ctx = new_context(store)
    other = make_store()
    mine = store.get_context(ctx.context_id).model_copy(deep=True)
    theirs = other.get_context(ctx.context_id).model_copy(deep=True)
    mine.set_variable("n", 10)
    theirs.set_variable("n", 20)
    store.commit(mine, expected_version=1)
    with pytest.raises(VersionConflict) as refused:
        other.commit(theirs, expected_version=1)
    assert (refused.value.tier, refused.value.expected, refused.value.actual) == ("L2", 1, 2)
    assert make_store().get_context(ctx.context_id).get("n") == 10  # the stale write changed nothing
    assert other.get_context(ctx.context_id, at_least=2).get("n") == 10


def test_stale_compare_and_set_is_refused_in_l3(store: TieredStore) -> None:
    ctx = new_context(store)
    stale = ctx.model_copy(deep=True)
    stale.set_variable("n", 99)
    stale.version = 5
    with pytest.raises(VersionConflict) as refused:  # creating an existing context is refused
        store.l3.create_context(stale)
    assert (refused.value.tier, refused.value.expected, refused.value.actual) == ("L3", 0, 1)
    # The write-behind rule: an older version never replaces a newer one.
    older = ctx.model_copy(deep=True)
    older.version = 0
    assert store.l3.write_context(older) is False
    assert store.l3.get_context(ctx.context_id).get("n") == 1


def test_write_behind_coalesces_many_commits_into_one_l3_write(store: TieredStore, make_store) -> None:
    ctx = new_context(store)
    clock = FakeClock()
    writer = clocked(store, clock)
    writes_before = l3_writes()
    for n in range(2, 12):
        with writer.edit(ctx.context_id) as working:
            working.set_variable("n", n)
    assert store.l3.context_version(ctx.context_id) == 1  # nothing written to L3 yet
    assert l3_writes() == writes_before
    assert store.l2.pending_flushes() == 1
    assert store.l2.client.ttl(store.l2.keys.context(ctx.context_id)) == -1  # dirty: never expires

    flusher = make_store()  # any process can do the flush
    assert flusher.l2.claim_due(clock(), lease_s=5) == []  # not due yet: the debounce
    clock.advance(store.config.write_behind_debounce_s + 0.05)
    assert flusher.l2.claim_due(clock(), lease_s=5) == [ctx.context_id]
    assert flusher.l2.claim_due(clock(), lease_s=5) == []  # claimed once
    assert flusher.flush(ctx.context_id)
    assert l3_writes() == writes_before + 1  # ten commits, one L3 write (the flusher's)
    assert store.l3.get_context(ctx.context_id).get("n") == 11
    assert store.l3.context_version(ctx.context_id) == 11
    assert store.l2.pending_flushes() == 0
    # Clean now, but its run goes on: a live context keeps no TTL (losing it would cost a rewind) ...
    assert store.l2.client.ttl(store.l2.keys.context(ctx.context_id)) == -1
    # ... until its run finishes.
    store.write_behind.mark_flushed(ctx.context_id, 11, expire=True)  # as the run's finalize does
    assert 0 < store.l2.client.ttl(store.l2.keys.context(ctx.context_id)) <= store.config.l2_context_ttl_s


def test_debounce_is_capped_by_max_delay(store: TieredStore) -> None:
    ctx = new_context(store)
    clock = FakeClock()
    writer = clocked(store, clock)
    first = clock()
    deadline = first + store.config.write_behind_max_delay_s
    while clock() < deadline - 0.05:
        with writer.edit(ctx.context_id) as working:
            working.set_variable("n", working.get("n") + 1)
        due = store.l2.next_due()
        assert due is not None and due <= first + store.config.write_behind_max_delay_s + 0.01
        clock.advance(0.01)


def test_commit_after_l2_expiry_refills_from_l3(store: TieredStore) -> None:
    ctx = new_context(store)
    store.l2.evict_context(ctx.context_id)  # as if the TTL had run out
    with store.edit(ctx.context_id) as working:
        working.set_variable("n", 2)
    assert store.l2.get_context(ctx.context_id).version == 2


def test_corrupt_l2_entry_is_detected_and_healed_from_l3(store: TieredStore, make_store, caplog: pytest.LogCaptureFixture) -> None:
    ctx = new_context(store, greeting="hello")
    key = store.l2.keys.context(ctx.context_id)
    store.l2.client.hset(key, "d", b'{"context_id": "tampered"')
    reader = make_store()
    with caplog.at_level(logging.DEBUG, logger="state.store"):
        got, tier = reader.read_context(ctx.context_id)
    assert tier == "L3" and got.get("greeting") == "hello"
    healed = [record for record in caplog.records if "dropping it and reloading from L3" in record.getMessage()]
    assert len(healed) == 1 and key in healed[0].getMessage()  # detected once, dropped, read from L3
    assert reader.l2.get_context(ctx.context_id).context.get("greeting") == "hello"  # L2 holds a good copy again

    # A payload that parses but does not match its checksum is caught too.
    payload = store.l2.client.hget(key, "d")
    store.l2.client.hset(key, "d", payload.replace(b"hello", b"HELLO"))
    assert make_store().get_context(ctx.context_id).get("greeting") == "hello"


def _plain_sql(database_url: str, sql: str, *params) -> None:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute(sql, params)


def test_plain_sql_update_of_a_context_evicts_the_l2_entry(store: TieredStore, database_url: str) -> None:
    events: list[ChangeEvent] = []

    def on_event(event: ChangeEvent) -> None:
        events.append(event)
        store.invalidation.handle_change(event)

    ctx = new_context(store, greeting="hello")
    listener = ChangeListener(database_url, on_event).start()
    try:
        assert listener.connected
        _plain_sql(
            database_url,
            "UPDATE context_snapshots SET document = jsonb_set(document, '{variables,greeting}', '\"bonjour\"') "
            "WHERE context_id = %s",
            ctx.context_id,
        )
        wait_for(lambda: store.l2.get_context(ctx.context_id) is None, 2, "the L2 entry evicted")
    finally:
        listener.stop()
    event = next(e for e in events if e.key == f"context:{ctx.context_id}" and e.op == "UPDATE")
    assert event.origin == "" and event.version == 2  # the trigger raised the version
    got, tier = store.read_context(ctx.context_id)
    assert tier == "L3" and got.get("greeting") == "bonjour"


def test_plain_sql_changes_to_routines_and_configurations_evict_them(store: TieredStore, database_url: str) -> None:
    store.configs.put_routine("onboarding", {"steps": ["a"]})
    store.configs.put_config("bot", "helper", {"model": "small"})
    assert store.configs.get_routine("onboarding").data == {"steps": ["a"]}
    assert store.configs.get_config("bot", "helper").data == {"model": "small"}
    assert store.l2.get_config("routine:onboarding") is not None

    # A stored routine version is immutable: the database refuses to change it in place.
    with pytest.raises(psycopg.errors.RestrictViolation, match="immutable"):
        _plain_sql(database_url, """UPDATE routines SET definition = '{"steps": ["b"]}' WHERE name = 'onboarding'""")
    listener = ChangeListener(database_url, store.invalidation.handle_change).start()
    try:
        _plain_sql(database_url, """INSERT INTO routines (name, version, definition) VALUES ('onboarding', 2, '{"steps": ["b"]}')""")
        _plain_sql(database_url, """UPDATE configurations SET data = '{"model": "large"}' WHERE name = 'helper'""")
        wait_for(
            lambda: store.l2.get_config("routine:onboarding") is None and store.l2.get_config("config:bot:helper") is None,
            2, "the routine and the configuration evicted from L2",
        )
    finally:
        listener.stop()
    assert store.configs.get_routine("onboarding").data == {"steps": ["b"]}
    assert store.configs.get_routine("onboarding", 1).data == {"steps": ["a"]}  # what runs of version 1 keep
    config = store.configs.get_config("bot", "helper")
    assert config.data == {"model": "large"} and config.version == 2


def test_own_flushes_produce_events_but_keep_l2(store: TieredStore, database_url: str) -> None:
    events: list[ChangeEvent] = []
    ctx = new_context(store)

    def on_event(event: ChangeEvent) -> None:
        events.append(event)
        store.invalidation.handle_change(event)

    listener = ChangeListener(database_url, on_event).start()
    try:
        with store.edit(ctx.context_id) as working:
            working.set_variable("n", 5)
        store.flush(ctx.context_id)
        wait_for(lambda: any(e.version == 2 for e in events), 5, "the event of the flush")
    finally:
        listener.stop()
    assert events[-1].origin == "runctx"
    assert store.l2.get_context(ctx.context_id).version == 2


def test_configuration_compare_and_set(store: TieredStore) -> None:
    assert store.configs.put_config("team", "ops", {"size": 1}) == 1
    assert store.configs.put_config("team", "ops", {"size": 2}, expected_version=1) == 2
    with pytest.raises(VersionConflict):
        store.configs.put_config("team", "ops", {"size": 3}, expected_version=1)
    assert store.configs.get_config("team", "ops").data == {"size": 2}


def test_routine_versions(store: TieredStore) -> None:
    assert store.configs.put_routine("r", {"v": 1}) == 1
    assert store.configs.put_routine("r", {"v": 2}) == 2
    assert store.configs.get_routine("r").data == {"v": 2}
    assert store.configs.get_routine("r", 1).data == {"v": 1}
    with pytest.raises(NotFound):
        store.configs.get_routine("r", 3)


def test_transient_l3_failures_are_retried_then_raised(store: TieredStore, database_url: str) -> None:
    ctx = new_context(store)
    l3 = PostgresTier.from_url(database_url, config=StateCacheConfig(l3_retry_attempts=3, l3_retry_base_delay_s=0.01))
    attempts = []

    def update_locked_row(conn):
        attempts.append(1)
        conn.exec_driver_sql("SET LOCAL lock_timeout = '20ms'")
        conn.exec_driver_sql("UPDATE context_snapshots SET version = version WHERE context_id = %s", (ctx.context_id,))

    with psycopg.connect(libpq_url(database_url)) as locker:
        locker.execute("SELECT 1 FROM context_snapshots WHERE context_id = %s FOR UPDATE", (ctx.context_id,))
        with pytest.raises(TransactionFailed) as failed:
            l3.run("update locked row", update_locked_row)
    assert len(attempts) == 3 and failed.value.attempts == 3
    l3.engine.dispose()


def test_unreachable_tiers_raise_communication_failure() -> None:
    with pytest.raises(CommunicationFailure) as l2_down:
        RedisTier.from_url("redis://127.0.0.1:1/0", prefix="x", config=StateCacheConfig()).get_context("x")
    assert l2_down.value.tier.startswith("L2") and l2_down.value.severity.value == "critical"
    l3 = PostgresTier.from_url("postgresql+psycopg://postgres@127.0.0.1:1/none", config=StateCacheConfig(l3_retry_attempts=1))
    with pytest.raises(CommunicationFailure) as l3_down:
        l3.get_context("x")
    assert l3_down.value.tier.startswith("L3")


def test_l1_is_shared_safely_between_threads(store: TieredStore) -> None:
    ctx = new_context(store)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(2000):
                store.l1.get_context(ctx.context_id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def evicter() -> None:
        for _ in range(2000):
            store.l1.evict_context(ctx.context_id)
            store.l1.put_context(ctx)

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=evicter)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_sensitivity_survives_the_round_trip(store: TieredStore, make_store) -> None:
    ctx = store.create_context(
        RunContextInit(
            run_id="r", routine_id="x", variables={"token": "t"}, sensitivity_map={"token": DataSensitivity.SECRET}
        )
    )
    other = make_store()
    other.l2.evict_context(ctx.context_id)
    assert other.get_context(ctx.context_id).sensitivity_of("token") is DataSensitivity.SECRET


def test_a_plain_sql_edit_never_drops_acknowledged_changes_waiting_for_l3(store: TieredStore, database_url: str) -> None:
    ctx = new_context(store, greeting="hello")
    with store.edit(ctx.context_id) as working:  # committed to L2 (acknowledged), not yet in L3
        working.set_variable("greeting", "from-a-step")
    assert store.l3.context_version(ctx.context_id) == 1
    listener = ChangeListener(database_url, store.invalidation.handle_change).start()
    try:
        _plain_sql(  # an edit that takes version 2 in L3, the version the step's change holds in L2
            database_url,
            "UPDATE context_snapshots SET document = jsonb_set(document, '{variables,note}', '\"manual\"') "
            "WHERE context_id = %s",
            ctx.context_id,
        )
        wait_for(lambda: store.l2.get_context(ctx.context_id).version == 3, 2, "the L2 entry raised to version 3")
    finally:
        listener.stop()
    assert store.l2.get_context(ctx.context_id).dirty
    store.flush(ctx.context_id)
    final = store.l3.get_context(ctx.context_id)
    assert (final.version, final.get("greeting")) == (3, "from-a-step")


def test_changes_after_a_flushed_version_get_a_window_of_their_own(store: TieredStore) -> None:
    ctx = new_context(store)
    clock = FakeClock()
    writer = clocked(store, clock)
    for n in (2, 3):
        with writer.edit(ctx.context_id) as working:
            working.set_variable("n", n)
    clock.advance(store.config.write_behind_max_delay_s + 0.05)  # the first change is long past its cap
    writer.write_behind.mark_flushed(ctx.context_id, 2)  # as if a flush wrote version 2 while version 3 came in
    now = clock()
    due = store.l2.due_time(ctx.context_id)
    assert due is not None and now < due <= now + store.config.write_behind_debounce_s + 0.01
    writer.write_behind.mark_flushed(ctx.context_id, 3)
    assert store.l2.due_time(ctx.context_id) is None and store.l2.pending_flushes() == 0


def test_a_plain_sql_session_cannot_pass_its_edit_for_runctx_own(store: TieredStore, database_url: str) -> None:
    """runctx's transactions run as the role runctx_writer; an operator's session (not a member)
    that sets the old marker is still seen as plain SQL: its edit raises the version and evicts."""
    import uuid

    from psycopg import sql

    ctx = new_context(store)
    operator = f"rctx_operator_{uuid.uuid4().hex[:8]}"
    _plain_sql(database_url, sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(operator)).as_string(None))
    _plain_sql(database_url, sql.SQL("GRANT ALL ON ALL TABLES IN SCHEMA public TO {}").format(sql.Identifier(operator)).as_string(None))
    events: list[ChangeEvent] = []
    listener = ChangeListener(database_url, events.append).start()
    try:
        as_operator = psycopg.conninfo.make_conninfo(libpq_url(database_url), user=operator)
        with psycopg.connect(as_operator, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SET ROLE runctx_writer")
            with conn.transaction():
                conn.execute("SELECT set_config('runctx.origin', 'runctx', true)")
                conn.execute(
                    "UPDATE context_snapshots SET document = jsonb_set(document, '{variables,greeting}', '\"hola\"') WHERE context_id = %s",
                    (ctx.context_id,),
                )
        wait_for(lambda: any(e.key == f"context:{ctx.context_id}" and e.op == "UPDATE" for e in events), 3, "the UPDATE event")
        event = next(e for e in events if e.key == f"context:{ctx.context_id}" and e.op == "UPDATE")
        assert event.origin == "" and event.version == ctx.version + 1  # plain SQL: bumped, not runctx's
    finally:
        listener.stop()
        _plain_sql(database_url, sql.SQL("DROP OWNED BY {}").format(sql.Identifier(operator)).as_string(None))
        _plain_sql(database_url, sql.SQL("DROP ROLE {}").format(sql.Identifier(operator)).as_string(None))


def test_a_write_behind_of_many_contexts_writes_each_newer_one_in_one_l3_transaction(store: TieredStore) -> None:
    contexts = [new_context(store, run_id=f"run-{n}") for n in range(3)]
    for ctx in contexts[:2]:
        with store.edit(ctx.context_id) as working:
            working.set_variable("n", 7)
    writes_before = l3_writes()
    assert store.write_behind.flush([ctx.context_id for ctx in contexts]) == 2  # the third is unchanged
    assert [store.l3.context_version(ctx.context_id) for ctx in contexts] == [2, 2, 1]
    assert store.l3.get_context(contexts[0].context_id).get("n") == 7
    assert l3_writes() == writes_before + 2 and store.l2.pending_flushes() == 0
    assert store.write_behind.flush([ctx.context_id for ctx in contexts]) == 0  # nothing newer: nothing written


def test_many_contexts_are_created_at_once_and_a_second_creation_changes_nothing(store: TieredStore) -> None:
    root = new_context(store, run_id="fan")
    items = [root.create_child("routine-a", context_id=f"fan/each[{n}]") for n in range(3)]
    for n, item in enumerate(items):
        item.set_variable("item", n)
    assert store.create_contexts(items) == 3
    for n in range(3):
        stored = store.l2.get_context(f"fan/each[{n}]")
        assert stored is not None and stored.live and stored.version == 1 and stored.context.get("item") == n
        assert store.l3.get_context(f"fan/each[{n}]").get("item") == n
    with store.edit("fan/each[1]") as working:  # an item goes on ...
        working.set_variable("item", 99)
    again = [root.create_child("routine-a", context_id=f"fan/each[{n}]") for n in range(3)]
    assert store.create_contexts(again) == 0  # ... and creating the items again leaves every one as it is
    assert store.l2.get_context("fan/each[1]").context.get("item") == 99
