"""L1: the per-process LRU (cachetools) for contexts and configurations. No I/O, thread-safe."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import LRUCache, TTLCache

from state.models import RunContext, StateCacheConfig
from state.tiers.data import CommittedState, ConfigEntry

ENDED_RUNS_KEPT = 10_000  # failed runs a process remembers, so their queued steps do not start

# (payload, checksum, the version before it) -> the context it holds, applied steps aside
Decode = Callable[[bytes, str, RunContext], RunContext]


@dataclass(frozen=True)
class _Followed:
    """A context another process committed, kept as its payload until a step here reads it (a
    state carried by a step's message is read at once; most that broadcasts bring never are, and
    decoding each would cost every process CPU for every commit). ``base`` is the last decoded
    version; ``steps`` the ids of the steps committed since (a chain of tuples, newest first, so
    that following another commit is O(1))."""

    version: int
    epoch: int
    base: RunContext
    steps: tuple  # (step id, ..., older chain) or ()
    payload: bytes
    checksum: str
    decode: Decode

    def materialize(self) -> RunContext | None:
        try:
            ctx = self.decode(self.payload, self.checksum, self.base)
        except Exception:  # a damaged payload: as good as none (the read goes to L2)
            return None
        if ctx.version != self.version or ctx.epoch != self.epoch:
            return None
        newer: list[str] = []
        chain = self.steps
        while chain:
            *pairs, chain = chain
            newer[:0] = pairs
        ctx.continues(self.base, newer)
        return ctx


def _since(state: CommittedState, version: int) -> tuple[str, ...] | None:
    """The steps of ``state`` whose commits came after ``version``, if it names all of them."""
    behind = state.version - version
    return state.steps[-behind:] if 0 < behind <= len(state.steps) else None


class LocalCache:
    """L1: one process's two LRUs (contexts; routine definitions and configurations) behind one lock.

    Owns nothing durable. Promises: no I/O; never serves a context older than the version asked
    for; never replaces a cached context by an older one; safe while the control channel's thread
    evicts as tasks read. Entries are shared objects: treat what ``get_context`` returns as
    read-only and copy it before changing it (the tiered store does).
    """

    def __init__(self, config: StateCacheConfig) -> None:
        self._contexts: LRUCache[str, RunContext | _Followed] = LRUCache(maxsize=config.l1_contexts)
        # Configurations carry no version a reader could ask for, so a lost invalidation is
        # bounded by a TTL instead.
        self._configs: TTLCache[str, ConfigEntry] = TTLCache(maxsize=config.l1_configs, ttl=config.l1_config_ttl_s)
        # Learnt from this process or the control channel; L2's failed flag is the truth (a step's
        # commit checks it), this only spares the steps of a failed run their action.
        self._ended_runs: LRUCache[str, bool] = LRUCache(maxsize=ENDED_RUNS_KEPT)
        self._lock = threading.Lock()

    def get_context(self, context_id: str, at_least: int = 0, epoch: int | None = None) -> RunContext | None:
        """The cached context if it is at least version ``at_least`` (of ``epoch``, if given); else a miss."""
        with self._lock:
            ctx = self._contexts.get(context_id)
        if ctx is None or ctx.version < at_least or (epoch is not None and ctx.epoch != epoch):
            return None
        if isinstance(ctx, _Followed):
            followed, ctx = ctx, ctx.materialize()
            with self._lock:
                if self._contexts.get(context_id) is followed:
                    if ctx is None:
                        del self._contexts[context_id]
                    else:
                        self._contexts[context_id] = ctx
        return ctx

    def follow(self, state: CommittedState, decode: Decode) -> bool:
        """Another process committed ``state``: move the cached copy forward to it (decoded only when
        read), if the cached version is one of those the state's steps lead from. Returns whether L1
        now holds that version; if it held an older one that this does not follow, that one is
        dropped."""
        context_id, version, epoch = state.context_id, state.version, state.epoch
        with self._lock:
            cached = self._contexts.get(context_id)
            if cached is None:
                return False
            if (cached.epoch, cached.version) >= (epoch, version):
                return True
            steps = _since(state, cached.version) if cached.epoch == epoch else None
            if steps is None:
                del self._contexts[context_id]
                return False
            if isinstance(cached, _Followed):
                base, chain = cached.base, (*steps, cached.steps)
            else:
                base, chain = cached, (*steps, ())
            self._contexts[context_id] = _Followed(version, epoch, base, chain, state.payload, state.checksum, decode)
            return True

    def put_context(self, ctx: RunContext) -> None:
        """Cache a context unless a newer one (a later epoch, or a higher version) is already cached."""
        with self._lock:
            cached = self._contexts.get(ctx.context_id)
            if cached is None or (cached.epoch, cached.version) <= (ctx.epoch, ctx.version):
                self._contexts[ctx.context_id] = ctx

    def evict_context(self, context_id: str, up_to_version: int | None = None) -> bool:
        """Drop a context; with ``up_to_version``, only if the cached one is not newer than that."""
        with self._lock:
            cached = self._contexts.get(context_id)
            if cached is None or (up_to_version is not None and cached.version > up_to_version):
                return False
            del self._contexts[context_id]
            return True

    def context_version(self, context_id: str) -> int | None:
        with self._lock:
            cached = self._contexts.get(context_id)
        return None if cached is None else cached.version

    def note_run_ended(self, run_id: str) -> None:
        with self._lock:
            self._ended_runs[run_id] = True

    def forget_run_ended(self, run_id: str) -> None:
        with self._lock:
            self._ended_runs.pop(run_id, None)

    def run_ended(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._ended_runs

    def get_config(self, key: str) -> ConfigEntry | None:
        with self._lock:
            return self._configs.get(key)

    def put_config(self, entry: ConfigEntry) -> None:
        with self._lock:
            self._configs[entry.key] = entry

    def evict_config(self, key: str) -> bool:
        with self._lock:
            return self._configs.pop(key, None) is not None

    def clear(self) -> None:
        with self._lock:
            self._contexts.clear()
            self._configs.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._contexts) + len(self._configs)
