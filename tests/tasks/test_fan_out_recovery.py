"""A fan-out rebuilt mid-way (a rewind, with or without L2's state) goes on from what its item
contexts show: finished items are not run again, unfinished ones are, the count of ended items is
set again, and the collect gathers every item once."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.engine import Stepwise


def fan_out(items: int, concurrency: int) -> dict[str, Any]:
    return {
        "name": "fan",
        "variables": {"numbers": list(range(items))},
        "steps": [
            {
                "id": "each", "for_each": "numbers", "as": "n", "max_concurrency": concurrency,
                "steps": [{"id": "work", "action": "set", "args": {"name": "out", "value": 1}}],
                "collect": {"from": "out", "into": "outs"},
            },
            {"id": "after", "action": "set", "args": {"name": "done", "value": True}},
        ],
    }


@pytest.fixture
def h() -> Stepwise:
    return Stepwise()


def item_steps(h: Stepwise, epoch: int) -> list[str]:
    return [step for step in h.sent_steps(epoch=epoch) if step.startswith("each[")]


def test_a_rewind_mid_fan_out_runs_no_finished_item_again(h: Stepwise) -> None:
    run_id = h.submit(fan_out(8, 3))
    assert item_steps(h, 1) == ["each[0]/work", "each[1]/work", "each[2]/work"]  # no message for the others
    h.deliver(4)  # three items end (starting three more), one more ends
    finished = {f"each[{n}]/work" for n in range(4)}
    assert h.engine.rewind(run_id, 1)
    resent = item_steps(h, 2)
    assert not finished & set(resent), resent  # a finished item is not run again
    h.drain()
    h.settle(run_id)
    row = h.row(run_id)
    assert row.status == "succeeded", row.error
    assert h.final(run_id).variables["outs"] == [1] * 8 and h.final(run_id).variables["done"] is True


def test_a_fan_out_whose_l2_state_is_lost_resumes_from_l3_and_collects_every_item(h: Stepwise) -> None:
    run_id = h.submit(fan_out(6, 2))
    h.deliver(3)
    for path in ["", *(f"each[{n}]" for n in range(6))]:
        try:
            h.flush(run_id, path)
        except Exception:  # noqa: BLE001 - an item not started has nothing to write
            pass
    h.lose_l2()
    assert h.engine.rewind(run_id, 1)
    h.drain()
    h.settle(run_id)
    row = h.row(run_id)
    assert row.status == "succeeded", row.error
    assert h.final(run_id).variables["outs"] == [1] * 6
