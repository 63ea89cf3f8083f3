"""Which click commands make up the ``ringplan`` group (one import line per command module)."""

from __future__ import annotations

import click


def all_commands() -> list[click.Command]:
    commands: list[click.Command] = []
    # Planner core (capacity, gpus, fit), time model (simulate, overlap) and runtime commands
    # (profile, validate) each add their import here.
    from ringplan.cli.capacity import capacity; commands.append(capacity)  # noqa: E702
    from ringplan.cli.gpus import gpus; commands.append(gpus)  # noqa: E702
    from ringplan.cli.models import models; commands.append(models)  # noqa: E702
    from ringplan.cli.fit import fit; commands.append(fit)  # noqa: E702
    from ringplan.cli.plan import plan; commands.append(plan)  # noqa: E702
    from ringplan.cli.simulate import simulate; commands.append(simulate)  # noqa: E702
    from ringplan.cli.overlap import overlap; commands.append(overlap)  # noqa: E702
    from ringplan.cli.profile import profile; commands.append(profile)  # noqa: E702
    from ringplan.cli.validate import validate; commands.append(validate)  # noqa: E702
    return commands
