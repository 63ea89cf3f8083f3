"""The layers hold: the import-linter contracts of pyproject.toml (core ← runtime ← CLI, commands
independent, no import cycle between sibling modules) and no private name imported across modules."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed (test extra)")
def test_import_contracts_are_kept():
    """`lint-imports` keeps every contract in pyproject.toml."""
    done = subprocess.run(["lint-imports", "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def private_imports(path: Path) -> list[str]:
    """``from ringplan… import _name`` statements of one source file (top level or inside functions);
    a private *module* (a version shim such as ``_compat``) is allowed."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in {"ringplan", "ringplan_runtime"}:
            package = REPO.joinpath(*node.module.split("."))
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and not (package / f"{alias.name}.py").exists():
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: from {node.module} import {alias.name}")
    return found


def test_private_imports_are_found(tmp_path):
    """The scanner sees a private name in a parenthesised list and inside a function (so the next
    test can fail)."""
    source = REPO / "ringplan" / "_probe_for_test.py"
    source.write_text("from ringplan.units import (GIB,\n    _x)\ndef f():\n    from ringplan.workload import _y\n")
    try:
        assert [line.rsplit(" ", 1)[1] for line in private_imports(source)] == ["_x", "_y"]
    finally:
        source.unlink()


def test_no_private_name_crosses_a_module():
    """No module of the planner or the runtime imports a private (_underscored) name of another."""
    offenders = [line for path in sorted([*REPO.glob("ringplan/**/*.py"), *REPO.glob("ringplan_runtime/**/*.py")])
                 for line in private_imports(path)]
    assert not offenders, "\n".join(offenders)


def test_core_import_pulls_no_torch():
    """Importing the whole planner core and the CLI registers no torch module."""
    code = ("import sys, ringplan, ringplan.cli, ringplan.capacity.stack, ringplan.time.stack_time; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
