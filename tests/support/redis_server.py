"""A throwaway redis-server of a test's own (no persistence): a wipe, a kill or a restart touches
nothing but the cluster under test."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import redis

from tests.support.servers import free_port
from tests.support.waiting import wait_for


class RedisServer:
    """A throwaway redis-server without persistence: killed, it comes back empty."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        self.starts += 1
        log = open(self.work_dir / f"redis-{self.starts}.log", "ab")
        self.process = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(self.work_dir),
            ],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        client = redis.Redis.from_url(self.url(), socket_timeout=1)
        process = self.process

        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited: see {self.work_dir}")
            return _pings(client)

        try:
            wait_for(up, 20, f"redis-server on port {self.port}", interval_s=0.02)
        finally:
            client.close()
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
