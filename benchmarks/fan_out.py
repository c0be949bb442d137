"""runctx's fan-out over a list: items per second, and what an item costs in a small and a large list.

    python benchmarks/fan_out.py [--items 1000] [--concurrency 20] [--small 100] [--large 10000] [--nodes 2]

Each item runs one step (an increment in its own context) and the fan-out collects every item's
result in order. Prints items per second for ``--items`` items at ``--concurrency``, and the cost per
item of a ``--small`` and a ``--large`` list (elapsed / items, submit to end): collecting must not
grow with the list, so the two should be alike. `versus_dbos.py` runs the same against DBOS's queue.

Uses RUNCTX_REDIS_URL / RUNCTX_DATABASE_URL / RUNCTX_BROKER_URL when set, else the embedded stack.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

from execution import BENCH_WORKERS, _remove_keys, bench_noop


def fan_out_file(directory: Path, items: int, concurrency: int) -> Path:
    routine = {
        "name": f"bench_fan_out_{items}",
        "variables": {"items": list(range(items))},
        "steps": [
            {
                "id": "each", "for_each": "items", "max_concurrency": concurrency,
                "steps": [{"id": "work", "action": "increment", "args": {"name": "counter"}}],
                "collect": {"from": "counter", "into": "counters"},
            }
        ],
    }
    path = directory / f"fan_out_{items}.json"
    path.write_text(json.dumps(routine))
    return path


def bench_fan_out(path: Path, items: int) -> float:
    """Seconds from submit to the end of a fan-out of ``items`` items (checked: every item counted once)."""
    from runctx.api import Client

    client = Client()
    routine = client.load(path)
    client.engine.register(routine)  # stored before timing, as a deployed routine would be
    time.sleep(0.2)  # ... and announced to the workers, which compile it
    started = time.perf_counter()
    result = client.run(routine, timeout=3600)
    elapsed = time.perf_counter() - started
    counters = result.variables.get("counters") if result.status == "succeeded" else None
    if counters != [1] * items:
        raise RuntimeError(f"benchmark fan-out did not succeed: {result.status} {result.error}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description="runctx's fan-out: items per second, and the cost per item of a small and a large list")
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=10000, help="0: the cost per item is not measured")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2, help="worker processes per node")
    args = parser.parse_args()

    os.environ.setdefault("RUNCTX_KEY_PREFIX", f"fanout{uuid.uuid4().hex[:6]}")
    from runctx.embedded import embedded_released, resolve
    from runctx.local_workers import LocalWorkers
    from state.settings import get_settings

    settings = get_settings()
    with embedded_released(), tempfile.TemporaryDirectory() as tmp:
        servers = resolve(settings)
        with LocalWorkers(args.nodes, servers, settings, concurrency=args.processes, **BENCH_WORKERS):
            bench_noop(50)
            elapsed = bench_fan_out(fan_out_file(Path(tmp), args.items, args.concurrency), args.items)
            if args.large:
                small = bench_fan_out(fan_out_file(Path(tmp), args.small, args.concurrency), args.small) / args.small
                large = bench_fan_out(fan_out_file(Path(tmp), args.large, args.concurrency), args.large) / args.large
        _remove_keys(servers.redis_url, settings.key_prefix)
    print(f"runctx fan-out on {args.nodes} node(s) x {args.processes} process(es), max_concurrency {args.concurrency}")
    print(f"  {args.items} items: {args.items / elapsed:8.1f} items/s ({elapsed:.1f} s)")
    if args.large:
        print(f"  cost per item: {args.small} items {small * 1000:.2f} ms, {args.large} items {large * 1000:.2f} ms"
              f"   ratio {large / small:5.2f}   (goal <= 1.2)")


if __name__ == "__main__":
    main()
