"""The ``ringplan.time`` package: its lazily re-exported names resolve, importing it stays cheap, and
its modules import one way (no cycle)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ringplan.time as time_pkg

TIME_DIR = Path(time_pkg.__file__).resolve().parent


@pytest.mark.parametrize("name", time_pkg.__all__)
def test_every_reexported_name_resolves(name):
    """Each name of ``ringplan.time.__all__`` is the object its defining time module holds."""
    value = getattr(time_pkg, name)
    assert value.__module__.startswith("ringplan.time.")
    assert getattr(sys.modules[value.__module__], name) is value


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute"):
        time_pkg.not_a_name  # noqa: B018


def test_importing_the_package_loads_no_numpy():
    """``import ringplan.time`` (and the whole-model step time) pulls neither numpy nor scipy."""
    code = ("import sys, ringplan.time, ringplan.time.stack_time, ringplan.time.provenance; "
            "sys.exit(1 if {'numpy', 'scipy'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def _time_imports(path: Path) -> set[str]:
    """Sibling modules of ``ringplan.time`` that ``path`` imports (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "ringplan.time":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ringplan.time."):
            found.add(node.module.split(".")[2])
    return found & {p.stem for p in TIME_DIR.glob("*.py")}


def test_time_modules_import_without_cycles():
    """The import graph of ``ringplan/time`` (lazy imports included) has no cycle."""
    graph = {p.stem: _time_imports(p) for p in TIME_DIR.glob("*.py") if p.stem != "__init__"}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module not in done:
            for imported in graph[module]:
                visit(imported, (*path, module))
            done.add(module)

    for module in graph:
        visit(module, ())
