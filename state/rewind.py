"""Rebuilding a run whose L2 state was lost (Redis wiped, corrupted, restarted from an older
snapshot): the run starts a new epoch, each context continuing from its newest intact state."""

from __future__ import annotations

from collections.abc import Callable

from state.errors import ContextCorruption, LineageLost, TransactionFailed
from state.metrics import count_l3_write
from state.history import event_entry
from state.models import RunContext
from state.tiers.contracts import L1Tier, L2Tier, L3Tier
from state.tiers.data import CommitRequest

ATTEMPTS = 200  # a context's move may lose this many times to writers of the old epoch


class Rewinds:
    """Owns nothing but its tiers. Promises: one process rebuilds a run per epoch (L3's epoch is
    raised first, by compare-and-set); after it, writers of the old epoch are refused everywhere."""

    def __init__(self, l1: L1Tier, l2: L2Tier, l3: L3Tier, *, clock: Callable[[], float]) -> None:
        self.l1, self.l2, self.l3 = l1, l2, l3
        self.clock = clock

    def rebuild_lineage(self, run_id: str, from_epoch: int) -> list[RunContext] | None:
        """Start epoch ``from_epoch + 1`` of a run: each context continues from its newest intact state.

        L3's epoch is raised first (so only one process rebuilds, and stale finalizes are refused);
        then each context's live L2 entry of ``from_epoch``, if intact, is moved to the new epoch,
        else L3's snapshot becomes the new live entry. Returns the contexts as they now stand in the
        new epoch, or None if the run is finished or someone else rebuilt it already.
        """
        new_epoch = self.l3.begin_rewind(run_id, from_epoch)
        if new_epoch is None:
            return None
        count_l3_write("rewind")
        note = f"epoch {from_epoch} -> {new_epoch}: its steps since the last L3 write run again"
        self.l3.add_history([event_entry(run_id, run_id, "rewound", now=self.clock(), note=note, epoch=new_epoch)])
        return [self._move_to_epoch(snapshot, from_epoch, new_epoch) for snapshot in self.l3.run_contexts(run_id)]

    def _move_to_epoch(self, snapshot: RunContext, from_epoch: int, new_epoch: int) -> RunContext:
        context_id = snapshot.context_id
        self.l1.evict_context(context_id)
        for _ in range(ATTEMPTS):
            try:
                stored = self.l2.get_context(context_id)
            except ContextCorruption:
                self.l2.evict_context(context_id)
                stored = None
            if stored is None or not stored.live or stored.epoch != from_epoch or stored.version < snapshot.version:
                base = snapshot.working_copy()
                base.epoch = new_epoch
                self.l2.evict_context(context_id)
                if self.l2.fill_context(base, live=True):
                    return base
                continue  # someone wrote meanwhile: look again
            moved = stored.context.working_copy()
            moved.epoch = new_epoch
            # Same version, new epoch: writers of the old epoch are refused from now on.
            request = CommitRequest(moved, stored.version, expected_epoch=from_epoch, require_live=True)
            try:
                if self.l2.commit(request, now=self.clock()).committed:
                    return moved
            except LineageLost:
                continue  # damaged meanwhile: look again
        raise TransactionFailed(f"rewind of context {context_id}", ATTEMPTS, RuntimeError("too many concurrent writers"))

    def discard_context(self, context_id: str) -> None:
        """Forget a context everywhere (a child whose creation the rebuilt lineage has not reached)."""
        self.l3.discard_context(context_id)
        self.l2.evict_context(context_id)
        self.l1.evict_context(context_id)
