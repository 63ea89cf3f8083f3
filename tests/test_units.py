"""Token and byte parsing: hand examples, errors that name the value, and format → parse round trips."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringplan.units import format_bytes, format_tokens, parse_bytes, parse_tokens

BYTE_UNITS = {"MB": 10**6, "GB": 10**9, "MiB": 2**20, "GiB": 2**30}


@pytest.mark.parametrize("text, tokens", [
    ("1M", 1_000_000), ("1Mi", 1_048_576), ("200K", 200_000), ("200k", 200_000), ("128Ki", 131_072),
    ("1.5M", 1_500_000), ("131072", 131_072), ("1,048,576", 1_048_576), (" 2K ", 2_000), ("1.1M", 1_100_000),
    (4096, 4096), ("1e6", 1_000_000), ("1_000_000", 1_000_000), ("2.5E3K", 2_500_000),
])
def test_parse_tokens_examples(text, tokens):
    """Decimal suffixes are powers of 1000, binary (Ki/Mi/Gi) powers of 1024; commas group digits."""
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("text, fragment", [
    ("0", "'0'"), ("-5", "'-5'"), ("abc", "'abc'"), ("", "''"), ("1.0000005M", "1.0000005M"),
    ("1e-6", "'1e-6'"), ("1MB", "'1MB'"), ("1,00", "'1,00'"),
])
def test_parse_tokens_rejects_with_the_value(text, fragment):
    """Zero, negative, fractional, malformed token counts raise ValueError quoting the input."""
    with pytest.raises(ValueError) as info:
        parse_tokens(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize("text, n_bytes", [
    ("40GB", 40 * 10**9), ("80GiB", 80 * 2**30), ("512MiB", 512 * 2**20), ("1.5G", 1_500_000_000),
    ("0.1GiB", 107_374_182), ("1073741824", 2**30),
])
def test_parse_bytes_examples(text, n_bytes):
    """Byte sizes: decimal and binary units, rounded to the nearest byte."""
    assert parse_bytes(text) == n_bytes


@pytest.mark.parametrize("text", ["0GB", "-1GiB", "lots", "1.5 parsecs"])
def test_parse_bytes_rejects(text):
    """Non-positive or malformed sizes raise ValueError."""
    with pytest.raises(ValueError):
        parse_bytes(text)


@given(st.integers(min_value=1, max_value=2**60))
def test_tokens_round_trip(tokens):
    """format_tokens → parse_tokens is the identity on positive integers."""
    assert parse_tokens(format_tokens(tokens)) == tokens


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["", "K", "M", "G", "Ki", "Mi", "Gi"]))
def test_suffix_round_trip(count, suffix):
    """``<count><suffix>`` parses to count × the suffix's scale, in any case."""
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[suffix]
    assert parse_tokens(f"{count}{suffix}") == count * scale
    assert parse_tokens(f"{count}{suffix.lower()}") == count * scale


@given(st.data(), st.sampled_from(sorted(BYTE_UNITS)))
def test_bytes_round_trip_within_display_rounding(data, unit):
    """format_bytes → parse_bytes returns the size to within the two displayed decimals
    (for sizes of at least 0.01 of the unit, which display as non-zero)."""
    n_bytes = data.draw(st.integers(min_value=BYTE_UNITS[unit] // 100 + BYTE_UNITS[unit] // 200 + 1, max_value=2**50))
    text = format_bytes(n_bytes, unit).replace(" ", "")
    assert abs(parse_bytes(text) - n_bytes) <= 0.005 * BYTE_UNITS[unit] + 1
