"""What sealing a secret costs a step: the same sequence with and without a secret variable, run by
the engine in this process (`runctx.testing`) on the real Redis and PostgreSQL, so the figure is
the engine's and the tiers' work without Celery's.

    python benchmarks/sealing_cost.py [--steps 2000] [--rounds 3]

Uses RUNCTX_REDIS_URL / RUNCTX_DATABASE_URL when set, else the embedded stack; a database and a key
prefix of its own, dropped afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import psycopg


def per_step(store_factory, steps: int, secret: bool) -> float:
    from tasks.engine import RunEngine
    from runctx.testing import InProcessDispatcher
    from tasks.routine import parse_routine

    store = store_factory()
    dispatcher = InProcessDispatcher()
    engine = RunEngine(store, dispatcher, max_attempts=5)
    variables: dict = {"counter": 0, "user": "alice"}
    if secret:
        variables["token"] = {"sensitivity": "secret"}
    routine = parse_routine(
        {
            "name": f"sealing-{'secret' if secret else 'plain'}",
            "variables": variables,
            "steps": [{"id": f"s{i}", "action": "increment", "args": {"name": "counter"}} for i in range(steps)],
        }
    )
    engine.register(routine)
    engine.submit(routine, variables={"token": f"tok-{uuid.uuid4().hex}"} if secret else None)
    started = time.perf_counter()
    while dispatcher.queue:
        delivery = dispatcher.queue.popleft()
        if delivery.kind == "step":
            dispatcher.deliver(engine, delivery)
    elapsed = time.perf_counter() - started
    store.close()
    return elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(description="the cost of sealing a secret, per step")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from sqlalchemy.engine import make_url

    from runctx.embedded import embedded_released, resolve
    from state.migrate import upgrade
    from state.models import StateCacheConfig
    from state.sealing import Keyring
    from state.settings import get_settings
    from state.store import TieredStore

    with embedded_released():
        servers = resolve(get_settings())
        url = make_url(servers.database_url)
        name = f"runctx_sealing_{uuid.uuid4().hex[:8]}"
        admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            database_url = url.set(database=name).render_as_string(hide_password=False)
            upgrade(database_url)
            keys = Keyring.parse(Keyring.new_entry())

            def store_factory() -> TieredStore:
                return TieredStore.connect(
                    servers.redis_url, database_url, config=StateCacheConfig(), prefix=f"sealbench{uuid.uuid4().hex[:6]}", keyring=keys
                )

            plain, sealed = [], []
            for _ in range(args.rounds):
                plain.append(per_step(store_factory, args.steps, secret=False))
                sealed.append(per_step(store_factory, args.steps, secret=True))
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    p, s = statistics.median(plain) * 1e6, statistics.median(sealed) * 1e6
    print(f"sealing cost ({args.steps}-step sequence, in-process engine on the real tiers, median of {args.rounds}):")
    print(f"  no sensitive variable: {p:7.1f} us/step   one secret variable: {s:7.1f} us/step   cost {s - p:+6.1f} us ({s / p:.2f}x)")


if __name__ == "__main__":
    main()
