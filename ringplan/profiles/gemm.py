"""Measured GEMM timing profiles (``ringplan.gemm/1``), written by ``benchmarks/measure_gemm.py``.

File format (JSON; the envelope is ``ringplan.profiles.envelope``'s, the provenance must carry
``ringplan.profiles.timing.TIMING_PROVENANCE_KEYS``)::

    {"schema": "ringplan.gemm/1", "provenance": {...},
     "rows": [{"op": "gemm", "name": "gate_up", "pass": "forward", "dtype": "bf16", "tokens": 8192,
               "in_features": 4096, "out_features": 14336, "seconds_median": 0.0021, "repeats": 10}]}

Files live beside the other timing profiles in ``profiles/measured/timing`` (``ringplan.paths.timing_dir``).
This module holds the rows and their reader and writer; the GEMM model that times a transformer's
GEMMs from them is ``ringplan.time.gemms``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ringplan.paths import timing_dir
from ringplan.profiles.envelope import Checker, schema_of
from ringplan.jsonfile import read_json_file, write_merged_json
from ringplan.profiles.timing import json_files_of_schema, timing_envelope

GEMM_FORMAT = "ringplan.gemm/1"
GEMM_PASSES: tuple[str, ...] = ("forward", "backward_input", "backward_weight")


@dataclass(frozen=True, slots=True, kw_only=True)
class GemmRow:
    """One timed GEMM: ``pass_name`` of the linear layer [tokens, in] → [tokens, out]: ``forward``
    (x·Wᵀ), ``backward_input`` (dy·W) or ``backward_weight`` (dyᵀ·x), each 2·tokens·in·out FLOPs."""

    name: str
    pass_name: str
    tokens: int
    in_features: int
    out_features: int
    dtype: str
    seconds: float
    repeats: int

    @property
    def flops(self) -> float:
        """2·tokens·in·out: one multiply and one add per weight per token."""
        return 2.0 * self.tokens * self.in_features * self.out_features

    @property
    def key(self) -> tuple:
        """What makes two rows the same measurement (seconds and repeats excluded)."""
        return (self.name, self.pass_name, self.tokens, self.in_features, self.out_features, self.dtype)


@dataclass(frozen=True, slots=True, kw_only=True)
class GemmProfile:
    """GEMM timings measured on one GPU type (``ringplan.gemm/1``)."""

    path: str
    provenance: dict[str, Any]
    rows: tuple[GemmRow, ...]

    @property
    def gpu_driver_name(self) -> str:
        """The GPU's name as its driver reports it (``provenance.gpu_driver_name``)."""
        return str(self.provenance["gpu_driver_name"])


def _gemm_row(check: Checker, r: Any, i: int) -> GemmRow:
    if not isinstance(r, dict) or r.get("op") != "gemm" or r.get("pass") not in GEMM_PASSES:
        check.fail(f"row {i}", f"must be an object with op 'gemm' and pass one of {list(GEMM_PASSES)}",
                   show_value=False)
    field = check.row_field
    return GemmRow(name=field(r, "name", str, i), pass_name=r["pass"], tokens=field(r, "tokens", int, i),
                   dtype=field(r, "dtype", str, i), in_features=field(r, "in_features", int, i),
                   out_features=field(r, "out_features", int, i), seconds=field(r, "seconds_median", float, i),
                   repeats=field(r, "repeats", int, i))


def gemm_profile_from_json(data: Any, path: str) -> GemmProfile:
    """Validate a ``ringplan.gemm/1`` document; ValueError naming the file, row and key otherwise."""
    if schema_of(data) != GEMM_FORMAT:
        raise ValueError(f"{path}: format {schema_of(data)!r} is not {GEMM_FORMAT!r}")
    check = Checker(path)
    provenance, raw_rows = timing_envelope(check, data, GEMM_FORMAT)
    rows = tuple(_gemm_row(check, r, i) for i, r in enumerate(raw_rows))
    if not rows:
        check.fail("a GEMM profile", "needs at least one row", show_value=False)
    check.unique_rows([row.key for row in rows])
    return GemmProfile(path=path, provenance=provenance, rows=rows)


def load_gemm_profile(path: str | os.PathLike) -> GemmProfile:
    """Read one ``ringplan.gemm/1`` file (ValueError on bad JSON or content, naming the file)."""
    return gemm_profile_from_json(read_json_file(path, "GEMM profile"), str(path))


def gemm_profiles_in(directory: str | os.PathLike | None = None) -> list[GemmProfile]:
    """Every GEMM profile under ``directory`` (default ``profiles/measured/timing``); JSON of other
    formats skipped, unreadable JSON an error naming the file."""
    root = Path(directory) if directory is not None else timing_dir()
    return [gemm_profile_from_json(data, str(path)) for path, data in json_files_of_schema(root, (GEMM_FORMAT,))]


def write_gemm_profile(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Check ``data`` validates, then write it atomically under the file's lock (``write_merged_json``)."""
    gemm_profile_from_json(data, str(path))
    write_merged_json(path, lambda: data)
