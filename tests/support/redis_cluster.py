"""A throwaway local Redis Cluster of three primaries, started with ``redis-server --cluster-enabled yes``
and joined with ``redis-cli --cluster create``, for the tests of L2 on a cluster."""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.support.waiting import wait_for


def free_port() -> int:
    # A cluster node also listens on port + 10000 (the cluster bus): both must be free.
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def available() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


@dataclass
class RedisCluster:
    directory: Path
    ports: list[int] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """What a user sets RUNCTX_REDIS_URL to: any one node of the cluster."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, primaries: int = 3) -> RedisCluster:
        for n in range(primaries):
            port = free_port()
            node_dir = self.directory / f"node-{port}"
            node_dir.mkdir(parents=True)
            log = open(node_dir / "redis.log", "ab")
            self.processes.append(
                subprocess.Popen(
                    [
                        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                        "--cluster-config-file", str(node_dir / "nodes.conf"), "--dir", str(node_dir),
                        "--save", "", "--appendonly", "no", "--protected-mode", "no",
                    ],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )
            )
            log.close()
            self.ports.append(port)
        for port in self.ports:
            self._wait(lambda: redis.Redis(port=port).ping())
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )
        for port in self.ports:
            self._wait(lambda: redis.Redis(port=port).cluster("info")["cluster_state"] == "ok")
        return self

    def nodes(self) -> list[redis.Redis]:
        return [redis.Redis(port=port) for port in self.ports]

    def keys_per_node(self, match: str) -> dict[int, list[bytes]]:
        """The keys matching a pattern that each primary holds."""
        out = {}
        for port, client in zip(self.ports, self.nodes()):
            out[port] = list(client.scan_iter(match=match, count=1000))
            client.close()
        return out

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait(10)

    @staticmethod
    def _wait(ready, timeout_s: float = 30.0) -> None:
        def answers() -> bool:
            try:
                return bool(ready())
            except redis.RedisError:
                return False

        wait_for(answers, timeout_s, "the Redis Cluster to come up", 0.05)
