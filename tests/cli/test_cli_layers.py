"""Issue 13's layering of the CLI, read from the source: commands never import each other (what two
commands share lives in ``options``, ``common`` or ``stack_output``), and nothing private crosses a
module boundary (``ringplan.capacity.answers`` uses only the searches' public names)."""

import ast
from pathlib import Path

import pytest

import ringplan

PACKAGE = Path(ringplan.__file__).parent
CLI = PACKAGE / "cli"
#: The CLI modules that are not commands: shared by several commands.
SHARED = {"__init__", "common", "options", "readable", "stack_output", "commands_registry"}
COMMANDS = sorted(p.stem for p in CLI.glob("*.py") if p.stem not in SHARED)


def imported_modules(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every ``import`` and ``from … import`` in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


def test_every_command_module_is_known():
    """The command modules are the ones the registry names (a new shared module joins SHARED), and
    every registered command loads."""
    from ringplan.cli.commands_registry import COMMANDS as REGISTERED, load_command

    registry = {target.split(":")[0].removeprefix("ringplan.cli.") for target in REGISTERED.values()}
    assert set(COMMANDS) == registry
    assert all(load_command(name).name == name for name in REGISTERED)


@pytest.mark.parametrize("command", COMMANDS)
def test_commands_never_import_each_other(command):
    """A command module imports no other command module."""
    others = {f"ringplan.cli.{other}" for other in COMMANDS if other != command}
    imports = [module for module, _ in imported_modules(CLI / f"{command}.py")]
    assert not [module for module in imports if module in others]


@pytest.mark.parametrize("path", sorted(CLI.glob("*.py")) + [PACKAGE / "capacity" / "answers.py"],
                         ids=lambda p: p.name)
def test_no_private_name_crosses_a_module(path):
    """No ``from ringplan… import _name`` and no ``module._name`` of another ringplan module."""
    tree = ast.parse(path.read_text())
    imported = [name for module, names in imported_modules(path) if module.startswith("ringplan")
                for name in names if name.startswith("_")]
    modules = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and (node.module or "").startswith("ringplan") for alias in node.names}
    attributes = [f"{node.value.id}.{node.attr}" for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                  and isinstance(node.value, ast.Name) and node.value.id in modules and node.attr.startswith("_")
                  and not node.attr.startswith("__")]
    assert not imported and not attributes
