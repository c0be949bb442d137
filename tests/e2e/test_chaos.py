"""Chaos on real worker nodes: a run survives it and every step is applied exactly once.

- PostgreSQL (L3, a throwaway cluster of its own) restarted twice while a run of a few hundred
  steps goes on: the run succeeds with the counter and the ordered logs of a run without faults.
- 50 SIGKILLs at random moments during a parallel run on two nodes (pool children; every tenth a
  whole node, then started again), Redis broker at its default 600 s visibility timeout: the
  watchdog (stall timeout 3 s) brings the lost work back, the run succeeds with every step
  applied once, in a time bounded by the fault-free time plus a few stall timeouts plus the time
  the node restarts took.

Each step runs `tests.support.chaos_actions:tally`, which also counts its executions in Redis (another DB
number), an outside effect: executions - steps = re-executions caused by the faults.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psutil
import pytest
import redis

from runctx.embedded import celery_broker_url
from state.migrate import upgrade
from tests.support.cluster import Cluster, new_prefix
from tests.support.records import wait_no_pending_flush
from tests.support.servers import free_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TALLY_DB = 15  # the executions tally lives on another Redis DB number than runctx's keys
STALL_TIMEOUT_S = 3.0
DEADLINE_S = 300.0


# ---- routines ------------------------------------------------------------------------------------


def parallel_routine(name: str, branches: int, steps: int, *, tally_url: str, tally_key: str, sleep_every: int, sleep_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """``branches`` branches of ``steps`` steps; each step increments `counter` and appends its
    number to its branch's log (and every ``sleep_every``-th sleeps ``sleep_s``); a last step
    copies the counter to `total` after the join. Returns the routine and the variables it must
    end with (each step applied exactly once, each log in order)."""
    group = []
    expected: dict[str, Any] = {"counter": branches * steps, "total": branches * steps}
    for b in range(1, branches + 1):
        log = f"log_b{b:02d}"
        branch = []
        for s in range(1, steps + 1):
            step_id = f"b{b:02d}_s{s:02d}"
            args = {"counter": "counter", "log": log, "value": s, "step": step_id, "tally_url": tally_url, "tally_key": tally_key}
            if s % sleep_every == 0:
                args["sleep"] = sleep_s
            branch.append({"id": step_id, "action": "tests.support.chaos_actions:tally", "args": args})
        group.append(branch)
        expected[log] = list(range(1, steps + 1))
    variables = {"counter": 0, **{f"log_b{b:02d}": [] for b in range(1, branches + 1)}}
    routine = {
        "name": name,
        "variables": variables,
        "steps": [
            {"id": "fan", "parallel": group},
            {"id": "total", "action": "copy", "args": {"from": "counter", "to": "total"}},
        ],
    }
    return routine, expected


def write(path: Path, routine: dict[str, Any]) -> Path:
    path.write_text(json.dumps(routine))
    return path


def action_steps(routine: dict[str, Any]) -> list[str]:
    return [step["id"] for branch in routine["steps"][0]["parallel"] for step in branch]


# ---- watching runs -------------------------------------------------------------------------------


def steps_done(client: redis.Redis, prefix: str, run_id: str) -> int:
    from state.keys import RedisKeys

    return sum(client.hlen(key) for key in RedisKeys(prefix).step_records(run_id))


def run_seconds(store, run_id: str) -> float:
    """The run's own duration, as the ledger (L3) recorded it: created -> finished."""
    row = store.ledger.get_run(run_id)
    return (row.finished_at - row.created_at).total_seconds()


def l3_failures(cluster: Cluster, what: str = r"L3 .* failed|CommunicationFailure") -> int:
    """Worker log lines saying an L3 operation failed (and is retried)."""
    return len(re.findall(what, cluster.logs()))


FLUSH_FAILED = r"L3 flush context \S+ failed"


def log_offsets(cluster: Cluster) -> dict[str, int]:
    return {short: cluster.log_path(short).stat().st_size for short in cluster.nodes}


