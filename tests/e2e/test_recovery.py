"""Recovery: a run survives the loss or corruption of anything in Redis, rebuilt from what PostgreSQL holds.

Real Redis, PostgreSQL and prefork worker nodes (two nodes of two processes). A run of 241
increment / tick / append / short-sleep steps meets a fault mid-run and must still end with every
step applied exactly once: the counter and the ordered log exactly as without the fault.

1. L2's Redis database wiped (FLUSHDB) twice while the broker, on another database, keeps its messages.
2. Redis (L2 and broker) killed and started again empty, nobody resubmitting: the watchdog resumes
   the run and `runctx wait`, started before the kill, returns it succeeded; every worker node,
   the one running a step included, reconnects (`workers/kombu_redis_fix.py`).
3. Every Redis value of the run corrupted twice: values of another type, and garbage of the same
   type landing mid-step. (In-process on the real tiers, a step message from before a rewind and
   garbage in L2 met where no checksum is read first: tests/tasks/test_recovery_real_tiers.py.)
4. Malformed NOTIFY payloads, whatever they make the parser do, cost nothing: the next change
   behind them reaches every process.
5. Values PostgreSQL would refuse are refused at submit, leaving nothing stored.

The fault tests run on a redis-server of their own (no persistence), so a wipe or a kill touches
nothing but the cluster under test; the ticks' outside effect (`tests.support.fault_actions:tick`, one
HINCRBY per execution) lives on the shared test Redis, which no fault touches: it tells how many
step executions a fault cost. Run with `pytest -s` to see the measured figures.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg.types.json import Jsonb

from state.change_events import ChangeEvent, ChangeListener, libpq_url
from state.keys import RedisKeys
from state.limits import canonical_json
from state.schema import CHANGE_CHANNEL
from tests.support.cluster import HERE, Cluster
from tests.support.redis_server import RedisServer
from tests.support.servers import Servers
from tests.support.waiting import wait_for
from workers.control import TRACE_PREFIX, probe

STALL_S = 3  # RUNCTX_STALL_TIMEOUT_S of the fault tests' clusters
DEADLINE_S = 120.0  # generous: other heavy tests may share this machine


def fault_env() -> dict[str, str]:
    """Workers resume stalled runs after STALL_S and can import tests.support.fault_actions."""
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return {"RUNCTX_STALL_TIMEOUT_S": str(STALL_S), "PYTHONPATH": path}


# ---- the routine and its outside effect ---------------------------------------------------------------


@dataclass
class Effects:
    """The steps' outside effect: HINCRBY key step 1 per execution, on a Redis no fault touches."""

    url: str
    key: str

    def counts(self) -> dict[str, int]:
        client = redis.Redis.from_url(self.url)
        try:
            return {step.decode(): int(count) for step, count in client.hgetall(self.key).items()}
        finally:
            client.close()

    def total(self) -> int:
        return sum(self.counts().values())

    def clear(self) -> None:
        client = redis.Redis.from_url(self.url)
        try:
            client.delete(self.key)
        finally:
            client.close()


@pytest.fixture
def effects(servers: Servers) -> Iterator[Effects]:
    found = Effects(servers.redis_url, f"rctxtest:effects:{uuid.uuid4().hex[:12]}")
    yield found
    found.clear()


@dataclass
class LongRun:
    path: Path
    routine: dict[str, Any]
    expected: dict[str, Any]
    ticks: list[str]  # the steps with an outside effect
    by_reference: dict[str, str] = field(default_factory=dict)  # untouched values large enough to be stored by reference

    def shows(self, variables: dict[str, Any]) -> bool:
        """Whether a run's variables (as the API shows them) are the expected ones: a value stored by
        reference shows as its reference, of the value's size."""
        held = {name: variables.get(name) for name in self.by_reference}
        sizes_right = all(isinstance(ref, dict) and ref.get("size") == len(value) + 2 for (name, value), ref in zip(self.by_reference.items(), held.values()))
        return sizes_right and {k: v for k, v in variables.items() if k not in self.by_reference} == self.expected

    @property
    def step_ids(self) -> list[str]:
        return [step["id"] for step in self.routine["steps"]]


