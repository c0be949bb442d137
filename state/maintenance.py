"""Keeping a deployment's stored state in order: pruning finished runs, and the encryption keys
(which ones sealed stored values, refusing a process that lacks one, sealing again under a new one)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from state.blobs import Blobs
from state.errors import ContextCorruption, LineageLost, SettingsError
from state.sealing import Keyring
from state.tiers.contracts import L1Tier, L2Tier, L3Tier
from state.tiers.data import CommitRequest

RESEAL_ATTEMPTS = 200  # an L2 entry's reseal may lose this many times to steps committing


@dataclass
class PruneReport:
    """What a prune deleted."""

    runs: int = 0
    contexts: int = 0


class Maintenance:
    """Owns nothing but its tiers. Promises: a prune or a rotation may stop anywhere and run again;
    neither touches a running run's state but to seal it again (versions unchanged)."""

    def __init__(self, l1: L1Tier, l2: L2Tier, l3: L3Tier, *, clock: Callable[[], float], blobs: Blobs | None = None) -> None:
        self.l1, self.l2, self.l3 = l1, l2, l3
        self.clock = clock
        self.blobs = blobs

    # ---- retention ------------------------------------------------------------------------------

    def prune(self, older_than_s: float, *, batch: int = 500) -> PruneReport:
        """Delete the runs that finished more than ``older_than_s`` ago: their ledger rows and context
        snapshots (L3), their L2 entries and run records, and L1 copies. Exports and blackboard
        entries stay. In batches, each one L3 transaction, so a prune may stop anywhere and run again."""
        report = PruneReport()
        while True:
            pruned = self.l3.prune_runs(older_than_s, limit=batch)
            for run_id, context_ids in pruned.items():
                for context_id in context_ids:
                    self.l2.evict_context(context_id)
                    self.l1.evict_context(context_id)
                self.l2.forget_run(run_id)
                report.runs += 1
                report.contexts += len(context_ids)
            if len(pruned) < batch:
                if self.blobs is not None:  # (in L3, a blob went in the prune's transaction)
                    self.blobs.collect()
                return report

    # ---- encryption keys ------------------------------------------------------------------------

    def key_ids(self) -> set[str]:
        """The ids of every key stored values were sealed under (L3 records them)."""
        return self.l3.key_ids()

    def check_keys(self, keyring: Keyring) -> None:
        """Refuse to go on if L3 holds values sealed under a key this process lacks; record the newest."""
        missing = sorted(self.l3.key_ids() - {key_id for key_id, _ in keyring.keys})
        if missing:
            raise SettingsError(
                "RUNCTX_ENCRYPTION_KEYS",
                f"the database holds values sealed under key(s) {', '.join(missing)}, which this process does not "
                "have: give it the same keys as the others (newest first)",
            )
        self.l3.record_key(keyring.newest)

    def rotate_keys(self, keyring: Keyring, *, batch: int = 100, progress: Callable[[str, int], None] | None = None) -> dict[str, int]:
        """Seal everything again under the newest key of ``keyring`` while runs go on: L3 in batches
        (each its own transaction; an interrupted rotation is resumed by running it again), then
        L2 (clean entries dropped, to be filled again from L3; dirty ones rewritten at their version
        by compare-and-set). The older keys are then forgotten by L3: processes may drop them."""
        old = ({key_id for key_id, _ in keyring.keys[1:]} | self.l3.key_ids()) - {keyring.newest}
        self.l3.record_key(keyring.newest)
        counts = {"l3": 0, "l2": 0}
        while done := self.l3.reseal(old, limit=batch):
            counts["l3"] += done
            if progress:
                progress("l3", counts["l3"])
        if self.blobs is not None:  # blobs kept in an object store, indexed by L3
            counts["l3"] += self.blobs.reseal_objects(old)
        for context_id in self.l2.context_ids():
            counts["l2"] += self._reseal_l2(context_id)
        for key in self.l2.config_keys():
            self.l2.evict_config(key)
        self.l3.forget_keys(old)
        return counts

    def _reseal_l2(self, context_id: str) -> int:
        for _ in range(RESEAL_ATTEMPTS):
            try:
                stored = self.l2.get_context(context_id)
            except ContextCorruption:
                self.l2.evict_context(context_id)
                return 1
            if stored is None:
                return 0
            if not stored.dirty:
                self.l2.evict_context(context_id, up_to_version=stored.version)
                return 1
            # The same version, sealed and authenticated anew (its detached values too: none is reused).
            stored.context._detached = {}
            request = CommitRequest(stored.context, stored.version, expected_epoch=stored.epoch)
            try:
                if self.l2.commit(request, now=self.clock()).committed:
                    return 1
            except LineageLost:
                continue
            # a step committed meanwhile: under the newest key already; look again
        return 0
