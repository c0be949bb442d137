"""What a large context costs a step, side by side in one run on the same servers:

    python benchmarks/large_context.py [--steps 200] [--nodes 2] [--rounds 3] [--no-dbos]

A sequence of ``--steps`` increments on a small context, and the same on a context that also holds
4 x 225 KB, and 8 x 1 MB (8 MB), of values no step touches. Each rate (steps per second, from submit
to the run's end, median of ``--rounds``) is printed with its ratio to the small context's (and the
same from the submit's return, the context created, to the end), and the
bytes PostgreSQL wrote per step while the run went on (its WAL, `pg_current_wal_lsn`: contexts,
history, runs, blobs and the write-behind alike; every run has values of its own, so none is
stored already). DBOS Transact does the same sequences with the same
data passed to its workflow as an argument and kept in a variable (`dbos_peer.py`).

Uses RUNCTX_REDIS_URL / RUNCTX_DATABASE_URL / RUNCTX_BROKER_URL when set, else the embedded stack.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import time
import uuid

import psycopg

from execution import BENCH_WORKERS, _remove_keys
from versus_dbos import run_peer

SHAPES = {"small": (0, 0), "4 x 225 KB": (4, 225_000), "8 x 1 MB (8 MB)": (8, 1_000_000)}


def untouched(count: int, size: int) -> dict[str, str]:
    """``count`` values of ``size`` bytes of text that does not compress to nothing."""
    return {f"doc{n}": base64.b64encode(os.urandom(size * 3 // 4)).decode()[:size] for n in range(count)}


def wal_bytes(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')").fetchone()[0])


def bench(client, steps: int, variables: dict, libpq: str) -> tuple[float, float, float]:
    """One run: its steps per second from submit to end, and from the submit's return (the context
    created) to end, and the WAL bytes written per step."""
    routine = client.load(
        {"name": f"large-context-{steps}", "steps": [{"id": f"s{i}", "action": "increment", "args": {"name": "counter"}} for i in range(steps)]}
    )
    client.engine.register(routine)
    time.sleep(0.2)  # announced to the workers, which compile it (a deployed routine is compiled)
    with psycopg.connect(libpq, autocommit=True) as conn:
        before = wal_bytes(conn)
        started = time.perf_counter()
        run_id = client.submit(routine, variables={"counter": 0, **variables})
        submitted = time.perf_counter()
        result = client.wait(run_id, timeout=600)
        ended = time.perf_counter()
        written = wal_bytes(conn) - before
    if result.status != "succeeded" or result.variables["counter"] != steps:
        raise RuntimeError(f"the run did not succeed: {result.status} {result.error}")
    return steps / (ended - started), steps / (ended - submitted), written / steps


def dbos(database_url: str, steps: int, count: int, size: int) -> float:
    found = run_peer(database_url, [
        "--steps", str(steps), "--branches", "1", "--per-branch", "1", "--data-values", str(count), "--data-bytes", str(size),
    ])
    return found["sequence_with_data_steps_per_s"] or found["sequence_steps_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description="what a large context costs a step")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-dbos", action="store_true", help="leave DBOS out")
    args = parser.parse_args()

    os.environ.setdefault("RUNCTX_KEY_PREFIX", f"bench{uuid.uuid4().hex[:6]}")
    from runctx.api import Client
    from runctx.embedded import embedded_released, resolve
    from runctx.local_workers import LocalWorkers
    from state.change_events import libpq_url
    from state.settings import get_settings

    settings = get_settings()
    with embedded_released():
        servers = resolve(settings)
        with LocalWorkers(args.nodes, servers, settings, concurrency=args.concurrency, **BENCH_WORKERS):
            client = Client()
            libpq = libpq_url(client.runtime.database_url)
            bench(client, 20, {}, libpq)  # warm up every process
            measured: dict[str, list[tuple[float, float, float]]] = {shape: [] for shape in SHAPES}
            for _ in range(args.rounds):  # the shapes in turn, round after round, each with values of its own
                for shape in SHAPES:
                    measured[shape].append(bench(client, args.steps, untouched(*SHAPES[shape]), libpq))
        _remove_keys(servers.redis_url, settings.key_prefix)
        peers = {} if args.no_dbos else {shape: dbos(client.runtime.database_url, args.steps, *SHAPES[shape]) for shape in SHAPES}

    where = "embedded stack" if servers.embedded else "configured servers"
    print(f"large contexts on {where}: {args.nodes} worker node(s) x {args.concurrency} process(es), {args.steps}-step sequences")
    small = statistics.median(rate for rate, _, _ in measured["small"])
    small_running = statistics.median(running for _, running, _ in measured["small"])
    for shape in SHAPES:
        rate = statistics.median(rate for rate, _, _ in measured[shape])
        running = statistics.median(running for _, running, _ in measured[shape])
        written = statistics.median(per_step for _, _, per_step in measured[shape])
        line = (
            f"  {shape:<18} {rate:8.1f} steps/s  {rate / small:5.2f} of small  (once created: {running:6.1f}, "
            f"{running / small_running:4.2f})  {written / 1024:8.1f} KiB written to PostgreSQL per step"
        )
        if peers:
            line += f"  | DBOS {peers[shape]:7.1f} steps/s, runctx / DBOS {rate / peers[shape]:5.2f}"
        print(line)
    print(f"  rounds: {args.rounds} (medians); each round's rates: " + "; ".join(
        f"{shape}: {' '.join(f'{rate:.0f}' for rate, _, _ in measured[shape])}" for shape in SHAPES
    ))


if __name__ == "__main__":
    main()