def long_run(
    directory: Path, effects: Effects, groups: int = 60, sleep_s: float = 0.01, slow_tick: tuple[int, float] | None = None
) -> LongRun:
    """``groups`` x (increment, tick, append, short sleep), then a copy of the counter: 4 * groups + 1 steps.

    A tick is the user action counting its executions outside runctx and appending to ``log``;
    ``slow_tick`` (group, seconds) makes one tick take that long (a fault can land while it runs).
    """
    steps: list[dict[str, Any]] = []
    counter, log, ticks = 0, [], []
    for group in range(1, groups + 1):
        inc, tick, app, nap = (f"g{group:03d}{kind}" for kind in "itas")
        steps.append({"id": inc, "action": "increment", "args": {"name": "counter", "by": group}})
        steps.append(
            {
                "id": tick, "action": "tests.support.fault_actions:tick",
                "args": {"effects_url": effects.url, "effects_key": effects.key, "step": tick, "value": tick}
                | ({"sleep": slow_tick[1]} if slow_tick and slow_tick[0] == group else {}),
            }
        )
        steps.append({"id": app, "action": "append", "args": {"name": "log", "value": app}})
        steps.append({"id": nap, "action": "sleep", "args": {"seconds": sleep_s}})
        counter += group
        log += [tick, app]
        ticks.append(tick)
    steps.append({"id": "total", "action": "copy", "args": {"from": "counter", "to": "total"}})
    # Large values no step touches: one kept beside the L2 payload (over 16 KiB), one stored by reference (over 256 KiB).
    notes, document = "n" * 40_000, "".join(f"{n:08d}" for n in range(40_000))
    routine = {"name": "recovery", "variables": {"counter": 0, "log": [], "notes": notes, "document": document}, "steps": steps}
    path = directory / "recovery.json"
    path.write_text(json.dumps(routine))
    return LongRun(path, routine, {"counter": counter, "log": log, "total": counter, "notes": notes}, ticks, {"document": document})


# ---- watching and measuring ---------------------------------------------------------------------------


def assert_applied_once(cluster: Cluster, run_id: str, run: LongRun) -> dict[str, Any]:
    """L3's final context holds each step once (one version per step) and exactly the expected variables."""
    store = cluster.store()
    try:
        final = store.l3.get_context(run_id)
        row = store.ledger.get_run(run_id)
    finally:
        store.close()
    applied = Counter(final.applied_steps)
    assert set(applied) == set(run.step_ids), set(run.step_ids) ^ set(applied)
    assert set(applied.values()) == {1}, {step: n for step, n in applied.items() if n != 1}
    assert final.version == 1 + len(run.step_ids)
    assert run.shows(final.variables)
    store = cluster.store()
    try:
        assert all(store.blobs.open(final.variables[name]) == value for name, value in run.by_reference.items())
    finally:
        store.close()
    assert row is not None and row.status == "succeeded"
    return {"epoch": row.epoch, "version": final.version}


_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}):")


def log_lines(cluster: Cluster, needle: str, short: str | None = None) -> list[tuple[float | None, str]]:
    """The worker log lines (of every node, or of ``short``) holding ``needle``, with their time
    (epoch seconds) where it can be read."""
    found = []
    for line in cluster.logs(short).splitlines():
        if needle in line:
            match = _LOG_TIME.match(line)
            at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if match else None
            found.append((at, line))
    return found


def step_task_runs(cluster: Cluster) -> int:
    """How many step task executions the nodes logged (Celery logs each one's end: succeeded, raised or retry)."""
    return sum(1 for line in cluster.logs().splitlines() if re.search(r"Task recovery: \S+\[[0-9a-f-]+\] (succeeded|raised|retry)", line))


def report(name: str, cluster: Cluster, run: LongRun, effects: Effects, elapsed_s: float, faults: list[float], epoch: int) -> dict[str, Any]:
    """Print (pytest -s) what the fault cost: run time, time from each fault to the next rewind, re-executions."""
    counts = effects.counts()
    rewinds = [at for at, _ in log_lines(cluster, "rewound to epoch") if at is not None]
    resumed_after = []
    for fault in faults:
        later = [at - fault for at in rewinds if at >= fault - 0.01]
        resumed_after.append(round(min(later), 2) if later else None)
    figures = {
        "steps": len(run.step_ids),
        "run_s": round(elapsed_s, 2),
        "final_epoch": epoch,
        "rewinds_logged": len(rewinds),
        "fault_to_rewind_s": resumed_after,
        "tick_steps": len(run.ticks),
        "tick_executions": sum(counts.values()),
        "ticks_re_executed": sum(n - 1 for n in counts.values() if n > 1),
        "step_tasks_run": step_task_runs(cluster),
        "stale_refused": len(log_lines(cluster, " refused: ")),
        "watchdog_resumes": len(log_lines(cluster, "resuming it from what the tiers hold")),  # a stall or Redis gone back
    }
    print(f"\n[{name}] " + ", ".join(f"{key}={value}" for key, value in figures.items()))
    return figures


