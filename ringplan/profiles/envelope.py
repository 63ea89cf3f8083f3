"""The envelope every profile format shares: schema, provenance, history, rows — and their checks.

Every profile file is one JSON object::

    {"schema": "<format>/<version>",                      ("format" is accepted for "schema")
     "provenance": {<PROVENANCE_KEYS>, "notes": [...], "assumptions": [...]},
     "history": [<provenance of earlier writes merged into this file>, ...],   (optional)
     "rows": [<one object per run, the format's row type>, ...],
     <a format's own top-level keys, e.g. "link" of ringplan.p2p/1>}

Here: ``Provenance`` (one set of keys for every format), the ``Checker`` that validates fields and
names the file and the field on error, ``envelope_from_json``, the row merge (only a ``measured`` row
replaces a row of the same key), the history rule, and ``write_merged_profile``. Reading and writing
JSON files is ``ringplan.jsonfile``'s (``read_json_file``, ``write_merged_json``). Each
format module (``attention``, ``stack``, ``timing``, ``gemm``) holds only its row types, readers
and writers. Source of the provenance keys: what the runtime (``ringplan_runtime``) and
``benchmarks/measure_timing.py`` write into the committed files under ``profiles/``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from ringplan.jsonfile import write_merged_json
from ringplan.workload import BACKENDS, LAYOUTS

#: Provenance keys with one string value (or null), and ``gpu_count`` / ``cudnn_version`` (a positive integer or null):
#: the union of the keys the committed memory, stack and timing profiles carry.
PROVENANCE_KEYS: tuple[str, ...] = (
    "gpu_driver_name", "driver_version", "torch_version", "nccl_version", "cuda_version", "git_sha",
    "date", "command", "method", "source", "interconnect", "hostname", "gpu_count", "cudnn_version")
#: Provenance keys whose value is a list of strings.
PROVENANCE_LIST_KEYS: tuple[str, ...] = ("notes", "assumptions")
#: Names the runtime's own ``Provenance`` uses, read as the envelope's keys.
PROVENANCE_ALIASES: dict[str, str] = {"gpu_name": "gpu_driver_name", "date_utc": "date"}
#: A row's ``kind``: ``measured`` (a run of ours), ``reported`` (copied from a report that claims a
#: measurement), ``estimated`` (a formula's output someone tabulated).
ROW_KINDS: tuple[str, ...] = ("measured", "reported", "estimated")
#: Integers larger than this are refused (no real count or byte size comes near it).
MAX_INTEGER = 2**63 - 1
_MAX_FLOAT = 1.7976931348623157e308  # sys.float_info.max: a larger integer has no float value


@dataclass(frozen=True, slots=True, kw_only=True)
class Provenance:
    """Where a profile's rows came from. Unknown values are None, never guessed."""

    gpu_driver_name: str | None = None
    driver_version: str | None = None
    torch_version: str | None = None
    nccl_version: str | None = None
    cuda_version: str | None = None
    git_sha: str | None = None
    date: str | None = None
    command: str | None = None
    method: str | None = None
    source: str | None = None
    interconnect: str | None = None
    hostname: str | None = None
    gpu_count: int | None = None
    cudnn_version: int | None = None
    notes: tuple[str, ...] = ()
    assumptions: tuple[str, ...] = ()


