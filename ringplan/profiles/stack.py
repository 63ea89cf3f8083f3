"""Measured whole-model runs: one row per (model, sequence, GPUs, settings) run, plus provenance.

File format (JSON, ``profiles/measured/stack/*.json``)::

    {"schema": "ringplan.stack/1",
     "provenance": {<the keys of ringplan.profiles.envelope.Provenance>},
     "history": [<provenance of earlier writes merged into this file>, ...],
     "rows": [{"gpu": "h100-80gb", "model": {"name": "llama-3-8b@4L", "n_layers": 4, ...},
               "seq_len_tokens": 65536, "batch": 1, "world_size": 2, "ring_size": 2,
               "layout": "contiguous", "backend": "auto", "training": true,
               "settings": {"sharding": "zero3", "checkpointing": "full", ...},
               "peak_allocated_bytes": ..., "tracked_peak_bytes": ..., "oom": false, ...}]}

``model`` holds the ``ringplan.models.ModelSpec`` fields (not its aliases and sources: the row
records the shape that ran, whatever it was called) and ``settings`` the
``ringplan.stack.StackSettings`` fields. The provenance block, the row ``kind`` rule (only a
``measured`` row replaces a row with the same key) and the atomic merged write under a lock are
the envelope's (``ringplan.profiles.envelope``), reused, not copied. ``ringplan_runtime.stack_sweep`` writes the
files; the planner reads them (``load_stack_profile``, ``load_stack_profiles``), which validates
every field and names the file and the field on error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ringplan.models import ModelSpec
from ringplan.paths import stack_profiles_dir
from ringplan.profiles.envelope import (Checker, Provenance, RowColumns, parsed_profile, profile_files,
                                        provenance_to_json, write_merged_profile)
from ringplan.jsonfile import read_json_file
from ringplan.stack import StackSettings, StackWorkload
from ringplan.workload import RingLayout

STACK_SCHEMA = "ringplan.stack/1"
#: Observed figures of a row (None: not observed, e.g. allocator figures on a CPU run).
STACK_FIGURE_FIELDS: tuple[str, ...] = (
    "peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes", "non_allocator_bytes",
    "tracked_peak_bytes", "resident_bytes", "host_bytes", "step_time_s")
#: ``ModelSpec`` fields a row records (aliases and sources are catalog matters, not the run's shape).
MODEL_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ModelSpec) if f.name not in ("aliases", "sources"))
SETTINGS_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(StackSettings))


@dataclass(frozen=True, slots=True, kw_only=True)
class StackMeasurement:
    """One whole-model run on ``world_size`` GPUs: what ran and what was observed (per rank, the
    largest over ranks; step time of the slowest rank).

    ``tracked_peak_bytes``: the live-tensor tracker's peak over the memory step, including the
    tensors alive when it started (``resident_bytes``: sharded parameters and optimizer states).
    ``host_bytes``: pinned host memory of offloaded checkpoints at the peak (not GPU memory).
    """

    gpu: str
    model: ModelSpec
    seq_len_tokens: int
    world_size: int
    ring_size: int
    batch: int = 1
    layout: str = "contiguous"
    backend: str = "auto"
    training: bool = True
    settings: StackSettings = field(default_factory=StackSettings)
    peak_allocated_bytes: float | None = None
    peak_reserved_bytes: float | None = None
    device_used_bytes: float | None = None
    non_allocator_bytes: float | None = None
    tracked_peak_bytes: float | None = None
    resident_bytes: float | None = None
    host_bytes: float | None = None
    step_time_s: float | None = None
    oom: bool = False
    kind: str = "measured"
    series: str | None = None
    notes: str | None = None

    def workload(self) -> StackWorkload:
        """The run's ``StackWorkload`` (raises ``ValueError`` if the row cannot be one)."""
        return StackWorkload(model=self.model, seq_len_tokens=self.seq_len_tokens, batch=self.batch,
                             training=self.training, world_size=self.world_size,
                             layout=RingLayout(ring_size=self.ring_size, layout=self.layout, backend=self.backend),
                             settings=self.settings)

    @property
    def key(self) -> tuple:
        """Merge key: GPU + model shape + sequence + GPUs + ring + settings (figures, kind, notes excluded)."""
        return (self.gpu, model_key(self.model), self.seq_len_tokens, self.batch, self.world_size, self.ring_size,
                self.layout, self.backend, self.training, astuple_settings(self.settings))


def model_key(model: ModelSpec) -> tuple:
    """The recorded ``ModelSpec`` fields as a tuple (name included)."""
    return tuple(getattr(model, name) for name in MODEL_FIELDS)


def astuple_settings(settings: StackSettings) -> tuple:
    """The ``StackSettings`` fields as a tuple (part of a row's merge key)."""
    return tuple(getattr(settings, name) for name in SETTINGS_FIELDS)