# ---- 1. L2 wiped twice ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_l2_wiped_twice_mid_run_the_run_ends_exactly_once(effects: Effects, own_redis: RedisServer, cluster_on, tmp_path: Path) -> None:
    run = long_run(tmp_path, effects)
    # L2 on database 0, the broker on database 1 of the same server: FLUSHDB of 0 spares the queue.
    cluster = cluster_on(own_redis.url(0), own_redis.url(1), **fault_env())
    cluster.start_nodes("n1", "n2", concurrency=2)
    l2 = redis.Redis.from_url(own_redis.url(0))
    broker = redis.Redis.from_url(own_redis.url(1))
    try:
        started = time.time()
        run_id = cluster.submit(run.path)
        wipes = []
        for third in (1, 2):
            wait_for(lambda: effects.total() >= third * len(run.ticks) // 3, DEADLINE_S, f"{third}/3 of the ticks")
            assert l2.exists(RedisKeys(cluster.prefix).context(run_id)), "L2 does not hold the run's context"
            l2.flushdb()
            wipes.append(time.time())
            assert broker.dbsize() > 0  # the broker's database was spared
        result = cluster.wait(run_id, timeout_s=DEADLINE_S)
        elapsed = time.time() - started
        assert result["status"] == "succeeded", result
        assert run.shows(result["variables"]), result["variables"]
        final = assert_applied_once(cluster, run_id, run)
        figures = report("L2 wiped twice", cluster, run, effects, elapsed, wipes, final["epoch"])
        assert set(effects.counts()) == set(run.ticks)  # every tick ran (at least once)
        assert final["epoch"] >= 2 and figures["rewinds_logged"] >= 1, "the wipes were never noticed"
        assert_history_tells_the_rewinds(cluster, run_id, result["variables"])
    finally:
        l2.close()
        broker.close()


def assert_history_tells_the_rewinds(cluster: Cluster, run_id: str, variables: dict) -> None:
    """The run's history names each rewind, and replaying it to the root's last commit gives the
    variables the run ended with (the steps a rewind ran again are there once per epoch)."""
    history = json.loads(cluster.runctx("history", run_id, "--json").stdout)
    assert any(e["status"] == "rewound" for e in history["entries"]), "no rewind in the history"
    last = max((e for e in history["entries"] if e["context"] == "" and e["kind"] == "step"), key=lambda e: (e["epoch"], e["version"]))
    at = json.loads(cluster.runctx("context", run_id, "--at", last["step_id"], "--json").stdout)
    assert at["variables"] == variables


# ---- 2. Redis killed and started again empty --------------------------------------------------------------


def _restart_empty(server: RedisServer, down_s: float = 0.5) -> tuple[float, float]:
    """SIGKILL the redis-server, leave it down a moment (every connection notices), start it empty."""
    server.kill()
    killed = time.time()
    time.sleep(down_s)  # the point: Redis stays down this long in real time (every connection notices)
    server.start()  # the same port, no data
    return killed, time.time()


def _connected_after(cluster: Cluster, short: str, at: float) -> bool:
    """The node's consumer logged 'Connected to redis://' after ``at`` (a broker reconnect)."""
    return any(when and when > at for when, _ in log_lines(cluster, "Connected to redis://", short))


@pytest.mark.slow
def test_redis_killed_and_restarted_empty_the_run_resumes_by_itself(effects: Effects, own_redis: RedisServer, cluster_on, tmp_path: Path) -> None:
    # The kill lands while tick g020t runs (2 s): what the run committed since L3's last write is lost.
    run = long_run(tmp_path, effects, slow_tick=(20, 2.0))
    # L2 and the broker on one Redis, as by default: the kill loses the queue, L2 and every run record.
    cluster = cluster_on(own_redis.url(0), own_redis.url(0), **fault_env())
    cluster.start_nodes("n1", "n2", concurrency=2)
    started = time.time()
    run_id = cluster.submit(run.path)
    # A waiter from before the kill: it must ride out the restart (falling back to L3) and return.
    waiter = subprocess.Popen(
        [sys.executable, "-m", "runctx.cli", "wait", run_id, "--json", "--timeout", str(DEADLINE_S)],
        env=cluster.env, cwd=cluster.work_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: "g020t" in effects.counts(), DEADLINE_S, "tick g020t to start")
        # Once the write-behind of g020t's base has run, g020t's is the only task in flight: one node
        # holds an unacknowledged message, the other none (see workers/kombu_redis_fix.py for why that matters).
        l2 = redis.Redis.from_url(own_redis.url(0))
        try:
            wait_for(lambda: l2.zscore(RedisKeys(cluster.prefix).write_behind_due(run_id), run_id) is None, 10, "the write-behind of g020t's base")
            # ... and its task acknowledged: g020t's message is the only one a node still holds (kombu's
            # Redis transport keeps each unacknowledged message in the hash "unacked").
            wait_for(lambda: l2.hlen("unacked") == 1, 10, lambda: f"one unacknowledged message, not {l2.hlen('unacked')}")
        finally:
            l2.close()
        # Down longer than g020t has left to run: its commit fails too, its message is lost with the
        # queue, and nothing is in flight any more: only the watchdog can resume the run.
        killed, restarted = _restart_empty(own_redis, down_s=4.0)
        out, err = waiter.communicate(timeout=DEADLINE_S + 30)
        elapsed = time.time() - started
        assert waiter.returncode == 0, f"runctx wait exited {waiter.returncode}:\n{out}\n{err}\n{cluster.logs()[-4000:]}"
        assert "Traceback" not in err, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["status"] == "succeeded", result
        assert run.shows(result["variables"]), result["variables"]
        final = assert_applied_once(cluster, run_id, run)
        figures = report("Redis killed, restarted empty", cluster, run, effects, elapsed, [restarted], final["epoch"])
        alive = {short: process.poll() is None for short, process in cluster.nodes.items()}
        reconnected = {short: _connected_after(cluster, short, restarted) for short in cluster.nodes}
        print(
            f"[Redis killed, restarted empty] down_s={restarted - killed:.2f}, done_after_restart_s={time.time() - restarted:.2f}, "
            f"nodes_alive={alive}, nodes_reconnected={reconnected}, "
            f"unrecoverable_errors={len(log_lines(cluster, 'Unrecoverable error'))}"
        )
        assert set(effects.counts()) == set(run.ticks)
        assert final["epoch"] >= 2 and figures["rewinds_logged"] >= 1
        assert figures["watchdog_resumes"] >= 1, "the run was not resumed by the watchdog"
        assert any(reconnected.values()), "no worker node reconnected to the broker"
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()


@pytest.mark.slow
def test_every_node_consumes_again_after_redis_restarts_mid_step(effects: Effects, own_redis: RedisServer, cluster_on, tmp_path: Path) -> None:
    """A node runs a 3 s step when Redis dies and comes back empty: every node must reconnect and go on."""
    slow = {
        "id": "slow", "action": "tests.support.fault_actions:tick",
        "args": {"effects_url": effects.url, "effects_key": effects.key, "step": "slow", "value": "slow", "sleep": 3.0},
    }
    after = [{"id": f"a{n}", "action": "increment", "args": {"name": "counter", "by": 1}} for n in range(8)]
    routine = {"name": "busy", "variables": {"counter": 0, "log": []}, "steps": [slow, *after]}
    path = tmp_path / "busy.json"
    path.write_text(json.dumps(routine))
    cluster = cluster_on(own_redis.url(0), own_redis.url(0), **fault_env())
    cluster.start_nodes("n1", "n2", concurrency=2)
    run_id = cluster.submit(path)
    wait_for(lambda: effects.total() >= 1, DEADLINE_S, "the slow step to run")
    killed, restarted = _restart_empty(own_redis)
    try:
        # Every node reconnects, or one has exited (then waiting longer is pointless).
        wait_for(
            lambda: any(process.poll() is not None for process in cluster.nodes.values())
            or all(_connected_after(cluster, short, restarted) for short in cluster.nodes),
            30, "every node to reconnect to the broker",
        )
        assert all(process.poll() is None for process in cluster.nodes.values()), "a worker node died"
        result = cluster.wait(run_id, timeout_s=DEADLINE_S)
        assert result["status"] == "succeeded", result
        assert result["variables"] == {"counter": 8, "log": ["slow"]}
        assert all(process.poll() is None for process in cluster.nodes.values())
    finally:
        alive = {short: process.poll() is None for short, process in cluster.nodes.items()}
        print(
            f"\n[Redis restarted mid-step] nodes_alive={alive}, "
            f"unrecoverable_errors={[line[:160] for _, line in log_lines(cluster, 'Unrecoverable error')]}"
        )


# ---- 3. every Redis value of the run corrupted twice --------------------------------------------------------


def _epoch(cluster: Cluster, run_id: str) -> int:
    store = cluster.store()
    try:
        row = store.ledger.get_run(run_id)
    finally:
        store.close()
    return row.epoch if row is not None else 0


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["restarted empty", "restarted from an older snapshot"])
def test_redis_that_went_back_is_noticed_in_seconds_with_the_default_stall_timeout(
    effects: Effects, own_redis: RedisServer, cluster_on, tmp_path: Path, fault: str
) -> None:
    """With the default RUNCTX_STALL_TIMEOUT_S (60 s), a Redis that lost its data, or came back
    from an older snapshot (a failover to a lagging replica), has its running run resumed within
    10 s of answering again: the processes' heartbeat count went back."""
    run = long_run(tmp_path, effects, groups=120, sleep_s=0.05)  # ~8 s
    env = {key: value for key, value in fault_env().items() if key != "RUNCTX_STALL_TIMEOUT_S"}
    cluster = cluster_on(own_redis.url(0), own_redis.url(0), **env)
    cluster.start_nodes("n1", "n2", concurrency=2)
    run_id = cluster.submit(run.path)
    l2 = redis.Redis.from_url(own_redis.url(0))
    try:
        wait_for(lambda: "g010t" in effects.counts(), DEADLINE_S, "tick g010t")
        if fault == "restarted from an older snapshot":
            l2.save()  # the snapshot the restart comes back to ...
            time.sleep(2.5)  # ... 2.5 s of the run old (the fault itself, not a wait for something)
            assert "g120t" not in effects.counts(), "the run ended before the fault"
        else:
            wait_for(lambda: "g020t" in effects.counts(), DEADLINE_S, "tick g020t")
    finally:
        l2.close()
    killed, restarted = _restart_empty(own_redis, down_s=1.0)  # (an older dump.rdb, if saved, is loaded)
    resumed_at = wait_for(lambda: time.time() if _epoch(cluster, run_id) >= 2 else None, DEADLINE_S, "the run to be resumed", interval_s=0.25)
    result = cluster.wait(run_id, timeout_s=DEADLINE_S)
    assert result["status"] == "succeeded", result
    final = assert_applied_once(cluster, run_id, run)
    print(f"[Redis {fault}, default stall timeout] resumed {resumed_at - restarted:.1f} s after Redis answered again (epoch {final['epoch']})")
    assert resumed_at - restarted < 10.0
    assert set(effects.counts()) == set(run.ticks)


