"""What the owners of an embedded stack and its supervisor share on disk: locks, leases and state.

An owner is a process using the servers; its lease is ``DATA_DIR/owners/<pid>``, which records
the pid's start time too, so that a reused pid owns nothing. The supervisor holds
``supervisor.lock`` for its whole life, and ``owners.lock`` serializes adding an owner against the
supervisor deciding to stop. ``state.json`` is the supervisor's report to the owners: starting,
ready (with the server pids), stopping, stopped or failed (with the error).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from runctx.embedded.layout import Layout


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


def write_json(path: Path, data: dict[str, Any]) -> None:
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
    write_json(layout.state_file, {"status": status, "supervisor_pid": me.pid,
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
    write_json(layout.owners_dir / str(pid), {"pid": pid, "create_time": psutil.Process(pid).create_time()})


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
