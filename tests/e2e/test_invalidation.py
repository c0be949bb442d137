"""Changes made in L3 by plain SQL (outside runctx) reach every worker process's cache.

Two nodes of two pool processes each: every process loads a configuration and a routine into
its L1; an UPDATE by psycopg changes them in PostgreSQL; within one second every process
serves the new one. A context changed by plain SQL loses its Redis (L2) entry.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg.types.json import Jsonb

from state.change_events import libpq_url
from state.limits import canonical_json
from tests.support.waiting import wait_for
from workers.control import TRACE_PREFIX, probe

PROCESSES = 4
DEADLINE_S = 1.0


def _digest(cluster: Any, data: Any) -> str:
    return cluster.keyring().mac(canonical_json(data).encode())  # what the probe answers: a keyed digest


def _probe_all(client: redis.Redis, prefix: str, key: str) -> dict[str, dict[str, Any]]:
    return probe(client, prefix, key, load=True, wait_s=2.0)


def _wait_until_all_serve(client: redis.Redis, prefix: str, key: str, digest: str, timeout_s: float) -> dict[str, dict[str, Any]]:
    """Probe (loading) until every process serves ``digest``; their answers (TimeoutError, with the
    last answers, after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    answers: dict[str, dict[str, Any]] = {}

    def all_serve() -> bool:
        nonlocal answers
        answers = probe(client, prefix, key, load=True, wait_s=max(0.05, deadline - time.monotonic()))
        return len(answers) == PROCESSES and all(answer["digest"] == digest for answer in answers.values())

    wait_for(all_serve, timeout_s, lambda: f"every process to serve the new {key}: {answers}")
    return answers


def _execute(database_url: str, sql: str, params: tuple[Any, ...]) -> int:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        return conn.execute(sql, params).rowcount


@pytest.mark.slow
def test_plain_sql_changes_reach_every_process_within_a_second(make_cluster) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    pool_pids = {pid for short in ("n1", "n2") for pid in cluster.pool_pids(short)}
    assert len(pool_pids) == PROCESSES

    store = cluster.store()
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        old_config = {"model": "small", "limits": {"tokens": 100}}
        old_routine = {"name": "inv-routine", "steps": [{"id": "s1", "action": "set", "args": {"name": "a", "value": 1}}]}
        config_version = store.configs.put_config("bot", "alpha", old_config)
        routine_version = store.configs.put_routine("inv-routine", old_routine)
        keys = {
            "config:bot:alpha": old_config,
            "routine:inv-routine": old_routine,
            f"routine:inv-routine@{routine_version}": old_routine,
        }

        # Every pool process loads each of them (into its L1) and serves the stored one.
        for key, data in keys.items():
            answers = _probe_all(client, cluster.prefix, key)
            assert len(answers) == PROCESSES, (key, answers)
            assert {int(identity.rsplit(":", 1)[1]) for identity in answers} == pool_pids
            assert {answer["digest"] for answer in answers.values()} == {_digest(cluster, data)}, (key, answers)

        # Plain SQL, as an operator would: no runctx code involved in the change.
        new_config = {"model": "large", "limits": {"tokens": 4000}}
        new_routine = {"name": "inv-routine", "steps": [{"id": "s1", "action": "set", "args": {"name": "a", "value": 2}}]}
        assert _execute(
            cluster.database_url,
            "UPDATE configurations SET data = %s WHERE kind = 'bot' AND name = 'alpha'",
            (Jsonb(new_config),),
        ) == 1
        config_answers = _wait_until_all_serve(client, cluster.prefix, "config:bot:alpha", _digest(cluster, new_config), DEADLINE_S)
        assert len(config_answers) == PROCESSES, config_answers
        assert {answer["digest"] for answer in config_answers.values()} == {_digest(cluster, new_config)}, config_answers
        # The trigger gave the plain-SQL change a new version, which is what processes serve now.
        assert {answer["version"] for answer in config_answers.values()} == {config_version + 1}

        # A stored routine version is immutable; a new version inserted by plain SQL reaches every
        # process as the routine's newest, and the old version stays what it was for its runs.
        with pytest.raises(psycopg.errors.RestrictViolation):
            _execute(
                cluster.database_url,
                "UPDATE routines SET definition = %s WHERE name = 'inv-routine' AND version = %s",
                (Jsonb(new_routine), routine_version),
            )
        assert _execute(
            cluster.database_url,
            "INSERT INTO routines (name, version, definition) VALUES ('inv-routine', %s, %s)",
            (routine_version + 1, Jsonb(new_routine)),
        ) == 1
        routine_answers = _wait_until_all_serve(client, cluster.prefix, "routine:inv-routine", _digest(cluster, new_routine), DEADLINE_S)
        assert len(routine_answers) == PROCESSES, routine_answers
        assert {answer["digest"] for answer in routine_answers.values()} == {_digest(cluster, new_routine)}, routine_answers
        old_answers = _probe_all(client, cluster.prefix, f"routine:inv-routine@{routine_version}")
        assert {answer["digest"] for answer in old_answers.values()} == {_digest(cluster, old_routine)}, old_answers
    finally:
        client.close()
        store.close()


@pytest.mark.slow
def test_every_process_drops_a_traced_configuration_within_a_second(make_cluster) -> None:
    """Configurations of kind TRACE_PREFIX record when each process dropped them: the exact latency."""
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    kind, name = TRACE_PREFIX.split(":")[1], "latency"
    key = f"{TRACE_PREFIX}{name}"
    store = cluster.store()
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        version = store.configs.put_config(kind, name, {"v": 1})
        answers = _probe_all(client, cluster.prefix, key)
        assert len(answers) == PROCESSES and {a["digest"] for a in answers.values()} == {_digest(cluster, {"v": 1})}, answers

        with psycopg.connect(libpq_url(cluster.database_url)) as conn:
            conn.execute("UPDATE configurations SET data = %s WHERE kind = %s AND name = %s", (Jsonb({"v": 2}), kind, name))
            txid = conn.execute("SELECT txid_current()").fetchone()[0]
            conn.commit()
        committed_at = time.time()
        trace = f"{cluster.prefix}:trace:{txid}:UPDATE:{key}:{version + 1}"
        wait_for(
            lambda: client.hlen(trace) >= PROCESSES, 5.0,
            lambda: f"every process to drop the old configuration; these did: {[i.decode() for i in client.hkeys(trace)]} of {sorted(answers)}",
        )
        dropped = {identity.decode(): float(at) for identity, at in client.hgetall(trace).items()}
        assert set(dropped) == set(answers), dropped  # every pool process dropped it ...
        late = {identity: round(at - committed_at, 3) for identity, at in dropped.items() if at - committed_at > DEADLINE_S}
        assert not late, f"processes that dropped the old configuration more than {DEADLINE_S}s after the commit: {late}"
        answers = _probe_all(client, cluster.prefix, key)  # ... and serves the new one
        assert len(answers) == PROCESSES and {a["digest"] for a in answers.values()} == {_digest(cluster, {"v": 2})}, answers
    finally:
        client.close()
        store.close()


def _finished_run_changed_by_sql(make_cluster, tmp_path: Path):
    """A finished run (its context cached in L2), then its context changed in L3 by plain SQL.

    Returns (cluster, run_id, L3 version before the change, whether L2 lost its entry within 5 s).
    """
    routine = tmp_path / "small.yaml"
    routine.write_text(
        "name: small\nvariables: {x: 1}\nsteps:\n"
        "  - {id: s1, action: increment, args: {name: x}}\n"
        "  - {id: s2, action: set, args: {name: y, value: before}}\n"
    )
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    result = cluster.run(routine)
    assert result["status"] == "succeeded", result
    run_id = result["run_id"]

    store = cluster.store()
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        ctx_key = store.l2.keys.context(run_id)
        assert client.exists(ctx_key), "the finished run's context should be cached in L2"
        cached = store.l2.get_context(run_id)
        assert cached is not None and cached.context.variables == {"x": 2, "y": "before"}
        l3_version = store.l3.context_version(run_id)

        assert _execute(
            cluster.database_url,
            "UPDATE context_snapshots SET document = jsonb_set(document, '{variables,y}', %s) WHERE context_id = %s",
            (Jsonb("after"), run_id),
        ) == 1
        wait_for(lambda: not client.exists(ctx_key), 5.0, "L2 to drop the context changed in L3")
        return cluster, run_id, l3_version, not client.exists(ctx_key)
    finally:
        client.close()
        store.close()


@pytest.mark.slow
def test_plain_sql_change_of_a_context_evicts_its_l2_entry(make_cluster, tmp_path: Path) -> None:
    cluster, run_id, l3_version, evicted = _finished_run_changed_by_sql(make_cluster, tmp_path)
    assert evicted, "L2 still holds the context changed in L3"
    store = cluster.store()
    try:
        assert store.l3.context_version(run_id) == l3_version + 1  # the trigger bumped the row's version
        # A read now goes to L3 and sees the change.
        assert store.get_context(run_id).variables == {"x": 2, "y": "after"}
    finally:
        store.close()


@pytest.mark.slow
def test_a_commit_after_a_plain_sql_change_of_a_context_reaches_l3(make_cluster, tmp_path: Path) -> None:
    """After the eviction, the next change (as a step would commit it) must still be written to L3."""
    cluster, run_id, l3_version, evicted = _finished_run_changed_by_sql(make_cluster, tmp_path)
    assert evicted, "L2 still holds the context changed in L3"
    store = cluster.store()
    try:
        row_version = store.l3.context_version(run_id)
        read_back = store.get_context(run_id)
        working = read_back.working_copy()
        working.set_variable("z", "after-the-sql-change")
        commit = store.commit(working, expected_version=read_back.version)
        store.flush(run_id)
        in_l3 = store.l3.get_context(run_id)
        assert in_l3.variables == {"x": 2, "y": "after", "z": "after-the-sql-change"}, (
            f"the commit of version {commit.context.version} after the plain-SQL change (row version {row_version}) "
            f"never reached L3: L3 holds {in_l3.variables}; the context was read back at version {read_back.version}"
        )
        assert read_back.version == row_version
    finally:
        store.close()