def corrupt_run_keys(client: redis.Redis, prefix: str, run_id: str, *, other_type: bool) -> Counter:
    """Overwrite every key whose name holds the run id: garbage of the same type, or of another type."""
    corrupted: Counter = Counter()
    for key in client.scan_iter(match=f"{prefix}:*{run_id}*", count=1000):
        kind = client.type(key).decode()
        if kind == "none":  # gone meanwhile
            continue
        if other_type:
            with client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                if kind == "string":
                    pipe.hset(key, "garbage", b"garbage")
                else:
                    pipe.set(key, b"garbage")
                pipe.execute()
        elif kind == "hash":
            fields = client.hkeys(key)
            if fields:
                client.hset(key, mapping={field: b"garbage" for field in fields})
        elif kind == "string":
            client.set(key, b"garbage", keepttl=True)
        elif kind == "list":
            for index in range(client.llen(key)):
                client.lset(key, index, b"garbage")
        elif kind == "set":
            with client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.sadd(key, b"garbage")
                pipe.execute()
        elif kind == "zset":
            client.zadd(key, {member: 0 for member in client.zrange(key, 0, -1)})
        corrupted[f"{kind}->{'other' if other_type else kind}"] += 1
    return corrupted


def _run_status(cluster: Cluster, run_id: str) -> str | None:
    with psycopg.connect(libpq_url(cluster.database_url)) as conn:
        row = conn.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,)).fetchone()
    return row[0] if row else None


