"""Latency of a context read served by L1, by L2 and by L3, measured in one run.

    python benchmarks/tier_latency.py [--iterations 2000] [--variables 20]

Uses RUNCTX_REDIS_URL / RUNCTX_DATABASE_URL when set, else the embedded stack. Each read goes
through the tiered store with the faster tiers emptied first, so it includes decoding and the
checksum check, and for L2/L3 the fill-back into the faster tiers.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

from runctx.embedded import embedded_released, resolve
from state.migrate import upgrade
from state.models import RunContextInit
from state.settings import get_settings
from state.store import TieredStore
from state.tiers.local import LocalCache
from state.tiers.postgres import PostgresTier
from state.tiers.redis import RedisTier


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(iterations: int, variables: int) -> dict[str, list[float]]:
    settings = get_settings()
    servers = resolve(settings)
    prefix = f"{settings.key_prefix}:bench:{uuid.uuid4().hex[:8]}"
    upgrade(servers.database_url)
    config = settings.cache_config()
    l1 = LocalCache(config)
    l2 = RedisTier.from_url(servers.redis_url, prefix=prefix, config=config)
    l3 = PostgresTier.from_url(servers.database_url, config=config)
    store = TieredStore(l1, l2, l3, config=config)  # the tiers measured one by one
    run_id = f"bench-{uuid.uuid4().hex[:12]}"
    values = {f"var_{i}": {"n": i, "text": "x" * 32} for i in range(variables)}
    ctx = store.create_context(RunContextInit(run_id=run_id, routine_id="bench", variables=values))
    samples: dict[str, list[float]] = {"L1": [], "L2": [], "L3": []}
    try:
        for _ in range(iterations):
            started = time.perf_counter()
            _, tier = store.read_context(ctx.context_id)
            samples[tier].append(time.perf_counter() - started)
        for _ in range(iterations):
            l1.evict_context(ctx.context_id)
            started = time.perf_counter()
            _, tier = store.read_context(ctx.context_id)
            samples[tier].append(time.perf_counter() - started)
        for _ in range(iterations):
            l1.evict_context(ctx.context_id)
            l2.evict_context(ctx.context_id)
            started = time.perf_counter()
            _, tier = store.read_context(ctx.context_id)
            samples[tier].append(time.perf_counter() - started)
    finally:
        with l3.transaction() as conn:
            conn.exec_driver_sql("DELETE FROM context_snapshots WHERE run_id = %s", (run_id,))
        l2.evict_context(ctx.context_id)
        store.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--variables", type=int, default=20, help="variables in the sample context")
    args = parser.parse_args()
    with embedded_released():
        samples = measure(args.iterations, args.variables)
    print(f"context read latency, {args.iterations} reads per tier, {args.variables} variables (microseconds)")
    print(f"{'tier':<5} {'p50':>9} {'p99':>9} {'mean':>9}")
    for tier, values in samples.items():
        micro = [v * 1e6 for v in values]
        print(f"{tier:<5} {percentile(micro, 0.5):9.1f} {percentile(micro, 0.99):9.1f} {statistics.fmean(micro):9.1f}")


if __name__ == "__main__":
    main()