def measurement_from_workload(w: StackWorkload, *, gpu: str, **figures: Any) -> StackMeasurement:
    """A row for workload ``w`` on ``gpu`` with the given figures / oom / kind / series / notes."""
    return StackMeasurement(gpu=gpu, model=w.model, seq_len_tokens=w.seq_len_tokens, batch=w.batch,
                            world_size=w.world_size, ring_size=w.layout.ring_size, layout=w.layout.layout,
                            backend=w.layout.backend, training=w.training, settings=w.settings, **figures)


@dataclass(frozen=True, slots=True, kw_only=True)
class StackProfile:
    """A stack profile file's content. ``history`` keeps the provenance of earlier merged writes."""

    provenance: Provenance
    rows: tuple[StackMeasurement, ...]
    history: tuple[dict[str, Any], ...] = ()
    path: str | None = field(default=None, compare=False)


# ----------------------------------------------------------------------------- reading

_ROW_FIELDS = tuple(f.name for f in fields(StackMeasurement))
_REQUIRED = ("gpu", "model", "seq_len_tokens", "world_size", "ring_size")
_INT_FIELDS = ("seq_len_tokens", "world_size", "ring_size", "batch")
_BOOL_FIELDS = ("training", "oom")


def _sub_object(check: Checker, where: str, raw: Any, known: tuple[str, ...], build):
    """Build a dataclass from a JSON object whose keys must be ``known``; errors name ``where``."""
    if not isinstance(raw, dict):
        check.fail(where, "is not an object", raw)
    for name in raw:
        if name not in known:
            check.fail(f"{where}.{name}", "is not a known field (known: " + ", ".join(known) + ")", show_value=False)
    try:
        return build(**raw)
    except TypeError as exc:
        check.fail(where, f"is incomplete ({exc})", show_value=False)
    except ValueError as exc:
        check.fail(where, f"is invalid ({exc})", show_value=False)


_COLUMNS = RowColumns(known=_ROW_FIELDS, required=_REQUIRED, ints=_INT_FIELDS, flags=_BOOL_FIELDS,
                      figures=STACK_FIGURE_FIELDS, true_by_default=("training",))


def _row_from_json(check: Checker, index: int, raw: Any) -> StackMeasurement:
    where = f"rows[{index}]"
    values = check.row_values(index, raw, columns=_COLUMNS)
    values["model"] = _sub_object(check, f"{where}.model", raw["model"], MODEL_FIELDS, ModelSpec)
    values["settings"] = _sub_object(check, f"{where}.settings", raw.get("settings", {}), SETTINGS_FIELDS,
                                     StackSettings)
    row = StackMeasurement(**values)
    try:
        row.workload()
    except ValueError as exc:
        check.fail(where, f"is not a valid run ({exc})", show_value=False)
    return row


def stack_profile_from_json(data: Any, path: str = "<stack profile>") -> StackProfile:
    """Validate parsed JSON and build a ``StackProfile``; ``ValueError`` names ``path`` and the field."""
    parsed = parsed_profile(data, path, STACK_SCHEMA, _row_from_json)
    return StackProfile(provenance=parsed.provenance, rows=parsed.rows, history=parsed.history, path=path)


def load_stack_profile(path: str | Path) -> StackProfile:
    """Read and validate one stack profile. Missing, unreadable or malformed → ``ValueError``."""
    return stack_profile_from_json(read_json_file(path, "stack profile file"), str(path))


def load_stack_profiles(directory: str | Path | None = None) -> list[StackProfile]:
    """Every ``*.json`` in ``directory`` (default ``profiles/measured/stack``), sorted by name."""
    directory = Path(directory) if directory is not None else stack_profiles_dir()
    return [load_stack_profile(path) for path in profile_files(directory)]


def stack_rows(directory: str | Path | None = None) -> list[StackMeasurement]:
    """All rows of every stack profile in ``directory``."""
    return [row for profile in load_stack_profiles(directory) for row in profile.rows]


# ----------------------------------------------------------------------------- writing


def row_to_json(row: StackMeasurement) -> dict[str, Any]:
    """One row as written: every column, ``model`` and ``settings`` as objects of their fields."""
    raw = {name: getattr(row, name) for name in _ROW_FIELDS}
    raw["model"] = {name: getattr(row.model, name) for name in MODEL_FIELDS}
    raw["settings"] = asdict(row.settings)
    return raw


def stack_profile_to_json(profile: StackProfile) -> dict[str, Any]:
    """The JSON form written to disk (all columns present; unknown figures are null)."""
    return {"schema": STACK_SCHEMA, "provenance": provenance_to_json(profile.provenance),
            "history": list(profile.history), "rows": [row_to_json(row) for row in profile.rows]}


def write_stack_profile(path: str | Path, profile: StackProfile) -> StackProfile:
    """Merge ``profile`` with what is on disk at ``path`` (rows by ``key``; only a ``measured`` row
    replaces one) and write atomically under the file's lock (``envelope.write_merged_profile``).
    The new provenance becomes the file's; a different old one goes to ``history`` once. A corrupt
    file on disk raises ``ValueError`` and is left untouched. Returns the merged profile."""
    profile = stack_profile_from_json(stack_profile_to_json(profile), f"{path} (rows to write)")
    return write_merged_profile(path, profile, load=load_stack_profile, to_json=stack_profile_to_json)
