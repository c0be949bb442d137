"""The baseline of the execution benchmarks: a Celery task that does nothing but send the next one,
the way a step sends its successor. Registered only on the benchmarks' own workers (`celery -I
noop_task`, with this directory on their PYTHONPATH), never on a deployment's."""

from __future__ import annotations

from typing import Any

from celery import shared_task


@shared_task(name="runctx_bench.noop_chain", bind=True)
def noop_chain(self: Any, remaining: int, done_run_id: str) -> None:
    if remaining > 1:
        noop_chain.apply_async(args=[remaining - 1, done_run_id])
    else:
        from workers.runtime import runtime

        runtime(self.app).store.ledger.announce_done(done_run_id)
