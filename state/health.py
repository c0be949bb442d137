"""The health check behind `runctx check`: a real round trip of a sample context through all three tiers, timed.

It lives in `state/` because it speaks SQL: it edits the sample context by plain SQL to see the
change event evict the Redis entry.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import psycopg

from state.change_events import ChangeListener, libpq_url
from state.errors import HealthCheckFailed
from state.models import DataSensitivity, RunContextInit
from state.settings import Settings
from state.store import TieredStore
from state.tiers.local import LocalCache

T = TypeVar("T")


@dataclass
class CheckStep:
    name: str
    tier: str
    detail: str
    seconds: float


def _timed(work: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def run_check(redis_url: str, database_url: str, settings: Settings) -> list[CheckStep]:
    """Create, read (from each tier), change, flush and invalidate one sample context, then remove it."""
    prefix = f"{settings.key_prefix}:check:{uuid.uuid4().hex[:8]}"
    config = settings.cache_config()
    store = TieredStore.connect(redis_url, database_url, config=config, prefix=prefix)
    steps: list[CheckStep] = []

    def record(name: str, tier: str, detail: str, seconds: float) -> None:
        steps.append(CheckStep(name, tier, detail, seconds))

    run_id = f"check-{uuid.uuid4().hex[:12]}"
    try:
        _, seconds = _timed(store.l2.ping)
        record("ping", "L2", "Redis answers", seconds)
        _, seconds = _timed(store.l3.ping)
        record("ping", "L3", "PostgreSQL answers", seconds)

        init = RunContextInit(
            run_id=run_id,
            routine_id="runctx-check",
            variables={"greeting": "hello", "visits": 0, "api_token": "not-a-real-secret"},
            sensitivity_map={"api_token": DataSensitivity.SECRET},
        )
        ctx, seconds = _timed(lambda: store.create_context(init))
        record("create", "L3+L2+L1", f"context {ctx.context_id} version {ctx.version}", seconds)

        (_, tier), seconds = _timed(lambda: store.read_context(ctx.context_id))
        record("read", tier, "hit in this process's LRU", seconds)

        fresh = TieredStore(LocalCache(config), store.l2, store.l3, config=config)
        (_, tier), seconds = _timed(lambda: fresh.read_context(ctx.context_id))
        record("read", tier, "another process's view: L1 miss, Redis hit, L1 filled", seconds)

        store.l2.evict_context(ctx.context_id)
        cold = TieredStore(LocalCache(config), store.l2, store.l3, config=config)
        (_, tier), seconds = _timed(lambda: cold.read_context(ctx.context_id))
        record("read", tier, "L1 and L2 miss, PostgreSQL hit, L2 and L1 filled", seconds)

        def change() -> int:
            with store.edit(ctx.context_id) as working:
                working.set_variable("visits", working.get("visits") + 1)
            return store.get_context(ctx.context_id).version

        version, seconds = _timed(change)
        record("commit", "L2", f"compare-and-set to version {version}, L3 write scheduled", seconds)

        written, seconds = _timed(lambda: store.flush(ctx.context_id))
        stored = store.l3.get_context(ctx.context_id)
        if not written or stored is None or stored.version != version or stored.get("visits") != 1:
            raise HealthCheckFailed("write-behind did not bring the change to PostgreSQL")
        record("flush", "L3", f"write-behind wrote version {version} in one transaction", seconds)

        seconds = _invalidation_round_trip(database_url, store, ctx.context_id)
        record("invalidate", "L3->L2", "plain SQL UPDATE -> NOTIFY -> Redis entry evicted", seconds)
    finally:
        _remove_sample(database_url, store, run_id)
        store.close()
    return steps


def _invalidation_round_trip(database_url: str, store: TieredStore, context_id: str) -> float:
    listener = ChangeListener(database_url, store.invalidation.handle_change).start()
    try:
        started = time.perf_counter()
        with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
            conn.execute(
                "UPDATE context_snapshots SET document = jsonb_set(document, '{variables,visits}', '2') "
                "WHERE context_id = %s",
                (context_id,),
            )
        deadline = time.monotonic() + 5
        while store.l2.get_context(context_id) is not None:
            if time.monotonic() > deadline:
                raise HealthCheckFailed("the change event did not evict the Redis entry within 5 s")
            time.sleep(0.001)
        return time.perf_counter() - started
    finally:
        listener.stop()


def _remove_sample(database_url: str, store: TieredStore, run_id: str) -> None:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute("DELETE FROM context_snapshots WHERE run_id = %s", (run_id,))
    client = store.l2.client  # type: ignore[attr-defined]  (the check runs on the real tiers)
    keys = list(client.scan_iter(match=store.l2.keys.pattern()))  # type: ignore[attr-defined]
    if keys:
        client.delete(*keys)


# What each Redis persistence mode costs when Redis restarts: see docs/internals.md, "Redis and durability".
PERSISTENCE_COST = {
    "aof-always": "nothing: every commit is on disk before Redis answers",
    "aof-everysec": "at most the last second of step commits, which run again after the rewind",
    "aof-no": "what the OS had not written out yet (seconds): those steps run again",
    "rdb": "every step since the last RDB snapshot that L3 did not have yet runs again",
    "none": "every step since each running run's last L3 write runs again (up to the write-behind cap)",
}


def redis_persistence(redis_url: str) -> str:
    """How the Redis at ``redis_url`` keeps data across a restart: a key of PERSISTENCE_COST, or "unknown"."""
    import redis

    from state.tiers.redis import connect

    client = connect(redis_url, socket_timeout=5)
    try:
        config = client.config_get("appendonly") | client.config_get("appendfsync") | client.config_get("save")
    except redis.RedisError:  # managed services often refuse CONFIG
        return "unknown"
    finally:
        client.close()
    if config.get("appendonly") == "yes":
        return f"aof-{config.get('appendfsync', 'everysec')}"
    return "rdb" if config.get("save") else "none"


def persistence_warning(mode: str) -> str | None:
    """A warning for a Redis that keeps nothing on disk (or cannot say), else None."""
    if mode == "none":
        return (
            "Redis keeps nothing on disk: after a restart every running run is rewound to what PostgreSQL holds, "
            "and " + PERSISTENCE_COST["none"] + "; run Redis with appendonly yes to cut that to a second"
        )
    if mode == "unknown":
        return "cannot read Redis's persistence settings (CONFIG refused): see docs/internals.md, 'Redis and durability'"
    return None
