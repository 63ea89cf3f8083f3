"""Shared pieces of the CLI: parameter types, output formats, and bad input → exit code 2."""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import re
import stat
from collections.abc import Callable, Sequence
from typing import Any

import click

from ringplan.units import GIB, MIB, parse_bytes, parse_tokens

#: Largest token count an option takes: 2**50 (about 1.1·10¹⁵) tokens, the capacity search's ceiling
#: (ringplan.capacity.search); no GPU fleet holds more, and larger integers overflow float arithmetic.
MAX_TOKENS = 2**50
#: Largest byte count an option takes (sizes, bandwidths in bytes/s): 2**60, about 1.15·10¹⁸.
MAX_BYTES = 2**60
#: Ranges of the integer options: far beyond any real model or cluster (Llama-3-405B: 126 layers,
#: E 16,384, 128 heads of 128, F 53,248, V 128,256; the largest vocabularies ~256K), small enough that
#: byte counts built from them stay far from float overflow (an integer of 309 digits has no float).
MAX_BATCH = 2**20
MAX_HEADS = 2**16
MAX_HEAD_DIM = 2**16
MAX_WIDTH = 2**24
MAX_LAYERS = 100_000
MAX_VOCAB = 2**28
#: Largest world, ring or shard group: the capacity search's own bound (ringplan.capacity.search).
MAX_WORLD_SIZE = 1_000_000
#: Largest ring ``simulate`` plays: it keeps P x P step arrays; a causal training step at P = 2,048 takes
#: ~1.5 s here, at P = 4,096 ~18 s (the arrays and the per-step work grow as P²).
MAX_SIMULATED_RING_SIZE = 2048
#: Largest least common multiple of dilated segment lengths (the shortest sequence the pattern
#: allows): 2**36, about 6.9·10¹⁰ tokens, thousands of times the longest context trained today. The
#: max-tokens search enumerates the divisors of that multiple (time ~ its square root): at 2**50 one
#: answer took ~30 s, two coprime lengths near 2**32 never finished.
MAX_PATTERN_TOKENS = 2**36
#: Longest text of a number an option reads: more digits are out of every range (and Python refuses
#: to convert integers of more than 4,300 digits).
MAX_NUMBER_CHARS = 40
_ASCII_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)
_ASCII_FLOAT = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*", re.ASCII)


def shown(value: Any, limit: int = MAX_NUMBER_CHARS) -> str:
    """``repr`` of a user value, cut to ``limit`` characters (a 10,000-digit number stays one short line)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


class TokenCountType(click.ParamType):
    """``1M`` = 1,000,000, ``1Mi`` = 1,048,576, ``200K``, ``128Ki``, ``1.5M``, plain integers."""

    name = "tokens"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        if len(str(value)) > MAX_NUMBER_CHARS:
            self.fail(f"{shown(value)} is too long to be a token count (at most {MAX_TOKENS:,})", param, ctx)
        try:
            tokens = parse_tokens(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if tokens > MAX_TOKENS:
            self.fail(f"{shown(value)} is more than {MAX_TOKENS:,} tokens", param, ctx)
        return tokens


class ByteSizeType(click.ParamType):
    """``40GB`` = 40·10⁹ bytes, ``80GiB`` = 80·2³⁰ bytes, plain integers are bytes."""

    name = "bytes"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        if len(str(value)) > MAX_NUMBER_CHARS:
            self.fail(f"{shown(value)} is too long to be a byte count (at most {MAX_BYTES:,})", param, ctx)
        try:
            n_bytes = parse_bytes(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if n_bytes > MAX_BYTES:
            self.fail(f"{shown(value)} is more than {MAX_BYTES:,} bytes", param, ctx)
        return n_bytes


class BoundedInt(click.IntRange):
    """An integer option with a meaningful range: ASCII digits only (Python's ``int`` also reads
    ``１２３`` and ``٣``), at most ``MAX_NUMBER_CHARS`` characters, then click's range check, which
    names the option and the bounds."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, str):
            if len(value) > MAX_NUMBER_CHARS:
                bounds = f"{'' if self.min is None else self.min}..{'' if self.max is None else f'{self.max:,}'}"
                self.fail(f"{shown(value)} is out of the range {bounds}", param, ctx)
            if not _ASCII_INTEGER.fullmatch(value):
                self.fail(f"{shown(value)} is not a whole number (ASCII digits)", param, ctx)
        return super().convert(value, param, ctx)