def logs_since(cluster: Cluster, offsets: dict[str, int]) -> str:
    """What the nodes logged since ``offsets``."""
    text = []
    for short, offset in offsets.items():
        with open(cluster.log_path(short), "rb") as f:
            f.seek(offset)
            text.append(f.read().decode(errors="replace"))
    return "\n".join(text)


def rewinds_of(cluster: Cluster, run_id: str) -> int:
    return len(re.findall(rf"run {run_id} rewound to epoch", cluster.logs()))


def executions(tally: redis.Redis, key: str) -> dict[str, int]:
    return {step.decode(): int(count) for step, count in tally.hgetall(key).items()}


def assert_exact(store, result: dict[str, Any], routine: dict[str, Any], expected: dict[str, Any]) -> None:
    """Succeeded; the result and L3's final context hold each step once and exactly the expected values."""
    assert result["status"] == "succeeded", result
    assert result["variables"] == expected
    final = store.l3.get_context(result["run_id"])
    step_ids = action_steps(routine) + ["total"]
    assert sorted(final.applied_steps) == sorted(step_ids), "a step applied twice or not at all"
    assert final.variables == expected
    assert store.ledger.get_run(result["run_id"]).status == "succeeded"


def timed_run(cluster: Cluster, path: Path) -> tuple[str, dict[str, Any], float]:
    started = time.monotonic()
    run_id = cluster.submit(path)
    result = cluster.wait(run_id, timeout_s=DEADLINE_S)
    return run_id, result, time.monotonic() - started


