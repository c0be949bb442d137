"""Supervisor of the embedded stack: runs redis-server and postgres, stops them when no owner is left.

Started by :mod:`runctx.embedded.stack` as ``python -P supervisor.py DATA_DIR``. The process takes the
per-data-dir lock, daemonizes (so the lock is already held when its launcher exits), starts both
servers as its own children and reports progress in ``DATA_DIR/state.json``. It then polls the
owner leases in ``DATA_DIR/owners/`` and stops the servers once no owner process is alive.

It imports nothing but the standard library, psutil and the siblings that do the same (layout,
leases, startup, binaries): the package's ``__init__`` imports the rest lazily.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

if not __package__:
    # Run by path with -P, which keeps the data dir (our cwd) and this directory off sys.path:
    # the package comes from the tree this file is in, after everything installed.
    sys.path.append(str(Path(__file__).resolve().parents[2]))

from runctx.embedded.layout import Layout  # noqa: E402
from runctx.embedded.leases import flocked, live_owners, try_lock, write_state  # noqa: E402
from runctx.embedded.startup import START_TIMEOUT_S, ServerStartup, StartupError  # noqa: E402

POLL_S = 0.25  # how often the owners are checked
STOP_TIMEOUT_S = 20.0
EXIT_ALREADY_RUNNING = 75

log = logging.getLogger("runctx.supervisor")

_WAKE_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD}
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


class Supervisor:
    """The life of one stack's servers: start them, serve the owners, stop them when none is left.

    Owns the two server processes and ``DATA_DIR/state.json``. Promises: the state goes starting,
    ready (with the server pids), stopping, stopped, or failed (with the error); "stopping" is
    written under the owners lock, so an owner arriving then waits for this process to exit
    instead of joining servers about to stop; the servers are gone once it says stopped.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.startup = ServerStartup(layout)
        self.redis: subprocess.Popen[bytes] | None = None
        self.postgres: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        write_state(self.layout, "starting")
        try:
            self.kill_orphans()
            self.start_servers()
        except Exception as exc:
            log.exception("start-up failed")
            self.stop_servers()
            self.remove_socket_dir()
            write_state(self.layout, "failed", error=str(exc))  # last: owners raise once nothing runs
            return 1
        assert self.redis and self.postgres
        write_state(self.layout, "ready", redis_pid=self.redis.pid, postgres_pid=self.postgres.pid)
        log.info("ready: redis pid %d, postgres pid %d", self.redis.pid, self.postgres.pid)
        reason = self.watch()
        log.info("stopping: %s", reason)
        with flocked(self.layout.owners_lock):
            write_state(self.layout, "stopping")
        self.stop_servers()
        self.remove_socket_dir()
        # Not deleted: until our lock is released, a new owner must see that we are finished.
        write_state(self.layout, "stopped")
        log.info("stopped")
        return 0

    def watch(self) -> str:
        """Wait until there is a reason to stop, and return it."""
        while True:
            sig = signal.sigtimedwait(_WAKE_SIGNALS, POLL_S)
            if sig is not None and sig.si_signo in _STOP_SIGNALS:
                return f"received signal {signal.Signals(sig.si_signo).name}"
            for name, proc in (("redis-server", self.redis), ("postgres", self.postgres)):
                if proc is not None and proc.poll() is not None:
                    return f"{name} exited unexpectedly with code {proc.returncode}"
            with flocked(self.layout.owners_lock):
                if not live_owners(self.layout, prune=True):
                    # Still under the lock: a new owner now sees "stopping" and waits for us to exit.
                    write_state(self.layout, "stopping")
                    return "no owner left"

    # start-up

    def kill_orphans(self) -> None:
        """Stop servers a previous supervisor of this data dir left behind (we hold the lock: any is an orphan)."""
        pid_file = self.layout.pg_dir / "postmaster.pid"
        for proc in psutil.process_iter(["name"]):
            try:
                if proc.info["name"] not in ("redis-server", "postgres"):
                    continue
                cwd = Path(proc.cwd())
                # For postgres only the postmaster: its backends follow it.
                parent = proc.parent()
                postmaster = cwd == self.layout.pg_dir and (parent is None or parent.name() != "postgres")
                if cwd == self.layout.redis_dir or postmaster:
                    log.warning("stopping orphaned %s (pid %d)", proc.info["name"], proc.pid)
                    proc.send_signal(signal.SIGTERM if proc.info["name"] == "redis-server" else signal.SIGQUIT)
                    try:
                        proc.wait(10)
                    except psutil.TimeoutExpired:
                        proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        # No postmaster of ours runs now, so a leftover pid file is stale; postgres would refuse to
        # start if its pid had been reused by an unrelated process.
        pid_file.unlink(missing_ok=True)

    def start_servers(self) -> None:
        self.redis = self.startup.start_redis()
        self.postgres = self.startup.start_postgres()
        deadline = time.monotonic() + START_TIMEOUT_S
        redis_ready = pg_ready = False
        while not (redis_ready and pg_ready):
            for name, proc in (("redis-server", self.redis), ("postgres", self.postgres)):
                if proc is not None and proc.poll() is not None:
                    raise StartupError(f"{name} exited with code {proc.returncode}; see {self.layout.log_file(name.split('-')[0])}")
            redis_ready = redis_ready or self.startup.redis_answers()
            pg_ready = pg_ready or self.startup.postgres_ready(self.postgres.pid)
            if time.monotonic() > deadline:
                raise StartupError(f"servers not ready after {START_TIMEOUT_S:.0f} s (redis {redis_ready}, postgres {pg_ready})")
            sig = signal.sigtimedwait(_WAKE_SIGNALS, 0.01)
            if sig is not None and sig.si_signo in _STOP_SIGNALS:
                raise StartupError(f"received signal {signal.Signals(sig.si_signo).name} during start-up")
        self.startup.ensure_database()

    # shutdown

    def stop_servers(self) -> None:
        """Stop both servers: postgres fast shutdown, redis SHUTDOWN (via SIGTERM); escalate if they hang."""
        escalation = {
            "postgres": (self.postgres, [signal.SIGINT, signal.SIGQUIT, signal.SIGKILL]),
            "redis-server": (self.redis, [signal.SIGTERM, signal.SIGKILL]),
        }
        for step in range(3):
            timeout = STOP_TIMEOUT_S if step == 0 else 5.0
            pending = []
            for name, (proc, signals) in escalation.items():
                if proc is not None and proc.poll() is None and step < len(signals):
                    proc.send_signal(signals[step])
                    pending.append((name, proc))
            deadline = time.monotonic() + timeout
            for name, proc in pending:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                    log.info("%s exited with code %s", name, proc.returncode)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) did not stop in time", name, proc.pid)
            if not pending:
                break

    def remove_socket_dir(self) -> None:
        """Remove a /tmp fallback socket directory (the servers removed their sockets)."""
        if self.layout.socket_dir.parent == Path("/tmp"):
            for directory in (self.layout.pg_socket_dir, self.layout.socket_dir):
                try:
                    directory.rmdir()
                except OSError:
                    pass


def main(argv: list[str]) -> int:
    layout = Layout(Path(argv[1]))
    layout.make_dirs()
    lock_fd = try_lock(layout.supervisor_lock)
    if lock_fd is None:
        return EXIT_ALREADY_RUNNING
    layout.ensure_passwords()  # under the lock: one supervisor makes them
    # Daemonize; the child inherits the locked descriptor, so the lock is held once our launcher
    # (which waits for this process) returns. We already are in a new session without a terminal.
    if os.fork() > 0:
        os._exit(0)
    os.chdir(layout.data_dir)
    os.umask(0o077)
    for sig in _WAKE_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, _WAKE_SIGNALS)  # consumed synchronously with sigtimedwait
    logging.basicConfig(filename=layout.log_file("supervisor"), level=logging.INFO,
                        format="%(asctime)s supervisor[%(process)d] %(levelname)s %(message)s")
    try:
        return Supervisor(layout).run()
    except Exception as exc:
        log.exception("supervisor failed")
        write_state(layout, "failed", error=f"supervisor failed: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
