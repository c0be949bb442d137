"""A secret value is used by a run but never leaves the state store in plain text: not in L2 (its
context entries hold it sealed, AES-GCM), not in a broker message, not in a worker log line (at
DEBUG), not in `runctx run --json` output.

Everything the Redis server executes during the run is captured with MONITOR.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path

import pytest

from tests.support.records import wait_no_pending_flush
from tests.support.redis_monitor import RedisMonitor, keys_of
from tests.support.waiting import wait_for


def _decoded_forms(value: bytes) -> list[bytes]:
    """A value as stored plus, for a kombu envelope (JSON with a base64 body), its decoded body."""
    forms = [value]
    try:
        envelope = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return forms
    if isinstance(envelope, dict) and isinstance(envelope.get("body"), str):
        body = envelope["body"]
        encoding = (envelope.get("properties") or {}).get("body_encoding")
        forms.append(base64.b64decode(body) if encoding == "base64" else body.encode())
    return forms


def _wait_until_written_behind(cluster) -> None:
    store = cluster.store()
    try:
        wait_no_pending_flush(store)
    finally:
        store.close()


# ---- the test ------------------------------------------------------------------------------------

BROKER_WRITES = (b"LPUSH", b"RPUSH", b"PUBLISH", b"SPUBLISH", b"XADD")


@pytest.mark.slow
def test_secret_reaches_l3_but_no_broker_message_log_line_or_output(make_cluster, tmp_path: Path) -> None:
    # Two secrets, both declared without a value in the routine: one given with --var-file, one
    # with --var (which warns that the process list shows it).
    inline_secret = f"file-secret-{uuid.uuid4().hex}"
    var_secret = f"var-secret-{uuid.uuid4().hex}"
    routine = tmp_path / "secret.yaml"
    routine.write_text(
        """
name: secret-e2e
variables:
  api_token: {sensitivity: secret}
  password: {sensitivity: secret}
  user: alice
steps:
  - {id: use-token, action: copy, args: {from: api_token, to: token_copy}, reads: [api_token]}
  - {id: use-password, action: copy, args: {from: password, to: password_copy}, reads: [password]}
  - id: fan-out
    parallel:
      - [{id: a1, action: append, args: {name: log, value: a}}]
      - [{id: b1, action: append, args: {name: log, value: b}}]
  - {id: greet, action: set, args: {name: message, value: "hello alice"}}
