"""`runctx status`'s lines: a long fan-out folded (its done items past the first five), the rest shown."""

from __future__ import annotations

from runctx.cli.inspecting import step_lines


def step(step_id: str, state: str = "done", **extra: object) -> dict[str, object]:
    return {"id": step_id, "state": state, "worker": "n1-1", "attempts": 1, "duration_s": 0.002, **extra}


def test_a_long_fan_out_is_folded_but_not_its_failed_items_and_all_lists_each() -> None:
    steps = [step(f"each[{n}]/work", "failed" if n == 30 else "done", reason="boom" if n == 30 else None) for n in range(40)]
    steps.append(step("after", "skipped", reason="when 'x > 1' was false"))
    folded = step_lines(steps, fold=True)
    assert [line.split()[0] for line in folded] == [*(f"each[{n}]/work" for n in range(5)), "each[30]/work", "each[]/work", "after"]
    assert "34 more items done" in folded[6] and "(boom)" in folded[5] and "(when 'x > 1' was false)" in folded[7]
    assert len(step_lines(steps, fold=False)) == 41


def test_a_short_fan_out_and_plain_steps_are_never_folded() -> None:
    steps = [step(f"each[{n}]/work") for n in range(20)] + [step(f"s{n}") for n in range(30)]
    assert len(step_lines(steps, fold=True)) == 50
