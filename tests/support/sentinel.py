"""A Redis master, its replica and three Sentinels watching them, all on loopback ports of a test's
own: to SIGKILL the master and let the Sentinels fail over to the replica."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import redis

from tests.support.servers import free_port
from tests.support.waiting import wait_for

MASTER_NAME = "runctx-test"
DOWN_AFTER_MS = 1000  # how long the Sentinels wait before they call the master down


class SentinelSet:
    """Owns its redis-server processes (master, replica, Sentinels) and their directory."""

    def __init__(self, work_dir: Path, sentinels: int = 3) -> None:
        self.work_dir = work_dir
        self.ports = {"master": free_port(), "replica": free_port()}
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"sentinel://{hosts}/{db}?master={MASTER_NAME}"

    def start(self) -> SentinelSet:
        self._server("master", [])
        self._server("replica", ["--replicaof", "127.0.0.1", str(self.ports["master"])])
        replica = redis.Redis(port=self.ports["replica"], socket_timeout=1)
        wait_for(lambda: replica.info("replication").get("master_link_status") == "up", 20, "the replica to sync")
        replica.close()
        for n, port in enumerate(self.sentinel_ports):
            config = self.work_dir / f"sentinel-{n}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.work_dir}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.ports['master']} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            self._spawn(f"sentinel-{n}", [str(config), "--sentinel"], port)
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, socket_timeout=1)
            wait_for(lambda c=client: _knows_replica(c), 20, f"Sentinel on {port} to see the replica")
            client.close()
        return self

    def master_port(self) -> int:
        """The master the Sentinels name now."""
        client = redis.Redis(port=self.sentinel_ports[0], socket_timeout=1)
        try:
            return int(client.sentinel_get_master_addr_by_name(MASTER_NAME)[1])
        finally:
            client.close()

    def kill_master(self) -> int:
        """SIGKILL the current master; its port."""
        port = self.master_port()
        name = next(name for name, p in self.ports.items() if p == port)
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        return port

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(10)

    def _server(self, name: str, extra: list[str]) -> None:
        port = self.ports[name]
        options = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.work_dir),
                   "--dbfilename", f"{name}.rdb"]
        self._spawn(name, options + extra, port)

    def _spawn(self, name: str, args: list[str], port: int) -> None:
        log = open(self.work_dir / f"{name}.log", "ab")
        self.processes[name] = process = subprocess.Popen(
            ["redis-server", *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        client = redis.Redis(port=port, socket_timeout=1)

        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server {name} on port {port} exited: see {self.work_dir}")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_for(up, 20, f"redis-server {name} on port {port}")
        finally:
            client.close()


def _knows_replica(client: redis.Redis) -> bool:
    try:
        master = client.sentinel_master(MASTER_NAME)
        return int(master.get("num-slaves", 0)) >= 1 and int(master.get("num-other-sentinels", 0)) >= 1
    except redis.RedisError:
        return False
