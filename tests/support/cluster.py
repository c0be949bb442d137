"""Real Celery worker nodes (prefork) for end-to-end tests, started and stopped as a user would.

Each cluster has its own database and key prefix (so its own queues), points its workers at
them through RUNCTX_* variables, and drives runs through the `runctx` command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

from state.models import StateCacheConfig
from state.sealing import KEY_FILE, Keyring
from state.sentinel import is_sentinel
from state.store import TieredStore
from state.tiers.redis import connect
from tests.support.waiting import wait_for

HERE = Path(__file__).resolve().parents[2]  # the repository root


@dataclass
class Cluster:
    redis_url: str
    database_url: str
    broker_url: str
    prefix: str
    work_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNCTX_")}
        env.update(
            {
                "RUNCTX_REDIS_URL": self.redis_url,
                "RUNCTX_DATABASE_URL": self.database_url,
                "RUNCTX_BROKER_URL": self.broker_url,
                "RUNCTX_KEY_PREFIX": self.prefix,
                "RUNCTX_ACTION_MODULES": os.environ.get("RUNCTX_ACTION_MODULES", "tests"),
                "RUNCTX_DATA_DIR": str(self.work_dir / "data"),
                "PYTHONUNBUFFERED": "1",
                # The test suite's own actions (RUNCTX_ACTION_MODULES=tests) are importable on the workers.
                "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p),
            }
        )
        env.update(self.extra_env)
        return env

    # ---- nodes ----------------------------------------------------------------------------------

    def node_name(self, short: str) -> str:
        return f"{short}-{self.prefix.rsplit(':', 1)[-1]}@{os.uname().nodename}"

    def log_path(self, short: str) -> Path:
        return self.work_dir / f"{short}.log"

    def start_node(
        self, short: str, *, concurrency: int = 2, loglevel: str = "INFO", env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a worker node; ``env``: settings of this node only, over the cluster's."""
        log = open(self.log_path(short), "ab")
        process = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "workers", "worker", "-n", self.node_name(short),
                "-c", str(concurrency), "-P", "prefork", "--without-gossip", "--without-mingle", "-l", loglevel,
            ],
            env={**self.env, **(env or {})}, cwd=self.work_dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        self.nodes[short] = process
        return process

    def start_nodes(self, *shorts: str, concurrency: int = 2, loglevel: str = "INFO") -> None:
        """Start worker nodes and wait until every one of them (and each pool process) is ready."""
        for short in shorts:
            self.start_node(short, concurrency=concurrency, loglevel=loglevel)
        self.wait_ready(*shorts)

    def wait_ready(self, *shorts: str, timeout_s: float = 60.0) -> None:
        """Every named node has logged 'ready' and each of its pool processes is subscribed."""
        deadline = time.monotonic() + timeout_s
        for short in shorts or tuple(self.nodes):

            def ready(short: str = short) -> bool:
                if self.nodes[short].poll() is not None:
                    raise RuntimeError(f"node {short} exited:\n{self.logs(short)[-3000:]}")
                return "ready." in self.log_path(short).read_text(errors="replace")

            wait_for(ready, deadline - time.monotonic(), lambda: f"node {short} to be ready:\n{self.logs(short)[-3000:]}", 0.1)
        expected = sum(len(self.pool_pids(short)) for short in shorts or tuple(self.nodes))
        wait_for(
            lambda: self.control_subscribers() >= expected, deadline - time.monotonic(),
            "pool processes to subscribe to the control channel", 0.05,
        )

    def control_subscribers(self) -> int:
        """Processes subscribed to the control channel (on a Redis Cluster: summed over its nodes)."""
        client = connect(self.redis_url) if is_sentinel(self.redis_url) else redis.Redis.from_url(self.redis_url)
        try:
            if not client.info("cluster").get("cluster_enabled"):
                return client.pubsub_numsub(f"{self.prefix}:control")[0][1]
            total = 0
            for address in client.cluster("nodes"):  # {"host:port": {...}}
                host, port = address.split("@")[0].rsplit(":", 1)
                node = redis.Redis(host=host, port=int(port))
                total += node.pubsub_numsub(f"{self.prefix}:control")[0][1]
                node.close()
            return total
        finally:
            client.close()

    def pool_pids(self, short: str) -> list[int]:
        try:
            return [child.pid for child in psutil.Process(self.nodes[short].pid).children()]
        except psutil.NoSuchProcess:
            return []

    def kill_node(self, short: str) -> None:
        """SIGKILL a node's main process (its pool processes die with it)."""
        process = self.nodes[short]
        children = self.pool_pids(short)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        psutil.wait_procs([psutil.Process(pid) for pid in children if psutil.pid_exists(pid)], timeout=10)

    def stop(self) -> None:
        for process in self.nodes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.nodes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def logs(self, short: str | None = None) -> str:
        names = [short] if short else list(self.nodes)
        return "\n".join(self.log_path(name).read_text(errors="replace") for name in names if self.log_path(name).exists())

    # ---- the runctx command -----------------------------------------------------------------------

    def runctx(self, *args: str, timeout_s: float = 120.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """The `runctx` command with the cluster's settings (``env``: others over them; a value of None unsets)."""
        merged = {**self.env, **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "runctx.cli", *args],
            env={k: v for k, v in merged.items() if v is not None}, cwd=self.work_dir, capture_output=True, text=True,
            timeout=timeout_s,
        )

    def run(self, routine: Path | str, *args: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """`runctx run ROUTINE --json`; returns the JSON object (whatever the exit code)."""
        done = self.runctx("run", str(routine), "--json", "--timeout", str(timeout_s), *args, timeout_s=timeout_s + 30)
        try:
            return json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise AssertionError(f"runctx run printed no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")

    def submit(self, routine: Path | str, *args: str) -> str:
        done = self.runctx("submit", str(routine), *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def wait(self, run_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
        done = self.runctx("wait", run_id, "--json", "--timeout", str(timeout_s), timeout_s=timeout_s + 30)
        try:
            return json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise AssertionError(f"runctx wait printed no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}") from None

    def store(self) -> TieredStore:
        """A store as the cluster's processes have it (the same keys open its sealed values)."""
        return TieredStore.connect(
            self.redis_url, self.database_url, config=StateCacheConfig(), prefix=self.prefix, keyring=self.keyring()
        )

    def keyring(self) -> Keyring:
        configured = self.env.get("RUNCTX_ENCRYPTION_KEYS")
        return Keyring.parse(configured) if configured else Keyring.from_file(self.work_dir / "data" / KEY_FILE)


def new_prefix() -> str:
    return f"rctxe2e:{uuid.uuid4().hex[:10]}"
