"""The sub-routine merge scenario shared by the engine test (in-process) and the end-to-end test.

The parent runs the sub-routine in one branch of a parallel group; the other branch writes
``count`` while the child is running, after the child changed it and before the child changes
``profile``. So when the child is merged back:

- ``count`` (scalar): parent 100 (written later), child 1 + 10 = 11 (written earlier);
- ``profile`` (mapping): parent its initial value (written at the start), child a new mapping
  (written later);
- ``untouched`` was inherited and not changed: not part of the merge;
- ``note``, ``extra`` (set by the child) and ``language`` (the child's own variable) are new.

The order comes from sleeps on real workers, from the FIFO queue in-process (sleeps of 0).
"""

from __future__ import annotations

from typing import Any

PROFILE = {"name": "ann", "tags": ["a"], "prefs": {"theme": "dark", "lang": "en"}}
CHILD_PROFILE = {"tags": ["b"], "prefs": {"theme": "light"}, "city": "Oslo"}
MERGED_PROFILE = {"name": "ann", "tags": ["b"], "prefs": {"theme": "light", "lang": "en"}, "city": "Oslo"}
NEW_FROM_CHILD = {"note": "from child", "extra": {"k": [1, 2]}, "language": "en"}
COMMON = {"untouched": "same", "parent_only": "p", "after": "done"}
CHILD_FINAL = {"count": 11, "profile": CHILD_PROFILE, "untouched": "same", **NEW_FROM_CHILD}
PARENT_UNMERGED = {"count": 100, "profile": PROFILE, "untouched": "same", "parent_only": "p"}

# strategy case -> (the step's `merge`, what count and profile end as)
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


def merge_routine(merge: dict[str, Any], *, child_wait_s: float = 0, parent_pause_s: float = 0) -> dict[str, Any]:
    child = {
        "name": "child",
        "variables": {"language": "en"},
        "steps": [
            {"id": "bump", "action": "increment", "args": {"name": "count", "by": 10}},
            {"id": "wait", "action": "sleep", "args": {"seconds": child_wait_s}},
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
                        {"id": "pause", "action": "sleep", "args": {"seconds": parent_pause_s}},
                        {"id": "parent-count", "action": "set", "args": {"name": "count", "value": 100}},
                    ],
                ],
            },
            {"id": "after", "action": "set", "args": {"name": "after", "value": "done"}},
        ],
    }
