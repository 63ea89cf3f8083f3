"""Answers a person can read (issue 16): the answer first, in a few labelled lines, then a compact
table, all within the terminal's width (``COLUMNS`` when set; 100 when there is no terminal).

Formatting only: times in ms/s/min/h, bytes in GiB with one decimal, the uncertainty in words, a
table that drops its least important columns until it fits, a per-term breakdown with terms as
rows, and warnings on stderr, one line each.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

import click

from ringplan.units import GIB

#: Width when the output is not a terminal (and ``COLUMNS`` is unset): what the README and the tests read.
DEFAULT_WIDTH = 100
#: Narrowest width the layout tries for (a narrower terminal wraps the table).
MIN_WIDTH = 60


def output_width() -> int:
    """Columns to fill: ``COLUMNS`` when set, else the terminal's when stdout is one
    (``shutil.get_terminal_size``), else 100 (a pipe, a file, a test: the same answer every time)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit():
        return max(MIN_WIDTH, int(columns))
    if sys.stdout.isatty():
        return max(MIN_WIDTH, shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns)
    return DEFAULT_WIDTH


def time_text(seconds: float | None) -> str:
    """``12.3 ms``, ``4.56 s``, ``3.2 min``, ``1.5 h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1e3:,.3g} ms" if seconds * 1e3 < 100 else f"{seconds * 1e3:,.0f} ms"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:,.3g} h"


def gib(n_bytes: float) -> str:
    """``12.3 GiB``: bytes in GiB (2^30) with one decimal."""
    return f"{n_bytes / GIB:,.1f} GiB"


def gib_number(n_bytes: float) -> str:
    """``12.3``: bytes in GiB with one decimal, for a table column headed in GiB."""
    return f"{n_bytes / GIB:,.1f}"


def tokens_per_s(seq_len_tokens: int, batch: int, data_parallel: int, step_time_s: float | None) -> float | None:
    """Tokens the whole job processes per second: S × batch × data-parallel replicas / step time."""
    if not step_time_s:
        return None
    return seq_len_tokens * batch * data_parallel / step_time_s


def rate_text(rate: float | None) -> str:
    """``1.23 M tokens/s``, ``45.6 K tokens/s``."""
    if rate is None:
        return "-"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if rate >= scale:
            return f"{rate / scale:,.3g} {unit} tokens/s"
    return f"{rate:,.3g} tokens/s"


def nodes(world_size: int, gpus_per_node: int) -> int:
    """Nodes a job of ``world_size`` GPUs takes, ``gpus_per_node`` to a node."""
    return -(-world_size // max(1, gpus_per_node))


_OUTSIDE = re.compile(r"n=([\d,]+) tokens/rank outside measured ([\d,]+)-([\d,]+)")
_RING = re.compile(r"ring of (\d+) beyond measured (\d+)")


def uncertainty_text(prediction, bound_bytes: float) -> str:
    """``± 0.3 GiB from the fit's residuals; extrapolated 2.5× beyond measured tokens`` (or within the
    measured range, or the ring beyond the measured ring), from a bound and a prediction's provenance."""
    text = f"± {gib(bound_bytes)} from the fit's residuals"
    outside = _OUTSIDE.search(prediction.provenance)
    ring = _RING.search(prediction.provenance)
    if outside:
        n, lo, hi = (int(g.replace(",", "")) for g in outside.groups())
        factor = n / hi if n > hi else lo / max(n, 1)
        side = "beyond" if n > hi else "below"
        text += f"; extrapolated {factor:,.1f}× {side} measured tokens per GPU ({lo:,}-{hi:,})"
    elif ring:
        text += f"; extrapolated to a ring of {ring.group(1)} (measured up to {ring.group(2)})"
    elif prediction.provenance_kind == "measured":
        text += "; within the measured range"
    source = prediction.provenance.split(": ", 1)[-1] if ":" in prediction.provenance else prediction.provenance
    return f"{text}; {source}"


