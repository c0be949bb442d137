"""A sub-routine's changes merged back into its parent under each strategy, on real workers.

The scenario and what each strategy must give are in `tests/support/merge_cases.py` (the engine test
runs the same in-process); here sleeps order the writes across worker processes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.merge_cases import (
    CASES,
    CHILD_FINAL,
    COMMON,
    NEW_FROM_CHILD,
    PARENT_UNMERGED,
    merge_routine,
)


def _routine(merge: dict[str, Any]) -> dict[str, Any]:
    return merge_routine(merge, child_wait_s=1.6, parent_pause_s=0.8)

def _run(cluster, path: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    done = cluster.runctx("run", str(path), "--json", "--timeout", "90", timeout_s=120)
    try:
        return done, json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise AssertionError(f"runctx run printed no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


@pytest.mark.slow
def test_subroutine_merge_back_under_each_strategy(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    store = cluster.store()
    try:
        for case, (merge, merged) in CASES.items():
            path = tmp_path / f"{case}.json"
            path.write_text(json.dumps(_routine(merge)))
            done, result = _run(cluster, path)
            assert done.returncode == 0 and result["status"] == "succeeded", (case, result, done.stderr)
            expected = {**COMMON, **NEW_FROM_CHILD, **merged}
            assert result["variables"] == expected, case
            assert store.l3.get_context(result["run_id"]).variables == expected, case
            # The child's own context is kept too, with what the child did.
            child = store.l3.get_context(f"{result['run_id']}/sub")
            assert child.variables == CHILD_FINAL, case

        # FAIL: the run fails, naming the conflicting variables (and only those); nothing is merged.
        path = tmp_path / "FAIL.json"
        path.write_text(json.dumps(_routine({"default": "FAIL"})))
        done, result = _run(cluster, path)
        assert done.returncode != 0, done
        assert result["status"] == "failed", result
        error = result["error"] or ""
        assert "count" in error and "profile" in error, error
        assert not any(name in error for name in ("untouched", "note", "extra", "language")), error
        assert "count" in done.stderr and "profile" in done.stderr, done.stderr
        steps = {step["id"]: step for step in result["steps"]}
        assert steps["sub"]["status"] == "failed" and "after" not in steps, steps
        final = store.l3.get_context(result["run_id"])
        assert final.variables == PARENT_UNMERGED
    finally:
        store.close()
