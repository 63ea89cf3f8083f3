"""Token counts and byte sizes: parsing from text and formatting for output.

Decimal suffixes are powers of 1000, binary ones (``Ki``, ``Mi``, ``Gi``) powers of 1024:
``1M`` tokens = 1,000,000 and ``1Mi`` = 1,048,576; ``40GB`` = 40·10⁹ bytes, ``80GiB`` = 80·2³⁰.
Everything inside ringplan is in tokens, bytes and seconds; MB/GiB/ms appear only when formatting.
"""

from __future__ import annotations

import math
import re

_DECIMAL = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_BINARY = {"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
_NUMBER = r"(?P<num>\d+(?:\.\d*)?|\.\d+)"
_TOKENS_RE = re.compile(rf"^\s*{_NUMBER}\s*(?P<suffix>[KMGT]I?)?\s*$", re.IGNORECASE)
_BYTES_RE = re.compile(rf"^\s*{_NUMBER}\s*(?P<suffix>[KMGT]I?)?B?\s*$", re.IGNORECASE)

MB = 10**6
GIB = 2**30


def _scaled_integer(text: str, match: re.Match | None, what: str) -> int:
    if match is None:
        raise ValueError(f"cannot read {text!r} as {what} (examples: 200K, 1M, 1Mi, 1.5M, 131072)")
    suffix = (match["suffix"] or "").upper()
    scale = _BINARY.get(suffix) or _DECIMAL[suffix]
    value = float(match["num"]) * scale
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"{text!r} is not a whole number of {what}")
    if value <= 0:
        raise ValueError(f"{what} must be positive, got {text!r}")
    return int(value)


def parse_tokens(text: str | int) -> int:
    """Token count from ``200K``, ``1M``, ``1Mi``, ``1.5M``, ``128Ki`` or a plain integer."""
    return _scaled_integer(str(text), _TOKENS_RE.match(str(text)), "tokens")


def parse_bytes(text: str | int) -> int:
    """Byte count from ``40GB``, ``80GiB``, ``512MiB``, ``1.5G`` or a plain integer."""
    return _scaled_integer(str(text), _BYTES_RE.match(str(text)), "bytes")


def format_tokens(tokens: int) -> str:
    """``1048576`` → ``1,048,576``: exact, so tables never hide a rounding."""
    return f"{int(tokens):,}"


def format_bytes(n_bytes: float, unit: str = "GiB") -> str:
    """Bytes in a named unit (``MB``, ``GB``, ``MiB``, ``GiB``) with two decimals."""
    scale = {"MB": 10**6, "GB": 10**9, "MiB": 2**20, "GiB": 2**30}[unit]
    return f"{n_bytes / scale:,.2f} {unit}"
