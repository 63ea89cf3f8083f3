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

Provenance keys (both formats): gpu_driver_name, driver_version, torch_version, nccl_version,
cuda_version, git_sha, date, command, method. ``gpu_name`` / ``date_utc`` (the runtime's
``Provenance`` names) are accepted as aliases, and ``"format"`` for ``"schema"``. A missing key or
a malformed row is a ValueError naming the file; files with another schema are not timing
profiles and are skipped by ``timing_profiles_in``.

Files live in ``profiles/measured/timing/`` (``timing_dir()``), apart from the memory profiles
of ``profiles/measured/*.json`` that ``ringplan.profiles.attention.load_profiles`` reads.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

P2P_FORMAT = "ringplan.p2p/1"
KERNELS_FORMAT = "ringplan.kernels/1"
PROVENANCE_KEYS: tuple[str, ...] = ("gpu_driver_name", "driver_version", "torch_version", "nccl_version",
                                    "cuda_version", "git_sha", "date", "command", "method")
_PROVENANCE_ALIASES = {"gpu_name": "gpu_driver_name", "date_utc": "date"}
LINK_SCOPES = ("intra_node", "inter_node")
KERNEL_PASSES = ("forward", "backward", "forward_backward")


def timing_dir() -> Path:
    """``profiles/measured/timing`` (follows ``$RINGPLAN_PROFILES_DIR`` like the other profiles)."""
    from ringplan.profiles.attention import measured_dir

    return measured_dir() / "timing"


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


def _provenance(raw: Any, path: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: 'provenance' must be an object with keys {list(PROVENANCE_KEYS)}")
    prov = {_PROVENANCE_ALIASES.get(k, k): v for k, v in raw.items()}
    missing = [k for k in PROVENANCE_KEYS if k not in prov]
    if missing:
        raise ValueError(f"{path}: provenance lacks {missing}")
    if not prov["gpu_driver_name"]:
        raise ValueError(f"{path}: provenance gpu_driver_name is empty")
    return prov


def _field(row: dict[str, Any], key: str, kind: type, path: str, index: int) -> Any:
    if key not in row:
        raise ValueError(f"{path}: row {index} lacks {key!r}")
    value = row[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{path}: row {index} {key}={value!r} is not {kind.__name__}")
    if kind in (int, float) and value <= 0:
        raise ValueError(f"{path}: row {index} {key}={value!r} must be positive")
    return value


def _p2p_profile(data: dict[str, Any], path: str) -> P2pProfile:
    link = data.get("link")
    if not isinstance(link, dict) or link.get("scope") not in LINK_SCOPES:
        raise ValueError(f"{path}: 'link' must be an object with scope one of {list(LINK_SCOPES)}")
    rows = tuple(P2pRow(message_bytes=_field(r, "message_bytes", int, path, i),
                        seconds=_field(r, "seconds_median", float, path, i),
                        repeats=_field(r, "repeats", int, path, i))
                 for i, r in enumerate(data.get("rows") or []))
    if len({r.message_bytes for r in rows}) < 2:
        raise ValueError(f"{path}: a p2p sweep needs at least 2 message sizes, got {len(rows)} rows")
    return P2pProfile(path=path, provenance=_provenance(data.get("provenance"), path), scope=link["scope"],
                      world_size=int(link.get("world_size", 2)), gpus_per_node=int(link.get("gpus_per_node", 0)),
                      nodes=int(link.get("nodes", 1)), rows=rows)


def _kernel_row(r: dict[str, Any], path: str, i: int) -> KernelRow:
    op = r.get("op")
    common = dict(op=op, dtype=_field(r, "dtype", str, path, i), batch=_field(r, "batch", int, path, i),
                  n_heads=_field(r, "n_heads", int, path, i), head_dim=_field(r, "head_dim", int, path, i),
                  q_tokens=_field(r, "q_tokens", int, path, i), seconds=_field(r, "seconds_median", float, path, i),
                  repeats=_field(r, "repeats", int, path, i))
    if op == "merge":
        return KernelRow(**common)
    if op != "attention":
        raise ValueError(f"{path}: row {i} op={op!r} is not 'attention' or 'merge'")
    if r.get("pass") not in KERNEL_PASSES:
        raise ValueError(f"{path}: row {i} pass={r.get('pass')!r} is not one of {list(KERNEL_PASSES)}")
    if not isinstance(r.get("causal"), bool):
        raise ValueError(f"{path}: row {i} causal={r.get('causal')!r} is not true/false")
    return KernelRow(**common, backend=_field(r, "backend", str, path, i), pass_name=r["pass"], causal=r["causal"],
                     n_kv_heads=_field(r, "n_kv_heads", int, path, i), kv_tokens=_field(r, "kv_tokens", int, path, i))


def _schema(data: Any) -> Any:
    return (data.get("schema") or data.get("format")) if isinstance(data, dict) else None


def load_timing_profile(path: str | os.PathLike) -> P2pProfile | KernelProfile:
    """Read one ``ringplan.p2p/1`` or ``ringplan.kernels/1`` file; ValueError on anything else."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    fmt = _schema(data)
    if fmt == P2P_FORMAT:
        return _p2p_profile(data, path)
    if fmt == KERNELS_FORMAT:
        rows = tuple(_kernel_row(r, path, i) for i, r in enumerate(data.get("rows") or []))
        if not rows:
            raise ValueError(f"{path}: a kernel profile needs at least one row")
        return KernelProfile(path=path, provenance=_provenance(data.get("provenance"), path), rows=rows)
    raise ValueError(f"{path}: format {fmt!r} is not {P2P_FORMAT!r} or {KERNELS_FORMAT!r}")


def timing_profiles_in(directory: str | os.PathLike | None = None) -> tuple[list[P2pProfile], list[KernelProfile]]:
    """Every timing profile under ``directory`` (default ``timing_dir()``), p2p and kernels apart.

    JSON files of other formats (memory profiles) are skipped; a timing file that does not parse raises.
    """
    root = Path(directory) if directory is not None else timing_dir()
    p2p: list[P2pProfile] = []
    kernels: list[KernelProfile] = []
    if not root.is_dir():
        return p2p, kernels
    for path in sorted(root.rglob("*.json")):
        try:
            with open(path, encoding="utf-8") as handle:
                fmt = _schema(json.load(handle))
        except json.JSONDecodeError:
            continue
        if fmt in (P2P_FORMAT, KERNELS_FORMAT):
            profile = load_timing_profile(path)
            (p2p if isinstance(profile, P2pProfile) else kernels).append(profile)
    return p2p, kernels


def write_timing_profile(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write a timing profile atomically (temp file + ``os.replace``) after checking it loads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
            handle.write("\n")
        load_timing_profile(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
