"""What a new user meets in the first hour, on real worker nodes and the real `runctx` command.

A worker node that could not do its job refuses to start (exit code and one line naming the
setting, never "ready."); a setting that differs between client and workers fails the run saying
which setting of which node, instead of leaving it running; a user action's traceback (its own
frames) is in the worker log, `runctx status` and Flower; read models read the truth while a step
runs; `--timeout` is the whole wait; exit codes and messages are those README gives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from state.change_events import libpq_url
from state.keys import RedisKeys
from state.sealing import Keyring
from tests.support.cluster import HERE, Cluster
from tests.support.flower import start_flower
from tests.support.records import control_app, step_records
from tests.support.waiting import wait_for

USER_ACTIONS = '''\
"""A user's own actions, as a newcomer writes them."""


def shout(view, args):
    return {"said": _louder(view.get("word", "hi"))}


def _louder(word):
    raise ValueError(f"{word} is too loud")
'''
RAISING_LINE = 'myacts.py", line 9, in _louder'  # the line that raises, as a traceback names it


def write_routine(path: Path, name: str, steps: list[dict[str, Any]], variables: dict[str, Any] | None = None) -> Path:
    path.write_text(json.dumps({"name": name, "variables": variables or {"counter": 0}, "steps": steps}))
    return path


def user_module(directory: Path) -> dict[str, str]:
    """myacts.py in ``directory``; the environment that lets a process import it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "myacts.py").write_text(USER_ACTIONS)
    repo = str(HERE)
    return {"PYTHONPATH": os.pathsep.join([str(directory), repo])}


def refused_start(cluster: Cluster, short: str, env: dict[str, str]) -> tuple[int, str]:
    """Start a node that must refuse to start: its exit code and its log."""
    process = cluster.start_node(short, concurrency=1, env=env)
    code = process.wait(90)
    return code, cluster.logs(short)


def the_line_naming(log: str, setting: str) -> str:
    lines = [line for line in log.splitlines() if setting in line]
    assert len(lines) == 1, f"expected one line naming {setting}, got {lines}\n{log[-2000:]}"
    return lines[0]


# ---- a node that cannot do its job does not start -------------------------------------------------


@pytest.mark.slow
def test_a_worker_without_the_key_that_sealed_stored_values_refuses_to_start(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster()
    cluster.start_nodes("n1", concurrency=1)  # its key file's key is recorded as in use

    # "Two machines": another node with a key file of its own, on the same Redis and database.
    code, log = refused_start(cluster, "n2", {"RUNCTX_DATA_DIR": str(tmp_path / "other-machine")})
    assert code != 0 and "ready." not in log
    line = the_line_naming(log, "RUNCTX_ENCRYPTION_KEYS")
    assert "cannot start" in line and cluster.keyring().newest in line

    # A node holding only the key from before a rotation (the rotation recorded the new one).
    old, new = Keyring.new_entry(), Keyring.new_entry()
    store = cluster.store()
    try:
        store.maintenance.check_keys(Keyring.parse(",".join([new, old, *_entries(cluster.keyring())])))
    finally:
        store.close()
    code, log = refused_start(cluster, "n3", {"RUNCTX_ENCRYPTION_KEYS": ",".join([old, *_entries(cluster.keyring())])})
    assert code != 0 and "ready." not in log
    assert new.split(":")[0] in the_line_naming(log, "RUNCTX_ENCRYPTION_KEYS")
    assert "corrupt" not in log.lower()


def _entries(keyring: Keyring) -> list[str]:
    import base64

    return [f"{key_id}:{base64.b64encode(key).decode()}" for key_id, key in keyring.keys]


@pytest.mark.slow
def test_a_worker_that_cannot_bring_the_schema_up_to_date_refuses_to_start(make_cluster) -> None:
    cluster = make_cluster()
    with psycopg.connect(libpq_url(cluster.database_url), autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'f00dfacef00d'")  # a revision this code does not know
    code, log = refused_start(cluster, "n1", {})
    assert code != 0 and "ready." not in log
    line = the_line_naming(log, "RUNCTX_DATABASE_URL")
    assert "cannot start" in line and "schema" in line


@pytest.mark.slow
def test_a_worker_that_cannot_import_an_allowed_action_module_refuses_to_start(make_cluster) -> None:
    cluster = make_cluster()
    code, log = refused_start(cluster, "n1", {"RUNCTX_ACTION_MODULES": "tests,no_such_module_of_ours"})
    assert code != 0 and "ready." not in log
    assert "no_such_module_of_ours" in the_line_naming(log, "RUNCTX_ACTION_MODULES")


# ---- a configuration mismatch fails the run, it does not hang -------------------------------------------


@pytest.mark.slow
def test_a_module_the_workers_do_not_allow_fails_the_run_naming_the_setting_and_the_node(make_cluster, tmp_path: Path) -> None:
    importable = user_module(tmp_path / "code")
    cluster = make_cluster()
    cluster.start_node("n1", concurrency=1, env=importable)  # RUNCTX_ACTION_MODULES=tests: myacts not allowed
    cluster.wait_ready("n1")
    routine = write_routine(tmp_path / "mine.json", "mine", [{"id": "loud", "action": "myacts:shout"}])

    started = time.monotonic()
    done = cluster.runctx(
        "run", str(routine), "--json", "--timeout", "60", env={**importable, "RUNCTX_ACTION_MODULES": "tests,myacts"},
        timeout_s=90,
    )
    assert time.monotonic() - started < 60, "the run hung instead of failing"
    result = json.loads(done.stdout)
    assert done.returncode == 1 and result["status"] == "failed"
    assert "RUNCTX_ACTION_MODULES" in result["error"] and cluster.node_name("n1") in result["error"]
    assert "myacts" in result["error"]

    # Reading it back needs no action module at all: a shell without the setting shows it.
    shown = cluster.runctx("status", result["run_id"], env={"RUNCTX_ACTION_MODULES": None})
    assert shown.returncode == 0, shown.stderr
    assert f"run {result['run_id']}: failed" in shown.stdout and "RUNCTX_ACTION_MODULES" in shown.stdout


# ---- a user action's traceback ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_user_action_traceback_is_in_the_worker_log_runctx_status_and_flower(make_cluster, tmp_path: Path) -> None:
    env = {**user_module(tmp_path / "code"), "RUNCTX_ACTION_MODULES": "tests,myacts"}
    cluster = make_cluster(**{k.lower(): v for k, v in env.items()})
    cluster.start_nodes("n1", concurrency=1)
    routine = write_routine(tmp_path / "loud.json", "loud", [{"id": "loud", "action": "myacts:shout"}], {"word": "hey"})

    with start_flower(cluster) as flower:
        flower.wait_for_workers({cluster.node_name("n1")})
        result = cluster.run(routine, timeout_s=60)
        assert result["status"] == "failed"
        assert result["error"] == "step 'loud': action 'myacts:shout' raised ValueError: hey is too loud"

        wait_for(lambda: RAISING_LINE in cluster.logs("n1"), 30, "the traceback in the log")
        log = cluster.logs("n1")
        error_lines = [line for line in log.splitlines() if "ERROR" in line and "loud" in line]
        assert error_lines, "the failure is not logged at ERROR"

        shown = cluster.runctx("status", result["run_id"])
        assert shown.returncode == 0 and RAISING_LINE in shown.stdout and "ValueError: hey is too loud" in shown.stdout
        assert "tasks/steps.py" not in shown.stdout and "tasks/actions.py" not in shown.stdout  # the user's frames only
        as_json = json.loads(cluster.runctx("status", result["run_id"], "--json").stdout)
        step = next(step for step in as_json["steps"] if step["id"] == "loud")
        assert step["state"] == "failed" and RAISING_LINE in step["traceback"]

        def flower_task() -> dict[str, Any] | None:
            tasks = flower.tasks_of({cluster.node_name("n1")})
            return next((t for t in tasks.values() if t["name"] == "loud: loud" and t["state"] == "FAILURE"), None)

        task = wait_for(flower_task, 30, "Flower to see the failed step")
        info = flower.json(f"/api/task/info/{task['uuid']}")
        assert RAISING_LINE in (info.get("traceback") or ""), info.get("traceback")


# ---- read models and waiting ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_polling_client_sees_the_step_that_runs(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster()
    cluster.start_nodes("n1", concurrency=1)
    steps = [
        {"id": "first", "action": "increment", "args": {"name": "counter"}},
        {"id": "slow", "action": "sleep", "args": {"seconds": 3}},
        {"id": "last", "action": "increment", "args": {"name": "counter"}},
    ]
    routine = write_routine(tmp_path / "slow.json", "slow-one", steps)

    # The progress lines of `runctx run` (its output is not a terminal: a line per change on stderr).
    done = cluster.runctx("run", str(routine), "--timeout", "60", timeout_s=90)
    assert done.returncode == 0, done.stderr
    assert any("running 1" in line and "done 1" in line for line in done.stderr.splitlines()), done.stderr

    # `runctx status --watch`, started while the slow step runs.
    run_id = cluster.submit(routine)
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        wait_for(lambda: "first" in step_records(client, cluster.prefix, run_id), 30, "the first step")
    finally:
        client.close()
    watched = cluster.runctx("status", run_id, "--watch", timeout_s=60)
    assert watched.returncode == 0, watched.stderr
    assert any(line.startswith("done 1 / running 1") for line in watched.stdout.splitlines()), watched.stdout
    assert f"run {run_id}: succeeded" in watched.stdout


@pytest.mark.slow
def test_timeout_is_the_whole_wait(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster()
    cluster.start_nodes("n1", concurrency=1)
    routine = write_routine(tmp_path / "long.json", "long", [{"id": "nap", "action": "sleep", "args": {"seconds": 20}}])
    started = time.monotonic()
    done = cluster.runctx("run", str(routine), "--timeout", "3", timeout_s=60)
    elapsed = time.monotonic() - started
    # The whole wait, from the command's start, is 3 s: far from the 20 s nap. The margin is the
    # machine's (a loaded 2-core box takes over a second to start Python), not the command's.
    assert elapsed < 5.5, f"--timeout 3 returned after {elapsed:.1f} s"
    assert done.returncode == 1 and "still running after 3 s" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("runctx: run ")


# ---- what the commands say ----------------------------------------------------------------------------


@pytest.mark.slow
def test_cancel_says_nothing_but_its_line_and_the_steps_left_are_cancelled(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster()
    cluster.start_nodes("n1", concurrency=1)
    steps = [{"id": f"s{n}", "action": "sleep", "args": {"seconds": 0.5}} for n in range(8)]
    run_id = cluster.submit(write_routine(tmp_path / "c.json", "cancel-me", steps))
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        wait_for(lambda: "s1" in step_records(client, cluster.prefix, run_id), 30, "two steps done")
    finally:
        client.close()
    done = cluster.runctx("cancel", run_id)
    assert done.returncode == 0 and done.stdout.strip() == f"run {run_id}: cancelled" and done.stderr == ""
    assert cluster.wait(run_id)["status"] == "cancelled"
    states = json.loads(cluster.runctx("status", run_id, "--json").stdout)
    by_state = {step["id"]: step["state"] for step in states["steps"]}
    assert set(by_state.values()) <= {"done", "cancelled"} and "pending" not in by_state.values()
    assert by_state["s7"] == "cancelled" and states["totals"]["cancelled"] == sum(s == "cancelled" for s in by_state.values())


@pytest.mark.slow
def test_a_context_redis_no_longer_holds_says_so(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster()
    cluster.start_nodes("n1", concurrency=1)
    result = cluster.run(write_routine(tmp_path / "r.json", "gone", [{"id": "a", "action": "increment", "args": {"name": "counter"}}]))
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        keys = RedisKeys(cluster.prefix)
        client.delete(keys.context(result["run_id"]), keys.applied(result["run_id"]))
    finally:
        client.close()
    shown = cluster.runctx("context", result["run_id"])
    assert shown.returncode == 0 and "not in L2" in shown.stdout and "None" not in shown.stdout


@pytest.mark.slow
def test_the_benchmark_task_is_not_registered_on_workers(make_cluster) -> None:
    cluster = make_cluster()
    cluster.start_nodes("n1", concurrency=1)
    registered = control_app(cluster).control.inspect(destination=[cluster.node_name("n1")], timeout=5).registered()
    names = [name for names in (registered or {}).values() for name in names]
    assert "runctx.step" in names and not [name for name in names if "noop" in name]


@pytest.mark.slow
def test_flower_shows_a_step_that_committed_nothing_as_revoked(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster()
    cluster.start_nodes("n1", concurrency=1)
    # A nap long enough that `runctx cancel` (a process start) comes before it ends, even on a busy machine.
    steps = [{"id": "nap", "action": "sleep", "args": {"seconds": 10}}, {"id": "after", "action": "increment", "args": {"name": "counter"}}]
    with start_flower(cluster) as flower:
        flower.wait_for_workers({cluster.node_name("n1")})
        run_id = cluster.submit(write_routine(tmp_path / "nap.json", "napper", steps))

        def started() -> Any:
            return any(t["name"] == "napper: nap" and t["state"] == "STARTED" for t in flower.tasks_of({cluster.node_name("n1")}).values())

        wait_for(started, 30, "the nap step to start")
        assert cluster.runctx("cancel", run_id).returncode == 0
        assert cluster.wait(run_id)["status"] == "cancelled"

        def nap_state() -> str | None:
            tasks = flower.tasks_of({cluster.node_name("n1")}).values()
            state = next((t["state"] for t in tasks if t["name"] == "napper: nap"), None)
            return state if state not in (None, "STARTED", "RECEIVED") else None

        assert wait_for(nap_state, 30, "Flower to see the nap step end") == "REVOKED"


# ---- commands without servers ----------------------------------------------------------------------------


def runctx(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runctx.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_runctx_without_arguments_prints_the_help_and_nothing_else() -> None:
    done = runctx()
    assert done.returncode == 2 and "Usage: runctx" in done.stdout and done.stderr == ""


def test_a_malformed_command_line_exits_2_with_one_line() -> None:
    for args, option in ((["runs", "--status", "bogus"], "--status"), (["prune", "--older-than", "soon"], "--older-than"),
                         (["run"], "FILE"), (["status"], "RUN_ID")):
        done = runctx(*args)
        assert done.returncode == 2, (args, done.returncode, done.stderr)
        assert done.stderr.count("\n") == 1 and option in done.stderr, (args, done.stderr)


def test_stack_down_of_a_stack_that_is_down_has_nothing_to_do(tmp_path: Path) -> None:
    done = runctx("stack", "down", env={"RUNCTX_DATA_DIR": str(tmp_path / "never-started")})
    assert done.returncode == 3 and "nothing to stop" in done.stderr


def test_every_help_text_is_whole_sentences() -> None:
    listing = runctx("--help").stdout
    commands = ["check", "migrate", "run", "submit", "wait", "runs", "status", "context", "cancel", "prune", "worker", "keys", "stack"]
    for command in commands:
        line = next(line for line in listing.splitlines() if line.strip().startswith(command + " "))
        assert line.rstrip().endswith(".") and not line.rstrip().endswith("..."), line
        page = runctx(command, "--help").stdout
        assert page.startswith("Usage: runctx " + command), page
    for command in ("context", "worker", "prune"):
        body = runctx(command, "--help").stdout.split("\n\n")[1]
        assert body.strip().endswith("."), body


def test_servers_that_cannot_be_reached_are_one_line() -> None:
    done = runctx("runs", env={"RUNCTX_REDIS_URL": "redis://127.0.0.1:1", "RUNCTX_DATABASE_URL": "postgresql+psycopg://x@127.0.0.1:1/x"})
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("runctx: L3 (PostgreSQL) unreachable: "), done.stderr


@pytest.mark.slow
def test_a_typo_inside_a_step_is_named(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster()
    routine = tmp_path / "typo.yaml"
    routine.write_text("name: typo\nsteps:\n  - id: a\n    acton: increment\n    args: {name: n}\n")
    done = cluster.runctx("run", str(routine))
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert str(routine) in done.stderr and "steps[0]" in done.stderr and "unknown key 'acton'" in done.stderr


@pytest.mark.slow
def test_a_missing_secret_names_the_file_and_the_routine(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster()
    routine = tmp_path / "needs-token.yaml"
    routine.write_text("name: needs-token\nvariables:\n  token: {sensitivity: secret}\nsteps:\n  - {id: a, action: set, args: {name: x, value: 1}}\n")
    done = cluster.runctx("submit", str(routine))
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert str(routine) in done.stderr and "needs-token" in done.stderr and "variables.token" in done.stderr


@pytest.mark.slow
def test_unknown_runs_are_one_line_and_exit_1_for_every_command(make_cluster) -> None:
    cluster = make_cluster()
    for command in (["status"], ["context"], ["cancel"], ["wait", "--timeout", "1"]):
        done = cluster.runctx(*command, "no-such-run")
        assert done.returncode == 1, (command, done.returncode, done.stderr)
        assert done.stderr.strip() == "runctx: run 'no-such-run' does not exist", (command, done.stderr)
