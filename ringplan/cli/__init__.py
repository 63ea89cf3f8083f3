"""The ``ringplan`` command line: a click group whose commands live one per module.

Commands parse options, build the core dataclasses, call one core function and format its
result. Runtime commands (``profile``, ``validate``) import torch lazily inside the command,
so ``ringplan capacity`` never pays for it.
"""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ringplan")
def main() -> None:
    """Plan how many GPUs ring attention needs, and check the plan on real GPUs."""


def _register_commands() -> None:
    # One import per command module; each module defines one or more click commands.
    from ringplan.cli import commands_registry

    for command in commands_registry.all_commands():
        main.add_command(command)


_register_commands()
