"""The GPU and interconnect catalog: what each card holds and how fast it talks.

The numbers are data, not code: ``profiles/gpus.json`` keeps one entry per GPU and per link,
keyed by the dataclass field names below, with a source beside every number. Usable memory is
what the driver reports (``nvidia-smi`` total) where it was measured on a real card, and the
datasheet capacity (marked nominal) elsewhere; it never exceeds ``physical_memory_bytes``, the
datasheet capacity in the unit the vendor means.

Names are case-insensitive and have aliases (``h100`` → ``h100-80gb-sxm``). An ambiguous alias
(``a100``) or an unknown name raises ``ValueError`` listing the choices or the closest names.
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CATALOG_SCHEMA = "ringplan.catalog/1"


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkSpec:
    """One interconnect: one-direction bandwidth per GPU and per-message latency."""

    name: str
    bandwidth_bytes_per_s: float
    latency_s: float
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require_finite_positive(f"link {self.name!r}", bandwidth_bytes_per_s=self.bandwidth_bytes_per_s,
                                 latency_s=self.latency_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuSpec:
    """One GPU type. ``peak_flops_per_s`` maps dtype → dense FLOP/s (no sparsity).

    ``usable_memory_bytes`` is what the driver reports; ``physical_memory_bytes`` (optional) is the
    datasheet capacity, an upper bound on it (GDDR6 ECC and the driver's reserve sit between them).

    ``runtime_overhead_bytes`` is device memory a torch + NCCL process holds outside the
    caching allocator (CUDA context, NCCL buffers); the catalog default is an estimate that
    measured profiles replace.
    """

    name: str
    driver_name: str
    usable_memory_bytes: int
    peak_flops_per_s: dict[str, float]
    hbm_bandwidth_bytes_per_s: float
    intra_node_link: str
    inter_node_link: str
    gpus_per_node: int
    aliases: tuple[str, ...] = ()
    usable_memory_measured: bool = False
    physical_memory_bytes: int | None = None
    runtime_overhead_bytes: int = 0
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        what = f"gpu {self.name!r}"
        _require_finite_positive(what, usable_memory_bytes=self.usable_memory_bytes,
                                 hbm_bandwidth_bytes_per_s=self.hbm_bandwidth_bytes_per_s,
                                 gpus_per_node=self.gpus_per_node)
        _require_finite_positive(what, **{f"peak_flops_per_s[{k}]": v for k, v in self.peak_flops_per_s.items()})
        if self.physical_memory_bytes is not None:
            _require_finite_positive(what, physical_memory_bytes=self.physical_memory_bytes)
            if self.usable_memory_bytes > self.physical_memory_bytes:
                raise ValueError(f"{what}: usable_memory_bytes {self.usable_memory_bytes} exceeds "
                                 f"physical_memory_bytes {self.physical_memory_bytes}")
        if self.runtime_overhead_bytes < 0:
            raise ValueError(f"{what}: runtime_overhead_bytes must be >= 0, got {self.runtime_overhead_bytes}")
        object.__setattr__(self, "aliases", tuple(self.aliases))


def _require_finite_positive(what: str, **values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{what}: {name} must be a finite positive number, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Catalog:
    """All GPUs and links, with case-insensitive name and alias lookup."""

    gpus: tuple[GpuSpec, ...]
    links: tuple[LinkSpec, ...]
    ambiguous_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source_path: str = ""

    def gpu(self, name: str) -> GpuSpec:
        """The GPU called ``name`` (or one of its aliases, any case); ``ValueError`` otherwise."""
        key = normalise_name(name)
        for spec in self.gpus:
            if key == spec.name or key in spec.aliases or key == normalise_name(spec.driver_name):
                return spec
        if key in self.ambiguous_aliases:
            raise ValueError(f"GPU name {name!r} is ambiguous; choose one of: "
                             f"{', '.join(self.ambiguous_aliases[key])}")
        names = [spec.name for spec in self.gpus] + [a for spec in self.gpus for a in spec.aliases]
        raise ValueError(f"unknown GPU {name!r}; closest names: {closest_names(key, names)} "
                         f"(run `ringplan gpus` for the full list)")

    def gpu_by_driver_name(self, driver_name: str) -> GpuSpec | None:
        """The catalog entry whose ``driver_name`` matches what NVML/torch reports, or None."""
        key = normalise_name(driver_name)
        return next((spec for spec in self.gpus if normalise_name(spec.driver_name) == key), None)

    def link(self, name: str) -> LinkSpec:
        """The link called ``name`` (any case); ``ValueError`` with the closest names otherwise."""
        key = normalise_name(name)
        for spec in self.links:
            if spec.name == key:
                return spec
        raise ValueError(f"unknown link {name!r}; closest names: {closest_names(key, [s.name for s in self.links])}")


def normalise_name(name: str) -> str:
    """Lower case, surrounding space dropped, inner spaces and underscores as dashes (catalog keys)."""
    return "-".join(str(name).strip().lower().replace("_", " ").split())


def closest_names(key: str, names: list[str]) -> str:
    """Up to three catalog names close to ``key`` (difflib), else ones sharing its first letter."""
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.4)
    if not close:
        close = sorted(n for n in names if n[:1] == key[:1])[:3] or sorted(names)[:3]
    return ", ".join(close)


def default_catalog_path() -> Path:
    """``profiles/gpus.json`` of the profiles directory (see ``ringplan.paths.profiles_dir``)."""
    from ringplan.paths import profiles_dir

    return profiles_dir() / "gpus.json"


@functools.lru_cache(maxsize=8)
def load_catalog(path: str | Path | None = None) -> Catalog:
    """Read and validate the catalog (cached per path). Bad data → ``ValueError`` naming the entry."""
    path = Path(path) if path is not None else default_catalog_path()
    from ringplan.jsonfile import read_json_file

    data = read_json_file(path, "GPU catalog")
    if not isinstance(data, dict) or data.get("schema") != CATALOG_SCHEMA:
        raise ValueError(f"{path}: schema must be {CATALOG_SCHEMA!r}")
    try:
        return _catalog_from_json(data, str(path))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: malformed catalog entry ({exc!r})") from None
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def _catalog_from_json(data: dict[str, Any], source_path: str) -> Catalog:
    defaults = data.get("defaults", {})
    links = tuple(LinkSpec(**entry) for entry in data["links"])
    gpus = tuple(_gpu_from_json(entry, defaults) for entry in data["gpus"])
    link_names = {link.name for link in links}
    seen: dict[str, str] = {}
    for gpu in gpus:
        for link_name in (gpu.intra_node_link, gpu.inter_node_link):
            if link_name not in link_names:
                raise ValueError(f"{source_path}: gpu {gpu.name!r} names unknown link {link_name!r}")
        for key in (gpu.name, *gpu.aliases):
            if key in seen:
                raise ValueError(f"{source_path}: name {key!r} used by both {seen[key]!r} and {gpu.name!r}")
            seen[key] = gpu.name
    ambiguous = {normalise_name(k): tuple(v) for k, v in data.get("ambiguous_aliases", {}).items()}
    return Catalog(gpus=gpus, links=links, ambiguous_aliases=ambiguous, source_path=source_path)


def _gpu_from_json(entry: dict[str, Any], defaults: dict[str, Any]) -> GpuSpec:
    entry = dict(entry)
    sources = dict(entry.pop("sources", {}))
    if "runtime_overhead_bytes" not in entry:
        entry["runtime_overhead_bytes"] = int(defaults.get("runtime_overhead_bytes", 0))
        default_source = defaults.get("sources", {}).get("runtime_overhead_bytes")
        if default_source:
            sources.setdefault("runtime_overhead_bytes", default_source)
    entry["aliases"] = tuple(normalise_name(a) for a in entry.get("aliases", ()))
    entry["name"] = normalise_name(entry["name"])
    return GpuSpec(sources=sources, **entry)
