"""A sub-routine's changes merged back into its parent under each strategy, on real workers.

The parent runs the sub-routine in one branch of a parallel group; the other branch writes
``count`` while the child is running, after the child changed it and before the child changes
``profile``. So when the child is merged back:

- ``count`` (scalar): parent 100 (written later), child 1 + 10 = 11 (written earlier);
- ``profile`` (mapping): parent its initial value (written at the start), child a new mapping
  (written later);
- ``untouched`` was inherited and not changed: not part of the merge;
- ``note``, ``extra`` (set by the child) and ``language`` (the child's own variable) are new.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

PROFILE = {"name": "ann", "tags": ["a"], "prefs": {"theme": "dark", "lang": "en"}}
CHILD_PROFILE = {"tags": ["b"], "prefs": {"theme": "light"}, "city": "Oslo"}
MERGED_PROFILE = {"name": "ann", "tags": ["b"], "prefs": {"theme": "light", "lang": "en"}, "city": "Oslo"}
NEW_FROM_CHILD = {"note": "from child", "extra": {"k": [1, 2]}, "language": "en"}
COMMON = {"untouched": "same", "parent_only": "p", "after": "done"}


def _routine(merge: dict[str, Any]) -> dict[str, Any]:
    child = {
        "name": "child",
        "variables": {"language": "en"},
        "steps": [
            {"id": "bump", "action": "increment", "args": {"name": "count", "by": 10}},
            {"id": "wait", "action": "sleep", "args": {"seconds": 1.6}},
            {"id": "reprofile", "action": "set", "args": {"name": "profile", "value": CHILD_PROFILE}},
            {"id": "note", "action": "set", "args": {"name": "note", "value": "from child"}},
            {"id": "extra", "action": "set", "args": {"name": "extra", "value": {"k": [1, 2]}}},
        ],
    }
    return {
        "name": "merge-parent",
        "variables": {"count": 1, "profile": PROFILE, "untouched": "same", "parent_only": "p"},
        "steps": [
            {
                "id": "fan",
                "parallel": [
                    [{"id": "sub", "routine": child, "inherit": ["count", "profile", "untouched"], "merge": merge}],
                    [
                        {"id": "pause", "action": "sleep", "args": {"seconds": 0.8}},
                        {"id": "parent-count", "action": "set", "args": {"name": "count", "value": 100}},
                    ],
                ],
            },
            {"id": "after", "action": "set", "args": {"name": "after", "value": "done"}},
        ],
    }


CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "PARENT_WINS": ({"default": "PARENT_WINS"}, {"count": 100, "profile": PROFILE}),
    "CHILD_WINS": ({"default": "CHILD_WINS"}, {"count": 11, "profile": CHILD_PROFILE}),
    # deep merge of mappings; for a scalar the incoming (child) value
    "MERGE_OBJECTS": ({"default": "MERGE_OBJECTS"}, {"count": 11, "profile": MERGED_PROFILE}),
    # the later write wins: the parent's for count, the child's for profile
    "LAST_WRITER_WINS": ({"default": "LAST_WRITER_WINS"}, {"count": 100, "profile": CHILD_PROFILE}),
    # per-variable strategies replace the default, here one that would fail the run
    "FAIL+per-variable": (
        {"default": "FAIL", "variables": {"count": "LAST_WRITER_WINS", "profile": "MERGE_OBJECTS"}},
        {"count": 100, "profile": MERGED_PROFILE},
    ),
    "CHILD_WINS+per-variable": (
        {"default": "CHILD_WINS", "variables": {"count": "PARENT_WINS"}},
        {"count": 100, "profile": CHILD_PROFILE},
    ),
}


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
            assert child.variables == {"count": 11, "profile": CHILD_PROFILE, "untouched": "same", **NEW_FROM_CHILD}, case

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
        assert final.variables == {"count": 100, "profile": PROFILE, "untouched": "same", "parent_only": "p"}
    finally:
        store.close()
