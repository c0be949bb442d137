"""Step actions (tasks/actions.py), pure: the built-ins and their args, the messages `check_action`
gives a routine's author, the RUNCTX_ACTION_MODULES allow-list, and what `run_action` makes of what a
user action returns."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from state.errors import NodeMisconfigured, StepFailed
from state.models import DataSensitivity, RunContext
from state.settings import get_settings
from tasks.actions import builtin_args, check_action, run_action
from tasks.changes import Change, ContextView

ME = "tests.tasks.test_actions"

# ---- user actions, named by the tests below ---------------------------------------------------------


def returns_changes(view: ContextView, args: dict[str, Any]) -> list[Change]:
    return [Change.increment("n", args.get("by", 1)), Change.delete("old")]


def returns_mapping(view: ContextView, args: dict[str, Any]) -> dict[str, Any]:
    return {"greeting": f"hello {view.get('user')}", "count": 2}


def returns_nothing(view: ContextView, args: dict[str, Any]) -> None:
    return None


def returns_a_generator(view: ContextView, args: dict[str, Any]) -> Iterator[Change]:
    yield Change.set("from_generator", True)


def returns_plain_values(view: ContextView, args: dict[str, Any]) -> list[Any]:
    return ["n", 1]


def returns_a_number(view: ContextView, args: dict[str, Any]) -> int:
    return 42


def edits_its_args(view: ContextView, args: dict[str, Any]) -> dict[str, Any]:
    seen = dict(args)
    args["k"] = "edited"
    return {"seen": seen}


NOT_CALLABLE = 3


@pytest.fixture
def allow(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Set RUNCTX_ACTION_MODULES for this test (the settings are cached: cleared around it)."""

    def set_modules(value: str) -> None:
        monkeypatch.setenv("RUNCTX_ACTION_MODULES", value)
        get_settings.cache_clear()

    yield set_modules
    get_settings.cache_clear()  # monkeypatch restores the variable after this: the next read is fresh


def context(**variables: Any) -> RunContext:
    ctx = RunContext(context_id="r", run_id="r", routine_id="x")
    for name, value in variables.items():
        ctx.set_variable(name, value)
    return ctx


def run(action: str, args: dict[str, Any] | None = None, ctx: RunContext | None = None, reads: frozenset[str] = frozenset()) -> list[Change]:
    return run_action(action, ContextView(ctx or context(), reads), args or {})


# ---- the built-ins ------------------------------------------------------------------------------


def test_set_increment_and_append_give_one_change_each() -> None:
    assert run("set", {"name": "a", "value": {"deep": [1]}}) == [Change.set("a", {"deep": [1]})]
    assert run("set", {"name": "a"}) == [Change.set("a", None)]  # a value left out sets null
    assert run("increment", {"name": "n"}) == [Change.increment("n", 1)]
    assert run("increment", {"name": "n", "by": 2.5}) == [Change.increment("n", 2.5)]
    assert run("append", {"name": "log", "value": "x"}) == [Change.append("log", "x")]


def test_copy_copies_the_value_with_its_sensitivity() -> None:
    ctx = context(user="alice")
    ctx.set_variable("token", "tok-1", sensitivity=DataSensitivity.SECRET)
    assert run("copy", {"from": "user", "to": "who"}, ctx) == [Change.set("who", "alice", sensitivity=DataSensitivity.PUBLIC)]
    copied = run("copy", {"from": "token", "to": "token2"}, ctx, reads=frozenset({"token"}))
    assert copied == [Change.set("token2", "tok-1", sensitivity=DataSensitivity.SECRET)]  # a copied secret stays secret


def test_copy_of_a_variable_that_does_not_exist_or_is_not_readable_fails_the_step() -> None:
    ctx = context()
    ctx.set_variable("token", "tok-1", sensitivity=DataSensitivity.SECRET)
    with pytest.raises(StepFailed, match="copy: variable 'missing' does not exist"):
        run("copy", {"from": "missing", "to": "x"}, ctx)
    with pytest.raises(StepFailed, match="copy: variable 'token' does not exist"):  # a secret not in the step's reads
        run("copy", {"from": "token", "to": "x"}, ctx)


def test_sleep_changes_nothing_and_fail_fails_the_step_with_its_message() -> None:
    assert run("sleep", {"seconds": 0}) == []
    with pytest.raises(StepFailed, match="^the routine asked to fail$"):
        run("fail")
    with pytest.raises(StepFailed, match="^disk full$"):
        run("fail", {"message": "disk full"})


def test_a_built_ins_args_are_validated_once_and_reused_by_run_action() -> None:
    validated = builtin_args("increment", {"name": "n", "by": 3})
    assert validated is builtin_args("increment", {"by": 3, "name": "n"})  # the same args, in any order
    assert run_action("increment", ContextView(context()), {"name": "ignored"}, validated) == [Change.increment("n", 3)]
    assert builtin_args("set", {"name": "a", "value": [1, 2]}).value == [1, 2]  # a list: validated, not cached
    assert builtin_args(f"{ME}:returns_nothing", {}) is None  # a user action's args are its own


# ---- check_action: what a routine's author reads --------------------------------------------------


