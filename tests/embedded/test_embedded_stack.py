"""The embedded stack with real servers: start, use, and stop however its owner ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import kombu
import psutil
import psycopg
import pytest
import redis
import sqlalchemy as sa

from runctx.embedded import EmbeddedStack, admin_database_url
from runctx.embedded.layout import DB_NAME, PG_PORT, PG_SUPERUSER, ROOT_PG_BASE, Layout
from runctx.embedded.leases import read_state
from runctx.embedded import supervisor
from state.errors import EmbeddedStackError
from tests.support.servers import remove_data_dir
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.embedded, pytest.mark.timeout(120)]

REPO_ROOT = Path(__file__).resolve().parents[2]

# Starts the stack on $DATA_DIR (not in argv: the process scan below must not find the owner),
# prints the server pids, then ends the way argv[1] says.
OWNER_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from runctx.embedded import EmbeddedStack

    stack = EmbeddedStack(Path(os.environ["DATA_DIR"])).start()
    print(*stack.server_pids(), flush=True)
    mode = sys.argv[1]
    if mode == "exit":
        sys.exit(0)
    if mode == "raise":
        raise RuntimeError("owner failed")
    time.sleep(120)  # until the test signals us
""")


def alive(pid: int) -> bool:
    """Running and not a zombie (an orphan's zombie may wait a while for init to reap it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stack_processes(data_dir: Path) -> list[psutil.Process]:
    """Live processes of the stack on ``data_dir``: supervisor, redis-server, postgres and its backends."""
    layout = Layout(data_dir.resolve())
    marks = (str(layout.data_dir), str(layout.socket_dir), str(layout.pg_dir))
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            cwd = proc.cwd()
        except (psutil.Error, OSError):
            cwd = ""
        cmdline = " ".join(proc.info["cmdline"] or [])
        if any(mark in cmdline for mark in marks) or any(cwd == root or cwd.startswith(root + "/") for root in (str(layout.data_dir), str(layout.pg_dir))):
            found.append(proc)
    return found


def no_stack_left(data_dir: Path) -> bool:
    return not stack_processes(data_dir)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "d"
    yield path
    # Whatever the test did, leave no server behind on the machine.
    with contextlib.suppress(TimeoutError):  # what is left is told below
        wait_for(lambda: no_stack_left(path), 5, "no stack left")
    leftovers = stack_processes(path)
    for proc in leftovers:
        proc.kill()
    remove_data_dir(path)
    assert not leftovers, f"servers left running: {leftovers}"


def spawn(script: str, data_dir: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DATA_DIR": str(data_dir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_owner(data_dir: Path, mode: str) -> tuple[subprocess.Popen[str], list[int]]:
    """An owner process that started the stack, and the server pids it reported."""
    proc = spawn(OWNER_SCRIPT, data_dir, mode)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        pytest.fail(f"owner failed to start the stack:\n{proc.communicate()[1]}")
    return proc, [int(pid) for pid in line.split()]


def test_start_use_stop(data_dir: Path) -> None:
    with EmbeddedStack(data_dir) as stack:
        assert stack.redis_url.startswith("unix://")
        client = redis.Redis.from_url(stack.redis_url)
        assert client.ping()
        assert client.set("k", "v") and client.get("k") == b"v"
        client.close()

        with kombu.Connection(stack.broker_url) as broker:  # what Celery uses
            queue = broker.SimpleQueue("q")
            queue.put({"step": 1})
            message = queue.get(timeout=5)
            assert message.payload == {"step": 1}
            message.ack()
            queue.close()

        engine = sa.create_engine(stack.database_url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar() == 1
            assert conn.execute(sa.text("select current_database()")).scalar() == "runctx"
        engine.dispose()

        pids = stack.server_pids()
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        assert (data_dir / "redis" / "appendonly.aof").exists()  # persistence in the data dir
    # Leaving the block released the lease; the supervisor notices at once.
    wait_for(lambda: not any(alive(pid) for pid in pids), 5, "the servers gone")
    wait_for(lambda: no_stack_left(data_dir), 5, lambda: f"no stack left: {stack_processes(data_dir)}")
    assert stack.server_pids() == []


def test_stop_wait_returns_once_the_servers_are_gone(data_dir: Path) -> None:
    stack = EmbeddedStack(data_dir).start()
    pids = stack.server_pids()
    stack.stop(wait=True)
    assert not any(alive(pid) for pid in pids)
    assert no_stack_left(data_dir)


def test_redis_data_survives_restart(data_dir: Path) -> None:
    with EmbeddedStack(data_dir) as stack:
        redis.Redis.from_url(stack.redis_url).set("pending", "write-behind")
        stack.stop(wait=True)
    with EmbeddedStack(data_dir) as stack:
        assert redis.Redis.from_url(stack.redis_url).get("pending") == b"write-behind"
        stack.stop(wait=True)


def test_servers_listen_on_loopback_or_unix_sockets_only(data_dir: Path) -> None:
    with EmbeddedStack(data_dir) as stack:
        state = read_state(stack.layout)
        assert state is not None
        redis_pid, postmaster_pid = stack.server_pids()
        postgres = psutil.Process(postmaster_pid)
        processes = [psutil.Process(state["supervisor_pid"]), psutil.Process(redis_pid), postgres,
                     *postgres.children(recursive=True)]
        assert len(processes) > 3  # postgres has its background processes
        for proc in processes:
            try:
                connections = proc.net_connections(kind="inet")
            except psutil.NoSuchProcess:  # a short-lived postgres worker that has finished
                continue
            listening = [c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN]
            assert set(listening) <= {"127.0.0.1", "::1"}, (proc, listening)
        assert stack.layout.redis_socket.is_socket()
        assert (stack.layout.pg_socket_dir / f".s.PGSQL.{PG_PORT}").is_socket()
        assert redis.Redis.from_url(stack.redis_url).config_get("port") == {"port": "0"}


def test_long_data_dir_puts_sockets_in_a_short_directory(tmp_path: Path) -> None:
    data_dir = tmp_path / ("x" * 120)
    try:
        with EmbeddedStack(data_dir) as stack:
            assert len(str(stack.layout.redis_socket)) <= 107 and str(stack.layout.socket_dir).startswith("/tmp/")
            assert redis.Redis.from_url(stack.redis_url).ping()
            with psycopg.connect(stack.database_url.replace("+psycopg", "")) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
            stack.stop(wait=True)
        assert no_stack_left(data_dir)
        assert not stack.layout.socket_dir.exists()
    finally:
        for proc in stack_processes(data_dir):
            proc.kill()
        remove_data_dir(data_dir)


def test_admin_database_url_reaches_other_databases(data_dir: Path) -> None:
    assert admin_database_url("postgresql+psycopg://postgres@/runctx?host=/s", "postgres") == (
        "postgresql+psycopg://postgres@/postgres?host=/s")
    with EmbeddedStack(data_dir) as stack:
        admin = sa.create_engine(admin_database_url(stack.database_url, "postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text("create database throwaway"))
        scratch = sa.create_engine(admin_database_url(stack.database_url, "throwaway"))
        with scratch.connect() as conn:
            assert conn.execute(sa.text("select current_database()")).scalar() == "throwaway"
        scratch.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text("drop database throwaway"))
        admin.dispose()


@pytest.mark.parametrize("mode", ["exit", "raise", "sigterm", "sigkill"])
def test_servers_stop_when_the_owner_process_ends(data_dir: Path, mode: str) -> None:
    owner, pids = start_owner(data_dir, mode)
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    if mode == "sigterm":
        owner.send_signal(signal.SIGTERM)
    elif mode == "sigkill":
        owner.send_signal(signal.SIGKILL)
    _, stderr = owner.communicate(timeout=30)
    expected = {"exit": 0, "raise": 1, "sigterm": -signal.SIGTERM, "sigkill": -signal.SIGKILL}[mode]
    assert owner.returncode == expected, stderr
    wait_for(lambda: no_stack_left(data_dir), 5, lambda: f"no stack left: {stack_processes(data_dir)}")
    assert not any(alive(pid) for pid in pids)


def test_second_owner_reuses_the_servers_until_both_are_gone(data_dir: Path) -> None:
    owners: list[subprocess.Popen[str]] = []
    try:
        first, first_pids = start_owner(data_dir, "sleep")
        owners.append(first)
        second, second_pids = start_owner(data_dir, "sleep")
        owners.append(second)
        assert first_pids == second_pids

        first.kill()
        first.wait()
        time.sleep(3 * supervisor.POLL_S)  # the point: several supervisor polls, none of which may stop the servers
        assert all(alive(pid) for pid in first_pids)
        stack = EmbeddedStack(data_dir)  # not started: just for the URL
        assert redis.Redis.from_url(stack.redis_url).ping()

        second.terminate()
        second.wait()
        wait_for(lambda: no_stack_left(data_dir), 5, lambda: f"no stack left: {stack_processes(data_dir)}")
    finally:
        for owner in owners:
            owner.kill()
            owner.wait()


def test_owners_starting_at_the_same_time_share_one_stack(data_dir: Path) -> None:
    # The flocks decide which one starts the servers; the others join.
    owners = [spawn(OWNER_SCRIPT, data_dir, "sleep") for _ in range(3)]
    try:
        reported = [owner.stdout.readline().split() for owner in owners if owner.stdout]
        if not all(len(pids) == 2 for pids in reported):
            for owner in owners:
                owner.kill()
            pytest.fail("\n".join(owner.communicate()[1] for owner in owners))
        assert len({tuple(pids) for pids in reported}) == 1
        with EmbeddedStack(data_dir) as stack:  # this process joins as a fourth owner
            assert [str(pid) for pid in stack.server_pids()] == reported[0]
    finally:
        for owner in owners:
            owner.terminate()
            owner.wait()
    wait_for(lambda: no_stack_left(data_dir), 5, lambda: f"no stack left: {stack_processes(data_dir)}")


CHURN_SCRIPT = textwrap.dedent("""
    import os, random, time
    from pathlib import Path
    import psycopg, redis
    from runctx.embedded import EmbeddedStack

    for _ in range(6):
        stack = EmbeddedStack(Path(os.environ["DATA_DIR"])).start()
        assert redis.Redis.from_url(stack.redis_url).ping()
        with psycopg.connect(stack.database_url.replace("+psycopg", "")) as conn:
            conn.execute("select 1")
        time.sleep(random.random() * 0.3)  # the point: owners come and go at random moments
        stack.stop(wait=random.random() < 0.5)
        time.sleep(random.random() * 0.3)
