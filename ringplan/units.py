"""Token counts and byte sizes: parsing from text and formatting for output.

Decimal suffixes are powers of 1000, binary ones (``Ki``, ``Mi``, ``Gi``) powers of 1024:
``1M`` tokens = 1,000,000 and ``1Mi`` = 1,048,576; ``40GB`` = 40·10⁹ bytes, ``80GiB`` = 80·2³⁰.
Everything inside ringplan is in tokens, bytes and seconds; MB/GiB/ms appear only when formatting.
"""

from __future__ import annotations

import re
from fractions import Fraction

_DECIMAL = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_BINARY = {"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
_NUMBER = r"(?P<num>[+-]?(?:\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+))"
#: Token counts also take underscores between digits (``1_000_000``) and a decimal exponent (``1e6``).
_TOKEN_NUMBER = r"(?P<num>[+-]?(?:\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+(?:_\d+)*(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)"
_TOKENS_RE = re.compile(rf"^\s*{_TOKEN_NUMBER}\s*(?P<suffix>[KMGT]I?)?\s*$", re.IGNORECASE | re.ASCII)
_BYTES_RE = re.compile(rf"^\s*{_NUMBER}\s*(?P<suffix>[KMGT]I?)?B?\s*$", re.IGNORECASE | re.ASCII)

MB = 10**6
MIB = 2**20
GIB = 2**30
FP32_BYTES = 4  # bytes per fp32 value (accumulators, master weights, gradients on the wire)
#: Bytes per element of each dtype the planner knows (IEEE 754 binary32 / binary16, bfloat16).
DTYPE_BYTES: dict[str, int] = {"fp32": FP32_BYTES, "fp16": 2, "bf16": 2}


def _scaled_integer(text: str, match: re.Match | None, what: str, examples: str, *, round_to_whole: bool) -> int:
    if match is None:
        raise ValueError(f"cannot read {text!r} as {what} (examples: {examples})")
    suffix = (match["suffix"] or "").upper()
    scale = _BINARY.get(suffix) or _DECIMAL[suffix]
    number = match["num"].replace(",", "").replace("_", "")
    # Decimal arithmetic on the digits: float(1.1) * 10**6 would give 1100000.0000000002.
    value = Fraction(number) * scale
    if value <= 0:
        raise ValueError(f"{what} must be positive, got {text.strip()!r}")
    if round_to_whole:
        value = Fraction(round(value))
    if value.denominator != 1:
        raise ValueError(f"{text.strip()!r} is not a whole number of {what}")
    return int(value)


def parse_tokens(text: str | int) -> int:
    """Token count from ``200K``, ``1M``, ``1Mi``, ``1.5M``, ``128Ki``, ``1,048,576``, ``1_000_000``,
    ``1e6`` or a plain integer.

    Must be a positive whole number: ``1.0000005M`` and ``0`` are errors, not roundings.
    """
    return _scaled_integer(str(text), _TOKENS_RE.match(str(text)), "tokens",
                           "200K, 1M, 1Mi, 1.5M, 131072", round_to_whole=False)


def parse_bytes(text: str | int) -> int:
    """Byte count from ``40GB``, ``80GiB``, ``512MiB``, ``1.5G``, ``1,234.57 GiB`` or a plain integer.

    Rounded to the nearest byte (``0.1GiB`` is 107,374,182 bytes); must be positive.
    """
    return _scaled_integer(str(text), _BYTES_RE.match(str(text)), "bytes",
                           "40GB, 80GiB, 512MiB, 1.5G, 1073741824", round_to_whole=True)


def format_tokens(tokens: int) -> str:
    """``1048576`` → ``1,048,576``: exact, so tables never hide a rounding."""
    return f"{int(tokens):,}"


def format_bytes(n_bytes: float, unit: str = "GiB") -> str:
    """Bytes in a named unit (``MB``, ``GB``, ``MiB``, ``GiB``) with two decimals."""
    scale = {"MB": 10**6, "GB": 10**9, "MiB": 2**20, "GiB": 2**30}[unit]
    return f"{n_bytes / scale:,.2f} {unit}"
