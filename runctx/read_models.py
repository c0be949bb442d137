"""What the API and the command show of a run, read from the shared tiers (never from this
process's L1 alone, which is only as fresh as the invalidations it heard): each step's state, and
the tree of its contexts with their versions in L2 and L3."""

from __future__ import annotations

from typing import Any

from state.errors import NotFound
from state.keys import context_id
from state.store import TieredStore
from state.tiers.data import FINAL_STATUSES, RunRow
from tasks.advance import resume_points
from tasks.plan import REAL_KINDS, Node, Plan
from tasks.plans import PlanCache

STEP_STATES = ("done", "running", "pending", "failed", "cancelled")


def _run_and_plan(store: TieredStore, plans: PlanCache, run_id: str) -> tuple[RunRow, Plan]:
    row = store.ledger.get_run(run_id)
    if row is None:
        raise NotFound(f"run {run_id!r} does not exist")
    if row.routine_version is None:
        raise NotFound(f"run {run_id!r} has no routine version")
    return row, plans.get(row.routine_name, row.routine_version)


def step_states(store: TieredStore, plans: PlanCache, run_id: str) -> dict[str, Any]:
    """The ``runctx status --json`` object: each real step's state (done, running, pending, failed or
    cancelled) with its worker, attempts and duration (and a failed user action's traceback), and
    the totals. "running": dispatched (the run's frontier: every step before it is applied) and not
    finished yet; "cancelled": the run ended before the step finished."""
    row, plan = _run_and_plan(store, plans, run_id)
    final = row.status in FINAL_STATUSES
    records = row.meta.get("steps", []) if final else store.ledger.summary(run_id)["steps"]
    by_id = {record["id"]: record for record in records}
    frontier: set[str] = set()
    if not final:
        contexts = {}
        for path in plan.contexts:
            try:
                contexts[path] = store.read_newest(context_id(run_id, path))
            except NotFound:
                continue
        if "" in contexts:
            frontier = {plan.node(i).step_id for i in resume_points(plan, contexts).points if plan.node(i).kind in REAL_KINDS}
    steps = []
    for node in in_order(plan):
        record = by_id.get(node.step_id)
        if record is not None:
            state = "failed" if record.get("status") == "failed" else "done"
        elif final:
            state = "cancelled"  # the run ended before this step finished: it never will
        else:
            state = "running" if node.step_id in frontier else "pending"
        step = {
            "id": node.step_id,
            "state": state,
            "worker": record.get("worker") if record else None,
            "attempts": record.get("attempts", 1) if record else 0,
            "duration_s": record.get("duration_s") if record else None,
        }
        if record and record.get("traceback"):
            step["traceback"] = record["traceback"]
        steps.append(step)
    totals = {state: sum(1 for step in steps if step["state"] == state) for state in STEP_STATES}
    return {
        "run_id": run_id, "routine": row.routine_name, "version": row.routine_version, "status": row.status,
        "error": row.error, "steps": steps, "totals": {**totals, "total": len(steps)},
    }


def context_tree(store: TieredStore, plans: PlanCache, run_id: str) -> dict[str, Any]:
    """The ``runctx context --json`` object: the run's contexts, root first then each sub-routine's
    under its parent, each with its version in L2 and in L3, whether it waits for its write-behind,
    and its variables with confidential and secret values masked."""
    row, plan = _run_and_plan(store, plans, run_id)
    contexts = []
    for path in sorted(plan.contexts, key=lambda p: (p.count("/") if p else -1, p)):
        stored, in_l3 = store.versions_of(context_id(run_id, path))
        newest = stored.context if stored is not None else in_l3
        if newest is None:
            continue  # a sub-routine the run has not reached
        contexts.append({
            "id": context_id(run_id, path),
            "path": path,
            "parent": newest.parent_id,
            "routine": plan.contexts[path],
            "version_l2": stored.version if stored is not None else None,
            "version_l3": in_l3.version if in_l3 is not None else None,
            "pending_write": bool(stored is not None and stored.dirty),
            "variables": newest.masked_variables(),
            "sensitivity": {name: level.value for name, level in newest.sensitivity_map.items() if level.value != "public"},
        })
    return {"run_id": run_id, "status": row.status, "contexts": contexts}


def in_order(plan: Plan) -> list[Node]:
    """The real steps in the order a reader expects: a sequence in order, each branch whole."""
    out: list[Node] = []

    def walk(index: int | None, stop: int | None = None) -> None:
        while index is not None and index != stop:
            node = plan.node(index)
            if node.kind in REAL_KINDS:
                out.append(node)
            if node.kind == "fork":
                for start in node.branch_starts:
                    walk(start, stop=node.next)
                index = plan.node(node.next).next if node.next is not None else None
            else:
                index = node.next

    walk(plan.start)
    return out