"""
    )
    var_file = tmp_path / "vars.yaml"
    var_file.write_text(f"api_token: {inline_secret}\n")
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2, loglevel="DEBUG")

    monitor = RedisMonitor(cluster.redis_url)
    try:
        done = cluster.runctx(
            "run", str(routine), "--json", "--timeout", "60", "--var-file", str(var_file), "--var", f"password={var_secret}",
            timeout_s=90,
        )
    finally:
        commands = monitor.stop()
    # The write-behind done and the finalize's task logged its end: every log line of the run is written.
    _wait_until_written_behind(cluster)
    wait_for(lambda: "Task secret-e2e: finalize (succeeded)[" in cluster.logs(), 30, "the finalize's log line")
    cluster.stop()  # flush and close the logs

    # The value was really used: L3's final context holds it, in the variables the steps wrote too.
    store = cluster.store()
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["status"] == "succeeded", (done.stdout, done.stderr)
        final = store.l3.get_context(result["run_id"])
        assert final.variables["api_token"] == inline_secret
        assert final.variables["password"] == var_secret
        assert final.variables["token_copy"] == inline_secret
        assert final.variables["password_copy"] == var_secret
    finally:
        store.close()

    ctx_prefix = f"{cluster.prefix}:{{c".encode()  # context entries: <prefix>:{c<shard>}:ctx:<id>
    steps_queue = f"{cluster.prefix}.steps".encode()

    # The capture is real: it saw this run's step messages, and sealed values going into L2.
    step_messages = [c for c in commands if c[0].upper() in (b"LPUSH", b"RPUSH") and c[1] == steps_queue]
    assert step_messages, "MONITOR saw no step message of this run"
    assert any(result["run_id"].encode() in form for c in step_messages for form in _decoded_forms(c[-1]))
    assert any(
        any(key.startswith(ctx_prefix) for key in keys_of(c)) and any(b"$sealed" in arg for arg in c) for c in commands
    ), "MONITOR never saw a sealed value going into L2: the capture proves nothing"

    # Every problem is collected first, so that one failure shows all the places the secret went.
    problems: list[str] = []
    for secret in (inline_secret, var_secret):  # L2 holds them sealed only
        for command in commands:
            if any(key.startswith(ctx_prefix) for key in keys_of(command)) and any(
                secret.encode() in form for arg in command[1:] for form in _decoded_forms(arg)
            ):
                problems.append(f"L2 context entry holds {secret} in plain: {repr(command)[:300]}")
    for secret in (inline_secret, var_secret):
        needle = secret.encode()
        for command in commands:
            name = command[0].upper()
            if name not in BROKER_WRITES and not (name == b"HSET" and command[1].endswith(b"unacked")):
                continue  # (HSET ...unacked: kombu's copy of a message a worker holds)
            if any(key.startswith(ctx_prefix) for key in keys_of(command)):
                continue
            if any(needle in form for arg in command[2:] for form in _decoded_forms(arg)):
                problems.append(f"broker message holds {secret}: {repr(command)[:300]}")

    # Neither secret is in any Redis command at all, in any form (the routine holds no value).
    for secret in (inline_secret, var_secret):
        for command in commands:
            if any(secret.encode() in form for arg in command[1:] for form in _decoded_forms(arg)):
                problems.append(f"a Redis command holds {secret}: {repr(command)[:300]}")
    assert "--var password: a secret value on the command line is visible in the process list" in done.stderr

    # Not in any worker log line (at DEBUG), nor in what `runctx run` printed.
    logs = cluster.logs()
    assert "DEBUG" in logs
    for secret in (inline_secret, var_secret):
        problems += [f"worker log line holds {secret}: {line[:300]}" for line in logs.splitlines() if secret in line]
        if secret in done.stdout or secret in done.stderr:
            problems.append(f"`runctx run --json` printed {secret}: {done.stdout.strip()[:600]} {done.stderr[:300]}")
    shown = result["variables"]
    for name in ("api_token", "password", "token_copy", "password_copy"):
        if shown.get(name) != "***":
            problems.append(f"output shows {name} = {shown.get(name)!r}, not '***'")
    assert shown["user"] == "alice" and shown["message"] == "hello alice" and sorted(shown["log"]) == ["a", "b"]
    assert not problems, "\n".join(problems)


# ---- every place at once --------------------------------------------------------------------------


def _needles(value: str) -> list[bytes]:
    """A value as it could appear: plain, JSON-escaped, base64 (of the value and of its JSON)."""
    raw = value.encode()
    forms = {raw, json.dumps(value).encode(), json.dumps(value)[1:-1].encode()}
    for data in (raw, json.dumps(value).encode()):
        encoded = base64.b64encode(data)
        forms |= {encoded, encoded.rstrip(b"="), base64.urlsafe_b64encode(data).rstrip(b"=")}
    return sorted(forms)


def _everything_in_redis(redis_url: str, prefix: str) -> list[tuple[bytes, bytes]]:
    import redis as redis_py

    client = redis_py.Redis.from_url(redis_url)
    found = []
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            if kind == b"string":
                values = [client.get(key) or b""]
            elif kind == b"hash":
                values = [b"%s=%s" % item for item in client.hgetall(key).items()]
            elif kind == b"list":
                values = client.lrange(key, 0, -1)
            elif kind == b"set":
                values = list(client.smembers(key))
            elif kind == b"zset":
                values = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
            else:
                values = []
            found += [(key, value) for value in [key, *values]]
    finally:
        client.close()
    return found


def _everything_in_postgres(database_url: str) -> list[tuple[str, str]]:
    import psycopg

    from state.change_events import libpq_url

    rows = []
    with psycopg.connect(libpq_url(database_url)) as conn:
        tables = [name for (name,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                rows.append((table, repr(row)))
    return rows


@pytest.mark.slow
def test_confidential_and_secret_values_are_nowhere_in_plain_text(make_cluster, tmp_path: Path) -> None:
    """A confidential and a secret variable given by --var-file; one step derives a new value from
    the secret, one copies the confidential one, one step (not declaring the secret) tries to read
    it, and a second run fails with the secret in its exception text. Then every Redis key and
    value, every row of every runctx table, every command Redis ran (MONITOR: the broker too), every
    worker log line at DEBUG and all CLI output: neither value, plain, base64 or JSON-escaped."""
    secret = f"sk-{uuid.uuid4().hex}"
    email = f"carol+{uuid.uuid4().hex[:8]}@example.com"
    (tmp_path / "ntk_actions.py").write_text(
        "from tasks.changes import Change\n"
        "def derive(view, args):\n"
        "    return {'derived': view.get('token')[::-1] + '!'}\n"
        "def nosy(view, args):\n"
        "    return {'nosy_saw': view.get('token', 'nothing'), 'nosy_listed': 'token' in view.names()}\n"
        "def leak(view, args):\n"
        "    raise RuntimeError('upstream refused ' + view.get('token') + ' for ' + view.get('email'))\n"
    )
    variables = {"token": {"sensitivity": "secret"}, "email": {"sensitivity": "confidential"}, "user": "carol"}
    good = {
        "name": "leak-good",
        "variables": variables,
        "steps": [
            {"id": "derive", "action": "ntk_actions:derive", "reads": ["token"]},
            {"id": "copy-email", "action": "copy", "args": {"from": "email", "to": "email_copy"}},
            {"id": "nosy", "action": "ntk_actions:nosy"},
        ],
        "exports": [{"variable": "derived", "destination": "blackboard", "scope": "team:leak"}],
    }
    bad = {"name": "leak-bad", "variables": variables, "steps": [{"id": "leak", "action": "ntk_actions:leak", "reads": ["token"]}]}
    # A secret that comes by a signal (`runctx signal --var-file`) into a variable declared secret.
    code = f"otp-{uuid.uuid4().hex}"
    waits = {
        "name": "leak-wait", "variables": {"approval": {"sensitivity": "secret"}},
        "steps": [{"id": "approve", "wait_for": {"event": "approve", "into": "approval"}}, {"id": "then", "action": "set", "args": {"name": "done", "value": True}}],
    }
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    (tmp_path / "wait.json").write_text(json.dumps(waits))
    (tmp_path / "vars.yaml").write_text(f"token: {secret}\nemail: {email}\n")
    (tmp_path / "signal.yaml").write_text(f"code: {code}\nby: carol\n")

    cluster = make_cluster("redis", PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[2])]), RUNCTX_ACTION_MODULES="ntk_actions,tests")
    cluster.start_nodes("n1", "n2", concurrency=2, loglevel="DEBUG")
    monitor = RedisMonitor(cluster.redis_url)
    try:
        outputs = [
            cluster.runctx("run", str(tmp_path / name), "--json", "--timeout", "60", "--var-file", str(tmp_path / "vars.yaml"), timeout_s=90)
            for name in ("good.json", "bad.json")
        ]
        waiting = cluster.submit(tmp_path / "wait.json")
        wait_for(lambda: cluster.runctx("status", waiting, "--json").stdout.find('"waiting"') > 0, 60, "the run to wait")
        outputs.append(cluster.runctx("signal", waiting, "approve", "--var-file", str(tmp_path / "signal.yaml")))
        outputs.append(cluster.runctx("wait", waiting, "--json", "--timeout", "60", timeout_s=90))
        outputs.append(cluster.runctx("history", waiting, "--json"))
        _wait_until_written_behind(cluster)  # the write-behind of the last changes, seen by MONITOR
    finally:
        commands = monitor.stop()
    cluster.stop()

    good_result, bad_result = (json.loads(done.stdout.strip().splitlines()[-1]) for done in outputs[:2])
    assert good_result["status"] == "succeeded", outputs[0].stderr
    assert bad_result["status"] == "failed"
    assert outputs[2].returncode == 0 and "delivered to step approve" in outputs[2].stdout, outputs[2].stderr
    signalled = json.loads(outputs[3].stdout.strip().splitlines()[-1])
    assert signalled["status"] == "succeeded" and signalled["variables"]["approval"] == "***", signalled
    assert bad_result["error"] == "step 'leak': action 'ntk_actions:leak' raised RuntimeError: <hidden: the step read secret values>"
    store = cluster.store()
    try:
        final = store.l3.get_context(good_result["run_id"])
        assert final.variables["derived"] == secret[::-1] + "!" and final.sensitivity_of("derived").value == "secret"
        assert final.variables["email_copy"] == email and final.sensitivity_of("email_copy").value == "confidential"
        assert final.variables["nosy_saw"] == "nothing" and final.variables["nosy_listed"] is False  # it saw nothing
        approved = store.l3.get_context(signalled["run_id"])
        assert approved.variables["approval"] == {"code": code, "by": "carol"} and approved.sensitivity_of("approval").value == "secret"
    finally:
        store.close()

    problems = []
    places = [(f"redis {key[:80]!r}", value) for key, value in _everything_in_redis(cluster.redis_url, cluster.prefix)]
    places += [(f"postgres {table}", row.encode()) for table, row in _everything_in_postgres(cluster.database_url)]
    places += [(f"redis command {command[0][:20]!r}", form) for command in commands for arg in command for form in _decoded_forms(arg)]
    places += [("worker log", line.encode()) for line in cluster.logs().splitlines()]
    places += [("cli output", (done.stdout + done.stderr).encode()) for done in outputs]
    assert "DEBUG" in cluster.logs() and len(places) > 100
    for value in (secret, email, secret[::-1] + "!", code):
        for needle in _needles(value):
            problems += [f"{where} holds {needle[:40]!r}" for where, text in places if needle in text]
    assert not problems, "\n".join(sorted(set(problems))[:40])
