"""Measured timing profiles: point-to-point ring-exchange sweeps and local kernel timings.

Two JSON formats, written by ``benchmarks/measure_timing.py`` on the GPU machine and read only here:

``ringplan.p2p/1`` — one ring exchange sweep (every rank sends to the next and receives from the
previous at once, ``batch_isend_irecv``)::

    {"schema": "ringplan.p2p/1", "provenance": {...},
     "link": {"scope": "intra_node" | "inter_node", "world_size": 2, "gpus_per_node": 2, "nodes": 1},
     "rows": [{"message_bytes": 4096, "seconds_median": 1.4e-4, "repeats": 20}, ...]}

``ringplan.kernels/1`` — local kernel timings on one GPU::

    {"schema": "ringplan.kernels/1", "provenance": {...},
     "rows": [{"op": "attention", "backend": "cudnn", "pass": "forward" | "backward" | "forward_backward",
               "causal": false, "dtype": "bf16", "batch": 1, "n_heads": 32, "n_kv_heads": 32,
               "head_dim": 128, "q_tokens": 8192, "kv_tokens": 8192, "seconds_median": 0.0021,
               "repeats": 10},
              {"op": "merge", "dtype": "bf16", "batch": 1, "n_heads": 32, "head_dim": 128,
               "q_tokens": 8192, "seconds_median": 1.2e-4, "repeats": 10, ...}]}

The envelope (schema, provenance, rows) is ``ringplan.profiles.envelope``'s: provenance keys are
its ``PROVENANCE_KEYS`` and a timing file must carry ``TIMING_PROVENANCE_KEYS``; ``gpu_name`` /
``date_utc`` (the runtime's ``Provenance`` names) are accepted as aliases, and ``"format"`` for
``"schema"``. A missing key, a malformed or repeated row is a ValueError naming the file; JSON files
of another schema (or text that is not JSON) are not timing profiles and are skipped by
``timing_profiles_in``; a file that cannot be read (not UTF-8, not a regular file) is an error naming it.

Files live in ``profiles/measured/timing/`` (``ringplan.paths.timing_dir``), apart from the memory
profiles of ``profiles/measured/*.json`` that ``ringplan.profiles.attention.load_profiles`` reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ringplan.paths import timing_dir
from ringplan.profiles.envelope import Checker, envelope_from_json, schema_of
from ringplan.jsonfile import NotJsonError, read_json_file, write_merged_json

P2P_FORMAT = "ringplan.p2p/1"
KERNELS_FORMAT = "ringplan.kernels/1"
#: Provenance keys a timing profile (p2p, kernels, GEMM) must carry (values may be null).
TIMING_PROVENANCE_KEYS: tuple[str, ...] = ("gpu_driver_name", "driver_version", "torch_version", "nccl_version",
                                           "cuda_version", "git_sha", "date", "command", "method")
LINK_SCOPES = ("intra_node", "inter_node")
KERNEL_PASSES = ("forward", "backward", "forward_backward")


@dataclass(frozen=True, slots=True, kw_only=True)
class P2pRow:
    """One message size of a ring exchange sweep: median seconds over ``repeats`` exchanges."""

    message_bytes: int
    seconds: float
    repeats: int


@dataclass(frozen=True, slots=True, kw_only=True)
class P2pProfile:
    """A ring exchange sweep on one GPU type over one link scope (intra- or inter-node)."""

    path: str
    provenance: dict[str, Any]
    scope: str
    world_size: int
    gpus_per_node: int
    nodes: int
    rows: tuple[P2pRow, ...]

    @property
    def gpu_driver_name(self) -> str:
        return str(self.provenance["gpu_driver_name"])


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelRow:
    """One timed local operation: an attention block (``op='attention'``) or an fp32 LSE merge."""

    op: str
    dtype: str
    batch: int
    n_heads: int
    head_dim: int
    q_tokens: int
    seconds: float
    repeats: int
    backend: str = ""
    pass_name: str = "forward"
    causal: bool = False
    n_kv_heads: int = 0
    kv_tokens: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelProfile:
    """Local kernel timings measured on one GPU type."""

    path: str
    provenance: dict[str, Any]
    rows: tuple[KernelRow, ...]

    @property
    def gpu_driver_name(self) -> str:
        return str(self.provenance["gpu_driver_name"])


def timing_envelope(check: Checker, data: Any, schema: str, *, extra_keys: tuple[str, ...] = ()
                    ) -> tuple[dict[str, Any], list]:
    """The envelope of a timing-style profile (p2p, kernels, GEMM): its provenance values, which
    must hold ``TIMING_PROVENANCE_KEYS`` and a GPU name, and its raw rows."""
    provenance, _, rows = envelope_from_json(check, data, schema, extra_keys=extra_keys)
    missing = [k for k in TIMING_PROVENANCE_KEYS if k not in provenance]
    if missing:
        check.fail("provenance", f"lacks {missing}", show_value=False)
    if not provenance["gpu_driver_name"]:
        check.fail("provenance", "gpu_driver_name is empty", show_value=False)
    return provenance, rows


def _p2p_profile(data: dict[str, Any], path: str) -> P2pProfile:
    check = Checker(path)
    provenance, raw_rows = timing_envelope(check, data, P2P_FORMAT, extra_keys=("link",))
    link = data.get("link")
    if not isinstance(link, dict) or link.get("scope") not in LINK_SCOPES:
        check.fail("'link'", f"must be an object with scope one of {list(LINK_SCOPES)}", show_value=False)
    rows = tuple(P2pRow(message_bytes=check.row_field(r, "message_bytes", int, i),
                        seconds=check.row_field(r, "seconds_median", float, i),
                        repeats=check.row_field(r, "repeats", int, i))
                 for i, r in enumerate(raw_rows))
    check.unique_rows([r.message_bytes for r in rows])
    if len(rows) < 2:
        check.fail("a p2p sweep", f"needs at least 2 message sizes, got {len(rows)} rows", show_value=False)
    sizes = {name: link.get(name, default) for name, default in (("world_size", 2), ("gpus_per_node", 0), ("nodes", 1))}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 2**31:
            check.fail(f"link.{name}", "is not a non-negative integer", value)
    return P2pProfile(path=path, provenance=provenance, scope=link["scope"], rows=rows, **sizes)


def _kernel_row(check: Checker, r: Any, i: int) -> KernelRow:
    field = check.row_field
    op = r.get("op") if isinstance(r, dict) else None
    common = dict(op=op, dtype=field(r, "dtype", str, i), batch=field(r, "batch", int, i),
                  n_heads=field(r, "n_heads", int, i), head_dim=field(r, "head_dim", int, i),
                  q_tokens=field(r, "q_tokens", int, i), seconds=field(r, "seconds_median", float, i),
                  repeats=field(r, "repeats", int, i))
    if op == "merge":
        return KernelRow(**common)
    if op != "attention":
        check.fail(f"row {i} op={op!r}", "is not 'attention' or 'merge'", show_value=False)
    if r.get("pass") not in KERNEL_PASSES:
        check.fail(f"row {i} pass={r.get('pass')!r}", f"is not one of {list(KERNEL_PASSES)}", show_value=False)
    if not isinstance(r.get("causal"), bool):
        check.fail(f"row {i} causal={r.get('causal')!r}", "is not true/false", show_value=False)
    return KernelRow(**common, backend=field(r, "backend", str, i), pass_name=r["pass"], causal=r["causal"],
                     n_kv_heads=field(r, "n_kv_heads", int, i), kv_tokens=field(r, "kv_tokens", int, i))


def _kernel_profile(data: dict[str, Any], path: str) -> KernelProfile:
    check = Checker(path)
    provenance, raw_rows = timing_envelope(check, data, KERNELS_FORMAT)
    rows = tuple(_kernel_row(check, r, i) for i, r in enumerate(raw_rows))
    if not rows:
        check.fail("a kernel profile", "needs at least one row", show_value=False)
    check.unique_rows([(r.op, r.backend, r.pass_name, r.causal, r.dtype, r.batch, r.n_heads, r.n_kv_heads,
                        r.head_dim, r.q_tokens, r.kv_tokens) for r in rows])
    return KernelProfile(path=path, provenance=provenance, rows=rows)


def timing_profile_from_json(data: Any, path: str) -> P2pProfile | KernelProfile:
    """Validate a parsed ``ringplan.p2p/1`` or ``ringplan.kernels/1`` document; ValueError on anything else."""
    fmt = schema_of(data)
    if fmt == P2P_FORMAT:
        return _p2p_profile(data, path)
    if fmt == KERNELS_FORMAT:
        return _kernel_profile(data, path)
    raise ValueError(f"{path}: format {fmt!r} is not {P2P_FORMAT!r} or {KERNELS_FORMAT!r}")


def load_timing_profile(path: str | os.PathLike) -> P2pProfile | KernelProfile:
    """Read one ``ringplan.p2p/1`` or ``ringplan.kernels/1`` file; ValueError on anything else."""
    return timing_profile_from_json(read_json_file(path, "timing profile"), str(path))


def json_files_of_schema(directory: str | os.PathLike, schemas: tuple[str, ...]) -> list[tuple[Path, Any]]:
    """(path, parsed JSON) of every ``*.json`` file under ``directory`` whose schema is one of
    ``schemas``, sorted by path. Directories named ``*.json`` are walked, not read, and text that
    is not JSON at all is another tool's file, skipped; a file that cannot be read (not UTF-8, not
    a regular file, too large) or JSON the reader refuses (duplicate keys, too deep) raises
    ``ValueError`` naming it."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.rglob("*.json")):
        if path.is_dir():
            continue
        try:
            data = read_json_file(path, "JSON file in the timing directory")
        except NotJsonError:
            continue
        if schema_of(data) in schemas:
            found.append((path, data))
    return found


def timing_profiles_in(directory: str | os.PathLike | None = None) -> tuple[list[P2pProfile], list[KernelProfile]]:
    """Every timing profile under ``directory`` (default ``timing_dir()``), p2p and kernels apart.

    JSON files of other formats (memory and GEMM profiles) and non-JSON text are skipped; a timing
    file that does not validate, or a file that cannot be read, raises ``ValueError`` naming it.
    """
    root = Path(directory) if directory is not None else timing_dir()
    p2p: list[P2pProfile] = []
    kernels: list[KernelProfile] = []
    for path, data in json_files_of_schema(root, (P2P_FORMAT, KERNELS_FORMAT)):
        profile = timing_profile_from_json(data, str(path))
        (p2p if isinstance(profile, P2pProfile) else kernels).append(profile)
    return p2p, kernels


def write_timing_profile(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Check ``data`` validates, then write it atomically under the file's lock
    (``jsonfile.write_merged_json``; the new document replaces the old one)."""
    timing_profile_from_json(data, str(path))
    write_merged_json(path, lambda: data)
