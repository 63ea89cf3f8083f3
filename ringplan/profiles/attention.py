"""Measured profiles: rows of real runs with unit-suffixed columns, plus provenance.

File format (JSON)::

    {"schema": "ringplan.profile/1",
     "provenance": {"gpu_driver_name": ..., "driver_version": ..., "torch_version": ...,
                    "nccl_version": ..., "cuda_version": ..., "git_sha": ..., "date": ...,
                    "command": ..., "method": ..., "source": ..., "notes": [...], ...},
     "history": [<provenance of earlier writes merged into this file>, ...],
     "rows": [{"seq_len_tokens": 131072, "ring_size": 2, ..., "device_used_bytes": ..., "oom": false}]}

``ringplan_runtime`` writes it (``write_profile``), ``ringplan`` is the only reader
(``load_profile``), which validates every field and names the file and the field on error.
A row's ``kind`` says where its figures come from: ``measured`` (a run of ours), ``reported``
(copied from a report that claims a measurement), ``estimated`` (a formula's output someone
tabulated). Only a ``measured`` row may replace an existing row with the same key.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ringplan.workload import (BACKENDS, DTYPE_BYTES, LAYOUTS, AttentionPattern, AttentionShape, RingLayout,
                               Workload)

PROFILE_SCHEMA = "ringplan.profile/1"
ROW_KINDS: tuple[str, ...] = ("measured", "reported", "estimated")
PROVENANCE_KEYS: tuple[str, ...] = (
    "gpu_driver_name", "driver_version", "torch_version", "nccl_version", "cuda_version", "git_sha",
    "date", "command", "method", "source", "interconnect", "hostname")
FIGURE_FIELDS: tuple[str, ...] = (
    "peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes", "tracked_peak_bytes",
    "step_time_s", "bytes_sent_per_rank")


def profiles_dir() -> Path:
    """Directory holding ``gpus.json`` and ``measured/``: ``$RINGPLAN_PROFILES_DIR`` if set, else the
    ``profiles/`` folder next to the ``ringplan`` package (the repository checkout)."""
    override = os.environ.get("RINGPLAN_PROFILES_DIR")
    return Path(override) if override else Path(__file__).resolve().parent.parent.parent / "profiles"


def measured_dir() -> Path:
    """``profiles/measured``: every ``*.json`` here feeds the default memory model."""
    return profiles_dir() / "measured"


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
    notes: tuple[str, ...] = ()
    assumptions: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Measurement:
    """One run: the workload and ring it used, the GPU, and what was observed (None: not observed).

    Bytes are per rank (the largest over ranks); ``step_time_s`` is one forward (or forward +
    backward when ``training``) step; ``oom`` marks a run that ran out of memory.
    """

    gpu: str
    seq_len_tokens: int
    ring_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    embed_dim: int
    dtype: str
    layout: str = "contiguous"
    backend: str = "auto"
    batch: int = 1
    causal: bool = False
    segment_lengths_tokens: tuple[int, ...] = ()
    dilation_rates: tuple[int, ...] = ()
    training: bool = False
    projections: bool = False
    peak_allocated_bytes: float | None = None
    peak_reserved_bytes: float | None = None
    device_used_bytes: float | None = None
    tracked_peak_bytes: float | None = None
    step_time_s: float | None = None
    bytes_sent_per_rank: float | None = None
    oom: bool = False
    kind: str = "measured"
    series: str | None = None
    notes: str | None = None

    @property
    def tokens_per_rank(self) -> float:
        """n = S / P (fractional when the recorded run padded or truncated its sequence)."""
        return self.seq_len_tokens / self.ring_size

    def workload_and_layout(self) -> tuple[Workload, RingLayout]:
        """The run's ``Workload`` and ``RingLayout`` (raises ``ValueError`` if the row cannot be one)."""
        shape = AttentionShape(n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                               embed_dim=self.embed_dim, batch=self.batch, dtype=self.dtype)
        pattern = AttentionPattern(causal=self.causal, segment_lengths_tokens=self.segment_lengths_tokens,
                                   dilation_rates=self.dilation_rates)
        workload = Workload(seq_len_tokens=self.seq_len_tokens, shape=shape, pattern=pattern,
                            training=self.training, projections=self.projections)
        return workload, RingLayout(ring_size=self.ring_size, layout=self.layout, backend=self.backend)

    @property
    def key(self) -> tuple:
        """Merge key: workload + layout + GPU (figures, kind and notes excluded)."""
        return (self.gpu, self.seq_len_tokens, self.ring_size, self.layout, self.backend, self.batch,
                self.n_heads, self.n_kv_heads, self.head_dim, self.embed_dim, self.dtype, self.causal,
                self.segment_lengths_tokens, self.dilation_rates, self.training, self.projections)


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """A profile file's content. ``history`` keeps the provenance of earlier merged writes."""

    provenance: Provenance
    rows: tuple[Measurement, ...]
    history: tuple[dict[str, Any], ...] = ()
    path: str | None = field(default=None, compare=False)


# ----------------------------------------------------------------------------- validation

