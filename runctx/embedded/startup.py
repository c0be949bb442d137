"""How the supervisor starts redis-server and postgres as its children, and tells when they are ready.

Used only by the supervisor process (:mod:`runctx.embedded.supervisor`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import pwd
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from runctx.embedded.binaries import (
    OWNER_FILE,
    SYSTEM_USER,
    collect_orphaned_clusters,
    ensure_owned_dir,
    ensure_pg_install_readable,
    ensure_system_user,
    ensure_traversable,
    pg_bin,
    redis_server_bin,
    runnable_pg_bin,
)
from runctx.embedded.layout import DB_NAME, PG_PORT, PG_SUPERUSER, ROOT_PG_BASE, Layout

START_TIMEOUT_S = 120.0  # generous: includes a first initdb on a slow disk

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


class StartupError(RuntimeError):
    pass


def _child_setup(user: pwd.struct_passwd | None, death_signal: int) -> Callable[[], None]:
    """preexec_fn for a server: drop to ``user`` and die with ``death_signal`` when the supervisor dies."""
    parent = os.getpid()

    def setup() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())  # the mask the supervisor waits with is inherited
        if user is not None:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
        # Only now: changing credentials clears PDEATHSIG.
        if _libc.prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(126)

    return setup


class ServerStartup:
    """Starts the servers of one stack as children of this process, and checks they answer.

    Owns what the servers run with: redis.conf, the postgres cluster (initdb, the runctx database),
    the server directories and who owns them, and a clean environment. Promises: every child logs
    to its file in ``DATA_DIR/logs`` and dies with this process; as root, postgres runs as the
    system user, never as root.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.user = ensure_system_user(SYSTEM_USER) if os.geteuid() == 0 else None
        # A clean environment: no PGHOST/PGDATA/LANG surprises from whoever started us.
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}

    @property
    def legacy_root(self) -> bool:
        """As root, with a cluster an older runctx made under the data dir."""
        return self.user is not None and self.layout.pg_base == self.layout.data_dir

    def start_redis(self) -> subprocess.Popen[bytes]:
        def q(path: Path) -> str:
            return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'

        conf = self.layout.redis_dir / "redis.conf"
        conf.write_text("\n".join([
            "daemonize no",
            "port 0",  # no TCP at all; bind is only a second line of defence
            "bind 127.0.0.1",
            "protected-mode yes",
            f"unixsocket {q(self.layout.redis_socket)}",
            "unixsocketperm 700",
            # The generated password (URL-safe characters only) from the 0600 secrets file.
            *([f'requirepass "{self.layout.passwords()["redis"]}"'] if self.layout.passwords().get("redis") else []),
            f"dir {q(self.layout.redis_dir)}",
            # It holds write-behind records not yet in PostgreSQL: keep them across restarts.
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            'logfile ""',  # stdout, which is our log file
            "always-show-logo no",
            "",
        ]))
        # 0700: only we reach the sockets; a cluster made by an older runctx keeps its socket in
        # here, which postgres (another user when we are root) must traverse to.
        ensure_owned_dir(self.layout.socket_dir, None, 0o711 if self.legacy_root else 0o700)
        return self._spawn("redis", [str(redis_server_bin()), str(conf)], self.layout.redis_dir, None, signal.SIGTERM)

    def start_postgres(self) -> subprocess.Popen[bytes]:
        pg_dir = self.layout.pg_dir
        if self.user is not None and not self.legacy_root:
            ensure_owned_dir(ROOT_PG_BASE, None, 0o755)  # ours: made here, changed nowhere else
            collect_orphaned_clusters()
            ensure_owned_dir(self.layout.pg_base, self.user, 0o700)
            (self.layout.pg_base / OWNER_FILE).write_text(str(self.layout.data_dir))
        ensure_owned_dir(pg_dir, self.user)
        ensure_owned_dir(self.layout.pg_socket_dir, self.user)
        if self.legacy_root:  # as it was set up then
            ensure_traversable(self.layout.socket_dir)
            ensure_traversable(self.layout.data_dir)
            ensure_pg_install_readable(pg_bin("postgres").parent)
        if not (pg_dir / "PG_VERSION").exists():
            self.initdb(pg_dir)
        return self._spawn("postgres", [
            str(self.pg_bin("postgres")), "-D", str(pg_dir), "-p", str(PG_PORT),
            "-h", "",  # listen_addresses='': no TCP at all
            "-k", str(self.layout.pg_socket_dir),
            "-c", "unix_socket_permissions=0700",
            "-c", "logging_collector=off",
        ], pg_dir, self.user, signal.SIGINT)  # SIGINT = fast shutdown

    def pg_bin(self, name: str) -> Path:
        return runnable_pg_bin(self.layout, self.user, name)

    def initdb(self, pg_dir: Path) -> None:
        """A new cluster whose superuser logs in with the generated password (scram-sha-256)."""
        log.info("initdb %s", pg_dir)
        password = self.layout.passwords().get("postgres")
        pwfile = pg_dir.parent / f".pwfile-{os.getpid()}"
        auth = ["--auth=trust", "--auth-local=trust"]
        if password:
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(password + "\n")
            if self.user is not None:
                os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
            auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        try:
            initdb = self._spawn("postgres", [str(self.pg_bin("initdb")), "-D", str(pg_dir), *auth, "--encoding=utf8",
                                              "--no-locale", "-U", PG_SUPERUSER], pg_dir, self.user, signal.SIGKILL)
            try:
                initdb.wait(START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                initdb.kill()
                initdb.wait()
        finally:
            pwfile.unlink(missing_ok=True)
        if initdb.returncode != 0:
            raise StartupError(f"initdb failed with code {initdb.returncode}; see {self.layout.log_file('postgres')}")

    def _spawn(self, log_name: str, args: list[str], cwd: Path, user: pwd.struct_passwd | None,
               death_signal: int) -> subprocess.Popen[bytes]:
        with self.layout.log_file(log_name).open("ab") as out:
            return subprocess.Popen(args, cwd=cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=out, preexec_fn=_child_setup(user, death_signal))

    def redis_answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(str(self.layout.redis_socket))
                password = self.layout.passwords().get("redis")
                if password:
                    s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(password.encode()), password.encode()))
                    if not s.recv(64).startswith(b"+OK"):
                        return False
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")  # -LOADING while it replays the AOF
        except OSError:
            return False

    def postgres_ready(self, postmaster_pid: int) -> bool:
        try:
            lines = (self.layout.pg_dir / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return False
        return len(lines) >= 8 and lines[0].strip() == str(postmaster_pid) and lines[7].strip() == "ready"

    def ensure_database(self) -> None:
        sql = f"SELECT 'CREATE DATABASE {DB_NAME}' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{DB_NAME}')\\gexec\n"
        result = subprocess.run(
            [str(self.pg_bin("psql")), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.layout.pg_socket_dir),
             "-p", str(PG_PORT), "-U", PG_SUPERUSER, "-d", "postgres"],
            input=sql.encode(), capture_output=True, timeout=30,
            env={**self.env, "PGPASSWORD": self.layout.passwords().get("postgres", "")})
        if result.returncode != 0:
            raise StartupError(f"creating database {DB_NAME} failed: {result.stderr.decode(errors='replace')}")
