"""End to end on real worker processes: an example routine over two nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.servers import BROKERS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("broker", BROKERS)
def test_example_routine_runs_end_to_end_over_two_nodes(make_cluster, broker: str) -> None:
    cluster = make_cluster(broker)
    cluster.start_nodes("n1", "n2", concurrency=1)
    result = cluster.run(EXAMPLES / "onboarding.yaml", "--var-file", str(EXAMPLES / "onboarding.vars.yaml"))
    assert result["status"] == "succeeded", result
    assert result["variables"] == {
        "greeting": "hello, new member",
        "visits": 2,
        "api_token": "***",
        "log": result["variables"]["log"],
        "language": "en",
        "welcomed": True,
        "last_greeting": "hello, new member",
    }
    assert sorted(result["variables"]["log"]) == ["a", "b"]
    steps = {step["id"]: step for step in result["steps"]}
    assert set(steps) == {"count", "a1", "b1", "child/greet", "child/count-again", "child/note", "child", "remember"}
    assert all(step["status"] == "succeeded" and step["attempts"] == 1 for step in steps.values())
    assert {step["worker"].split("-")[0] for step in steps.values()} == {"n1", "n2"}

    store = cluster.store()
    final = store.l3.get_context(result["run_id"])
    assert final.variables["greeting"] == "hello, new member" and final.variables["visits"] == 2
    assert store.l2.pending_flushes() == 0
    store.close()