_INT_FIELDS = ("seq_len_tokens", "ring_size", "n_heads", "n_kv_heads", "head_dim", "embed_dim", "batch")
_BOOL_FIELDS = ("causal", "training", "projections", "oom")
_REQUIRED = ("gpu", "seq_len_tokens", "ring_size", "n_heads", "n_kv_heads", "head_dim", "embed_dim", "dtype")
_ROW_FIELDS = tuple(f.name for f in fields(Measurement))


class _Checker:
    """Raises ``ValueError("<file>: <where> <problem>: <value>")``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, where: str, problem: str, value: Any = None, *, show_value: bool = True) -> None:
        shown = f": {value!r}" if show_value else ""
        raise ValueError(f"{self.path}: {where} {problem}{shown}")

    def positive_int(self, where: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.fail(where, "is not a positive integer", value)
        return value

    def figure(self, where: str, value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(where, "is not a finite number", value)
        if value < 0:
            self.fail(where, "is negative", value)
        return value

    def choice(self, where: str, value: Any, choices: tuple[str, ...]) -> str:
        if value not in choices:
            self.fail(where, f"is not one of {list(choices)}", value)
        return value

    def int_tuple(self, where: str, value: Any) -> tuple[int, ...]:
        if not isinstance(value, list):
            self.fail(where, "is not a list of positive integers", value)
        return tuple(self.positive_int(f"{where}[{i}]", v) for i, v in enumerate(value))


def _row_from_json(check: _Checker, index: int, raw: Any) -> Measurement:
    where = f"rows[{index}]"
    if not isinstance(raw, dict):
        check.fail(where, "is not an object", raw)
    for name in raw:
        if name not in _ROW_FIELDS:
            check.fail(f"{where}.{name}", "is not a known column (known: " + ", ".join(_ROW_FIELDS) + ")",
                       show_value=False)
    for name in _REQUIRED:
        if raw.get(name) is None:
            check.fail(f"{where}.{name}", "is missing", show_value=False)
    values: dict[str, Any] = {name: check.positive_int(f"{where}.{name}", raw[name])
                              for name in _INT_FIELDS if name in raw}
    for name in _BOOL_FIELDS:
        if name in raw and not isinstance(raw[name], bool):
            check.fail(f"{where}.{name}", "is not true/false", raw[name])
        values[name] = raw.get(name, False)
    for name in FIGURE_FIELDS:
        values[name] = check.figure(f"{where}.{name}", raw.get(name))
    values["dtype"] = check.choice(f"{where}.dtype", raw["dtype"], tuple(DTYPE_BYTES))
    values["layout"] = check.choice(f"{where}.layout", raw.get("layout", "contiguous"), LAYOUTS)
    values["backend"] = check.choice(f"{where}.backend", raw.get("backend", "auto"), BACKENDS)
    values["kind"] = check.choice(f"{where}.kind", raw.get("kind", "measured"), ROW_KINDS)
    values["gpu"] = _canonical_gpu(check, f"{where}.gpu", raw["gpu"])
    for name in ("segment_lengths_tokens", "dilation_rates"):
        values[name] = check.int_tuple(f"{where}.{name}", raw.get(name, []))
    if len(values["segment_lengths_tokens"]) != len(values["dilation_rates"]):
        check.fail(f"{where}.dilation_rates", "does not have one rate per segment length",
                   list(values["dilation_rates"]))
    if values["n_heads"] % values["n_kv_heads"]:
        check.fail(f"{where}.n_kv_heads", f"does not divide n_heads={values['n_heads']}", values["n_kv_heads"])
    for name in ("series", "notes"):
        if raw.get(name) is not None and not isinstance(raw[name], str):
            check.fail(f"{where}.{name}", "is not a string", raw[name])
        values[name] = raw.get(name)
    return Measurement(**values)


def _canonical_gpu(check: _Checker, where: str, value: Any) -> str:
    from ringplan.hardware import load_catalog

    if not isinstance(value, str):
        check.fail(where, "is not a GPU name", value)
    try:
        return load_catalog().gpu(value).name
    except ValueError as exc:
        check.fail(where, f"is not in the GPU catalog ({exc})", show_value=False)
        raise  # unreachable: fail() raises


def _provenance_from_json(check: _Checker, raw: Any, where: str = "provenance") -> Provenance:
    if not isinstance(raw, dict):
        check.fail(where, "is not an object", raw)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name in ("notes", "assumptions"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                check.fail(f"{where}.{name}", "is not a list of strings", value)
            values[name] = tuple(value)
        elif name in PROVENANCE_KEYS:
            if value is not None and not isinstance(value, str):
                check.fail(f"{where}.{name}", "is not a string", value)
            values[name] = value
        else:
            check.fail(f"{where}.{name}", "is not a known provenance key (known: "
                       + ", ".join(PROVENANCE_KEYS + ("notes", "assumptions")) + ")", show_value=False)
    return Provenance(**values)


def envelope_from_json(check: "_Checker", data: Any, schema: str) -> tuple[Provenance, tuple, list]:
    """The envelope every profile format shares: ``schema``, ``provenance``, ``history`` (earlier
    provenance blocks, validated) and ``rows`` (a list, returned raw for the format to parse)."""
    if not isinstance(data, dict):
        check.fail("top level", "is not an object", show_value=False)
    if data.get("schema") != schema:
        check.fail("schema", f"must be {schema!r}", data.get("schema"))
    for name in data:
        if name not in ("schema", "provenance", "rows", "history"):
            check.fail(name, "is not a known top-level key (known: schema, provenance, rows, history)",
                       show_value=False)
    provenance = _provenance_from_json(check, data.get("provenance", {}))
    history = data.get("history", [])
    if not isinstance(history, list):
        check.fail("history", "is not a list", show_value=False)
    for i, entry in enumerate(history):
        _provenance_from_json(check, entry, f"history[{i}]")
    rows = data.get("rows")
    if not isinstance(rows, list):
        check.fail("rows", "is not a list", show_value=False)
    return provenance, tuple(history), rows


def profile_from_json(data: Any, path: str = "<profile>") -> Profile:
    """Validate parsed JSON and build a ``Profile``; ``ValueError`` names ``path`` and the field."""
    check = _Checker(path)
    provenance, history, rows = envelope_from_json(check, data, PROFILE_SCHEMA)
    parsed = tuple(_row_from_json(check, i, raw) for i, raw in enumerate(rows))
    return Profile(provenance=provenance, rows=parsed, history=history, path=path)


def read_json_file(path: str | Path, what: str = "profile") -> Any:
    """Parsed JSON of ``path``; missing, unreadable or malformed → ``ValueError`` naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read {what} ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def load_profile(path: str | Path) -> Profile:
    """Read and validate one profile file. Missing, unreadable or malformed → ``ValueError``."""
    return profile_from_json(read_json_file(path), str(path))


