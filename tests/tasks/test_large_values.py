"""Large values in the engine, in memory: a fan-out over a list held by reference (`state.blobs`)
runs every item and collects them, also when a rebuilt run has to count its items again."""

from __future__ import annotations

from runctx.testing import LocalEnvironment
from state.blobs import is_ref
from tests.support.engine import Stepwise

ITEMS = [f"{n:04d}" + "x" * 1000 for n in range(400)]  # ~400 KB: held by reference
ROUTINE = {
    "name": "long-list",
    "variables": {"docs": ITEMS},
    "steps": [{
        "id": "each", "for_each": "docs", "as": "doc", "max_concurrency": 50,
        "steps": [{"id": "keep", "action": "copy", "args": {"from": "doc", "to": "kept"}}],
        "collect": {"from": "kept", "into": "all"},
    }],
}


def test_a_fan_out_over_a_list_held_by_reference_runs_every_item() -> None:
    env = LocalEnvironment()
    run_id, row = env.run(ROUTINE)
    assert row.status == "succeeded", row.error
    final = env.final(run_id)
    assert is_ref(final.variables["docs"]) and final.variables["docs"]["items"] == 400
    assert env.store.blobs.open(final.variables["all"]) == ITEMS


def test_a_rebuilt_run_counts_the_items_of_a_list_held_by_reference() -> None:
    env = Stepwise()
    run_id = env.submit(ROUTINE)
    env.deliver(120)  # some items done, others under way
    for path in [""] + [f"each[{n}]" for n in range(400)]:
        try:
            env.flush(run_id, path)
        except Exception:  # (an item not started has no context yet)
            pass
    env.lose_l2()
    env.engine.rewind(run_id, env.row(run_id).epoch)
    env.drain()
    row = env.row(run_id)
    assert row.status == "succeeded", row.error
    assert env.store.blobs.open(env.final(run_id).variables["all"]) == ITEMS
