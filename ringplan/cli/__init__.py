"""The ``ringplan`` command line: a click group whose commands live one per module.

Commands parse options, build the core dataclasses, call one core function and format its
result. Each command module is imported only when that command runs
(``commands_registry.LazyGroup``), and runtime commands (``profile``, ``validate``) import torch
lazily inside the command, so ``ringplan capacity`` pays for neither.
"""

from __future__ import annotations

import click

from ringplan.cli.commands_registry import LazyGroup


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ringplan")
def main() -> None:
    """Plan how many GPUs ring attention needs, and check the plan on real GPUs."""