@pytest.mark.parametrize(
    ("action", "args", "message"),
    [
        ("increment", {}, "action 'increment': args.name: Field required"),
        ("increment", {"name": "n", "by": "two"}, "action 'increment': args.by: Input should be a valid"),
        ("set", {"name": "a", "valeu": 1}, "action 'set': args.valeu: Extra inputs are not permitted"),
        ("copy", {"to": "b"}, "action 'copy': args.from: Field required"),
        ("sleep", {"seconds": -1}, "action 'sleep': args.seconds: Input should be greater than or equal to 0"),
        ("sleep", {"seconds": 3601}, "action 'sleep': args.seconds: Input should be less than or equal to 3600"),
        ("fail", {"message": 7}, "action 'fail': args.message: Input should be a valid string"),
        ("frobnicate", {}, "unknown action 'frobnicate': use a built-in (append, copy, fail, increment, set, sleep) or package.module:function"),
    ],
)
def test_check_action_names_the_action_the_arg_and_the_problem(action: str, args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as refused:
        check_action(action, args)
    assert str(refused.value).startswith(message), str(refused.value)


def test_check_action_accepts_valid_built_ins() -> None:
    for action, args in [("set", {"name": "a", "value": 1}), ("copy", {"from": "a", "to": "b"}), ("sleep", {"seconds": 0.5}),
                         ("increment", {"name": "n", "by": -2}), ("append", {"name": "l"}), ("fail", {})]:
        check_action(action, args)


# ---- the allow-list ---------------------------------------------------------------------------------


def test_a_user_action_from_an_allowed_module_or_a_submodule_of_one_is_accepted(allow) -> None:
    allow("json, tests")
    check_action(f"{ME}:returns_nothing", {})
    check_action("json:dumps", {})
    check_action("tests:anything", {})  # the module itself, not only its submodules


def test_a_user_action_from_a_module_not_allowed_is_refused_naming_the_setting_and_what_is_allowed(allow) -> None:
    allow("tests")
    with pytest.raises(ValueError, match=r"^action 'os:system': module 'os' is not in RUNCTX_ACTION_MODULES \(allowed: tests\)$"):
        check_action("os:system", {})
    with pytest.raises(ValueError, match="module 'testsuite.evil' is not in RUNCTX_ACTION_MODULES"):  # a prefix ends at a dot
        check_action("testsuite.evil:f", {})


def test_with_no_modules_allowed_only_built_ins_can_be_used(allow) -> None:
    allow("")
    with pytest.raises(ValueError, match=r"\(allowed: none: only built-ins\)"):
        check_action(f"{ME}:returns_nothing", {})
    check_action(f"{ME}:returns_nothing", {}, allow_list=False)  # a stored routine: the running process checks


def test_a_node_that_may_not_import_an_action_module_is_misconfigured_not_the_step(allow) -> None:
    allow("json")
    with pytest.raises(NodeMisconfigured) as refused:
        run("os:getcwd")
    assert refused.value.setting == "RUNCTX_ACTION_MODULES"
    assert "module 'os' is not in RUNCTX_ACTION_MODULES on this node (allowed: json)" in str(refused.value)


def test_an_allowed_module_that_cannot_be_imported_makes_the_node_misconfigured(allow) -> None:
    allow("tests")
    with pytest.raises(NodeMisconfigured) as refused:
        run("tests.no_such_module_here:act")
    assert refused.value.setting == "RUNCTX_ACTION_MODULES"
    message = str(refused.value)
    assert "module 'tests.no_such_module_here' cannot be imported on this node" in message
    assert "ModuleNotFoundError" in message and "PYTHONPATH" in message


def test_a_missing_or_not_callable_attribute_fails_the_step(allow) -> None:
    allow("tests")
    with pytest.raises(StepFailed, match=f"action '{ME}:nope' cannot be imported: module '{ME}' has no 'nope'"):
        run(f"{ME}:nope")
    with pytest.raises(StepFailed, match=f"action '{ME}:NOT_CALLABLE' is not callable"):
        run(f"{ME}:NOT_CALLABLE")


# ---- run_action: what a user action returns -------------------------------------------------------


def test_a_list_of_changes_is_taken_as_it_is(allow) -> None:
    allow("tests")
    assert run(f"{ME}:returns_changes", {"by": 5}) == [Change.increment("n", 5), Change.delete("old")]


def test_a_mapping_sets_each_name_to_its_value(allow) -> None:
    allow("tests")
    assert run(f"{ME}:returns_mapping", ctx=context(user="bob")) == [Change.set("greeting", "hello bob"), Change.set("count", 2)]


def test_none_changes_nothing_and_any_iterable_of_changes_counts(allow) -> None:
    allow("tests")
    assert run(f"{ME}:returns_nothing") == []
    assert run(f"{ME}:returns_a_generator") == [Change.set("from_generator", True)]


def test_an_action_gets_the_steps_args_as_a_copy_it_cannot_edit_for_the_next_attempt(allow) -> None:
    allow("tests")
    args = {"k": 1}
    assert run(f"{ME}:edits_its_args", args) == [Change.set("seen", {"k": 1})]
    assert run(f"{ME}:edits_its_args", args) == [Change.set("seen", {"k": 1})]
    assert args == {"k": 1}


def test_a_list_of_anything_but_changes_fails_the_step(allow) -> None:
    allow("tests")
    with pytest.raises(StepFailed, match=f"action '{ME}:returns_plain_values' must return a list of Change, a mapping or None"):
        run(f"{ME}:returns_plain_values")


def test_a_result_that_is_no_list_mapping_or_none_fails_the_step(allow) -> None:
    allow("tests")
    with pytest.raises(StepFailed, match="must return a list of Change, a mapping or None"):
        run(f"{ME}:returns_a_number")
