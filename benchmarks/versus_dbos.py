"""runctx against its peers, side by side in one run on the same servers: every goal of the
performance issue measured at once.

    pip install -e '.[bench]'      # adds dbos
    python benchmarks/versus_dbos.py [--steps 1000] [--branches 20 --per-branch 50] [--long 10000]
                                     [--nodes 2] [--concurrency 1] [--invalidations 200] [--rounds 3]
                                     [--hot-study] [--outbox-study]

The same work on both: a sequence of ``--steps`` increments, and ``--branches`` branches of
``--per-branch`` increments (runctx: one routine with a parallel group; DBOS: workflows on a queue
of that concurrency). runctx runs on ``--nodes`` local worker nodes, every step its own Celery task
(and once more with ``inline: true``, successors running in their predecessor's task); DBOS runs in
one process (`dbos_peer.py`), checkpointing every step in PostgreSQL. Steps per second are measured
from submit to the run's end; the ratios are runctx / peer. It also prints the ratio against no-op
Celery tasks dispatched worker to worker, what the 10th and the ``--long``-th step of one sequence
cost (the gap between consecutive step commits, median of 100 around each), L3 writes per changed
step and the plain-SQL-commit-to-last-process invalidation latency.

Uses RUNCTX_REDIS_URL / RUNCTX_DATABASE_URL / RUNCTX_BROKER_URL when set, else the embedded stack;
DBOS gets a database of its own on the same PostgreSQL server, dropped afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg
import yaml

# The same measures as benchmarks/execution.py (this folder is on sys.path).
from execution import BENCH_WORKERS, _remove_keys, bench_invalidation, bench_noop, bench_routine, percentile
from fan_out import bench_fan_out, fan_out_file

HERE = Path(__file__).resolve().parent
DBOS_POLLS_S = (1.0, 0.05)  # DBOS's default queue polling interval, and a short one (its best here)


def routine_files(directory: Path, steps: int, branches: int, per_branch: int, long: int) -> dict[str, Path]:
    def inc(step_id: str) -> dict:
        return {"id": step_id, "action": "increment", "args": {"name": "counter"}}

    routines = {
        "sequence": {"name": f"vs-dbos-sequence-{steps}", "variables": {"counter": 0}, "steps": [inc(f"s{i}") for i in range(steps)]},
        "inline": {
            "name": f"vs-dbos-inline-{steps}", "inline": True, "variables": {"counter": 0},
            "steps": [inc(f"s{i}") for i in range(steps)],
        },
        "fanout": {
            "name": f"vs-dbos-fanout-{branches}x{per_branch}",
            "variables": {"counter": 0},
            "steps": [{"id": "fan", "parallel": [[inc(f"b{b}-{i}") for i in range(per_branch)] for b in range(branches)]}],
        },
        "long": {"name": f"vs-dbos-long-{long}", "variables": {"counter": 0}, "steps": [inc(f"s{i}") for i in range(long)]},
    }
    paths = {}
    for kind, routine in routines.items():
        paths[kind] = directory / f"{kind}.yaml"
        paths[kind].write_text(yaml.safe_dump(routine))
    return paths


def step_costs(path: Path, steps: int, around: tuple[int, ...]) -> dict[int, float]:
    """Run a sequence and return, for each step number in ``around``, the median gap (s) between
    consecutive step commits over the 100 steps from there (the last: up to there): what one step
    costs at that point of the run."""
    from runctx.api import Client

    client = Client()
    routine = client.load(path)
    client.engine.register(routine)
    result = client.run(routine, timeout=1800)
    if result.status != "succeeded" or result.variables["counter"] != steps:
        raise RuntimeError(f"long run did not succeed: {result.status} {result.error}")
    finished = [step["finished_at"] for step in sorted(result.steps, key=lambda step: int(step["id"][1:]))]
    gaps = [later - earlier for earlier, later in zip(finished, finished[1:])]
    out = {}
    for n in around:  # the 100 steps from n on, or (at the end of the run) the 100 up to n
        window = gaps[n - 1 : n + 99] if n + 99 <= len(gaps) else gaps[max(0, n - 101) : n - 1]
        out[n] = percentile(window, 0.5)
    return out


def run_peer(database_url: str, peer_args: list[str]) -> dict:
    """Run the peer (`dbos_peer.py`) in its own process on a fresh database of the same server; its answer."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url).set(drivername="postgresql")
    name = f"runctx_vs_dbos_{uuid.uuid4().hex[:8]}"
    admin = url.set(database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        done = subprocess.run(
            [sys.executable, str(HERE / "dbos_peer.py"), "--database-url", url.set(database=name).render_as_string(hide_password=False), *peer_args],
            capture_output=True, text=True, timeout=1200,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the DBOS side failed (is dbos installed? pip install -e '.[bench]'):\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def dbos_rates(database_url: str, args: argparse.Namespace) -> dict[str, float]:
    return run_peer(database_url, [
        "--steps", str(args.steps), "--branches", str(args.branches), "--per-branch", str(args.per_branch),
        "--items", str(args.items), "--item-concurrency", str(args.item_concurrency),
        "--poll-s", *(str(poll) for poll in DBOS_POLLS_S),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description="runctx against DBOS Transact and no-op Celery tasks, side by side")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--branches", type=int, default=20)
    parser.add_argument("--per-branch", type=int, default=50)
    parser.add_argument("--long", type=int, default=10000, help="steps of the sequence whose step cost is traced")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--invalidations", type=int, default=200)
    parser.add_argument("--items", type=int, default=1000, help="a fan-out over a list of this many items, one step each")
    parser.add_argument("--item-concurrency", type=int, default=20)
    parser.add_argument("--small", type=int, default=100, help="the cost per item of a fan-out this small ...")
    parser.add_argument("--large", type=int, default=10000, help="... and this large (0: not measured)")
    parser.add_argument("--rounds", type=int, default=3, help="runctx's runs and the no-op chain this many times each (medians)")
    parser.add_argument(
        "--hot-study", action="store_true",
        help="also run the sequence with no state passed on (RUNCTX_L1_UPDATE_MAX_BYTES=0: every step then reads L2)",
    )
    parser.add_argument(
        "--outbox-study", action="store_true",
        help="also run the sequence with RUNCTX_STEP_OUTBOX=false (successors sent by apply_async after the commit)",
    )
    args = parser.parse_args()

    os.environ.setdefault("RUNCTX_KEY_PREFIX", f"vsdbos{uuid.uuid4().hex[:6]}")
    from runctx.embedded import embedded_released, resolve
    from runctx.local_workers import LocalWorkers
    from state.settings import get_settings

    settings = get_settings()
    with embedded_released(), tempfile.TemporaryDirectory() as tmp:
        servers = resolve(settings)
        paths = routine_files(Path(tmp), args.steps, args.branches, args.per_branch, args.long)
        with LocalWorkers(args.nodes, servers, settings, concurrency=args.concurrency, **BENCH_WORKERS):
            bench_noop(50)  # warm up connections and imports in every process
            rounds = []
            for _ in range(args.rounds):  # in turn, so that a slower moment of the machine hits all alike
                noop = bench_noop(args.steps)
                sequence, l3_writes, _ = bench_routine(paths["sequence"], args.steps)
                inline, _, _ = bench_routine(paths["inline"], args.steps)
                fanout, _, _ = bench_routine(paths["fanout"], args.branches * args.per_branch)
                rounds.append((noop, sequence, l3_writes, inline, fanout))
            noop, sequence, l3_writes, inline, fanout = (statistics.median(column) for column in zip(*rounds))
            noop_ratios = [round_[1] / round_[0] for round_ in rounds]
            costs = step_costs(paths["long"], args.long, (10, args.long))
            latencies = [latency * 1000 for latency in bench_invalidation(args.invalidations)]
            # Last: a large fan-out's write-behind goes on after it ends, and would slow what follows.
            items_s = bench_fan_out(fan_out_file(Path(tmp), args.items, args.item_concurrency), args.items)
            per_item = {
                size: bench_fan_out(fan_out_file(Path(tmp), size, args.item_concurrency), size) / size
                for size in (args.small, args.large) if size
            }
        cold = None
        if args.hot_study:  # the same workers' setup, but no message (or broadcast) carries the committed state
            os.environ["RUNCTX_L1_UPDATE_MAX_BYTES"] = "0"
            with LocalWorkers(args.nodes, servers, settings, concurrency=args.concurrency, **BENCH_WORKERS):
                bench_noop(50)
                cold, _, _ = bench_routine(paths["sequence"], args.steps)
            del os.environ["RUNCTX_L1_UPDATE_MAX_BYTES"]
        sent = None
        if args.outbox_study:  # the same workers' setup, but a step's successor is sent after its commit
            os.environ["RUNCTX_STEP_OUTBOX"] = "false"
            with LocalWorkers(args.nodes, servers, settings, concurrency=args.concurrency, **BENCH_WORKERS):
                bench_noop(50)
                sent, _, _ = bench_routine(paths["sequence"], args.steps)
            del os.environ["RUNCTX_STEP_OUTBOX"]
        peer = dbos_rates(servers.database_url, args)
        _remove_keys(servers.redis_url, settings.key_prefix)  # runs stay in L3, as any run does

    fan = f"{args.branches} x {args.per_branch}"
    dbos_sequence, dbos_fanout = peer["sequence_steps_per_s"], peer["fanout_steps_per_s"]
    print(f"runctx vs DBOS Transact ({'embedded stack' if servers.embedded else 'configured servers'}; "
          f"runctx on {args.nodes} node(s) x {args.concurrency} process(es), each step a Celery task, medians of "
          f"{args.rounds} rounds; DBOS in one process)")
    print(f"  {args.steps}-step sequence:          runctx {sequence:8.1f} steps/s   DBOS {dbos_sequence:8.1f} steps/s"
          f"   ratio {sequence / dbos_sequence:5.2f}   (goal >= 1.2)")
    print(f"  {fan} fan-out:               runctx {fanout:8.1f} steps/s   DBOS {dbos_fanout:8.1f} steps/s"
          f"   ratio {fanout / dbos_fanout:5.2f}   (goal >= 1.5)")
    dbos_items = max(peer["items_per_s"].values())
    print(f"  {args.items}-item fan-out at {args.item_concurrency}: runctx {args.items / items_s:8.1f} items/s   DBOS queue "
          f"{dbos_items:8.1f} items/s   ratio {args.items / items_s / dbos_items:5.2f}   (goal >= 1.5; DBOS at polling "
          + ", ".join(f"{poll} s: {rate:.1f}" for poll, rate in peer["items_per_s"].items()) + ")")
    if args.large:
        small, large = per_item[args.small], per_item[args.large]
        print(f"  cost per item: {args.small} items {small * 1000:.2f} ms, {args.large} items {large * 1000:.2f} ms"
              f"   ratio {large / small:5.2f}   (goal <= 1.2)")
    print(f"  {args.steps}-step inline sequence:   runctx {inline:8.1f} steps/s   DBOS {dbos_sequence:8.1f} steps/s"
          f"   ratio {inline / dbos_sequence:5.2f}   (goal >= 3)")
    print(f"  {args.steps}-step sequence vs no-op Celery tasks worker to worker: {sequence:8.1f} vs {noop:8.1f} /s"
          f"   ratio {statistics.median(noop_ratios):5.2f}   (goal >= 0.85; each round: "
          f"{' '.join(f'{ratio:.2f}' for ratio in noop_ratios)})")
    print(f"  step cost in a {args.long}-step sequence: step 10 {costs[10] * 1000:.2f} ms, step {args.long} "
          f"{costs[args.long] * 1000:.2f} ms   ratio {costs[args.long] / costs[10]:5.2f}   (goal: 1)")
    if cold is not None:
        print(f"  {args.steps}-step sequence, each step's message carrying the state its predecessor committed: "
              f"{sequence:8.1f} steps/s; each step reading it from Redis: {cold:8.1f} steps/s   ratio {sequence / cold:5.2f}")
    if sent is not None:
        print(f"  {args.steps}-step sequence, successors pushed by the step's commit: {sequence:8.1f} steps/s;"
              f" sent after it: {sent:8.1f} steps/s   ratio {sequence / sent:5.2f}")
    print(f"  L3 writes per changed step: {l3_writes / args.steps:.4f}   (goal <= 0.01)")
    print(f"  plain-SQL L3 commit -> last process dropped the stale entry ({len(latencies)} commits): "
          f"p50 {percentile(latencies, 0.5):.2f} ms, p99 {percentile(latencies, 0.99):.2f} ms   (goal p99 <= 10 ms)")


if __name__ == "__main__":
    main()
