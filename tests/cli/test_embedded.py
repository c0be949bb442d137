"""The commands a new user runs first, on the embedded stack whatever the environment says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from tests.support.servers import remove_data_dir
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


def _runctx(data_dir: Path, *args: str, timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RUNCTX_")}
    env["RUNCTX_DATA_DIR"] = str(data_dir)
    env.update(extra_env)
    return subprocess.run(
        [sys.executable, "-m", "runctx.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _processes_using(data_dir: Path) -> list[str]:
    found = []
    for process in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            environ = process.info["environ"] or {}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if str(data_dir) in cmdline or environ.get("RUNCTX_DATA_DIR") == str(data_dir):
            if process.pid != os.getpid() and process.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{process.pid} {cmdline}")
    return found


def _assert_nothing_left(data_dir: Path) -> None:
    wait_for(lambda: not _processes_using(data_dir), 10, lambda: f"no process using {data_dir}: {_processes_using(data_dir)}", 0.1)
    assert _processes_using(data_dir) == []


@pytest.fixture
def data_dir():
    path = Path(tempfile.mkdtemp(prefix="rctx-cli-"))  # short: it holds Unix sockets
    yield path
    _assert_nothing_left(path)
    remove_data_dir(path)


@pytest.mark.embedded
def test_check_round_trips_through_all_three_tiers(data_dir: Path) -> None:
    done = _runctx(data_dir, "check", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["servers"] == "embedded"
    reads = [step["tier"] for step in report["steps"] if step["step"] == "read"]
    assert reads == ["L1", "L2", "L3"]
    assert {step["step"] for step in report["steps"]} >= {"create", "commit", "flush", "invalidate"}
    assert report["redis_persistence"] == "aof-everysec" and report["warnings"] == []  # the embedded Redis keeps an AOF
    _assert_nothing_left(data_dir)

    human = _runctx(data_dir, "check")  # a second run reuses the data directory
    assert human.returncode == 0 and "ok: all three tiers answered" in human.stdout


@pytest.mark.embedded
@pytest.mark.slow
def test_run_with_local_workers_on_the_embedded_stack(data_dir: Path) -> None:
    done = _runctx(data_dir, "run", "examples/sequence.yaml", "--workers", "2", "--json", "--var", "total=10")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "succeeded"
    assert result["variables"] == {"total": 13, "total_copy": 13, "status": "done"}
    assert [step["id"] for step in result["steps"]] == ["start", "add-1", "add-2", "keep", "done"]
    _assert_nothing_left(data_dir)


@pytest.mark.embedded
def test_failed_run_exits_non_zero_with_a_reason(data_dir: Path, tmp_path: Path) -> None:
    routine = tmp_path / "fails.yaml"
    routine.write_text("name: fails\nsteps:\n  - {id: boom, action: fail, args: {message: out of coffee}}\n")
    done = _runctx(data_dir, "run", str(routine), "--workers", "1")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].endswith("failed: step 'boom': out of coffee")


@pytest.mark.embedded
@pytest.mark.slow
def test_user_actions_run_and_their_errors_fail_the_run_without_leaking_secrets(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "myactions.py").write_text(
        "from tasks.changes import Change\n"
        "def greet(view, args):\n"
        "    return [Change.set('message', 'hello ' + view.get('user')), Change.increment('calls')]\n"
        "def explode(view, args):\n"
        "    raise ValueError('cannot use token ' + view.get('api_token'))\n"
    )
    routine = tmp_path / "user.yaml"
    routine.write_text(
        "name: user-actions\n"
        "variables: {user: bob, api_token: {sensitivity: secret}}\n"
        "steps:\n"
        "  - {id: greet, action: 'myactions:greet'}\n"
        "  - {id: explode, action: 'myactions:explode', reads: [api_token]}\n"
    )
    (tmp_path / "vars.json").write_text('{"api_token": "tok-SECRET-4242"}')
    done = _runctx(
        data_dir, "run", str(routine), "--var-file", str(tmp_path / "vars.json"), "--workers", "1", "--json",
        PYTHONPATH=str(tmp_path), RUNCTX_ACTION_MODULES="myactions",
    )
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert result["status"] == "failed"
    assert result["variables"]["message"] == "hello bob" and result["variables"]["calls"] == 1
    # The step read the secret: its error's text is never shown, only its type and the step.
    hidden = "ValueError: <hidden: the step read secret values>"
    assert result["error"] == f"step 'explode': action 'myactions:explode' raised {hidden}"
    assert "tok-SECRET-4242" not in done.stdout + done.stderr
    logs = "".join(path.read_text() for path in (data_dir / "logs").glob("worker-*.log"))
    assert hidden in logs and "tok-SECRET-4242" not in logs


@pytest.mark.embedded
def test_a_variable_over_its_limit_is_refused_naming_the_variable_and_the_limit(data_dir: Path, tmp_path: Path) -> None:
    routine = tmp_path / "small.yaml"
    routine.write_text("name: small\nvariables: {a: 1}\nsteps: [{id: s, action: set, args: {name: b, value: 1}}]\n")
    done = _runctx(data_dir, "run", str(routine), "--var", 'a="a value longer than ten bytes"', RUNCTX_MAX_VALUE_BYTES="10")
    assert done.returncode == 1
    assert done.stderr.strip() == "runctx: variable 'a': max_value_bytes is 10, got 31"


@pytest.mark.embedded
def test_stack_up_keeps_the_servers_between_commands_until_stack_down(data_dir: Path) -> None:
    up = _runctx(data_dir, "stack", "up", "--json")
    assert up.returncode == 0, up.stderr
    state = json.loads(up.stdout)
    assert (state["status"], state["kept_up"]) == ("up", True)
    servers = (state["redis_pid"], state["postgres_pid"])
    assert json.loads(_runctx(data_dir, "stack", "up", "--json").stdout)["redis_pid"] == servers[0]  # up already

    ran = _runctx(data_dir, "run", str(ROOT / "examples" / "welcome.yaml"), "--workers", "1", "--json")
    assert ran.returncode == 0, ran.stderr
    after = _runctx(data_dir, "stack", "status", "--json")
    assert after.returncode == 0 and (json.loads(after.stdout)["redis_pid"], json.loads(after.stdout)["postgres_pid"]) == servers
    listed = _runctx(data_dir, "runs", "--json")  # another command finds the run on the same servers
    assert [run["status"] for run in json.loads(listed.stdout)["runs"]] == ["succeeded"]

    down = _runctx(data_dir, "stack", "down")
    assert down.returncode == 0 and "is down" in down.stdout, down.stdout + down.stderr
    status = _runctx(data_dir, "stack", "status")
    assert status.returncode == 3 and "down" in status.stdout
    assert not any(psutil.pid_exists(pid) for pid in servers)
