"""What the API and the command show of a run, read from the shared tiers (never from this
process's L1 alone, which is only as fresh as the invalidations it heard): each step's state, and
the tree of its contexts with their versions in L2 and L3."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from state.errors import NotFound
from state.keys import context_id
from state.store import TieredStore
from state.tiers.data import FINAL_STATUSES, RunRow
from tasks.advance import resume_points
from tasks.plan import ITEM, REAL_KINDS, Node, Plan, concrete, template_of
from tasks.plans import PlanCache

STEP_STATES = ("done", "running", "waiting", "pending", "failed", "skipped", "cancelled")


def _run_and_plan(store: TieredStore, plans: PlanCache, run_id: str) -> tuple[RunRow, Plan]:
    row = store.ledger.get_run(run_id)
    if row is None:
        raise NotFound(f"run {run_id!r} does not exist")
    if row.routine_version is None:
        raise NotFound(f"run {run_id!r} has no routine version")
    return row, plans.get(row.routine_name, row.routine_version)


def step_states(store: TieredStore, plans: PlanCache, run_id: str) -> dict[str, Any]:
    """The ``runctx status --json`` object: each real step's state (done, running, pending, failed,
    skipped or cancelled) with its worker, attempts, duration, reason (why it was skipped or
    failed), the attempts its retry policy made, and a failed user action's traceback; a fan-out's
    steps once per item that ran (``each[3]/work``); and the totals. "running": dispatched (the
    run's frontier: every step before it is applied) and not finished yet; "waiting": a wait step
    waiting for its event (the run's status is then "waiting" too, with ``waiting_for``: each
    event, its step and deadline); "cancelled": the run ended before the step finished."""
    row, plan = _run_and_plan(store, plans, run_id)
    final = row.status in FINAL_STATUSES
    waits = {} if final else {wait.step_id: wait for wait in store.waits.open([run_id])}
    records = row.meta.get("steps", []) if final else store.ledger.summary(run_id)["steps"]
    by_id: dict[str, dict[str, Any]] = {}
    retried: dict[str, list[dict[str, Any]]] = {}
    by_template: dict[str, list[str]] = {}
    for record in records:
        step_id, _, attempt = record["id"].partition("#")
        if attempt:
            retried.setdefault(step_id, []).append(record)
            continue
        by_id[step_id] = record
        by_template.setdefault(template_of(step_id), []).append(step_id)
    frontier = set() if final else _frontier(store, plan, run_id)
    steps = []
    for node in in_order(plan):
        ids = sorted(by_template.get(node.step_id, []), key=_natural) if ITEM in node.step_id else [node.step_id]
        for step_id in ids:
            step = _step_state(step_id, by_id.get(step_id), retried.get(step_id, []), final, step_id in frontier, row.status == "succeeded")
            if step_id in waits:
                step.update(state="waiting", event=waits[step_id].event)
            steps.append(step)
    listed = {step["id"] for step in steps}
    for step_id, wait in waits.items():  # an item's wait its records do not name (Redis lost them)
        if step_id not in listed:
            steps.append({"id": step_id, "state": "waiting", "event": wait.event, "worker": None, "attempts": 0, "duration_s": None})
    # "waiting" is counted for routines that can wait (the totals of others keep their shape).
    counted = [state for state in STEP_STATES if state != "waiting" or any(node.kind == "wait" for node in plan.nodes)]
    totals = {state: sum(1 for step in steps if step["state"] == state) for state in counted}
    return {
        "run_id": run_id, "routine": row.routine_name, "version": row.routine_version,
        "status": "waiting" if waits else row.status, "error": row.error, "steps": steps,
        "totals": {**totals, "total": len(steps)}, "waiting_for": waiting_for(waits.values()),
    }


def waiting_for(waits: Any) -> list[dict[str, Any]]:
    """What a run waits for: each event, the step waiting and its deadline (ISO 8601, UTC)."""
    return [
        {"event": wait.event, "step": wait.step_id,
         "deadline": dt.datetime.fromtimestamp(wait.deadline, dt.UTC).isoformat() if wait.deadline else None}
        for wait in sorted(waits, key=lambda wait: _natural(wait.step_id))
    ]


def _step_state(
    step_id: str, record: dict[str, Any] | None, retries: list[dict[str, Any]], final: bool, running: bool, succeeded: bool
) -> dict[str, Any]:
    if record is not None:
        status = record.get("status")
        state = {"failed": "failed", "timed_out": "failed", "skipped": "skipped", "waiting": "running"}.get(status, "done")
    elif final:
        # A run that succeeded passed it by (inside a group its `when` skipped); one that failed or
        # was cancelled ended before it finished: it never will.
        state = "skipped" if succeeded else "cancelled"
    else:
        state = "running" if running or retries else "pending"
    step: dict[str, Any] = {
        "id": step_id,
        "state": state,
        "worker": record.get("worker") if record else None,
        "attempts": record.get("attempts", 1) if record else len(retries),
        "duration_s": record.get("duration_s") if record else None,
    }
    if record and record.get("reason"):
        step["reason"] = record["reason"]
    if record and record.get("status") == "timed_out":
        step["timed_out"] = True
    if retries:
        step["retries"] = [
            {"attempt": int(r["id"].partition("#")[2]), "reason": r.get("reason"), "retry_in_s": r.get("retry_in_s"),
             "finished_at": r.get("finished_at"), "worker": r.get("worker")}
            for r in sorted(retries, key=lambda r: r.get("finished_at", 0))
        ]
    if record and record.get("traceback"):
        step["traceback"] = record["traceback"]
    return step


def _frontier(store: TieredStore, plan: Plan, run_id: str) -> set[str]:
    """The steps dispatched and not yet applied (a fan-out under way counts as its collect step)."""
    contexts = {}
    for path in plan.contexts:
        try:
            contexts[path] = store.read_newest(context_id(run_id, path))
        except NotFound:
            continue
    if "" not in contexts:
        return set()
    frontier = set()
    for index, items in resume_points(plan, contexts).points:
        node = plan.node(index)
        if node.kind in REAL_KINDS:
            frontier.add(concrete(node.step_id, items))
        elif node.kind == "fan_out" and node.collect is not None:
            frontier.add(concrete(plan.node(node.collect).step_id, items))
    return frontier


def _natural(step_id: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", step_id)]


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
            elif node.kind == "fan_out":  # the item's steps (once, as a template), then the collect
                walk(node.item_start)
                index = node.collect
            else:
                index = node.next

    walk(plan.start)
    return out
