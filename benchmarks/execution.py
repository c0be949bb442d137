"""Execution benchmark, measured in one run on real worker processes:

1. steps per second of a 1000-step routine, against the same Celery setup running 1000 no-op
   tasks that dispatch each other the same way (worker to worker), as a ratio (``--rounds`` of
   each, one after the other: the rates printed are medians, the ratio the median of the rounds');
2. L3 writes per changed step;
3. time from an L3 commit (plain SQL) to the last worker process dropping the stale entry (p50, p99).

    python benchmarks/execution.py [--steps 1000] [--nodes 2] [--concurrency 1] [--invalidations 200] [--rounds 3]

Uses RUNCTX_REDIS_URL / RUNCTX_DATABASE_URL / RUNCTX_BROKER_URL when set, else the embedded
stack; works under its own key prefix, so it leaves a developer's data alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import yaml


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# The benchmarks' worker nodes also register the no-op baseline task (`noop_task.py`, beside this file).
BENCH_WORKERS = {"include": ("noop_task",), "pythonpath": (str(Path(__file__).resolve().parent),)}


def write_routine(directory: Path, steps: int) -> Path:
    routine = {
        "name": f"bench-sequence-{steps}",
        "variables": {"counter": 0},
        "steps": [{"id": f"s{i}", "action": "increment", "args": {"name": "counter"}} for i in range(steps)],
    }
    path = directory / "sequence.yaml"
    path.write_text(yaml.safe_dump(routine))
    return path


def bench_noop(steps: int) -> float:
    from runctx.api import Client
    from noop_task import noop_chain

    ledger = Client().store.ledger
    done_run_id = f"bench-noop-{uuid.uuid4().hex[:8]}"  # the chain's last task announces this "run" done
    started = time.perf_counter()
    noop_chain.apply_async(args=[steps, done_run_id])
    deadline = time.monotonic() + 600
    while not ledger.wait_done(done_run_id, timeout_s=1.0):
        if time.monotonic() > deadline:
            raise RuntimeError("no-op chain did not finish")
    return steps / (time.perf_counter() - started)


def bench_routine(path: Path, steps: int) -> tuple[float, int, float]:
    from runctx.api import Client

    client = Client()
    routine = client.load(path)
    client.engine.register(routine)  # stored before timing, as a deployed routine would be
    time.sleep(0.2)  # ... and announced to the workers, which compile it (a deployed routine is compiled)
    started = time.perf_counter()
    result = client.run(routine, timeout=600)
    elapsed = time.perf_counter() - started
    if result.status != "succeeded" or result.variables["counter"] != steps:
        raise RuntimeError(f"benchmark run did not succeed: {result.status} {result.error}")
    return steps / elapsed, result.l3_writes, elapsed


def bench_invalidation(rounds: int) -> list[float]:
    import redis

    from runctx.api import Client
    from runctx.embedded import resolve
    from state.change_events import ChangeEvent, libpq_url
    from state.keys import RedisKeys, config_key
    from workers.control import TRACE_KIND, probe

    client = Client()
    redis_client = redis.Redis.from_url(resolve().redis_url)
    prefix = os.environ["RUNCTX_KEY_PREFIX"]
    kind, name = TRACE_KIND, "bench"
    client.store.configs.put_config(kind, name, {"round": 0})
    latencies = []
    with psycopg.connect(libpq_url(client.runtime.database_url)) as conn:
        for round_ in range(1, rounds + 1):
            answers = probe(redis_client, prefix, config_key(kind, name), load=True)  # every process caches it
            with conn.transaction():
                txid = conn.execute("SELECT txid_current()").fetchone()[0]
                version = conn.execute(
                    "UPDATE configurations SET data = %s WHERE kind = %s AND name = %s RETURNING version",
                    (psycopg.types.json.Jsonb({"round": round_}), kind, name),
                ).fetchone()[0]
                committed_at = time.time()  # the COMMIT is sent when this block ends
            identity = ChangeEvent("configurations", "UPDATE", (kind, name), version, "", txid).identity
            trace_key = RedisKeys(prefix).trace(identity)
            deadline = time.monotonic() + 5
            while redis_client.hlen(trace_key) < len(answers) and time.monotonic() < deadline:
                time.sleep(0.0005)
            drops = [float(value) for value in redis_client.hvals(trace_key)]
            if len(drops) < len(answers):
                raise RuntimeError(f"only {len(drops)} of {len(answers)} processes dropped the entry within 5 s")
            latencies.append(max(drops) - committed_at)
    return latencies


def _remove_keys(redis_url: str, prefix: str) -> None:
    """Drop the benchmark's Redis keys (runs stay in L3, as any run does)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    for pattern in (f"{prefix}:*", f"_kombu.binding*.{prefix}.*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="runctx execution benchmark")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--invalidations", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="no-op chain and routine this many times each, in turn")
    args = parser.parse_args()

    os.environ.setdefault("RUNCTX_KEY_PREFIX", f"bench{uuid.uuid4().hex[:6]}")
    from runctx.embedded import embedded_released, resolve
    from runctx.local_workers import LocalWorkers
    from state.settings import get_settings

    settings = get_settings()
    with embedded_released(), tempfile.TemporaryDirectory() as tmp:
        servers = resolve(settings)
        with LocalWorkers(args.nodes, servers, settings, concurrency=args.concurrency, **BENCH_WORKERS):
            bench_noop(50)  # warm up connections and imports in every process
            path = write_routine(Path(tmp), args.steps)
            rounds = [(bench_noop(args.steps), *bench_routine(path, args.steps)) for _ in range(args.rounds)]
            latencies = bench_invalidation(args.invalidations)
        _remove_keys(servers.redis_url, settings.key_prefix)

    noop_rate = statistics.median(noop for noop, *_ in rounds)
    routine_rate = statistics.median(rate for _, rate, _, _ in rounds)
    l3_writes = statistics.median(writes for _, _, writes, _ in rounds)
    elapsed = statistics.median(seconds for *_, seconds in rounds)
    ratios = [rate / noop for noop, rate, _, _ in rounds]
    where = "embedded stack" if servers.embedded else "configured servers"
    print(f"runctx execution benchmark on {where}: {args.nodes} worker node(s) x {args.concurrency} process(es)")
    print(f"  no-op Celery tasks, worker to worker:  {noop_rate:8.1f} tasks/s ({args.steps} tasks)")
    print(f"  {args.steps}-step routine:                {routine_rate:8.1f} steps/s ({elapsed:.2f} s, incl. finalize)")
    print(f"  ratio routine / no-op:                 {statistics.median(ratios):8.2f}")
    print(f"  L3 writes: {l3_writes:g} for {args.steps} changed steps = {l3_writes / args.steps:.4f} per changed step")
    ms = [latency * 1000 for latency in latencies]
    print(
        f"  L3 commit -> last worker process dropped the stale entry ({len(ms)} commits): "
        f"p50 {percentile(ms, 0.5):.2f} ms, p99 {percentile(ms, 0.99):.2f} ms, max {max(ms):.2f} ms, "
        f"mean {statistics.fmean(ms):.2f} ms"
    )
    print(f"  rounds: {args.rounds} (figures above: medians); ratio of each round: {' '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
