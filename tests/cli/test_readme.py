"""README.md cannot drift: its examples run, its usage lines are the commands' options, its files
are the files in examples/, its links lead somewhere.

How README marks what is checked (HTML comments: GitHub shows nothing of them):

- ``<!-- readme-test -->`` on the line right before a ```bash or ```python fence: the block is run.
  Blocks without the marker are not run (the venv-making first line, the worker of terminal 2,
  ``runctx stack down``): the test provides those services itself.
- ``<!-- readme-test skip-lines="PREFIX" ... -->``: the block is run without its lines that start
  with one of the quoted prefixes (e.g. ``runctx stack``: the test uses its own servers).
- ``<!-- readme-test file="examples/x.py" -->``: the block is not run; it must be that file's text.
- ``<!-- readme-usage -->``: each line of the block is a command's usage; its options and metavars
  must be those of ``runctx <command> --help``, every option of the command shown.

How the marked blocks run (`test_readme_examples`): not on the embedded stack but on the test
servers (the ``make_cluster`` fixture: a database and key prefix of its own, ``cluster.env``), in a
temporary directory holding a copy of examples/ and a ``.venv/bin/activate`` that puts this
interpreter's bin directory (``Path(sys.executable).parent``, where ``runctx`` is) first on PATH.
The environment is a fresh terminal's: ``cluster.env`` without ``RUNCTX_ACTION_MODULES`` and
``PYTHONPATH``, which the blocks set themselves as README says. One worker node runs with what
README's terminal 2 sets (``WORKER_ENV``). Consecutive bash blocks run as one script (one
terminal: variables and exports carry over) with ``bash -euo pipefail``; a python block runs with
``sys.executable``, in the same directory and environment.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

# README's first code block: CI runs these two lines (its hook looks for the second in .ci/run).
FIRST_BLOCK = [
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[embedded,test]' && .venv/bin/runctx run "
    "examples/onboarding.yaml --var-file examples/onboarding.vars.yaml --workers 2",
    "./.venv/bin/python -m pytest -q",
]

# What README's terminal 2 exports before `runctx worker` (relative paths made absolute below).
WORKER_ENV = {"RUNCTX_ACTION_MODULES": "myacts", "PYTHONPATH": "examples"}

# What the blocks' comments promise a reader sees.
EXPECTED_OUTPUT = [
    'shouted = "HELLO!"',  # runctx run examples/shout.yaml
    "raised ValueError: nothing to shout",  # the failed run's one line
    "traceback of step 'loud'",  # runctx status of it
    "exit code 1",  # runctx wait of a failed run
    "exit code 3",  # runctx cancel of a run that had ended
    "api_token = \"***\"",  # runctx context: the secret masked
    "succeeded {",  # the Python API's first print
    'kinds = ["large", "small", "small"]',  # runctx run examples/documents.yaml
    'signatures = [{"by": "ann"}, {"by": "bob"}]',  # runctx wait of examples/approval.yaml, signalled
]

MARKER = re.compile(r"^<!--\s*readme-(test|usage)\b(.*?)-->\s*$")
ATTRIBUTE = re.compile(r'([\w-]+)="([^"]*)"')


@dataclass
class Block:
    kind: str  # test | usage
    language: str
    line: int  # README's line of the first line of code
    lines: list[str]
    attributes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def runnable(self) -> list[str]:
        skipped = tuple(self.attributes.get("skip-lines", []))
        return [line for line in self.lines if not (skipped and line.lstrip().startswith(skipped))]


def marked_blocks(text: str) -> list[Block]:
    """Every fenced block right after a readme-test or readme-usage marker, in README's order."""
    lines = text.splitlines()
    blocks = []
    for index, line in enumerate(lines):
        match = MARKER.match(line.strip())
        if not match:
            continue
        fence = lines[index + 1] if index + 1 < len(lines) else ""
        assert fence.startswith("```"), f"README.md:{index + 1}: a marker must be right before a ``` fence"
        attributes: dict[str, list[str]] = {}
        for key, value in ATTRIBUTE.findall(match.group(2)):
            attributes.setdefault(key, []).append(value)
        end = next(i for i in range(index + 2, len(lines)) if lines[i].startswith("```"))
        blocks.append(Block(match.group(1), fence[3:].strip(), index + 3, lines[index + 2 : end], attributes))
    return blocks


def code_blocks(text: str) -> list[list[str]]:
    out, current = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                out.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return out


# ---- what needs no server ---------------------------------------------------------------------------


def test_readme_opens_with_the_title_a_paragraph_and_the_two_lines() -> None:
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == "# runctx"
    fence = next(i for i, line in enumerate(lines) if line.startswith("```"))
    paragraphs = [part for part in "\n".join(lines[1:fence]).split("\n\n") if part.strip()]
    assert len(paragraphs) == 1, "one paragraph between the title and the first code block"
    assert code_blocks(text)[0] == FIRST_BLOCK
    assert "./.venv/bin/python -m pytest -q" in (ROOT / ".ci" / "run").read_text()


def test_readme_files_are_the_files_in_the_repository() -> None:
    blocks = [block for block in marked_blocks(README.read_text(encoding="utf-8")) if "file" in block.attributes]
    assert blocks, "README shows examples/myacts.py and examples/shout.yaml"
    for block in blocks:
        path = ROOT / block.attributes["file"][0]
        assert "\n".join(block.lines) == path.read_text(encoding="utf-8").rstrip("\n"), (
            f"README.md:{block.line}: the block differs from {path.relative_to(ROOT)}"
        )


