"""runctx against DBOS Transact, side by side in one run on the same PostgreSQL.

    pip install -e '.[bench]'      # adds dbos
    python benchmarks/versus_dbos.py [--steps 1000] [--branches 20 --per-branch 50] [--nodes 2] [--concurrency 1]

The same work on both: a sequence of ``--steps`` increments, and ``--branches`` branches of
``--per-branch`` increments (runctx: one routine with a parallel group; DBOS: workflows on a queue
of that concurrency). runctx runs on ``--nodes`` local worker nodes, every step its own Celery task;
DBOS runs in one process (`dbos_peer.py`), checkpointing every step in PostgreSQL. Steps per second
are measured from submit to the run's end; the ratios are runctx / DBOS.

Uses RUNCTX_REDIS_URL / RUNCTX_DATABASE_URL / RUNCTX_BROKER_URL when set, else the embedded stack;
DBOS gets a database of its own on the same PostgreSQL server, dropped afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg
import yaml
from execution import bench_routine  # the same measure as benchmarks/execution.py (this folder is on sys.path)

HERE = Path(__file__).resolve().parent


def routine_files(directory: Path, steps: int, branches: int, per_branch: int) -> tuple[Path, Path]:
    def inc(step_id: str) -> dict:
        return {"id": step_id, "action": "increment", "args": {"name": "counter"}}

    sequence = {"name": f"vs-dbos-sequence-{steps}", "variables": {"counter": 0}, "steps": [inc(f"s{i}") for i in range(steps)]}
    fanout = {
        "name": f"vs-dbos-fanout-{branches}x{per_branch}",
        "variables": {"counter": 0},
        "steps": [{"id": "fan", "parallel": [[inc(f"b{b}-{i}") for i in range(per_branch)] for b in range(branches)]}],
    }
    paths = directory / "sequence.yaml", directory / "fanout.yaml"
    for path, routine in zip(paths, (sequence, fanout)):
        path.write_text(yaml.safe_dump(routine))
    return paths


def dbos_rates(database_url: str, args: argparse.Namespace) -> dict[str, float]:
    """Run the peer in its own process on a fresh database of the same server."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url).set(drivername="postgresql")
    name = f"runctx_vs_dbos_{uuid.uuid4().hex[:8]}"
    admin = url.set(database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        done = subprocess.run(
            [
                sys.executable, str(HERE / "dbos_peer.py"), "--database-url", url.set(database=name).render_as_string(hide_password=False),
                "--steps", str(args.steps), "--branches", str(args.branches), "--per-branch", str(args.per_branch),
            ],
            capture_output=True, text=True, timeout=1200,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the DBOS side failed (is dbos installed? pip install -e '.[bench]'):\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description="runctx against DBOS Transact, side by side")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--branches", type=int, default=20)
    parser.add_argument("--per-branch", type=int, default=50)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()

    os.environ.setdefault("RUNCTX_KEY_PREFIX", f"vsdbos{uuid.uuid4().hex[:6]}")
    from runctx.embedded import embedded_released, resolve
    from runctx.local_workers import LocalWorkers
    from state.settings import get_settings

    settings = get_settings()
    with embedded_released(), tempfile.TemporaryDirectory() as tmp:
        servers = resolve(settings)
        sequence, fanout = routine_files(Path(tmp), args.steps, args.branches, args.per_branch)
        with LocalWorkers(args.nodes, servers, settings, concurrency=args.concurrency):
            runctx_sequence, _, _ = bench_routine(sequence, args.steps)
            runctx_fanout, _, _ = bench_routine(fanout, args.branches * args.per_branch)
        peer = dbos_rates(servers.database_url, args)

    fan = f"{args.branches} x {args.per_branch}"
    print(f"runctx vs DBOS Transact ({'embedded stack' if servers.embedded else 'configured servers'}; "
          f"runctx on {args.nodes} node(s) x {args.concurrency} process(es), each step a Celery task; DBOS in one process)")
    print(f"  {args.steps}-step sequence:   runctx {runctx_sequence:8.1f} steps/s   DBOS {peer['sequence_steps_per_s']:8.1f} steps/s"
          f"   ratio {runctx_sequence / peer['sequence_steps_per_s']:5.2f}")
    print(f"  {fan} fan-out:        runctx {runctx_fanout:8.1f} steps/s   DBOS {peer['fanout_steps_per_s']:8.1f} steps/s"
          f"   ratio {runctx_fanout / peer['fanout_steps_per_s']:5.2f}")


if __name__ == "__main__":
    main()