def load_profiles(directory: str | Path | None = None) -> list[Profile]:
    """Every ``*.json`` profile in ``directory`` (default ``profiles/measured``), sorted by name."""
    directory = Path(directory) if directory is not None else measured_dir()
    if not directory.is_dir():
        return []
    return [load_profile(path) for path in sorted(directory.glob("*.json"))]


# ----------------------------------------------------------------------------- writing


def profile_to_json(profile: Profile) -> dict[str, Any]:
    """The JSON form written to disk (all columns present; unknown figures are null)."""
    provenance = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(profile.provenance).items()}
    rows = []
    for row in profile.rows:
        raw = asdict(row)
        raw["segment_lengths_tokens"] = list(row.segment_lengths_tokens)
        raw["dilation_rates"] = list(row.dilation_rates)
        rows.append(raw)
    return {"schema": PROFILE_SCHEMA, "provenance": provenance, "history": list(profile.history), "rows": rows}


def merge_rows(old: tuple[Measurement, ...], new: tuple[Measurement, ...]) -> tuple[Measurement, ...]:
    """Old rows in order, a same-key old row replaced only by a ``measured`` new row, then the new
    rows with new keys. Never drops a row of another key; a non-measured new row never overrides."""
    merged = {row.key: row for row in old}
    order = [row.key for row in old]
    for row in new:
        if row.key not in merged:
            order.append(row.key)
            merged[row.key] = row
        elif row.kind == "measured":
            merged[row.key] = row
    return tuple(merged[key] for key in order)


def write_profile(path: str | Path, profile: Profile) -> Profile:
    """Merge ``profile`` with what is on disk at ``path`` and write atomically (temp file in the
    same directory + ``os.replace``), under an advisory lock. Returns the merged profile.

    The new provenance becomes the file's; the old one is appended to ``history`` when it differs.
    A corrupt file on disk raises ``ValueError`` and is left untouched.
    """
    path = Path(path)
    profile = profile_from_json(profile_to_json(profile), f"{path} (rows to write)")  # validate new rows
    written: list[Profile] = []

    def merged_json() -> dict[str, Any]:
        merged = profile
        if path.exists():
            old = load_profile(path)
            history = old.history
            if old.provenance != profile.provenance:
                history = history + (profile_to_json(old)["provenance"],)
            merged = replace(profile, rows=merge_rows(old.rows, profile.rows), history=history)
        written.append(merged)
        return profile_to_json(merged)

    write_merged_json(path, merged_json)
    return replace(written[0], path=str(path))


def write_merged_json(path: str | Path, merged_json: Callable[[], dict[str, Any]]) -> None:
    """Write ``merged_json()`` to ``path`` atomically (temp file in the same directory + ``os.replace``)
    under an advisory lock; ``merged_json`` runs under the lock, so it can read what is on disk and
    merge. Shared by every profile format (``ringplan.profiles.stack`` too)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        text = json.dumps(merged_json(), indent=1, allow_nan=False) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def _locked(path: Path):
    """Advisory lock (a file in the temp dir keyed by the resolved path) so concurrent writers merge
    instead of overwriting each other (POSIX only; elsewhere the replace is still atomic)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: atomic replace only
        yield
        return
    import hashlib

    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"ringplan-profile-{digest}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