def test_readme_usage_lines_are_the_commands_options() -> None:
    import typer

    from runctx.cli import app

    def is_group(command) -> bool:  # Typer carries its own click: judged by shape, not by class
        return hasattr(command, "commands")

    group = typer.main.get_command(app)
    (block,) = [block for block in marked_blocks(README.read_text(encoding="utf-8")) if block.kind == "usage"]
    shown: set[str] = set()
    for offset, line in enumerate(block.lines):
        if not line.strip():
            continue
        where = f"README.md:{block.line + offset}: {line}"
        tokens = line.replace("[", " ").replace("]", " ").split()
        assert tokens[0] == "runctx", where
        command, path, tokens = group, [], tokens[1:]
        while is_group(command):
            assert tokens and tokens[0] in command.commands, f"{where}: no such command"
            path.append(tokens[0])
            command, tokens = command.commands[tokens[0]], tokens[1:]
        shown.add(" ".join(path))
        params = [param for param in command.params if param.name != "help"]
        arguments = [param.metavar for param in params if param.param_type_name == "argument"]
        options = {opt: param for param in params if param.param_type_name == "option" for opt in param.opts}
        seen, positional, last, i = set(), [], None, 0
        while i < len(tokens):
            token = tokens[i]
            if token == "...":
                assert last is not None and last.multiple, f"{where}: '...' after an option that is not repeatable"
            elif token == "--":
                assert command.context_settings.get("allow_extra_args"), f"{where}: takes no arguments after --"
                break
            elif token.startswith("-"):
                assert token in options, f"{where}: {token} is not an option of runctx {' '.join(path)}"
                param = last = options[token]
                seen.add(param.name)
                if not param.is_flag:
                    i += 1
                    assert i < len(tokens) and tokens[i] == param.metavar, f"{where}: {token} takes {param.metavar}"
            else:
                positional.append(token)
            i += 1
        assert positional == arguments, f"{where}: arguments {positional}, --help says {arguments}"
        missing = {param.opts[0] for param in options.values()} - {
            param.opts[0] for param in options.values() if param.name in seen
        }
        assert not missing, f"{where}: options not shown: {sorted(missing)}"
    every = {name for name, command in group.commands.items() if not is_group(command)}
    every |= {f"{name} {sub}" for name, command in group.commands.items() if is_group(command) for sub in command.commands}
    assert shown == every, f"commands without a usage line: {sorted(every - shown)}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_in_readme_and_docs_lead_to_files_and_headings_that_exist() -> None:
    for page in [README, *DOCS]:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            assert linked.exists(), f"{page.relative_to(ROOT)}: link to {target}: no such file"
            if anchor:
                headings = {slug(line.lstrip("#")) for line in linked.read_text(encoding="utf-8").splitlines() if line.startswith("#")}
                assert anchor in headings, f"{page.relative_to(ROOT)}: link to {target}: no such heading"


# ---- the examples, run ------------------------------------------------------------------------------


def runs_of(blocks: list[Block]) -> list[tuple[str, str, int]]:
    """(language, program, README line) to run in order: consecutive bash blocks as one script."""
    runs: list[tuple[str, str, int]] = []
    for block in blocks:
        if block.kind != "test" or "file" in block.attributes:
            continue
        assert block.language in ("bash", "python"), f"README.md:{block.line}: cannot run a {block.language!r} block"
        if block.language == "bash":
            part = f'echo "### README.md:{block.line}" >&2\n' + "\n".join(block.runnable) + "\n"
            if runs and runs[-1][0] == "bash":
                runs[-1] = ("bash", runs[-1][1] + part, runs[-1][2])
                continue
            runs.append(("bash", part, block.line))
        else:
            runs.append(("python", "\n".join(block.lines) + "\n", block.line))
    return runs


def a_fresh_terminal(cluster, work: Path) -> dict[str, str]:
    """The environment of a terminal pointed at the cluster, before README's blocks set anything."""
    env = {k: v for k, v in cluster.env.items() if k not in ("RUNCTX_ACTION_MODULES", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    activate = work / ".venv" / "bin" / "activate"
    activate.parent.mkdir(parents=True)
    activate.write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    return env


@pytest.mark.slow
def test_readme_examples(make_cluster, tmp_path: Path) -> None:
    runs = runs_of(marked_blocks(README.read_text(encoding="utf-8")))
    assert [language for language, _, _ in runs].count("python") >= 1 and runs[0][0] == "bash"
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "examples", work / "examples", ignore=shutil.ignore_patterns("__pycache__"))

    cluster = make_cluster()
    node_env = dict(WORKER_ENV)
    node_env["PYTHONPATH"] = os.pathsep.join([str(work / WORKER_ENV["PYTHONPATH"]), str(ROOT)])
    cluster.start_node("n1", env=node_env)
    cluster.wait_ready("n1")
    env = a_fresh_terminal(cluster, work)

    seen = ""
    for language, program, line in runs:
        command = ["bash", "-euo", "pipefail", "-c", program] if language == "bash" else [sys.executable, "-c", program]
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        seen += done.stdout + done.stderr
        assert done.returncode == 0, (
            f"README.md:{line}: the {language} example exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}"
            f"\n--- stderr\n{done.stderr[-4000:]}\n--- worker log\n{cluster.logs()[-3000:]}"
        )
    for expected in EXPECTED_OUTPUT:
        assert expected in seen, f"README's examples did not print {expected!r}:\n{seen[-6000:]}"