def delete_keys(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    keys += list(client.scan_iter(match=f"_kombu.binding*.{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def tally_url_for(redis_url: str) -> str:
    """The same Redis server, on the tally's DB number (a URL's own /N would win over a db= argument)."""
    parts = urlsplit(redis_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{TALLY_DB}", parts.query, parts.fragment))


def worker_pythonpath() -> str:
    """Workers run in their own work dir: they find `tests.support.chaos_actions` through PYTHONPATH."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


# ---- a throwaway PostgreSQL ----------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        pytest.skip(f"no PostgreSQL {name} under /usr/lib/postgresql")
    return str(found[-1])


@dataclass
class ThrowawayPostgres:
    """A PostgreSQL cluster of our own (initdb + pg_ctl as the postgres user), trust auth."""

    base: Path
    port: int

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def pg_ctl(self, *args: str, timeout_s: float = 120.0) -> None:
        options = f"-p {self.port} -k {self.base / 'sock'} -c listen_addresses=127.0.0.1"
        command = [_pg_bin("pg_ctl"), "-D", str(self.data), "-w", "-t", "60", *args]
        if args[0] in ("start", "restart"):
            command += ["-o", options, "-l", str(self.base / "postgres.log")]
        done = subprocess.run(["runuser", "-u", "postgres", "--", *command], capture_output=True, text=True, timeout=timeout_s)
        assert done.returncode == 0, f"pg_ctl {' '.join(args)}: {done.stdout}{done.stderr}"

    def log(self) -> str:
        path = self.base / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    base = Path(tempfile.mkdtemp(prefix="rctxpg-"))
    (base / "sock").mkdir()
    for path in (base, base / "sock"):
        shutil.chown(path, "postgres", "postgres")
    pg = ThrowawayPostgres(base, free_port())
    try:
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", _pg_bin("initdb"), "-D", str(pg.data), "--auth=trust", "-U", "postgres", "--no-sync"],
            capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        pg.pg_ctl("start")
        yield pg
    finally:
        if (pg.data / "postmaster.pid").exists():
            subprocess.run(
                ["runuser", "-u", "postgres", "--", _pg_bin("pg_ctl"), "-D", str(pg.data), "-w", "-m", "immediate", "stop"],
                capture_output=True, timeout=60,
            )
        shutil.rmtree(base, ignore_errors=True)


# ---- 1. PostgreSQL restarted twice mid-run -------------------------------------------------------


def test_postgres_restarted_twice_mid_run_the_run_ends_as_without_faults(servers, tmp_path: Path) -> None:
    tally_url = tally_url_for(servers.redis_url)
    tally = redis.Redis.from_url(tally_url)
    with contextlib.ExitStack() as cleanup:
        pg = cleanup.enter_context(throwaway_postgres())
        upgrade(pg.url)
        cluster = Cluster(
            redis_url=servers.redis_url,
            database_url=pg.url,
            broker_url=celery_broker_url(servers.redis_url),
            prefix=new_prefix(),
            work_dir=tmp_path,
            extra_env={"RUNCTX_STALL_TIMEOUT_S": str(STALL_TIMEOUT_S), "PYTHONPATH": worker_pythonpath()},
        )
        # Runs last (LIFO): nodes stopped, Redis keys gone, before PostgreSQL stops.
        cleanup.callback(tally.close)
        cleanup.callback(delete_keys, servers.redis_url, cluster.prefix)
        cleanup.callback(cluster.stop)
        cluster.start_nodes("n1", "n2", concurrency=2)
        client = redis.Redis.from_url(cluster.redis_url)
        cleanup.callback(client.close)
        store = cluster.store()
        cleanup.callback(store.close)

        def routine_for(key: str) -> tuple[dict[str, Any], dict[str, Any], Path]:
            cleanup.callback(tally.delete, key)
            routine, expected = parallel_routine(
                "pg-restarts", 4, 75, tally_url=tally_url, tally_key=key, sleep_every=1, sleep_s=0.05
            )
            return routine, expected, write(tmp_path / f"{key.rsplit(':', 1)[-1]}.json", routine)

        # Fault-free reference on the same cluster.
        routine, expected, path = routine_for(f"{cluster.prefix}:ref")
        n_steps = len(action_steps(routine))
        ref_id, reference, ref_wall = timed_run(cluster, path)
        assert_exact(store, reference, routine, expected)
        ref_s = run_seconds(store, ref_id)

        # The same routine again; PostgreSQL stopped (fast) and started again twice while it runs.
        routine, expected, path = routine_for(f"{cluster.prefix}:run")
        started = time.monotonic()
        run_id = cluster.submit(path)
        restarts = []
        for _ in range(2):  # the first at 20 % of the steps, the second 20 % of the steps after the first
            due = (restarts[-1][1] if restarts else 0) + 0.2 * n_steps
            wait_for(lambda: steps_done(client, cluster.prefix, run_id) >= due, DEADLINE_S, f"{due:.0f} steps done", 0.05)
            before = steps_done(client, cluster.prefix, run_id)
            offsets = log_offsets(cluster)
            t0 = time.monotonic()
            pg.pg_ctl("stop", "-m", "fast")
            # Down until a write-behind has failed on it (one comes due at least every
            # max_delay = 2 s while steps commit), or 6 s at most; then up again.
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: re.search(FLUSH_FAILED, logs_since(cluster, offsets)), 6.0, "a failed write-behind", interval_s=0.1)
            pg.pg_ctl("start")
            restarts.append((before, steps_done(client, cluster.prefix, run_id), round(time.monotonic() - t0, 2)))
        result = cluster.wait(run_id, timeout_s=DEADLINE_S)
        wall = time.monotonic() - started

        counts = executions(tally, f"{cluster.prefix}:run")
        print(
            f"\n[pg restarts] steps={n_steps} run={run_seconds(store, run_id) if result['status'] == 'succeeded' else float('nan'):.2f}s "
            f"(wall {wall:.2f}s) fault-free={ref_s:.2f}s (wall {ref_wall:.2f}s) "
            f"restarts (steps done before/after, seconds down)={restarts} L3 failures logged={l3_failures(cluster)} (write-behinds {l3_failures(cluster, FLUSH_FAILED)}) "
            f"rewinds={rewinds_of(cluster, run_id)} executions={sum(counts.values())} "
            f"re-executed steps={ {k: v for k, v in counts.items() if v > 1} } "
            f"max attempts={max((s['attempts'] for s in result.get('steps', [])), default=0)} "
            f"kills=0 (PostgreSQL restarts: {len(restarts)})"
        )
        # Both restarts landed while the run was in flight, and the workers felt them.
        assert all(before < n_steps for before, _, _ in restarts), restarts
        assert l3_failures(cluster, FLUSH_FAILED) >= 1, "no write-behind ever met PostgreSQL down"
        assert result["status"] == "succeeded", f"{result}\n{cluster.logs()[-5000:]}"
        assert_exact(store, result, routine, expected)
        assert result["variables"] == reference["variables"]
        assert sorted(counts) == sorted(action_steps(routine)), "a step's action never ran"
        wait_no_pending_flush(store, 30)


# ---- 2. 50 SIGKILLs during a parallel run ----------------------------------------------------------


def live_pool_pids(cluster: Cluster, short: str) -> list[int]:
    """A node's pool processes that are alive (a killed one stays a zombie, still its child, until reaped)."""
    alive = []
    for pid in cluster.pool_pids(short):
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
    return alive


def restart_node(cluster: Cluster, short: str, concurrency: int) -> None:
    """SIGKILL a node, start it again and wait until it (and each of its pool processes) is ready."""
    log = cluster.log_path(short)
    offset = log.stat().st_size if log.exists() else 0
    cluster.kill_node(short)
    cluster.start_node(short, concurrency=concurrency)

    def ready() -> bool:
        if cluster.nodes[short].poll() is not None:
            raise RuntimeError(f"node {short} exited after its restart:\n{cluster.logs(short)[-3000:]}")
        with open(log, "rb") as f:
            f.seek(offset)
            return b"ready." in f.read() and len(cluster.pool_pids(short)) == concurrency

    # wait_ready alone would see the 'ready.' of the node's first life
    wait_for(ready, 120, f"node {short} ready after its restart", 0.05)
    cluster.wait_ready(short, timeout_s=120)


def test_fifty_sigkills_during_a_parallel_run_every_step_applies_once(make_cluster, tmp_path: Path) -> None:
    concurrency, total_kills = 2, 50
    cluster = make_cluster(
        "redis",
        RUNCTX_STALL_TIMEOUT_S=str(STALL_TIMEOUT_S),
        RUNCTX_STEP_MAX_ATTEMPTS="50",
        PYTHONPATH=worker_pythonpath(),
    )
    assert "RUNCTX_VISIBILITY_TIMEOUT_S" not in cluster.env  # the broker's default (600 s): no help from it
    cluster.start_nodes("n1", "n2", concurrency=concurrency)
    tally_url = tally_url_for(cluster.redis_url)
    tally = redis.Redis.from_url(tally_url)
    store = cluster.store()
    keys = [f"{cluster.prefix}:ref", f"{cluster.prefix}:chaos"]
    stop = threading.Event()  # ends the chaos
    try:

        def routine_for(key: str) -> tuple[dict[str, Any], dict[str, Any], Path]:
            routine, expected = parallel_routine(
                "chaos", 20, 30, tally_url=tally_url, tally_key=key, sleep_every=2, sleep_s=0.02
            )
            return routine, expected, write(tmp_path / f"{key.rsplit(':', 1)[-1]}.json", routine)

        # Fault-free run of the same routine on the same cluster.
        routine, expected, path = routine_for(keys[0])
        n_steps = len(action_steps(routine))
        ref_id, reference, ref_wall = timed_run(cluster, path)
        assert_exact(store, reference, routine, expected)
        fault_free = run_seconds(store, ref_id)
        assert sum(executions(tally, keys[0]).values()) == n_steps

        # Again, under chaos: a kill every fault_free / 50 s on average (the node restarts add their time).
        routine, expected, path = routine_for(keys[1])
        seed = int(os.environ.get("RUNCTX_CHAOS_SEED") or time.time_ns() % 10**9)
        rng = random.Random(seed)
        kills: list[tuple[str, str]] = []
        restart_times: list[float] = []
        errors: list[BaseException] = []

        def restart(short: str) -> None:
            try:
                t0 = time.monotonic()
                restart_node(cluster, short, concurrency)
                restart_times.append(time.monotonic() - t0)
            except BaseException as exc:  # reported by the test, not lost in the thread
                errors.append(exc)

        def chaos() -> None:
            """Kill at random moments; a node restart goes on in its own thread (one at a time)
            while the kills go on among the other node's pool processes."""
            restarting: tuple[str, threading.Thread] | None = None
            try:
                while len(kills) < total_kills and not stop.wait(rng.uniform(0, 2 * fault_free / total_kills)):
                    if restarting is not None and not restarting[1].is_alive():
                        restarting = None
                    if (len(kills) + 1) % 10 == 0:
                        if restarting is not None:
                            continue  # the previous node restart is not over yet
                        short = rng.choice(sorted(cluster.nodes))
                        restarting = (short, threading.Thread(target=restart, args=(short,), daemon=True))
                        restarting[1].start()
                        kills.append(("node", short))
                        continue
                    short = rng.choice(sorted(set(cluster.nodes) - {restarting[0] if restarting else ""}))
                    pids = live_pool_pids(cluster, short)
                    if not pids:
                        continue
                    try:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    kills.append(("child", short))
                if restarting is not None:
                    restarting[1].join(180)
            except BaseException as exc:  # reported by the test, not lost in the thread
                errors.append(exc)

        offsets = log_offsets(cluster)
        started = time.monotonic()
        run_id = cluster.submit(path)
        chaos_thread = threading.Thread(target=chaos, name="chaos", daemon=True)
        chaos_thread.start()
        try:
            result = cluster.wait(run_id, timeout_s=DEADLINE_S)
        finally:
            stop.set()
            chaos_thread.join(180)
        wall = time.monotonic() - started
        assert not errors, errors

        counts = executions(tally, keys[1])
        rewinds = rewinds_of(cluster, run_id)
        # Kills that caught a pool process running a task (Celery requeues it at once).
        interrupted = len(re.findall(r"Task handler raised error: WorkerLostError", logs_since(cluster, offsets)))
        restart_total = sum(restart_times)
        run_s = run_seconds(store, run_id) if result["status"] == "succeeded" else float("nan")
        # The bound: fault-free time + 5 stall timeouts + the time the node restarts took.
        # - A node kill strands the steps its node held (the Redis transport would give them back
        #   only after 600 s); the watchdog resumes them once the whole run has stood still for a
        #   stall timeout (a run still stuck after a resume waits 2x, and a killed watchdog holder
        #   costs a lease handover of 3 x 0.75 s < one stall timeout). 5 node kills, at worst one
        #   stall each; in practice one or two rewinds pick up all stranded branches at once.
        # - While a node restarts (kill -> ready) it serves no step and its start takes CPU of this
        #   2-core machine from the surviving node: at most that time lost.
        # - A pool-child kill costs one step re-run (ms) and a pool process respawn; no term of its
        #   own: the two above are worst cases that the measured runs stay well inside of.
        bound = fault_free + 5 * STALL_TIMEOUT_S + restart_total
        print(
            f"\n[chaos] seed={seed} steps={n_steps} run={run_s:.2f}s (wall {wall:.2f}s) fault-free={fault_free:.2f}s (wall {ref_wall:.2f}s) "
            f"kills={len(kills)} (pool children {sum(k == 'child' for k, _ in kills)}, nodes {sum(k == 'node' for k, _ in kills)}) "
            f"tasks interrupted by child kills={interrupted} node restarts={[round(t, 2) for t in restart_times]} total {restart_total:.2f}s "
            f"stall timeout={STALL_TIMEOUT_S}s bound={bound:.2f}s rewinds={rewinds} "
            f"executions={sum(counts.values())} (re-executed steps {sum(v > 1 for v in counts.values())}, "
            f"extra executions {sum(counts.values()) - len(counts)}) "
            f"max attempts={max((s['attempts'] for s in result.get('steps', [])), default=0)}"
        )
        assert result["status"] == "succeeded", f"{result.get('error')}\n{cluster.logs()[-5000:]}"
        assert_exact(store, result, routine, expected)
        assert sorted(counts) == sorted(action_steps(routine))
        assert len(kills) >= 10, f"only {len(kills)} kills landed during the run"
        assert run_s <= bound, f"run took {run_s:.2f}s, bound {bound:.2f}s"
    finally:
        stop.set()
        for key in keys:
            tally.delete(key)
        tally.close()
        store.close()