def provenance_to_json(provenance: Provenance) -> dict[str, Any]:
    """The provenance block as written (every key; lists for the tuples)."""
    return {name: (list(value) if isinstance(value, tuple) else value)
            for name, value in ((f.name, getattr(provenance, f.name)) for f in dataclasses.fields(Provenance))}


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a 300-digit number in a message helps no one)."""
    text = repr(value) if not (isinstance(value, int) and abs(value) > MAX_INTEGER) else f"<{value.bit_length()}-bit integer>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True, slots=True, kw_only=True)
class RowColumns:
    """The columns of one row format, as ``Checker.row_values`` checks them."""

    known: tuple[str, ...]
    required: tuple[str, ...]
    ints: tuple[str, ...]
    flags: tuple[str, ...]
    figures: tuple[str, ...]
    true_by_default: tuple[str, ...] = ()


class Checker:
    """Validates the parsed JSON of one file. Every failure is
    ``ValueError("<file>: <where> <problem>: <value>")``, so the message names the file and the field."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, where: str, problem: str, value: Any = None, *, show_value: bool = True) -> NoReturn:
        """Raise the ``ValueError`` naming the file, ``where`` and the problem (and the value)."""
        suffix = f": {shown(value)}" if show_value else ""
        raise ValueError(f"{self.path}: {where} {problem}{suffix}")

    def positive_int(self, where: str, value: Any) -> int:
        """A positive integer no larger than ``MAX_INTEGER`` (not a bool, not a float)."""
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.fail(where, "is not a positive integer", value)
        if value > MAX_INTEGER:
            self.fail(where, f"is larger than {MAX_INTEGER}", value)
        return value

    def figure(self, where: str, value: Any) -> float | None:
        """A finite, non-negative number or None (an observed figure; None: not observed)."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -_MAX_FLOAT <= value <= _MAX_FLOAT:
            self.fail(where, "is not a finite number", value)
        if value < 0:
            self.fail(where, "is negative", value)
        return value

    def choice(self, where: str, value: Any, choices: tuple[str, ...]) -> str:
        """One of ``choices``."""
        if not isinstance(value, str) or value not in choices:
            self.fail(where, f"is not one of {list(choices)}", value)
        return value

    def int_tuple(self, where: str, value: Any) -> tuple[int, ...]:
        """A list of positive integers, as a tuple."""
        if not isinstance(value, list):
            self.fail(where, "is not a list of positive integers", value)
        return tuple(self.positive_int(f"{where}[{i}]", v) for i, v in enumerate(value))

    def row_field(self, row: Any, key: str, kind: type, index: int) -> Any:
        """``row[key]`` of a timing-style row: a ``str``, or a positive finite ``int`` / ``float``
        (an integer is accepted for a float). Errors read ``row <index> <key>=<value> ...``."""
        if not isinstance(row, dict):
            self.fail(f"row {index}", "is not an object", row)
        if key not in row:
            self.fail(f"row {index}", f"lacks {key!r}", show_value=False)
        value = row[key]
        label = f"row {index} {key}={shown(value)}"
        if kind in (int, float) and isinstance(value, int) and not isinstance(value, bool) and value > MAX_INTEGER:
            self.fail(label, f"is larger than {MAX_INTEGER}", show_value=False)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(label, f"is not {kind.__name__}", show_value=False)
        if kind is float and not -_MAX_FLOAT <= value <= _MAX_FLOAT:
            self.fail(label, "is not a finite number", show_value=False)
        if kind in (int, float) and value <= 0:
            self.fail(label, "must be positive", show_value=False)
        return value

    def gpu(self, where: str, value: Any) -> str:
        """The canonical catalog name of a GPU (``ringplan.hardware``'s lookup, aliases included)."""
        from ringplan.hardware import load_catalog

        if not isinstance(value, str):
            self.fail(where, "is not a GPU name", value)
        try:
            return load_catalog().gpu(value).name
        except ValueError as exc:
            self.fail(where, f"is not in the GPU catalog ({exc})", show_value=False)

    def row_values(self, index: int, raw: Any, *, columns: "RowColumns") -> dict[str, Any]:
        """The checked values every row format shares: ``raw`` is an object of known columns with the
        required ones present; integers positive, flags true/false (absent: ``columns.true_by_default``
        are true), figures finite; layout, backend, kind and GPU valid; series and notes strings."""
        where = f"rows[{index}]"
        if not isinstance(raw, dict):
            self.fail(where, "is not an object", raw)
        for name in raw:
            if name not in columns.known:
                self.fail(f"{where}.{name}", "is not a known column (known: " + ", ".join(columns.known) + ")",
                          show_value=False)
        for name in columns.required:
            if raw.get(name) is None:
                self.fail(f"{where}.{name}", "is missing", show_value=False)
        values: dict[str, Any] = {name: self.positive_int(f"{where}.{name}", raw[name])
                                  for name in columns.ints if name in raw}
        for name in columns.flags:
            if name in raw and not isinstance(raw[name], bool):
                self.fail(f"{where}.{name}", "is not true/false", raw[name])
            values[name] = raw.get(name, name in columns.true_by_default)
        for name in columns.figures:
            values[name] = self.figure(f"{where}.{name}", raw.get(name))
        values["layout"] = self.choice(f"{where}.layout", raw.get("layout", "contiguous"), LAYOUTS)
        values["backend"] = self.choice(f"{where}.backend", raw.get("backend", "auto"), BACKENDS)
        values["kind"] = self.choice(f"{where}.kind", raw.get("kind", "measured"), ROW_KINDS)
        values["gpu"] = self.gpu(f"{where}.gpu", raw["gpu"])
        for name in ("series", "notes"):
            if raw.get(name) is not None and not isinstance(raw[name], str):
                self.fail(f"{where}.{name}", "is not a string", raw[name])
            values[name] = raw.get(name)
        return values

    def unique_rows(self, keys: Sequence[Hashable]) -> None:
        """Refuse two rows with the same key (one row per run: which one would count?)."""
        first: dict[Hashable, int] = {}
        for index, key in enumerate(keys):
            if key in first:
                self.fail(f"rows[{first[key]}] and rows[{index}]", "have the same key (one row per run)", key)
            first[key] = index

    def provenance(self, raw: Any, where: str = "provenance") -> dict[str, Any]:
        """A provenance block's values by ``PROVENANCE_KEYS`` name (aliases renamed, lists kept)."""
        if not isinstance(raw, dict):
            self.fail(where, "is not an object", raw)
        values: dict[str, Any] = {}
        for given, value in raw.items():
            name = PROVENANCE_ALIASES.get(given, given)
            if name in values:
                self.fail(f"{where}.{name}", f"is given twice (as {name!r} and its alias {given!r})", show_value=False)
            if name in PROVENANCE_LIST_KEYS:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    self.fail(f"{where}.{name}", "is not a list of strings", value)
            elif name in ("gpu_count", "cudnn_version"):
                if value is not None:
                    self.positive_int(f"{where}.{name}", value)
            elif name in PROVENANCE_KEYS:
                if value is not None and not isinstance(value, str):
                    self.fail(f"{where}.{name}", "is not a string", value)
            else:
                self.fail(f"{where}.{given}", "is not a known provenance key (known: "
                          + ", ".join(PROVENANCE_KEYS + PROVENANCE_LIST_KEYS) + ")", show_value=False)
            values[name] = value
        return values


def provenance_from_values(values: dict[str, Any]) -> Provenance:
    """``Provenance`` from ``Checker.provenance``'s values (lists become tuples)."""
    return Provenance(**{k: (tuple(v) if k in PROVENANCE_LIST_KEYS else v) for k, v in values.items()})


def schema_of(data: Any) -> Any:
    """The document's ``schema`` (or ``format``) value; None for anything but an object."""
    return (data.get("schema") or data.get("format")) if isinstance(data, dict) else None


def envelope_from_json(check: Checker, data: Any, schema: str, *, extra_keys: tuple[str, ...] = ()
                       ) -> tuple[dict[str, Any], tuple[dict[str, Any], ...], list]:
    """Check the envelope: an object of ``schema`` whose top-level keys are the envelope's (or
    ``extra_keys``), a valid provenance and history. Returns the provenance values, the history
    (entries as written) and the raw ``rows`` list, for the format to parse."""
    if not isinstance(data, dict):
        check.fail("top level", "is not an object", show_value=False)
    if schema_of(data) != schema:
        check.fail("schema", f"must be {schema!r}", schema_of(data))
    known = ("schema", "provenance", "rows", "history") + extra_keys
    for name in data:
        if name not in known + ("format",):
            check.fail(name, f"is not a known top-level key (known: {', '.join(known)})", show_value=False)
    provenance = check.provenance(data.get("provenance", {}))
    history = data.get("history", [])
    if not isinstance(history, list):
        check.fail("history", "is not a list", show_value=False)
    for i, entry in enumerate(history):
        check.provenance(entry, f"history[{i}]")
    rows = data.get("rows")
    if not isinstance(rows, list):
        check.fail("rows", "is not a list", show_value=False)
    return provenance, tuple(history), rows


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedProfile:
    """A validated profile file of any row format: its provenance, history and parsed rows."""

    provenance: Provenance
    history: tuple[dict[str, Any], ...]
    rows: tuple


def parsed_profile(data: Any, path: str, schema: str, row_from_json: Callable[[Checker, int, Any], Any]
                   ) -> ParsedProfile:
    """Check a profile's envelope, parse every row with ``row_from_json(check, index, raw)`` and
    refuse repeated rows (same ``key``); ``ValueError`` names ``path`` and the field."""
    check = Checker(path)
    provenance, history, rows = envelope_from_json(check, data, schema)
    parsed = tuple(row_from_json(check, i, raw) for i, raw in enumerate(rows))
    check.unique_rows([row.key for row in parsed])
    return ParsedProfile(provenance=provenance_from_values(provenance), history=history, rows=parsed)


def profile_files(directory: Path) -> list[Path]:
    """Every ``*.json`` file in ``directory``, sorted by name (none when it does not exist)."""
    return sorted(directory.glob("*.json")) if directory.is_dir() else []


# ----------------------------------------------------------------------------- merging


def merge_rows(old: tuple, new: tuple) -> tuple:
    """Old rows in order, a same-key old row replaced only by a ``measured`` new row, then the new
    rows with new keys. Never drops a row of another key; a non-measured new row never overrides.
    Rows need ``key`` and ``kind``."""
    merged = {row.key: row for row in old}
    order = [row.key for row in old]
    for row in new:
        if row.key not in merged:
            order.append(row.key)
            merged[row.key] = row
        elif row.kind == "measured":
            merged[row.key] = row
    return tuple(merged[key] for key in order)


def merged_history(history: tuple[dict[str, Any], ...], old: dict[str, Any], new: dict[str, Any]
                   ) -> tuple[dict[str, Any], ...]:
    """The history after a write whose provenance ``new`` replaces ``old``: ``old`` is appended
    unless it equals ``new`` or is already there — so interleaved writers with two provenances
    leave two entries, not one per write."""
    if _stated(old) == _stated(new) or any(_stated(entry) == _stated(old) for entry in history):
        return tuple(history)
    return tuple(history) + (old,)


def _stated(provenance: dict[str, Any]) -> dict[str, Any]:
    """The keys a provenance block states (null and empty values dropped: files written before a
    key existed compare equal to newer ones that write it as null)."""
    return {k: v for k, v in provenance.items() if v not in (None, [], ())}


def write_merged_profile(path: str | Path, profile: Any, *, load: Callable[[Path], Any],
                         to_json: Callable[[Any], dict[str, Any]]) -> Any:
    """Merge ``profile`` (a dataclass with ``provenance``, ``rows``, ``history``, ``path``) with what
    is on disk at ``path`` (``load``) and write ``to_json`` of the result through
    ``write_merged_json`` (atomic, under the lock). The new provenance becomes the file's; the old
    one goes to ``history`` (``merged_history``). A corrupt file on disk raises ``ValueError`` and is
    left untouched. Returns the merged profile."""
    path = Path(path)
    written: list[Any] = []

    def merged_json() -> dict[str, Any]:
        merged = profile
        if path.exists():
            old = load(path)
            history = merged_history(old.history, provenance_to_json(old.provenance),
                                     provenance_to_json(profile.provenance))
            merged = dataclasses.replace(profile, rows=merge_rows(old.rows, profile.rows), history=history)
        written.append(merged)
        return to_json(merged)

    write_merged_json(path, merged_json)
    return dataclasses.replace(written[-1], path=str(path))
