"""Keeping this process's caches in step with other processes' commits (heard on the control bus,
or carried by a step's message) and with L3's change events (plain SQL edits, definitions)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from state.change_events import ChangeEvent
from state.errors import DetachedNotHeld, ContextCorruption, log_error
from state.models import RunContext
from state.tiers.contracts import L1Tier, L2Tier
from state.tiers.data import CommitRequest, CommitStatus, CommittedState

log = logging.getLogger(__name__)


class Invalidation:
    """Owns nothing but its tiers. Promises: an invalidation never drops a newer copy than the one
    it names; acknowledged step changes survive a concurrent plain-SQL edit of L3."""

    def __init__(self, l1: L1Tier, l2: L2Tier, *, clock: Callable[[], float]) -> None:
        self.l1, self.l2 = l1, l2
        self.clock = clock

    def take_commit(self, context_id: str, version: int, *, state: CommittedState | None = None) -> bool:
        """Another process committed ``version`` (heard from its broadcast, or carried by the message
        of the step that follows it): drop older L1 copies, or, given its ``state`` while this L1
        holds one of the versions its steps lead from, take it, so that a step here finds it in L1.
        Returns whether L1 now holds ``version``."""
        if state is not None and state.context_id == context_id and state.version == version:
            return self.l1.follow(state, self._decode_followed(context_id))
        self.l1.evict_context(context_id, up_to_version=version - 1)
        return False

    def _decode_followed(self, context_id: str) -> Callable[[bytes, str, RunContext], RunContext]:
        def decode(payload: bytes, payload_checksum: str, known: RunContext) -> RunContext:
            try:
                return self.l2.decode_state(payload, payload_checksum, [], key=context_id, known=known)
            except DetachedNotHeld:
                raise  # (a read from L2 takes its place: nothing is wrong)
            except ContextCorruption as exc:
                log_error(log, exc, "ignoring the state another process committed (a read from L2 takes its place)")
                raise

        return decode

    def run_ended(self, run_id: str) -> None:
        """The run failed or was cancelled: start none of its steps here."""
        self.l1.note_run_ended(run_id)

    def run_resumed(self, run_id: str) -> None:
        """The run was resumed: its steps may start here again."""
        self.l1.forget_run_ended(run_id)

    def forget_config(self, key: str) -> bool:
        """Drop this process's copy of a definition or configuration; whether it held one."""
        return self.l1.evict_config(key)

    def clear(self) -> None:
        """Drop the whole L1 (after a gap in what this process heard)."""
        self.l1.clear()

    def handle_change(self, event: ChangeEvent) -> None:
        """Apply an L3 change event to L2 and this process's L1."""
        if event.kind == "context":
            if event.origin == "runctx":
                return  # runctx wrote L3 from L2: L2 is already as new as this
            self._reconcile_sql_change(event.context_id, event.version or 0)
        else:
            for key in event.cache_keys:
                self.l2.evict_config(key)
                self.l1.evict_config(key)

    def _reconcile_sql_change(self, context_id: str, l3_version: int) -> None:
        """A context changed in L3 outside runctx, now at ``l3_version``.

        A clean L2 copy that is not newer is evicted, so the next read takes the edit. A dirty one
        holds step changes that were acknowledged but not yet written to L3: they are kept, moved
        to a version above the edit's so that the write-behind replaces it (the run's progress
        wins over a concurrent manual edit; nothing acknowledged is lost).
        """
        for _ in range(10):
            try:
                stored = self.l2.get_context(context_id)
            except ContextCorruption:
                self.l2.evict_context(context_id)
                break
            if stored is None or stored.version > l3_version:
                break
            if not stored.dirty:
                self.l2.evict_context(context_id, up_to_version=l3_version)
                break
            kept = stored.context.working_copy()
            kept.version = l3_version + 1
            reply = self.l2.commit(CommitRequest(kept, stored.version), now=self.clock())
            if reply.status is not CommitStatus.COMMITTED:
                continue  # expired, or a step committed meanwhile: look again
            log.warning(
                "context %s was changed in L3 (version %d) while it had unwritten changes; these are kept as version %d",
                context_id, l3_version, kept.version,
            )
            break
        self.l1.evict_context(context_id, up_to_version=l3_version)