""")


def test_owners_coming_and_going_never_join_a_stopping_stack(data_dir: Path) -> None:
    # Starts race with the supervisor deciding to stop: every start must get working servers.
    owners = [spawn(CHURN_SCRIPT, data_dir) for _ in range(3)]
    errors = [owner.communicate(timeout=90)[1] for owner in owners]
    assert [owner.returncode for owner in owners] == [0, 0, 0], errors
    wait_for(lambda: no_stack_left(data_dir), 5, lambda: f"no stack left: {stack_processes(data_dir)}")


def test_nested_stacks_in_one_process_share_one_lease(data_dir: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)  # the session's own embedded stack may hold a lease
    outer = EmbeddedStack(data_dir).start()
    with EmbeddedStack(data_dir) as inner:
        assert inner.server_pids() == outer.server_pids()
    time.sleep(3 * supervisor.POLL_S)  # the point: several supervisor polls, none of which may stop the servers
    assert all(alive(pid) for pid in outer.server_pids())
    outer.stop(wait=True)
    assert no_stack_left(data_dir)
    assert signal.getsignal(signal.SIGTERM) == before  # our handler is gone with the last lease of ours


def test_add_owner_keeps_the_servers_for_another_process(data_dir: Path) -> None:
    helper = subprocess.Popen(["sleep", "60"])
    try:
        stack = EmbeddedStack(data_dir).start()
        stack.add_owner(helper.pid)
        pids = stack.server_pids()
        stack.stop(wait=True)  # returns: the helper still owns the servers
        assert all(alive(pid) for pid in pids)
        helper.kill()
        helper.wait()
        wait_for(lambda: no_stack_left(data_dir), 5, lambda: f"no stack left: {stack_processes(data_dir)}")
    finally:
        helper.kill()
        helper.wait()


def test_start_failure_raises_with_the_log_tail(data_dir: Path) -> None:
    (data_dir / "redis").mkdir(parents=True)
    (data_dir / "redis" / "appendonly.aof").write_text("this is not an append only file\n")
    started = time.monotonic()
    with pytest.raises(EmbeddedStackError, match="redis-server exited") as error:
        EmbeddedStack(data_dir).start()
    assert time.monotonic() - started < 30
    assert "redis.log" in str(error.value) and "append only file" in str(error.value).lower()
    wait_for(lambda: no_stack_left(data_dir), 5, lambda: f"no stack left: {stack_processes(data_dir)}")


def test_the_supervisor_run_by_path_imports_only_the_standard_library_and_psutil(tmp_path: Path) -> None:
    """It lives as long as the servers, and is started by path with -P from the data dir."""
    path = Path(supervisor.__file__).resolve()
    script = (
        "import runpy, sys; before = set(sys.modules); "
        f"runpy.run_path({str(path)!r}, run_name='not_main'); "  # as by path, without running main()
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)))"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-P", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['psutil', 'runctx']"


# ---- hardening ----------------------------------------------------------------------------------


def _modes(path: Path) -> dict[str, int]:
    return {str(p): os.stat(p).st_mode & 0o7777 for p in [path, *path.parents]}


def test_the_stack_changes_no_permission_outside_its_directories_and_locks_its_servers(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    home.chmod(0o700)
    data_dir = home / "runctx"
    before = _modes(home)
    try:
        with EmbeddedStack(data_dir) as stack:
            assert _modes(home) == before  # no o+x added on the way to the data dir
            layout = stack.layout
            assert os.stat(layout.secrets_file).st_mode & 0o777 == 0o600
            assert os.stat(layout.socket_dir).st_mode & 0o777 == 0o700
            passwords = layout.passwords()
            assert set(passwords) == {"redis", "postgres"} and all(len(value) >= 24 for value in passwords.values())

            with pytest.raises(redis.exceptions.AuthenticationError):  # no password: refused
                redis.Redis(unix_socket_path=str(layout.redis_socket)).ping()
            assert redis.Redis.from_url(stack.redis_url).ping()

            with pytest.raises(psycopg.OperationalError, match="password"):
                psycopg.connect(host=str(layout.pg_socket_dir), port=PG_PORT, user=PG_SUPERUSER, dbname=DB_NAME)
            engine = sa.create_engine(stack.database_url)
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar() == 1
            engine.dispose()
            if os.geteuid() == 0:  # postgres runs as another user: its cluster lives where that user may go
                assert ROOT_PG_BASE in layout.pg_dir.parents
        assert _modes(home) == before
    finally:
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: no_stack_left(data_dir), 10, "no stack left")
        remove_data_dir(data_dir)
