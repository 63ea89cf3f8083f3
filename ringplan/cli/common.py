"""Shared pieces of the CLI: parameter types, output formats, and bad input → exit code 2."""

from __future__ import annotations

import csv
import functools
import io
import json
from collections.abc import Callable, Sequence
from typing import Any

import click

from ringplan.units import parse_bytes, parse_tokens


class TokenCountType(click.ParamType):
    """``1M`` = 1,000,000, ``1Mi`` = 1,048,576, ``200K``, ``128Ki``, ``1.5M``, plain integers."""

    name = "tokens"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        try:
            return parse_tokens(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class ByteSizeType(click.ParamType):
    """``40GB`` = 40·10⁹ bytes, ``80GiB`` = 80·2³⁰ bytes, plain integers are bytes."""

    name = "bytes"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        try:
            return parse_bytes(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


TOKENS = TokenCountType()
BYTES = ByteSizeType()

format_option = click.option(
    "--format", "output_format", type=click.Choice(["table", "json", "csv"]), default="table",
    show_default=True, help="Output format.")


class OneLineErrorCommand(click.Command):
    """A command whose usage errors print one line (``Error: ...``) instead of the usage block.

    Exit code stays 2. Use as ``@click.command(cls=OneLineErrorCommand)``.
    """

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            exc.ctx = None  # UsageError.show prints the usage block only when it has a context
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            exc.ctx = None
            raise


def bad_input_exits_2(func: Callable) -> Callable:
    """Turn a core ``ValueError`` (or missing/corrupt file) into a one-line click error, exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ValueError, FileNotFoundError, KeyError) as exc:
            message = exc.args[0] if exc.args else str(exc)
            raise click.UsageError(str(message)) from None

    return wrapper


def render_rows(rows: Sequence[dict[str, Any]], output_format: str) -> str:
    """Rows of equal keys as a ``tabulate`` table, JSON list, or CSV."""
    if output_format == "json":
        return json.dumps(list(rows), indent=2, default=str)
    if output_format == "csv":
        buffer = io.StringIO()
        if rows:
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return buffer.getvalue().rstrip("\n")
    from tabulate import tabulate  # imported here: only table output pays for it

    return tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True)