class FiniteFloat(click.FloatRange):
    """A float option that must be finite (click's ``FloatRange`` lets ``nan`` through every bound
    and ``inf`` through an open one), written in ASCII, optionally within bounds."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, str):
            if len(value) > MAX_NUMBER_CHARS or not _ASCII_FLOAT.fullmatch(value):
                self.fail(f"{shown(value)} is not a finite decimal number", param, ctx)
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{shown(value)} is not a finite number", param, ctx)
        return number


class MarginType(FiniteFloat):
    """The safety margin: a fraction in [0, 1) (``0.05``) or a percentage (``5%``); a bare number of 1
    or more (``5``) is an error that suggests the fraction it probably meant."""

    def __init__(self) -> None:
        super().__init__(min=0.0, max=1.0, max_open=True)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        text = value.strip() if isinstance(value, str) else None
        if text is not None and text.endswith("%"):
            if len(text) > MAX_NUMBER_CHARS or not _ASCII_FLOAT.fullmatch(text[:-1]):
                self.fail(f"{shown(value)} is not a percentage (e.g. 5%)", param, ctx)
            value = str(float(text[:-1]) / 100.0)
        elif text is not None and _ASCII_FLOAT.fullmatch(text) and 1.0 <= float(text) <= 100.0:
            self.fail(f"{shown(value)} is out of the range 0 <= x < 1: the margin is a fraction of usable memory; "
                      f"did you mean {float(text) / 100:g} (or {float(text):g}%)?", param, ctx)
        return super().convert(value, param, ctx)


#: Dtype names the options accept beside the planner's own (``bf16``, ``fp16``, ``fp32``).
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


class DtypeChoice(click.Choice):
    """A dtype: ``bf16``/``bfloat16``, ``fp16``/``float16``, ``fp32``/``float32`` (any case), read as the
    planner's short name."""

    def __init__(self, choices: Sequence[str]) -> None:
        super().__init__(list(choices), case_sensitive=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            value = DTYPE_ALIASES.get(value.strip().lower(), value.strip().lower())
        return super().convert(value, param, ctx)


class QuietAliasOption(click.Option):
    """An option with extra names that it accepts but ``--help`` does not list (old spellings kept
    working: ``--training`` for ``--train``): ``quiet_aliases=("--training", ...)``."""

    def __init__(self, *args: Any, quiet_aliases: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.quiet_aliases = frozenset(quiet_aliases)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        opts, secondary = self.opts, self.secondary_opts
        self.opts = [o for o in opts if o not in self.quiet_aliases]
        self.secondary_opts = [o for o in secondary if o not in self.quiet_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts, self.secondary_opts = opts, secondary


class InputFile(click.Path):
    """A file the command reads. Missing: left to the reader (which names it). Present: must be a
    regular file (``/dev/zero``, a FIFO or a directory would hang or fail mid-read)."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = super().convert(value, param, ctx)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            return path
        except (OSError, ValueError) as exc:
            self.fail(f"{shown(str(value), 200)}: {getattr(exc, 'strerror', None) or exc}", param, ctx)
        if not stat.S_ISREG(mode):
            self.fail(f"{shown(str(value), 200)} is not a regular file", param, ctx)
        return path


class OutputFile(click.Path):
    """A file the command writes (and may merge into): if present, a regular file; its folder must exist."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = super().convert(value, param, ctx)
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            self.fail(f"the folder of {shown(str(value), 200)} does not exist", param, ctx)
        if os.path.exists(path) and not os.path.isfile(path):
            self.fail(f"{shown(str(value), 200)} is not a regular file", param, ctx)
        return path


class TokenListType(click.ParamType):
    """Comma-separated positive token counts: ``4096,8192,16384`` or ``4Ki,8Ki``; an empty part
    (``4096,,8192``, ``,``) is an error, an empty value the empty list."""

    name = "list"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        text = str(value)
        if not text.strip():
            return ()
        parts = text.split(",")
        if any(not part.strip() for part in parts):
            self.fail(f"empty entry in {shown(text, 80)} (give comma-separated token counts, e.g. 4096,8192)",
                      param, ctx)
        return tuple(TOKENS.convert(part, param, ctx) for part in parts)


class SegmentListType(TokenListType):
    """Dilated-attention segment lengths: token counts whose least common multiple (the shortest
    sequence the pattern allows) is at most ``MAX_PATTERN_TOKENS``."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        lengths = super().convert(value, param, ctx)
        if lengths and math.lcm(*lengths) > MAX_PATTERN_TOKENS:
            self.fail(f"segment lengths {shown(value, 80)} allow only sequences of a multiple of their least "
                      f"common multiple, which is over {MAX_PATTERN_TOKENS:,} tokens", param, ctx)
        return lengths


class IntListType(click.ParamType):
    """Comma-separated integers of at least ``min_value`` (ASCII digits, no empty entry): ``1,2,4``."""

    name = "ints"

    def __init__(self, min_value: int = 1, max_value: int = MAX_TOKENS) -> None:
        self.min_value, self.max_value = min_value, max_value

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        parts = [part.strip() for part in str(value).split(",")]
        if not all(_ASCII_INTEGER.fullmatch(part) and len(part) <= MAX_NUMBER_CHARS for part in parts):
            self.fail(f"cannot read {shown(value, 80)} as comma-separated integers (e.g. 1,2,4)", param, ctx)
        values = tuple(int(part) for part in parts)
        if min(values) < self.min_value or max(values) > self.max_value:
            self.fail(f"need integers from {self.min_value} to {self.max_value:,}, got {shown(value, 80)}", param, ctx)
        return values


class TileTokensType(TokenCountType):
    """A tile size in tokens, or ``none`` (no tiling; returned as 0)."""

    name = "tokens|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, str) and value.strip().lower() == "none":
            return 0
        return super().convert(value, param, ctx)


TOKENS = TokenCountType()
TILE_TOKENS = TileTokensType()
BYTES = ByteSizeType()
TOKEN_LIST = TokenListType()
SEGMENT_LIST = SegmentListType()

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


#: What bad user input raises inside a command: a core ``ValueError`` (``UnicodeDecodeError`` and
#: ``json.JSONDecodeError`` are ones), a catalog ``KeyError``, ``OverflowError`` from a number too large
#: for float arithmetic, ``OSError`` on a user path, ``RecursionError`` from a deeply nested user file.
USER_INPUT_ERRORS = (ValueError, KeyError, OverflowError, OSError, RecursionError)
#: Longest error message printed; longer ones (a user value echoed whole) are cut.
MAX_MESSAGE_CHARS = 500


def error_line(exc: BaseException, paths: Sequence[str] = ()) -> str:
    """The one line an input error prints: the core's message (its first argument, as raised), an
    ``OSError``'s file and reason, or what a ``RecursionError`` means; newlines folded, cut to
    ``MAX_MESSAGE_CHARS``. ``paths``: the user files given, named when the error itself names none."""
    if isinstance(exc, OSError) and exc.strerror:
        message = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    elif isinstance(exc, RecursionError):
        message = f"{', '.join(paths) or 'input'}: nested too deeply to read"
    elif isinstance(exc, OverflowError):
        message = f"a number is too large to compute with ({exc})"
    else:
        message = str(exc.args[0] if exc.args else exc)
    if "\n" in message or "\r" in message:
        message = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "…"


def _given_paths() -> list[str]:
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return []
    paths = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param.type, click.Path) and value:
            paths += [str(v) for v in (value if isinstance(value, tuple) else (value,))]
    return paths


def bad_input_exits_2(func: Callable) -> Callable:
    """Turn any user-input failure (``USER_INPUT_ERRORS``) into one ``Error:`` line, exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except USER_INPUT_ERRORS as exc:
            raise click.UsageError(error_line(exc, _given_paths())) from None

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


# ----------------------------------------------------------------------------- measured points (profile, validate)


def result_record(result) -> dict[str, Any]:
    """One measured point as a flat record (bytes, seconds) for json/csv output."""
    w, ring = result.point.workload, result.point.layout
    return {"world_size": ring.ring_size, "seq_len_tokens": w.seq_len_tokens,
            "mode": "training" if w.training else "forward", "n_heads": w.shape.n_heads,
            "n_kv_heads": w.shape.n_kv_heads, "head_dim": w.shape.head_dim, "layout": ring.layout,
            "backend": result.backend or ring.backend, "feasible": result.feasible, "failure": result.failure,
            "peak_allocated_bytes": result.peak_allocated_bytes, "peak_reserved_bytes": result.peak_reserved_bytes,
            "device_used_bytes": result.device_used_bytes, "tracked_peak_bytes": result.tracked_peak_bytes,
            "step_time_s": result.step_time_s, "bytes_sent_per_rank": result.sent_bytes}


def bytes_text(value: float | None) -> str:
    """``1.234 GiB`` from 1 GiB up, ``12.345 MiB`` below; ``-`` when not measured."""
    if value is None:
        return "-"
    return f"{value / GIB:,.3f} GiB" if value >= GIB else f"{value / MIB:,.3f} MiB"
