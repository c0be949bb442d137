"""The peer side of `versus_dbos.py`: DBOS Transact running the same work in one process.

    python benchmarks/dbos_peer.py --database-url postgresql://... [--steps 1000] [--branches 20 --per-branch 50]

Prints one JSON object: steps per second of a sequential workflow of ``--steps`` steps (each step
increments a counter and is checkpointed in PostgreSQL, as DBOS does for every step), of
``--branches`` workflows of ``--per-branch`` steps enqueued on a DBOS queue of that concurrency,
and (with ``--items``) items per second of ``--items`` one-step workflows on a queue of
``--item-concurrency``, the fan-out over a list DBOS's documentation shows, once per polling
interval of ``--poll-s`` (DBOS polls its queues; its default is 1 s). With ``--data-values K
--data-bytes N``: also the sequence with K strings of N bytes passed as the workflow's argument
and kept in a variable, untouched by its steps (`large_context.py`).
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
    parser.add_argument("--items", type=int, default=0)
    parser.add_argument("--item-concurrency", type=int, default=20)
    parser.add_argument("--poll-s", type=float, nargs="+", default=[1.0])
    parser.add_argument("--data-values", type=int, default=0)
    parser.add_argument("--data-bytes", type=int, default=0)
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

    @DBOS.workflow()
    def sequence_with_data(steps: int, data: list[str]) -> int:
        kept = data  # held by the workflow, as a runctx context holds it
        counter = 0
        for _ in range(steps):
            counter = increment(counter)
        return counter + 0 * len(kept)

    @DBOS.workflow()
    def item(counter: int) -> int:
        return increment(counter)

    DBOS.launch()
    queue = DBOS.register_queue("runctx-peer-fanout", global_concurrency=args.branches)
    item_queues = [
        DBOS.register_queue(f"runctx-peer-items-{n}", global_concurrency=args.item_concurrency, polling_interval_sec=poll)
        for n, poll in enumerate(args.poll_s)
    ]
    try:
        assert sequence(10) == 10  # warm up connections
        started = time.perf_counter()
        assert sequence(args.steps) == args.steps
        sequence_rate = args.steps / (time.perf_counter() - started)

        started = time.perf_counter()
        handles = [queue.enqueue(sequence, args.per_branch) for _ in range(args.branches)]
        assert sum(handle.get_result() for handle in handles) == args.branches * args.per_branch
        fanout_rate = args.branches * args.per_branch / (time.perf_counter() - started)

        data_rate = None
        if args.data_values:
            data = ["d" * args.data_bytes for _ in range(args.data_values)]
            started = time.perf_counter()
            assert sequence_with_data(args.steps, data) == args.steps
            data_rate = args.steps / (time.perf_counter() - started)

        items_rates = {}
        for poll, item_queue in zip(args.poll_s, item_queues):
            if not args.items:
                break
            started = time.perf_counter()
            handles = [item_queue.enqueue(item, 0) for _ in range(args.items)]
            assert [handle.get_result() for handle in handles] == [1] * args.items
            items_rates[str(poll)] = args.items / (time.perf_counter() - started)
    finally:
        DBOS.destroy()
    print(json.dumps({
        "sequence_steps_per_s": sequence_rate, "fanout_steps_per_s": fanout_rate, "items_per_s": items_rates,
        "sequence_with_data_steps_per_s": data_rate,
    }))


if __name__ == "__main__":
    main()
