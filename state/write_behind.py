"""The write-behind L2 -> L3: the contexts whose changes wait for L3, written when their debounce
window has passed, many in one L3 transaction."""

from __future__ import annotations

import logging
from collections.abc import Callable

from state.errors import ContextCorruption, log_error
from state.metrics import count_l3_write
from state.models import RunContext
from state.run_history import RunHistory
from state.tiers.contracts import L1Tier, L2Tier, L3Tier

log = logging.getLogger(__name__)


class WriteBehind:
    """Owns nothing but its tiers. Promises: L3 only ever gets a newer (epoch, version) of a context
    than it holds, with the history entries waiting beside it in the same transaction; a context
    whose L2 entry is damaged is dropped (L3 keeps its last good version); a flush that fails
    writes nothing of its batch (one transaction) and can be made again."""

    def __init__(self, l1: L1Tier, l2: L2Tier, l3: L3Tier, *, clock: Callable[[], float], history: RunHistory) -> None:
        self.l1, self.l2, self.l3 = l1, l2, l3
        self.clock = clock
        self.history = history

    def flush(self, context_ids: list[str]) -> int:
        """Write the L2 version of each context to L3 where it is newer there, in one transaction;
        returns how many L3 rows changed."""
        found: list[tuple[RunContext, bool]] = []
        gone: list[str] = []  # no entry left in L2: only its waiting history is written
        for context_id in dict.fromkeys(context_ids):
            try:
                stored = self.l2.get_context(context_id)
            except ContextCorruption as exc:
                log_error(log, exc, "dropping it, L3 keeps the last good version")
                self.l2.evict_context(context_id)
                self.l1.evict_context(context_id)
                continue
            if stored is None:
                gone.append(context_id)
                continue
            found.append((stored.context, stored.live))
        # Read after the contexts: an entry may be of a version newer than the one written, never older.
        entries, taken = self.history.to_write([ctx.context_id for ctx, _ in found] + gone)
        if not found and not entries:
            for context_id in gone:
                self.mark_flushed(context_id, 0, epoch=0, expire=False)  # nothing left to write
            return 0
        written = self.l3.write_contexts([ctx for ctx, _ in found], entries)
        for ctx, live in found:
            # A running run's contexts keep no TTL: losing one would cost a rewind.
            self.l2.mark_flushed(
                ctx.context_id, ctx.version, now=self.clock(), epoch=ctx.epoch, expire=not live,
                history_taken=taken.get(ctx.context_id, ""),
            )
        for context_id in gone:
            self.l2.mark_flushed(context_id, 0, now=self.clock(), epoch=0, expire=False, history_taken=taken.get(context_id, ""))
        if written:
            count_l3_write("snapshot", written)
        return written

    def give_up(self, context_id: str) -> None:
        """Stop trying to write a context that L3 refuses for good (its run fails instead)."""
        self.mark_flushed(context_id, 2**53, epoch=2**31, expire=True)

    def mark_flushed(self, context_id: str, version: int, *, epoch: int = 1, expire: bool = False) -> None:
        """Record that L3 holds (``epoch``, ``version``), written by a flush or by a finalize."""
        self.l2.mark_flushed(context_id, version, now=self.clock(), epoch=epoch, expire=expire)
