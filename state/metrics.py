"""runctx's Prometheus metrics: one definition of each, used by the store, the engine and the workers.

Labels are bounded: a routine name, a tier, a status, a kind or a source; never a run, context or
step id (a routine of 10,000 steps would make 10,000 series).

A worker node serves them from its main process (``workers.metrics``) on ``RUNCTX_METRICS_PORT``;
its prefork children write to files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's
multiprocess mode), which the main process adds up at each scrape. The instruments are built on
first use, not at import, so a worker can set up that directory before any of them exists; in a
process that never does (a submitter, a test) they count in memory and nobody scrapes them.

The write-behind's backlog (``runctx_write_behind_pending``, ``..._oldest_seconds``) is read from L2
when scraped, so every node reports the same cluster-wide figure.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

# Every metric name a scrape can show (samples add _bucket/_sum/_count to histograms).
STEPS_TOTAL = "runctx_steps_total"
STEP_DURATION = "runctx_step_duration_seconds"
RUNS_TOTAL = "runctx_runs_total"
CACHE_READS_TOTAL = "runctx_cache_reads_total"
L2_COMMITS_TOTAL = "runctx_l2_commits_total"
L2_CONFLICTS_TOTAL = "runctx_l2_conflicts_total"
L3_WRITES_TOTAL = "runctx_l3_writes_total"
WRITE_BEHIND_PENDING = "runctx_write_behind_pending"
WRITE_BEHIND_OLDEST = "runctx_write_behind_oldest_seconds"
INVALIDATIONS_TOTAL = "runctx_invalidations_total"
INVALIDATION_DELAY = "runctx_invalidation_delay_seconds"
REWINDS_TOTAL = "runctx_rewinds_total"
CHANGE_LISTENER_UP = "runctx_change_listener_up"
WAITS_TOTAL = "runctx_waits_total"
SIGNALS_TOTAL = "runctx_signals_total"

METRIC_NAMES = (
    STEPS_TOTAL, STEP_DURATION, RUNS_TOTAL, CACHE_READS_TOTAL, L2_COMMITS_TOTAL, L2_CONFLICTS_TOTAL,
    L3_WRITES_TOTAL, WRITE_BEHIND_PENDING, WRITE_BEHIND_OLDEST, INVALIDATIONS_TOTAL, INVALIDATION_DELAY,
    REWINDS_TOTAL, CHANGE_LISTENER_UP, WAITS_TOTAL, SIGNALS_TOTAL,
)

# Steps take from under a millisecond (inline) to minutes; invalidations are expected in milliseconds.
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
DELAY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


def _base(name: str) -> str:
    """prometheus-client adds ``_total`` to a counter's name itself."""
    return name.removesuffix("_total")


@dataclass(frozen=True)
class Metrics:
    """The instruments. Label values: ``status`` of a step: succeeded / failed / skipped; of a run:
    succeeded / failed / cancelled. ``tier``: l1 / l2 / l3, ``result``: hit / miss. ``kind`` of an
    L3 write: context (created) / snapshot (write-behind) / run (finished, with its
    final contexts and exports) / rewind / routine / config. ``source`` of an
    invalidation: commit (a commit's broadcast) / message (the state a step's message carried) /
    l3 (a change made in PostgreSQL) / run_ended. ``outcome`` of a wait: armed (a step began to
    wait) / signalled / timed_out (it ended so); of a signal: delivered (to a step that waited) /
    early (kept, then consumed when its step came to wait)."""

    steps: Counter
    step_duration: Histogram
    runs: Counter
    cache_reads: Counter
    l2_commits: Counter
    l2_conflicts: Counter
    l3_writes: Counter
    invalidations: Counter
    invalidation_delay: Histogram
    rewinds: Counter
    change_listener_up: Gauge
    waits: Counter
    signals: Counter

    @classmethod
    def build(cls) -> Metrics:
        return cls(
            steps=Counter(_base(STEPS_TOTAL), "Steps that ended, by routine and how", ["routine", "status"]),
            step_duration=Histogram(
                STEP_DURATION, "Time a step took, its action and commit included", ["routine"], buckets=STEP_BUCKETS
            ),
            runs=Counter(_base(RUNS_TOTAL), "Runs that ended, by routine and status", ["routine", "status"]),
            cache_reads=Counter(_base(CACHE_READS_TOTAL), "Context reads by tier and result", ["tier", "result"]),
            l2_commits=Counter(_base(L2_COMMITS_TOTAL), "Compare-and-set commits to L2 that applied"),
            l2_conflicts=Counter(_base(L2_CONFLICTS_TOTAL), "Compare-and-set commits to L2 that lost to another writer"),
            l3_writes=Counter(_base(L3_WRITES_TOTAL), "Writes to PostgreSQL by kind", ["kind"]),
            invalidations=Counter(
                _base(INVALIDATIONS_TOTAL), "Invalidation or update events a process received", ["source"]
            ),
            invalidation_delay=Histogram(
                INVALIDATION_DELAY, "From a change's commit (or relay) to a process receiving it", ["source"],
                buckets=DELAY_BUCKETS,
            ),
            rewinds=Counter(_base(REWINDS_TOTAL), "Runs rebuilt from what the tiers held after L2 lost their state"),
            change_listener_up=Gauge(
                CHANGE_LISTENER_UP, "1 while every live worker process listens to PostgreSQL's change events",
                multiprocess_mode="livemin",
            ),
            waits=Counter(_base(WAITS_TOTAL), "Steps that began or ended waiting for an outside event", ["routine", "outcome"]),
            signals=Counter(_base(SIGNALS_TOTAL), "Signals that reached the step waiting for them", ["routine", "outcome"]),
        )


_metrics: Metrics | None = None
_lock = threading.Lock()


def metrics() -> Metrics:
    """The process's instruments, built on first use (see the module docstring for why not at import)."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = Metrics.build()
    return _metrics


@functools.cache
def _cache_reads(tier: str, result: str) -> Counter:
    """The counter of one (tier, result): resolved once, not at every read (an L1 hit is a dict lookup)."""
    return metrics().cache_reads.labels(tier, result)


def count_read(tier: str) -> None:
    """A read was served by ``tier`` ("l1", "l2" or "l3"); the tiers above it missed."""
    if tier == "l1":
        _cache_reads("l1", "hit").inc()
        return
    _cache_reads("l1", "miss").inc()
    if tier == "l2":
        _cache_reads("l2", "hit").inc()
        return
    _cache_reads("l2", "miss").inc()
    _cache_reads("l3", "hit").inc()


def count_l3_write(kind: str, count: int = 1) -> None:
    metrics().l3_writes.labels(kind).inc(count)
