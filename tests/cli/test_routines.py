"""`runctx run` refuses routine files that cannot run, before anything is submitted.

No worker is started: a refused routine never reaches the broker. Each case must exit
non-zero with one line on stderr that names the file and where inside it the problem is.
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from state.change_events import libpq_url

# name -> (files to write {relative path: text}, the file given to `runctx run`,
#          the file the message must name, fragments the message must hold)
CASES: dict[str, tuple[dict[str, str], str, str, list[str]]] = {
    "bad-yaml": (
        {
            "routine.yaml": (
                "name: broken\n"
                "steps:\n"
                "  - {id: a, action: set, args: {name: v, value: 1}}\n"
                "  - id: b\n"
                "    action: set: oops\n"
            )
        },
        "routine.yaml",
        "routine.yaml",
        ["line 5"],
    ),
    "bad-json": (
        {"routine.json": '{"name": "broken",\n "steps": [{"id": "a" "action": "set"}]}\n'},
        "routine.json",
        "routine.json",
        ["line 2"],
    ),
    "missing-name": (
        {"routine.yaml": "steps:\n  - {id: a, action: set, args: {name: v, value: 1}}\n"},
        "routine.yaml",
        "routine.yaml",
        ["name", "required"],
    ),
    "missing-steps": (
        {"routine.yaml": "name: nosteps\nvariables: {a: 1}\n"},
        "routine.yaml",
        "routine.yaml",
        ["steps", "required"],
    ),
    "step-without-kind": (
        {"routine.yaml": "name: r\nsteps:\n  - {id: a, action: set, args: {name: v}}\n  - {id: b, args: {name: v}}\n"},
        "routine.yaml",
        "routine.yaml",
        ["steps[1]"],
    ),
    "unknown-action": (
        {"routine.yaml": "name: r\nsteps:\n  - {id: a, action: set, args: {name: v}}\n  - {id: b, action: frobnicate}\n"},
        "routine.yaml",
        "routine.yaml",
        ["steps[1]", "frobnicate"],
    ),
    "unknown-action-json": (
        {"routine.json": json.dumps({"name": "r", "steps": [{"id": "a", "action": "teleport"}]})},
        "routine.json",
        "routine.json",
        ["steps[0]", "teleport"],
    ),
    "bad-builtin-arg": (
        {"routine.yaml": "name: r\nsteps:\n  - {id: a, action: increment, args: {name: n, by: lots}}\n"},
        "routine.yaml",
        "routine.yaml",
        ["steps[0]", "increment", "args.by"],
    ),
    "missing-builtin-arg-in-branch": (
        {
            "routine.yaml": (
                "name: r\n"
                "steps:\n"
                "  - {id: a, action: set, args: {name: v}}\n"
                "  - id: p\n"
                "    parallel:\n"
                "      - [{id: b, action: set, args: {name: w}}, {id: c, action: sleep, args: {secs: 1}}]\n"
            )
        },
        "routine.yaml",
        "routine.yaml",
        ["steps[1].parallel[0][1]", "sleep", "args.seconds"],
    ),
    "bad-arg-in-inline-subroutine": (
        {
            "routine.yaml": (
                "name: r\n"
                "steps:\n"
                "  - id: child\n"
                "    routine:\n"
                "      name: kid\n"
                "      steps:\n"
                "        - {id: k1, action: append, args: {value: 1}}\n"
            )
        },
        "routine.yaml",
        "routine.yaml",
        ["steps[0].routine.steps[0]", "append", "args.name"],
    ),
    "duplicate-step-id": (
        {
            "routine.yaml": (
                "name: r\n"
                "steps:\n"
                "  - {id: twice, action: set, args: {name: v}}\n"
                "  - id: p\n"
                "    parallel:\n"
                "      - [{id: twice, action: set, args: {name: w}}]\n"
            )
        },
        "routine.yaml",
        "routine.yaml",
        ["'twice'", "more than once"],
    ),
    "missing-subroutine-file": (
        {"routine.yaml": "name: r\nsteps:\n  - {id: a, action: set, args: {name: v}}\n  - {id: child, routine: nowhere.yaml}\n"},
        "routine.yaml",
        "routine.yaml",
        ["'child'", "nowhere.yaml", "does not exist"],
    ),
    "secret-value-written-in-the-file": (
        {"routine.yaml": "name: r\nvariables: {token: {value: tok-1234, sensitivity: secret}}\nsteps: [{id: a, action: set, args: {name: v}}]\n"},
        "routine.yaml",
        "routine.yaml",
        ["variables", "token", "stored with it in plain text", "--var-file"],
    ),
    "misspelt-declaration": (
        {"routine.yaml": "name: r\nvariables: {token: {value: x, sensitivty: secret}}\nsteps: [{id: a, action: set, args: {name: v}}]\n"},
        "routine.yaml",
        "routine.yaml",
        ["token", "only value and sensitivity", "sensitivty"],
    ),
    "action-module-not-allowed": (
        {"routine.yaml": "name: r\nsteps: [{id: a, action: 'os:system'}]\n"},
        "routine.yaml",
        "routine.yaml",
        ["steps[0]", "'os'", "RUNCTX_ACTION_MODULES"],
    ),
    "invalid-subroutine-file": (
        {
            "routine.yaml": "name: r\nsteps:\n  - {id: child, routine: sub/kid.yaml}\n",
            "sub/kid.yaml": "name: kid\nsteps:\n  - {id: k1, action: copy, args: {from: a}}\n",
        },
        "routine.yaml",
        "sub/kid.yaml",
        ["steps[0]", "copy", "args.to"],
    ),
}


def _runs_in_l3(database_url: str) -> int:
    with psycopg.connect(libpq_url(database_url)) as conn:
        return conn.execute("SELECT count(*) FROM runs").fetchone()[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_routine_file_is_refused_with_one_line_naming_file_and_place(make_cluster, tmp_path: Path, case: str) -> None:
    files, given, named, fragments = CASES[case]
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    cluster = make_cluster("redis")  # servers and a database, but no worker: nothing may be submitted

    done = cluster.runctx("run", str(tmp_path / given), "--json", "--timeout", "5", timeout_s=60)

    assert done.returncode != 0, done
    message = done.stderr.strip()
    assert "Traceback" not in done.stderr, done.stderr
    assert message.count("\n") == 0, f"expected one line, got:\n{message}"
    assert message.startswith("runctx: "), message
    assert str((tmp_path / named).resolve()) in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert done.stdout.strip() == "", done.stdout
    assert _runs_in_l3(cluster.database_url) == 0


@pytest.mark.slow
@pytest.mark.parametrize("form", ["novalue", "=1", ""])
def test_bad_var_form_is_refused(make_cluster, tmp_path: Path, form: str) -> None:
    routine = tmp_path / "ok.yaml"
    routine.write_text("name: ok\nvariables: {a: 1}\nsteps:\n  - {id: s, action: increment, args: {name: a}}\n")
    cluster = make_cluster("redis")

    done = cluster.runctx("run", str(routine), "--var", form, "--json", "--timeout", "5", timeout_s=60)

    assert done.returncode != 0, done
    message = done.stderr.strip()
    assert "Traceback" not in done.stderr, done.stderr
    assert message.count("\n") == 0, f"expected one line, got:\n{message}"
    assert message.startswith("runctx: --var"), message
    assert repr(form) in message and "NAME=VALUE" in message, message
    assert _runs_in_l3(cluster.database_url) == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "var_file, fragments",
    [
        (None, ["variables.token", "secret without a value", "--var-file"]),  # declared, never given
        ("missing.yaml", ["missing.yaml", "cannot read"]),
        ("list.yaml", ["list.yaml", "expected a mapping"]),
        ("broken.yaml", ["broken.yaml", "not YAML or JSON"]),
    ],
)
def test_a_secret_declared_without_value_must_come_with_a_good_var_file(
    make_cluster, tmp_path: Path, var_file: str | None, fragments: list[str]
) -> None:
    routine = tmp_path / "needs.yaml"
    routine.write_text("name: needs\nvariables: {token: {sensitivity: secret}}\nsteps:\n  - {id: s, action: set, args: {name: a, value: 1}}\n")
    (tmp_path / "list.yaml").write_text("- token\n")
    (tmp_path / "broken.yaml").write_text("token: [unclosed\n")
    cluster = make_cluster("redis")
    args = ["--var-file", str(tmp_path / var_file)] if var_file else []

    done = cluster.runctx("run", str(routine), *args, "--json", "--timeout", "5", timeout_s=60)

    assert done.returncode != 0, done
    message = done.stderr.strip()
    assert "Traceback" not in done.stderr and message.count("\n") == 0 and message.startswith("runctx: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert _runs_in_l3(cluster.database_url) == 0
