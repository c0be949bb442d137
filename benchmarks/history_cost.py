"""What a run's history costs, side by side in one run on the same servers, and how fast the web
inspector answers for a long run:

1. steps per second of `versus_dbos.py`'s sequence (``--steps`` increments) and fan-out
   (``--branches`` x ``--per-branch`` increments in a parallel group), and items per second of a
   ``--items`` for-each, with the history kept (the default) and with ``RUNCTX_HISTORY=false``:
   the rounds alternate on and off, each with its own worker nodes; the ratio is on / off;
2. L3 writes per changed step with the history on (the history rides in the write-behind's
   transactions, so it adds none);
3. the run page and the ``/api/`` answers for a run of ``--long`` steps (median of 5 requests each
   over HTTP to ``runctx web``, after one warm-up).

    python benchmarks/history_cost.py [--steps 1000] [--branches 20 --per-branch 50] [--items 1000]
                                      [--long 10000] [--nodes 2] [--concurrency 1] [--rounds 3]

Uses RUNCTX_REDIS_URL / RUNCTX_DATABASE_URL / RUNCTX_BROKER_URL when set, else the embedded stack.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

from execution import BENCH_WORKERS, _remove_keys, bench_noop, bench_routine
from fan_out import bench_fan_out, fan_out_file

HERE = Path(__file__).resolve().parent
PASSWORD = "bench-password"


def routine_files(directory: Path, steps: int, branches: int, per_branch: int, long: int) -> dict[str, Path]:
    def inc(step_id: str) -> dict:
        return {"id": step_id, "action": "increment", "args": {"name": "counter"}}

    routines = {
        "sequence": {"name": f"hist-sequence-{steps}", "variables": {"counter": 0}, "steps": [inc(f"s{i}") for i in range(steps)]},
        "fanout": {
            "name": f"hist-fanout-{branches}x{per_branch}", "variables": {"counter": 0},
            "steps": [{"id": "fan", "parallel": [[inc(f"b{b}-{i}") for i in range(per_branch)] for b in range(branches)]}],
        },
        "long": {"name": f"hist-long-{long}", "variables": {"counter": 0}, "steps": [inc(f"s{i}") for i in range(long)]},
    }
    paths = {}
    for name, routine in routines.items():
        paths[name] = directory / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(routine))
    return paths


def phase(args: argparse.Namespace) -> None:
    """One round in this process's setting (RUNCTX_HISTORY): prints its figures as one JSON line."""
    from runctx.embedded import embedded_released, resolve
    from runctx.local_workers import LocalWorkers
    from state.settings import get_settings

    settings = get_settings()
    with embedded_released(), tempfile.TemporaryDirectory() as tmp:
        servers = resolve(settings)
        paths = routine_files(Path(tmp), args.steps, args.branches, args.per_branch, args.long)
        with LocalWorkers(args.nodes, servers, settings, concurrency=args.concurrency, **BENCH_WORKERS):
            bench_noop(50)
            sequence, writes, _ = bench_routine(paths["sequence"], args.steps)
            fan_total = args.branches * args.per_branch
            fanout, fan_writes, _ = bench_routine(paths["fanout"], fan_total)
            items = args.items / bench_fan_out(fan_out_file(Path(tmp), args.items, 20), args.items)
            long_run = None
            if args.phase == "on" and args.long:
                from runctx.api import Client

                client = Client()
                long_run = client.submit(client.load(paths["long"]))
                if client.wait(long_run, timeout=3600).status != "succeeded":
                    raise RuntimeError("the long run did not succeed")
        _remove_keys(servers.redis_url, settings.key_prefix) if args.phase == "off" else None
    print(json.dumps({
        "sequence": sequence, "fanout": fanout, "items": items, "writes": writes, "fan_writes": fan_writes,
        "long_run": long_run, "prefix": settings.key_prefix,
    }))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def inspector_latency(run_id: str, prefix: str, long: int) -> dict[str, float]:
    """Median milliseconds of each page and API answer for the run, over HTTP to `runctx web` (and
    the first answer of each: the first to read the run's history reads all of it from L3)."""
    import httpx

    port = free_port()
    env = {**os.environ, "RUNCTX_KEY_PREFIX": prefix, "RUNCTX_WEB_PASSWORD": PASSWORD}
    server = subprocess.Popen(
        [sys.executable, "-m", "runctx.cli", "web", "--bind", f"127.0.0.1:{port}"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    middle, late = f"s{long // 2}", f"s{long - 10}"
    paths = {
        "run page (HTML)": f"/runs/{run_id}",
        "runs list (HTML)": "/",
        "/api/runs": "/api/runs",
        "/api/runs/ID (status)": f"/api/runs/{run_id}",
        "/api/runs/ID/history (first 500)": f"/api/runs/{run_id}/history",
        "/api/runs/ID/history?brief (2000)": f"/api/runs/{run_id}/history?brief=true&limit=2000&offset={long - 2000}",
        "/api/runs/ID/steps/STEP": f"/api/runs/{run_id}/steps/{middle}",
        "/api/runs/ID/contexts": f"/api/runs/{run_id}/contexts",
        "/api/runs/ID/context?at=STEP": f"/api/runs/{run_id}/context?at={middle}",
        "/api/runs/ID/diff": f"/api/runs/{run_id}/diff?a=s10&b={late}",
    }
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=("runctx", PASSWORD), timeout=30) as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    http.get("/api/runs").raise_for_status()
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            figures = {}
            for name, path in paths.items():
                started = time.perf_counter()
                http.get(path).raise_for_status()
                figures[f"{name}, first answer"] = (time.perf_counter() - started) * 1000
                samples = []
                for _ in range(5):
                    started = time.perf_counter()
                    http.get(path).raise_for_status()
                    samples.append((time.perf_counter() - started) * 1000)
                figures[name] = statistics.median(samples)
            return figures
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description="what a run's history costs, and how fast the inspector answers")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--branches", type=int, default=20)
    parser.add_argument("--per-branch", type=int, default=50)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--long", type=int, default=10000)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phase", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        phase(args)
        return

    prefix = f"hist{uuid.uuid4().hex[:6]}"
    results: dict[str, list[dict]] = {"on": [], "off": []}
    for round_ in range(args.rounds):
        for setting in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
            argv = [a for a in sys.argv[1:]] + ["--phase", setting]
            if setting == "off" or round_ > 0:
                argv += ["--long", "0"]
            env = {**os.environ, "RUNCTX_HISTORY": "true" if setting == "on" else "false", "RUNCTX_KEY_PREFIX": prefix}
            done = subprocess.run([sys.executable, str(Path(__file__).resolve())] + argv, env=env, capture_output=True, text=True, cwd=HERE)
            if done.returncode != 0:
                raise SystemExit(f"round {round_ + 1} ({setting}) failed:\n{done.stderr[-3000:]}")
            results[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))

    def median(setting: str, name: str) -> float:
        return statistics.median(r[name] for r in results[setting])

    print(f"runctx history cost: {args.nodes} worker node(s) x {args.concurrency} process(es), {args.rounds} rounds each way, alternating")
    for name, label in (("sequence", f"sequence of {args.steps} steps"), ("fanout", f"parallel {args.branches}x{args.per_branch}"),
                        ("items", f"for-each of {args.items} items")):
        on, off = median("on", name), median("off", name)
        ratios = [a[name] / b[name] for a, b in zip(results["on"], results["off"])]
        unit = "items/s" if name == "items" else "steps/s"
        print(f"  {label:<28} history on {on:7.1f} {unit}, off {off:7.1f}: ratio {on / off:.2f} (rounds: {' '.join(f'{r:.2f}' for r in ratios)})")
    writes = median("on", "writes")
    print(f"  L3 writes with history on: {writes:g} for {args.steps} changed steps = {writes / args.steps:.4f} per changed step;"
          f" parallel: {median('on', 'fan_writes') / (args.branches * args.per_branch):.4f}")
    long_run = results["on"][0]["long_run"]
    if long_run:
        print(f"  the inspector on a run of {args.long} steps ({long_run}), median of 5 requests:")
        for name, ms in inspector_latency(long_run, prefix, args.long).items():
            print(f"    {name:<38} {ms:7.1f} ms")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
