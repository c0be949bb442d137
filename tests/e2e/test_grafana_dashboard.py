"""deploy/grafana/runctx.json, the Grafana dashboard: it shows every metric a worker node exports
(state.metrics.METRIC_NAMES), no other, and never by a run, context or step id (one series each)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from state.metrics import METRIC_NAMES

DASHBOARD = json.loads((Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "runctx.json").read_text())
METRIC = re.compile(r"\brunctx_[a-z0-9_]+")
# The labels runctx's metrics carry, histograms' le, and those Prometheus adds to each target.
BOUNDED_LABELS = {"routine", "status", "tier", "result", "kind", "source", "outcome", "le", "instance", "job"}


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))  # a collapsed row keeps its panels inside


def expressions() -> list[str]:
    exprs = [target["expr"] for panel in panels(DASHBOARD["panels"]) for target in panel.get("targets", [])]
    variables = DASHBOARD["templating"]["list"]
    return exprs + [variable["definition"] for variable in variables if variable["type"] == "query"]


def metric_name(sample_name: str) -> str:
    """A histogram's samples are NAME_bucket, NAME_sum and NAME_count."""
    return sample_name if sample_name in METRIC_NAMES else re.sub(r"_(bucket|sum|count)$", "", sample_name)


def test_dashboard_is_a_grafana_dashboard_with_a_prometheus_datasource_and_routine_variable() -> None:
    assert DASHBOARD["uid"] and DASHBOARD["title"] and DASHBOARD["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in DASHBOARD["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["routine"]["definition"] == "label_values(runctx_steps_total, routine)"
    shown = [panel for panel in panels(DASHBOARD["panels"]) if panel["type"] != "row"]
    assert {panel["type"] for panel in shown} <= {"timeseries", "stat"}
    assert len({panel["id"] for panel in panels(DASHBOARD["panels"])}) == len(list(panels(DASHBOARD["panels"])))
    for panel in shown:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"] and all(target["expr"] for target in panel["targets"]), panel["title"]


def test_every_metric_shown_is_exported_and_every_exported_metric_is_shown() -> None:
    used = {metric_name(name) for expr in expressions() for name in METRIC.findall(expr)}
    assert used <= set(METRIC_NAMES), f"not exported by runctx: {used - set(METRIC_NAMES)}"
    assert set(METRIC_NAMES) <= used, f"on no panel: {set(METRIC_NAMES) - used}"


def test_no_query_groups_or_filters_by_a_run_context_or_step_id() -> None:
    for expr in expressions():
        selectors = re.findall(r"\{([^}]*)\}", expr.replace("{{", "").replace("}}", ""))
        labels = {match for selector in selectors for match in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector)}
        for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
            labels |= {label.strip() for label in group.split(",") if label.strip()}
        labels.discard("")
        assert labels <= BOUNDED_LABELS, f"{expr}: {labels - BOUNDED_LABELS}"
        assert not re.search(r"\b(run_id|context_id|step_id|context|run)\b", expr), expr
        assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]"), expr