def _corrupted_run(
    effects: Effects, own_redis: RedisServer, cluster_on, tmp_path: Path, label: str, *, first_mid_step: bool, first_other_type: bool
) -> None:
    """A long run whose Redis values are corrupted twice: first at a third of the run (or, with
    ``first_mid_step``, while tick g005t sleeps between reading its context and committing), then
    at two thirds with values of another type. It must end succeeded, exactly once, no task dead.

    g005t comes early on purpose: the garbled progress record must not make the watchdog resume the
    run (which it does once a run older than the stall timeout shows no progress) before g005t commits."""
    run = long_run(tmp_path, effects, slow_tick=(5, 3.0) if first_mid_step else None)
    cluster = cluster_on(own_redis.url(0), own_redis.url(1), **fault_env())
    cluster.start_nodes("n1", "n2", concurrency=2)
    l2 = redis.Redis.from_url(own_redis.url(0))
    corruptions: list[float] = []
    kinds: list[dict[str, int]] = []
    run_id = ""
    try:
        started = time.time()
        run_id = cluster.submit(run.path)
        if first_mid_step:
            wait_for(lambda: "g005t" in effects.counts(), DEADLINE_S, "tick g005t to start")
            # Its predecessor's write-behind done, nothing reads the context until g005t commits.
            wait_for(lambda: l2.zscore(RedisKeys(cluster.prefix).write_behind_due(run_id), run_id) is None, 10, "the write-behind of g005t's base")
        else:
            wait_for(lambda: effects.total() >= len(run.ticks) // 3, DEADLINE_S, "a third of the ticks")
        kinds.append(dict(corrupt_run_keys(l2, cluster.prefix, run_id, other_type=first_other_type)))
        corruptions.append(time.time())
        assert "hash->" + ("other" if first_other_type else "hash") in kinds[0], kinds  # the context was hit
        wait_for(
            lambda: effects.total() >= 2 * len(run.ticks) // 3 or _run_status(cluster, run_id) != "running",
            DEADLINE_S, "two thirds of the ticks",
        )
        if _run_status(cluster, run_id) == "running":
            kinds.append(dict(corrupt_run_keys(l2, cluster.prefix, run_id, other_type=True)))
            corruptions.append(time.time())
        result = cluster.wait(run_id, timeout_s=DEADLINE_S)
        elapsed = time.time() - started
        assert result["status"] == "succeeded", result
        assert run.shows(result["variables"]), result["variables"]
        final = assert_applied_once(cluster, run_id, run)
        figures = report(label, cluster, run, effects, elapsed, corruptions, final["epoch"])
        assert set(effects.counts()) == set(run.ticks)
        assert final["epoch"] >= 2 and figures["rewinds_logged"] >= 1
    finally:
        died = [line[:300] for _, line in log_lines(cluster, "raised unexpected")]
        print(f"\n[{label}] keys corrupted: {kinds}; status: {run_id and _run_status(cluster, run_id)}; tasks died: {died}")
        l2.close()
    # No task died of the garbage (finalize included): each was a corruption healed, a retry or a rewind.
    assert not died, died


@pytest.mark.slow
def test_every_redis_value_of_the_run_replaced_by_another_type_twice_the_run_ends_exactly_once(
    effects: Effects, own_redis: RedisServer, cluster_on, tmp_path: Path
) -> None:
    _corrupted_run(effects, own_redis, cluster_on, tmp_path, "values replaced by another type twice", first_mid_step=False, first_other_type=True)


@pytest.mark.slow
def test_every_redis_value_of_the_run_garbled_mid_step_then_replaced_by_another_type(
    effects: Effects, own_redis: RedisServer, cluster_on, tmp_path: Path
) -> None:
    _corrupted_run(effects, own_redis, cluster_on, tmp_path, "values garbled mid-step, then another type", first_mid_step=True, first_other_type=False)


# ---- 4. malformed NOTIFY payloads, then a plain-SQL change ---------------------------------------------------

PROCESSES = 4
DROP_DEADLINE_S = 1.0

# Payloads the parser refuses as "not a change event".
REFUSED_PAYLOADS = [
    "null", "", "garbage", "[]", "{}", '"a string"', "42", '{"table": null}',
    '{"table": "configurations", "op": "UPDATE", "ident": ["only-one-part"]}',
    '{"table": "no_such_table", "op": "UPDATE", "ident": ["x"]}',
    '{"table": "routines", "op": "UPDATE", "ident": 7}',
    '{"table": "routines", "op": "UPDATE", "ident": ["x"], "version": "not a number"}',
]
# Payloads that make the parser itself raise something other than ValueError.
HOSTILE_PAYLOADS = [
    '{"table": ["routines"], "op": "UPDATE", "ident": ["x"]}',  # an unhashable table name
    '{"table": "routines", "op": "UPDATE", "ident": ["x"], "version": 1e999}',  # int(inf)
    "[" * 7000,  # nests deeper than the JSON decoder's recursion limit
]


def _digest(cluster: Any, data: Any) -> str:
    return cluster.keyring().mac(canonical_json(data).encode())  # what the probe answers: a keyed digest


def _notify_garbage(database_url: str, payloads: list[str]) -> None:
    """Send each payload on the change channel from a plain psycopg connection, one transaction each."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute(f"NOTIFY {CHANGE_CHANNEL}, 'null'")
        for payload in payloads:
            conn.execute("SELECT pg_notify(%s, %s)", (CHANGE_CHANNEL, payload))


def _garbage_then_traced_change(cluster: Cluster, payloads: list[str], label: str, *, same_transaction: bool = False) -> None:
    """Every process serves a traced configuration; garbage NOTIFYs; then a plain-SQL UPDATE of it:
    every process must drop the old one within DROP_DEADLINE_S and serve the new one.

    ``same_transaction``: the garbage is sent in the UPDATE's transaction, just before it, so the
    listeners receive both together, the garbage first (no timing can separate them)."""
    cluster.start_nodes("n1", "n2", concurrency=2)
    kind, name = TRACE_PREFIX.split(":")[1], f"after-garbage-{uuid.uuid4().hex[:6]}"
    key = f"{TRACE_PREFIX}{name}"
    store = cluster.store()
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        version = store.configs.put_config(kind, name, {"v": 1})
        answers = probe(client, cluster.prefix, key, load=True, wait_s=2.0)
        assert len(answers) == PROCESSES and {a["digest"] for a in answers.values()} == {_digest(cluster, {"v": 1})}, answers

        if not same_transaction:
            _notify_garbage(cluster.database_url, payloads)
        with psycopg.connect(libpq_url(cluster.database_url)) as conn:
            for payload in payloads if same_transaction else []:
                conn.execute("SELECT pg_notify(%s, %s)", (CHANGE_CHANNEL, payload))
            conn.execute("UPDATE configurations SET data = %s WHERE kind = %s AND name = %s", (Jsonb({"v": 2}), kind, name))
            txid = conn.execute("SELECT txid_current()").fetchone()[0]
            conn.commit()
        committed_at = time.time()
        trace = f"{cluster.prefix}:trace:{txid}:UPDATE:{key}:{version + 1}"
        wait_for(
            lambda: client.hlen(trace) >= PROCESSES, 5.0,
            lambda: f"every process to drop the old configuration; these did: {[i.decode() for i in client.hkeys(trace)]} of {sorted(answers)}",
        )
        dropped = {identity.decode(): round(float(at) - committed_at, 3) for identity, at in client.hgetall(trace).items()}
        served = probe(client, cluster.prefix, key, load=True, wait_s=2.0)
        print(
            f"\n[{label}] drop latency per process (s): {dropped or 'none dropped it'}; "
            f"serving now: {sorted({a['digest'] == _digest(cluster, {'v': 2}) and 'new' or 'OLD' for a in served.values()})}; "
            f"'ignoring malformed' lines: {len(log_lines(cluster, 'ignoring malformed change event'))}, "
            f"listener reconnects: {len(log_lines(cluster, 'change listener lost its connection'))}"
        )
        assert set(dropped) == set(answers), f"processes that never dropped the old configuration: {set(answers) - set(dropped)}"
        late = {identity: at for identity, at in dropped.items() if at > DROP_DEADLINE_S}
        assert not late, f"dropped more than {DROP_DEADLINE_S}s after the commit: {late}"
        assert len(served) == PROCESSES and {a["digest"] for a in served.values()} == {_digest(cluster, {"v": 2})}, served
        assert all(process.poll() is None for process in cluster.nodes.values())
    finally:
        client.close()
        store.close()


@pytest.mark.slow
def test_malformed_notify_payloads_are_ignored_and_the_next_change_reaches_every_process(make_cluster) -> None:
    cluster = make_cluster("redis")
    _garbage_then_traced_change(cluster, REFUSED_PAYLOADS, "malformed NOTIFY")
    assert len(log_lines(cluster, "ignoring malformed change event")) >= PROCESSES * len(REFUSED_PAYLOADS)




@pytest.mark.slow
def test_hostile_notify_payloads_do_not_cost_the_next_change(make_cluster) -> None:
    cluster = make_cluster("redis")
    _garbage_then_traced_change(cluster, HOSTILE_PAYLOADS[:1], "hostile NOTIFY", same_transaction=True)


@pytest.mark.parametrize(
    "payload",
    ["null", "{}"] + [pytest.param(payload, id=f"hostile{n}") for n, payload in enumerate(HOSTILE_PAYLOADS)],
)
def test_the_change_listener_delivers_the_change_behind_any_payload(database_url: str, payload: str) -> None:
    """One listener (no workers): a payload, then in the same transaction a plain-SQL change; the change
    must arrive within a second, without a reconnection."""
    events: queue.Queue[ChangeEvent] = queue.Queue()
    connects: list[float] = []
    listener = ChangeListener(database_url, events.put, on_connected=lambda: connects.append(time.time())).start(wait_s=10)
    try:
        assert listener.connected
        with psycopg.connect(libpq_url(database_url)) as conn:
            conn.execute("SELECT pg_notify(%s, %s)", (CHANGE_CHANNEL, payload))
            conn.execute("INSERT INTO configurations (kind, name, version, data) VALUES ('bot', 'behind', 1, %s)", (Jsonb({"v": 1}),))
            conn.commit()
        try:
            event = events.get(timeout=DROP_DEADLINE_S)
        except queue.Empty:
            raise AssertionError(f"the change behind the payload never arrived (listener connections: {len(connects)})") from None
        assert (event.kind, event.ident) == ("config", ("bot", "behind"))
        assert len(connects) == 1
    finally:
        listener.stop()


# ---- 5. values PostgreSQL would refuse, refused at submit ------------------------------------------------------


def _plain_routine(**extra: Any) -> dict[str, Any]:
    return {"name": "refused", "variables": {"x": "ok"}, "steps": [{"id": "s1", "action": "set", "args": {"name": "y", "value": 1}}], **extra}


SUBMIT_CASES = {
    # case: (routine, extra CLI args, what the message must name)
    "var-nul": (_plain_routine(), ["--var", 'x="a\\u0000b"'], r"variable 'x'.*NUL"),
    "var-nul-in-a-key": (_plain_routine(), ["--var", 'x={"k\\u0000": 1}'], r"variable 'x'.*NUL"),
    "file-nul": (_plain_routine(variables={"x": "a\u0000b"}), [], r"(variables\.x|'x').*NUL|NUL.*(variables\.x|'x')"),
    "export-scope": (
        _plain_routine(exports=[{"variable": "x", "destination": "blackboard", "scope": "s" * 201}]), [], r"exports\[0\]\.scope",
    ),
    "export-key": (
        _plain_routine(exports=[{"variable": "x", "destination": "blackboard", "key": "k" * 201}]), [], r"exports\[0\]\.key",
    ),
}


@pytest.mark.parametrize(
    "case",
    [
        case
        for case in SUBMIT_CASES
    ],
)
def test_a_value_postgresql_would_refuse_is_refused_at_submit(make_cluster, tmp_path: Path, case: str) -> None:
    routine, args, names = SUBMIT_CASES[case]
    path = tmp_path / "refused.json"
    path.write_text(json.dumps(routine))
    cluster = make_cluster("redis")  # no worker: submit fails before dispatching anything
    done = cluster.runctx("submit", str(path), *args)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    print(f"\n[refused at submit: {case}] exit {done.returncode}: {done.stderr.strip()[:300]}")
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert done.stdout.strip() == "" and "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("runctx: "), done.stderr
    assert re.search(names, lines[0]), f"the message does not name what is wrong ({names}): {lines[0]}"
    # Nothing stored: no run, no context in L3, no key under the cluster's prefix in Redis.
    with psycopg.connect(libpq_url(cluster.database_url)) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM context_snapshots").fetchone()[0] == 0
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        assert list(client.scan_iter(match=f"{cluster.prefix}:*", count=1000)) == []
    finally:
        client.close()
