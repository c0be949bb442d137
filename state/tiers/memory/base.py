"""The shared state of the in-memory twin of L2: what each piece (`contexts`, `records`) keeps, under
one lock, as Redis keeps it (encoded payloads with their checksums, so a reader gets its own copy
and a damaged payload is detected the same way)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from state.codec import DEFAULT_CODEC, Codec
from state.keys import RedisKeys
from state.models import StateCacheConfig

@dataclass
class Entry:
    version: int
    checksum: str
    payload: bytes
    expires_at: float | None = None  # None: no TTL
    epoch: int = 1
    live: bool = True  # a live lineage, or a reader's copy filled from L3
    applied: list[str] = field(default_factory=list)  # beside the payload, as Redis keeps them
    applied_count: int = -1  # how many there are (-1: as many as the list holds), as the entry's n field
    # The newest applied steps with the version each one's commit made (as Redis scores them).
    scored: tuple[tuple[int, str], ...] = ()
    fields: dict[str, bytes] = field(default_factory=dict)  # detached values (`state.detached`)

    def __post_init__(self) -> None:
        if self.applied_count < 0:
            self.applied_count = len(self.applied)


@dataclass
class RunRecord:
    attempts: dict[str, int] = field(default_factory=dict)
    step_attempts: dict[str, int] = field(default_factory=dict)
    steps: dict[str, str] = field(default_factory=dict)
    failed: str | None = None
    hidden_error: dict | None = None
    l3_writes: int = 0
    done: bool = False
    progress: float | None = None
    fan_outs: dict[str, tuple[int, dict[int, tuple[int, bool]]]] = field(default_factory=dict)  # total, item -> rank, failed


class MemoryState:
    """The twin's storage: owns its entries, write-behind schedule, run records, leases and the
    queues commits pushed onto; every piece changes them under one lock, with TTLs measured by
    ``clock``."""

    def __init__(self, *, prefix: str, config: StateCacheConfig, codec: Codec = DEFAULT_CODEC, clock=time.time) -> None:
        self.keys = RedisKeys(prefix)
        self.prefix = prefix
        self.config = config
        self.codec = codec
        self.clock = clock
        self._contexts: dict[str, Entry] = {}
        self._configs: dict[str, Entry] = {}
        self._due: dict[str, float] = {}
        self._first: dict[str, float] = {}
        self._runs: dict[str, RunRecord] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._heartbeats = 0  # the heartbeat counter (a Redis that comes back empty starts again at 0)
        self._loss: tuple[float, float] | None = None  # (when L2 was found to have gone back, until when noted)
        self._loss_claims: dict[str, float] = {}  # run id -> until when its resume for the loss is claimed
        self._queues: dict[str, list[bytes]] = {}  # outbox messages pushed by commits, newest first (as LPUSH)
        self._history: dict[str, list[str]] = {}  # each context's history entries waiting for L3
        self._lock = threading.RLock()
        self._done = threading.Condition(self._lock)

    def _live(self, table: dict[str, Entry], key: str) -> Entry | None:
        entry = table.get(key)
        if entry is not None and entry.expires_at is not None and entry.expires_at <= self.clock():
            del table[key]
            return None
        return entry

    def _run(self, run_id: str) -> RunRecord:
        return self._runs.setdefault(run_id, RunRecord())

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass
