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
tabulated). Only a ``measured`` row may replace an existing row with the same key; two rows of
one key in a file are an error. The envelope (provenance, history, checks, merged write) is
``ringplan.profiles.envelope``'s; this module holds the row type and its reader and writer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ringplan.paths import measured_dir
from ringplan.profiles.envelope import (Checker, Provenance, RowColumns, parsed_profile, profile_files,
                                        provenance_to_json, write_merged_profile)
from ringplan.jsonfile import read_json_file
from ringplan.units import DTYPE_BYTES
from ringplan.workload import AttentionPattern, AttentionShape, RingLayout, Workload

PROFILE_SCHEMA = "ringplan.profile/1"
FIGURE_FIELDS: tuple[str, ...] = (
    "peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes", "tracked_peak_bytes",
    "step_time_s", "bytes_sent_per_rank")


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


_COLUMNS = RowColumns(known=_ROW_FIELDS, required=_REQUIRED, ints=_INT_FIELDS, flags=_BOOL_FIELDS,
                      figures=FIGURE_FIELDS)


def _row_from_json(check: Checker, index: int, raw: Any) -> Measurement:
    where = f"rows[{index}]"
    values = check.row_values(index, raw, columns=_COLUMNS)
    values["dtype"] = check.choice(f"{where}.dtype", raw["dtype"], tuple(DTYPE_BYTES))
    for name in ("segment_lengths_tokens", "dilation_rates"):
        values[name] = check.int_tuple(f"{where}.{name}", raw.get(name, []))
    if len(values["segment_lengths_tokens"]) != len(values["dilation_rates"]):
        check.fail(f"{where}.dilation_rates", "does not have one rate per segment length",
                   list(values["dilation_rates"]))
    if values["n_heads"] % values["n_kv_heads"]:
        check.fail(f"{where}.n_kv_heads", f"does not divide n_heads={values['n_heads']}", values["n_kv_heads"])
    return Measurement(**values)


def profile_from_json(data: Any, path: str = "<profile>") -> Profile:
    """Validate parsed JSON and build a ``Profile``; ``ValueError`` names ``path`` and the field."""
    parsed = parsed_profile(data, path, PROFILE_SCHEMA, _row_from_json)
    return Profile(provenance=parsed.provenance, rows=parsed.rows, history=parsed.history, path=path)


def load_profile(path: str | Path) -> Profile:
    """Read and validate one profile file. Missing, unreadable or malformed → ``ValueError``."""
    return profile_from_json(read_json_file(path, "profile file"), str(path))


def load_profiles(directory: str | Path | None = None) -> list[Profile]:
    """Every ``*.json`` profile in ``directory`` (default ``profiles/measured``), sorted by name."""
    directory = Path(directory) if directory is not None else measured_dir()
    return [load_profile(path) for path in profile_files(directory)]


# ----------------------------------------------------------------------------- writing


def profile_to_json(profile: Profile) -> dict[str, Any]:
    """The JSON form written to disk (all columns present; unknown figures are null)."""
    rows = []
    for row in profile.rows:
        raw = asdict(row)
        raw["segment_lengths_tokens"] = list(row.segment_lengths_tokens)
        raw["dilation_rates"] = list(row.dilation_rates)
        rows.append(raw)
    return {"schema": PROFILE_SCHEMA, "provenance": provenance_to_json(profile.provenance),
            "history": list(profile.history), "rows": rows}


def write_profile(path: str | Path, profile: Profile) -> Profile:
    """Merge ``profile`` with what is on disk at ``path`` (rows by ``key``; only a ``measured`` row
    replaces one) and write atomically under the file's lock (``envelope.write_merged_profile``).
    The new provenance becomes the file's; a different old one goes to ``history`` once. A corrupt
    file on disk raises ``ValueError`` and is left untouched. Returns the merged profile."""
    profile = profile_from_json(profile_to_json(profile), f"{path} (rows to write)")  # validate new rows
    return write_merged_profile(path, profile, load=load_profile, to_json=profile_to_json)
