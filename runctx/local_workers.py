"""Worker processes started for one command (`runctx run --workers N`) and stopped after it.

They are ordinary `celery -A workers worker` nodes, pointed at the same servers through the
RUNCTX_* environment; their output goes to log files, not to the command's output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType

from runctx.embedded import Servers
from state.errors import WorkersDidNotStart
from state.settings import Settings

__all__ = ["LocalWorkers", "WorkersDidNotStart"]


class LocalWorkers:
    """Worker nodes this command started: owns their processes and stops them (warm, then kill)."""

    def __init__(
        self, count: int, servers: Servers, settings: Settings, *, concurrency: int = 1,
        include: tuple[str, ...] = (), pythonpath: tuple[str, ...] = (),
    ) -> None:
        """``include``: more task modules the nodes import (``celery -I``), found on ``pythonpath``."""
        self.count = count
        self.include = include
        self.pythonpath = pythonpath
        self.servers = servers
        self.settings = settings
        self.concurrency = concurrency
        self.token = uuid.uuid4().hex[:6]
        self.names = [f"local{i + 1}-{self.token}@{os.uname().nodename}" for i in range(count)]
        self.log_dir = Path(settings.data_dir) / "logs"
        self.processes: list[subprocess.Popen[bytes]] = []

    def environment(self) -> dict[str, str]:
        env = {**os.environ, **self.servers.environment()}
        env["RUNCTX_KEY_PREFIX"] = self.settings.key_prefix
        env["RUNCTX_DATA_DIR"] = str(self.settings.data_dir)
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join([*self.pythonpath, *filter(None, [env.get("PYTHONPATH")])])
        return env

    def start(self, timeout_s: float = 60.0) -> LocalWorkers:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            log_file = open(self.log_dir / f"worker-{name.split('@')[0]}.log", "ab")
            command = [
                sys.executable, "-m", "celery", "-A", "workers", "worker", "-n", name,
                "-c", str(self.concurrency), "-P", "prefork", "--without-gossip", "--without-mingle", "-l", "INFO",
            ] + (["-I", ",".join(self.include)] if self.include else [])
            self.processes.append(
                subprocess.Popen(command, env=self.environment(), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            )
            log_file.close()
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        from workers import app

        deadline = time.monotonic() + timeout_s
        ready: set[str] = set()
        while time.monotonic() < deadline:
            for process, name in zip(self.processes, self.names):
                if process.poll() is not None:
                    raise WorkersDidNotStart(f"worker {name} exited with {process.returncode}; see {self.log_dir}")
            for reply in app.control.ping(destination=self.names, timeout=0.5) or []:
                ready.update(reply)
            if ready >= set(self.names):
                return
        raise WorkersDidNotStart(f"workers not ready after {timeout_s} s; see {self.log_dir}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """Warm shutdown (a running step finishes), then kill whatever is left."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def __enter__(self) -> LocalWorkers:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
