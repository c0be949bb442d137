"""The peer side of `versus_dbos.py`: DBOS Transact running the same work in one process.

    python benchmarks/dbos_peer.py --database-url postgresql://... [--steps 1000] [--branches 20 --per-branch 50]

Prints one JSON object: steps per second of a sequential workflow of ``--steps`` steps (each step
increments a counter and is checkpointed in PostgreSQL, as DBOS does for every step), and of
``--branches`` workflows of ``--per-branch`` steps enqueued on a DBOS queue of that concurrency.
Run in its own process: DBOS is a process-wide singleton.
"""

from __future__ import annotations

import argparse
import json
import time

from dbos import DBOS, DBOSConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", required=True, help="a database DBOS may use as its system database")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--branches", type=int, default=20)
    parser.add_argument("--per-branch", type=int, default=50)
    args = parser.parse_args()

    DBOS(config=DBOSConfig(name="runctx-peer", system_database_url=args.database_url))

    @DBOS.step()
    def increment(counter: int) -> int:
        return counter + 1

    @DBOS.workflow()
    def sequence(steps: int) -> int:
        counter = 0
        for _ in range(steps):
            counter = increment(counter)
        return counter

    DBOS.launch()
    queue = DBOS.register_queue("runctx-peer-fanout", global_concurrency=args.branches)
    try:
        assert sequence(10) == 10  # warm up connections
        started = time.perf_counter()
        assert sequence(args.steps) == args.steps
        sequence_rate = args.steps / (time.perf_counter() - started)

        started = time.perf_counter()
        handles = [queue.enqueue(sequence, args.per_branch) for _ in range(args.branches)]
        assert sum(handle.get_result() for handle in handles) == args.branches * args.per_branch
        fanout_rate = args.branches * args.per_branch / (time.perf_counter() - started)
    finally:
        DBOS.destroy()
    print(json.dumps({"sequence_steps_per_s": sequence_rate, "fanout_steps_per_s": fanout_rate}))


if __name__ == "__main__":
    main()
