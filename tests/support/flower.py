"""Flower started as a user would (``celery -A workers flower``, HTTP basic auth) against a cluster's
broker, and its HTTP API."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.cluster import Cluster
from tests.support.servers import free_port
from tests.support.waiting import wait_for

CREDENTIALS = ("runctx", "s3cret-flower")


class Flower:
    """A running Flower and its HTTP API, queried with basic auth."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process, self.base, self.log = process, f"http://127.0.0.1:{port}", log

    def get(self, path: str, *, auth: bool = True, timeout_s: float = 10.0) -> tuple[int, bytes]:
        request = urllib.request.Request(self.base + path)
        if auth:
            token = base64.b64encode(":".join(CREDENTIALS).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, f"GET {path}: {status} {body[:300]!r}"
        return json.loads(body)

    def tasks_of(self, workers: set[str]) -> dict[str, dict[str, Any]]:
        """Every task Flower saw on these workers (events of other clusters on the broker left out)."""
        return {uuid: task for uuid, task in self.json("/api/tasks?limit=100000").items() if task.get("worker") in workers}

    def wait_for_workers(self, workers: set[str], timeout_s: float = 60.0) -> None:
        """Until Flower's event receiver has heard from every node (so it sees the run's events)."""

        def heard_from_all() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"flower exited:\n{self.log.read_text(errors='replace')[-3000:]}")
            try:
                status, body = self.get("/api/workers?status=true", timeout_s=5)
            except OSError:
                return False  # not listening yet
            return status == 200 and all(json.loads(body).get(worker) for worker in workers)

        wait_for(heard_from_all, timeout_s, lambda: f"flower to see {workers}:\n{self.log.read_text(errors='replace')[-3000:]}", 0.25)


@contextmanager
def start_flower(cluster: Cluster) -> Iterator[Flower]:
    """`celery -A workers flower` with the cluster's settings (so its broker), basic auth, a free port."""
    port = free_port()
    log_path = cluster.work_dir / "flower.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "workers", "flower",
                f"--port={port}", "--address=127.0.0.1", f"--basic_auth={':'.join(CREDENTIALS)}",
            ],
            env=cluster.env, cwd=cluster.work_dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        yield Flower(process, port, log_path)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
