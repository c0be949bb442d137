"""Need-to-know and rising sensitivity, on the in-memory tiers: a secret is absent to a step that did
not declare it in ``reads``; what a step writes takes on the highest sensitivity it read (a user
action's mapping, a built-in copy, a child context merged back), unless the step declassifies it."""

from __future__ import annotations

from typing import Any

import pytest

from runctx.testing import LocalEnvironment
from tests.support.actions import ME

TOKEN = "tok-9c1e-very-secret"


class GivenTheToken(LocalEnvironment):
    """Every run here is given the token at submit."""

    def run(self, routine: dict[str, Any], variables: dict[str, Any] | None = None):  # type: ignore[override]
        return super().run(routine, {"token": TOKEN, **(variables or {})})


@pytest.fixture
def h() -> GivenTheToken:
    return GivenTheToken()


def secret_routine(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"name": "ntk", "variables": {"token": {"sensitivity": "secret"}, "user": "alice"}, "steps": list(steps)}


def test_a_step_that_did_not_declare_the_secret_sees_nothing_of_it(h: GivenTheToken) -> None:
    run_id, row = h.run(secret_routine({"id": "nosy", "action": f"{ME}:peek"}))
    final = h.final(run_id)
    assert row.status == "succeeded"
    assert (final.variables["seen"], final.variables["listed"], final.variables["has"]) == ("absent", False, False)


def test_built_in_actions_are_held_to_reads_too(h: GivenTheToken) -> None:
    run_id, row = h.run(secret_routine({"id": "copy", "action": "copy", "args": {"from": "token", "to": "stolen"}}))
    assert row.status == "failed" and "'token' does not exist" in row.error
    assert "stolen" not in h.final(run_id).variables


def test_what_a_step_derives_from_a_secret_is_secret(h: GivenTheToken) -> None:
    run_id, row = h.run(secret_routine({"id": "derive", "action": f"{ME}:derive", "reads": ["token"]}))
    final = h.final(run_id)
    assert row.status == "succeeded" and final.variables["derived"] == TOKEN.upper()
    assert final.sensitivity_of("derived").value == "secret" and final.sensitivity_of("token_length").value == "secret"


def test_a_declassified_name_keeps_its_own_sensitivity(h: GivenTheToken, caplog) -> None:
    step = {"id": "derive", "action": f"{ME}:derive", "reads": ["token"], "declassify": ["token_length"]}
    run_id, row = h.run(secret_routine(step))
    final = h.final(run_id)
    assert final.sensitivity_of("token_length").value == "public" and final.sensitivity_of("derived").value == "secret"
    assert "declassifies token_length" in caplog.text and TOKEN not in caplog.text


def test_a_copy_of_a_secret_stays_secret(h: GivenTheToken) -> None:
    run_id, _ = h.run(secret_routine({"id": "copy", "action": "copy", "args": {"from": "token", "to": "kept"}, "reads": ["token"]}))
    assert h.final(run_id).sensitivity_of("kept").value == "secret"


def test_sensitivity_rises_through_a_child_and_its_merge(h: GivenTheToken) -> None:
    child = {
        "name": "ntk-child",
        "steps": [{"id": "derive", "action": f"{ME}:derive", "reads": ["token"]}],
    }
    routine = secret_routine({"id": "sub", "routine": child, "inherit": ["token"]})
    run_id, row = h.run(routine)
    assert row.status == "succeeded"
    in_child = h.final(run_id, "sub")
    assert in_child.sensitivity_of("token").value == "secret" and in_child.sensitivity_of("derived").value == "secret"
    parent = h.final(run_id)
    assert parent.variables["derived"] == TOKEN.upper() and parent.sensitivity_of("derived").value == "secret"


# ---- the action allow-list ------------------------------------------------------------------------


def test_an_action_outside_the_allow_list_is_refused_at_load_naming_the_setting(monkeypatch) -> None:
    from state.errors import InvalidRoutine
    from state.settings import get_settings
    from tasks.actions import _import
    from tasks.routine import parse_routine

    monkeypatch.setenv("RUNCTX_ACTION_MODULES", f"myjobs, {ME}")
    get_settings.cache_clear()
    _import.cache_clear()
    try:
        parse_routine({"name": "ok", "steps": [{"id": "a", "action": f"{ME}:peek"}, {"id": "b", "action": "myjobs.sub:run"}]})
        for reference in ("os:system", "subprocess:run", "myjobsx:run", "tests.support.fault_actions:tick"):
            with pytest.raises(InvalidRoutine, match="RUNCTX_ACTION_MODULES") as refused:
                parse_routine({"name": "bad", "steps": [{"id": "a", "action": reference}]})
            assert reference.partition(":")[0] in str(refused.value)
    finally:
        get_settings.cache_clear()
        _import.cache_clear()


def test_a_stored_routine_naming_a_module_outside_the_list_fails_its_step_without_importing(monkeypatch) -> None:
    import sys

    from state.errors import NodeMisconfigured
    from state.settings import get_settings
    from tasks.actions import _import, run_action
    from tasks.changes import ContextView

    monkeypatch.setenv("RUNCTX_ACTION_MODULES", "myjobs")
    get_settings.cache_clear()
    _import.cache_clear()
    try:
        assert "antigravity" not in sys.modules
        with pytest.raises(NodeMisconfigured, match="RUNCTX_ACTION_MODULES on this node"):
            run_action("antigravity:fly", ContextView(None), {})  # type: ignore[arg-type]
        assert "antigravity" not in sys.modules
    finally:
        get_settings.cache_clear()
        _import.cache_clear()
