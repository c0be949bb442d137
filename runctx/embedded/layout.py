"""The paths, sockets, URLs and passwords of one embedded stack.

Shared by the owners (:mod:`runctx.embedded.stack`) and the supervisor process, which imports
nothing but the standard library and psutil: so does this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import quote

ROOT_PG_BASE = Path("/var/lib/runctx")  # as root: postgres clusters, and a copy of its binaries
PG_PORT = 5432  # only names the socket file; postgres listens on no TCP port
PG_SUPERUSER = "postgres"
DB_NAME = "runctx"
MAX_SOCKET_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1


@dataclass(frozen=True)
class Layout:
    """Where everything of one embedded stack lives, derived from its data directory.

    Holds nothing but the data directory, so every process that makes a Layout of the same
    directory (the owners, the supervisor) agrees on every path. Promises socket paths that fit
    in ``sockaddr_un``. It writes only the directories (``make_dirs``) and the secrets file
    (``ensure_passwords``).
    """

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
