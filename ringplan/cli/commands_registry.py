"""Which click commands make up the ``ringplan`` group: name → ``module:attribute``, imported only
when the command runs (or ``--help`` lists them), so ``ringplan capacity`` loads no other command."""

from __future__ import annotations

import importlib

import click

#: Planner core (capacity, gpus, models, fit, plan), time model (simulate, overlap) and runtime
#: commands (profile, validate).
COMMANDS: dict[str, str] = {
    "capacity": "ringplan.cli.capacity:capacity",
    "gpus": "ringplan.cli.gpus:gpus",
    "models": "ringplan.cli.models:models",
    "fit": "ringplan.cli.fit:fit",
    "plan": "ringplan.cli.plan:plan",
    "simulate": "ringplan.cli.simulate:simulate",
    "overlap": "ringplan.cli.overlap:overlap",
    "profile": "ringplan.cli.profile:profile",
    "validate": "ringplan.cli.validate:validate",
    "calibrate": "ringplan.cli.calibrate:calibrate",
}


def load_command(name: str) -> click.Command | None:
    """The click command registered as ``name`` (None when there is none)."""
    target = COMMANDS.get(name)
    if target is None:
        return None
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use (click's documented lazy-loading pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name) or load_command(cmd_name)