def wrapped(label: str, text: str, width: int) -> list[str]:
    """``label: text`` wrapped at ``width``, continuation lines indented under the text."""
    head = f"{label}: "
    glued = _NUMBER_UNIT.sub(lambda m: f"{m[1]}\0{m[2]}", text)  # a number stays on the line of its unit
    lines = textwrap.wrap(glued, width=width, initial_indent=head, subsequent_indent=" " * min(len(head), 14),
                          break_on_hyphens=False) or [head.rstrip()]
    return [line.replace("\0", " ") for line in lines]


_NUMBER_UNIT = re.compile(r"(\d) (GiB|MiB|ms|s|min|h|K|M|G|tokens)\b")


def echo_lines(pairs: Sequence[tuple[str, str]], width: int) -> None:
    """Print each (label, text) wrapped at ``width``."""
    for label, text in pairs:
        for line in wrapped(label, text, width):
            click.echo(line)


_NUMBER = re.compile(r"^[-+]?[\d,]+(\.\d+)?( \*)?$")


def markdown_table(rows: Sequence[dict[str, str]], keys: Sequence[str]) -> str:
    """A GitHub-markdown table of ``rows`` over ``keys``, one space of padding, numbers right-aligned."""
    cells = [[str(r[k]) for k in keys] for r in rows]
    widths = [max([len(k)] + [len(c[i]) for c in cells]) for i, k in enumerate(keys)]
    numeric = [bool(cells) and all(_NUMBER.match(c[i]) or c[i] == "-" for c in cells) for i in range(len(keys))]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if n else "-" * (w + 2) for w, n in zip(widths, numeric)) + "|"
    return "\n".join([line(keys), rule] + [line(c) for c in cells])


def fitted_table(rows: Sequence[dict[str, str]], width: int, droppable: Sequence[str] = ()) -> str:
    """A markdown table of ``rows`` within ``width``: columns in ``droppable`` are left out, last
    first, until it fits; a cell still too wide is cut with ``~`` (ASCII: a terminal and a byte count
    agree on its width)."""
    keys = list(rows[0]) if rows else []
    drop = [k for k in droppable if k in keys]
    rows = [{k: str(v) for k, v in r.items()} for r in rows]
    while True:
        table = markdown_table(rows, keys)
        too_wide = max(map(len, table.splitlines()), default=0) - width
        if too_wide <= 0:
            return table
        if not drop:
            break
        keys.remove(drop.pop())
    while too_wide > 0:  # cut the widest cells until the table fits (or no cell can shrink more)
        widest = max(keys, key=lambda k: max(len(r[k]) for r in rows))
        longest = max(len(r[widest]) for r in rows)
        limit = max(8, longest - too_wide)
        if limit >= longest:
            break
        rows = [{**r, widest: r[widest] if len(r[widest]) <= limit else r[widest][:limit - 1] + "~"} for r in rows]
        table = markdown_table(rows, keys)
        too_wide = max(map(len, table.splitlines()), default=0) - width
    return table


def breakdown_table(columns: Sequence[tuple[str, dict[str, float]]], width: int, keep: int = 0) -> str:
    """Terms as rows, one column per (heading, {term: bytes}) in GiB; only terms non-zero somewhere;
    columns past the width are left out, last first (column ``keep``, the answer's, stays)."""
    terms = [t for t in columns[0][1] if any(c[1].get(t) for c in columns)] if columns else []
    rows = [{"term (GiB)": t.removesuffix("_bytes"), **{h: gib_number(c.get(t, 0.0)) for h, c in columns}}
            for t in terms]
    rows.append({"term (GiB)": "total", **{h: gib_number(sum(c.values())) for h, c in columns}})
    return fitted_table(rows, width, droppable=[h for i, (h, _) in enumerate(columns) if i != keep])


def warn(warnings: Sequence[str]) -> None:
    """Each warning on stderr, one line each."""
    for text in dict.fromkeys(warnings):
        click.echo(f"warning: {text}", err=True)


def given_or_chosen(given: bool) -> str:
    return "(given)" if given else "(chosen)"


def answer_json_extra(**fields: Any) -> dict[str, Any]:
    """The fields issue 16 adds to a JSON answer, without the ones that are None."""
    return {k: v for k, v in fields.items() if v is not None}
