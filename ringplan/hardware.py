"""The GPU and interconnect catalog: what each card holds and how fast it talks.

The numbers are data, not code: ``profiles/gpus.json`` keeps one entry per GPU and per link,
keyed by the dataclass field names below, with a source beside every number. Usable memory is
what the driver reports (``nvidia-smi`` total) where it was measured on a real card, and the
datasheet capacity (marked nominal) elsewhere; it never exceeds ``physical_memory_bytes``, the
datasheet capacity in the unit the vendor means.

Names are case-insensitive and have aliases (``h100`` → ``h100-80gb-sxm``). An ambiguous alias
(``a100``) or an unknown name raises ``ValueError`` listing the choices or the closest names.

Hardware outside the catalog (issue 17): ``gpu_from_spec`` reads a one-line description
(``memory=96GiB,bf16=989TF,hbm=3.35TB/s,link=450GB/s,gpus-per-node=8``) and ``catalog_with`` merges
a user JSON file of the catalog's schema over the bundled one; every number they bring has the
source "user-specified (...)". A link such a GPU names that the bundled catalog lacks travels with
it (``GpuSpec.own_links``; ``gpu_link`` finds it).
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from dataclasses import dataclass, field, replace
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
    own_links: tuple[LinkSpec, ...] = ()

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
        object.__setattr__(self, "own_links", tuple(self.own_links))


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
    defaults: dict[str, Any] = field(default_factory=dict)

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
    return Catalog(gpus=gpus, links=links, ambiguous_aliases=ambiguous, source_path=source_path,
                   defaults=dict(defaults))


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


# ----------------------------------------------------------------------------- hardware outside the catalog

#: ``--gpu-spec`` keys → what each one sets (the help and the error messages list them).
SPEC_KEYS: dict[str, str] = {
    "memory": "usable memory in bytes (96GiB, 141GB)", "bf16": "dense bf16 FLOP/s (989TF, 1.98PF)",
    "fp16": "dense fp16 FLOP/s", "fp32": "dense fp32 FLOP/s", "hbm": "memory bandwidth in bytes/s (3.35TB/s)",
    "link": "intra-node bandwidth to one ring neighbour, one direction, bytes/s (450GB/s)",
    "inter-link": "inter-node bandwidth per GPU, bytes/s (50GB/s; default infiniband-ndr-400)",
    "gpus-per-node": "GPUs per node (8)", "name": "the name answers use (default: custom)"}
SPEC_SOURCE = "user-specified (--gpu-spec)"
#: A made-up link's latency: the catalog's order of magnitude (the time model adds the torch p2p floor).
SPEC_LINK_LATENCY_S = 1e-6
#: The inter-node link a GPU outside the catalog is given when its spec names none.
SPEC_DEFAULT_INTER_LINK = "infiniband-ndr-400"
_FLOPS_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+)\s*(?P<suffix>[KMGTP]?)\s*"
                       r"(?:F|FLOPS|FLOP/S)?\s*$", re.IGNORECASE | re.ASCII)


def gpu_link(gpu: GpuSpec, name: str, catalog: Catalog | None = None) -> LinkSpec:
    """The link called ``name`` for ``gpu``: one it brings (``own_links``), else the catalog's."""
    key = normalise_name(name)
    own = next((link for link in getattr(gpu, "own_links", ()) if link.name == key), None)
    return own if own is not None else (catalog or load_catalog()).link(name)


def spec_flops_per_s(text: str) -> float:
    """FLOP/s from ``989TF``, ``1.98PF``, ``989T``, ``989TFLOPS``, ``9.89e14``; must be finite and positive."""
    match = _FLOPS_RE.match(text)
    if match is None:
        raise ValueError(f"cannot read {text!r} as FLOP/s (examples: 989TF, 1.98PF, 312e12)")
    scale = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}[match["suffix"].upper()]
    value = float(match["num"]) * scale
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"FLOP/s must be finite and positive, got {text!r}")
    return value


def spec_bytes_per_s(text: str) -> float:
    """Bytes/s from ``3.35TB/s``, ``450GB/s``, ``64GiB/s`` (``/s`` optional; units as ``parse_bytes``)."""
    from ringplan.units import parse_bytes

    body = text.strip()
    if body.lower().endswith("/s"):
        body = body[:-2]
    return float(parse_bytes(body))


def spec_fields(text: str) -> dict[str, str]:
    """``key=value`` pairs of a ``--gpu-spec`` (keys lower case, ``_`` as ``-``); ``ValueError`` naming a
    malformed pair, a repeated key or an unknown key with the accepted ones."""
    fields: dict[str, str] = {}
    for pair in str(text).split(","):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        key = key.strip().lower().replace("_", "-")
        if not sep or not key or not value.strip():
            raise ValueError(f"--gpu-spec: {pair.strip()!r} is not key=value; accepted keys: {', '.join(SPEC_KEYS)}")
        if key not in SPEC_KEYS:
            raise ValueError(f"--gpu-spec: unknown key {key!r}; accepted keys: {', '.join(SPEC_KEYS)}")
        if key in fields:
            raise ValueError(f"--gpu-spec: {key} given twice")
        fields[key] = value.strip()
    if not fields:
        raise ValueError(f"--gpu-spec is empty; accepted keys: {', '.join(SPEC_KEYS)}")
    return fields


def _spec_value(key: str, text: str) -> Any:
    try:
        if key == "memory":
            from ringplan.units import parse_bytes

            return parse_bytes(text)
        if key in ("bf16", "fp16", "fp32"):
            return spec_flops_per_s(text)
        if key in ("hbm", "link", "inter-link"):
            return spec_bytes_per_s(text)
        if key == "gpus-per-node":
            if not text.isdigit() or int(text) < 1:
                raise ValueError(f"expected a positive whole number, got {text!r}")
            return int(text)
        name = normalise_name(text)
        if not name or not all(c.isalnum() or c in "-." for c in name):
            raise ValueError(f"expected letters, digits, '-' or '.', got {text!r}")
        return name
    except ValueError as exc:
        raise ValueError(f"--gpu-spec {key}={text}: {exc}; {key} is {SPEC_KEYS[key]}") from None


def gpu_from_spec(text: str, name: str = "custom", *, base: GpuSpec | None = None,
                  catalog: Catalog | None = None) -> GpuSpec:
    """The GPU a ``--gpu-spec`` describes: ``base``'s fields with the given ones replaced, or (no base) a
    GPU outside the catalog, which needs memory, one of bf16/fp16/fp32, hbm, link and gpus-per-node.

    Every given number's source is "user-specified (--gpu-spec)". A given ``link`` (``inter-link``) is
    a new ``LinkSpec`` the GPU brings (``own_links``) with the catalog's order-of-magnitude latency.
    The driver name is the GPU's own name, so no measured profile is taken as this GPU's: the
    memory and time models transfer fits from measured GPUs and say which. The name must not be a
    catalog name (a plan would claim that GPU's measurements). Bad input → ``ValueError``.
    """
    catalog = catalog or load_catalog()
    given = {key: _spec_value(key, value) for key, value in spec_fields(text).items()}
    peaks = {dtype: given[dtype] for dtype in ("bf16", "fp16", "fp32") if dtype in given}
    if base is None:
        missing = [k for k in ("memory", "hbm", "link", "gpus-per-node") if k not in given] + \
            ([] if peaks else ["bf16 (or fp16, fp32)"])
        if missing:
            raise ValueError(f"--gpu-spec lacks {', '.join(missing)}: a GPU outside the catalog needs memory, "
                             f"bf16/fp16/fp32, hbm, link and gpus-per-node (or give --gpu NAME to start from)")
    label = ",".join(f"{k}={v}" for k, v in spec_fields(text).items() if k != "name")
    gpu_name = given.get("name") or (f"{base.name}({label})" if base is not None else normalise_name(name))
    _refuse_catalog_name(gpu_name, catalog)
    sources = dict(base.sources) if base is not None else {}
    fields = _spec_base_fields(base, catalog, sources)
    fields["peak_flops_per_s"] = {**fields["peak_flops_per_s"], **peaks}
    own_links = []
    for key, scope in (("link", "intra_node_link"), ("inter-link", "inter_node_link")):
        if key in given:
            link = LinkSpec(name=f"{gpu_name}-{scope.split('_')[0]}", bandwidth_bytes_per_s=given[key],
                            latency_s=SPEC_LINK_LATENCY_S,
                            sources={"bandwidth_bytes_per_s": SPEC_SOURCE,
                                     "latency_s": "ringplan default: the catalog's order-of-magnitude hop latency"})
            own_links.append(link)
            fields[scope] = link.name
            sources[scope] = SPEC_SOURCE
    for key, field_name in (("memory", "usable_memory_bytes"), ("hbm", "hbm_bandwidth_bytes_per_s"),
                            ("gpus-per-node", "gpus_per_node")):
        if key in given:
            fields[field_name] = given[key]
            sources[field_name] = SPEC_SOURCE
    if peaks:
        sources["peak_flops_per_s"] = f"{SPEC_SOURCE}: {', '.join(sorted(peaks))}" + (
            f"; other dtypes from {base.name}" if base is not None and set(fields["peak_flops_per_s"]) - set(peaks)
            else "")
    if "memory" in given:
        fields.update(physical_memory_bytes=None, usable_memory_measured=False)
        sources.pop("physical_memory_bytes", None)
    return GpuSpec(name=gpu_name, driver_name=gpu_name, sources=sources, own_links=tuple(own_links), **fields)


def _spec_base_fields(base: GpuSpec | None, catalog: Catalog, sources: dict[str, str]) -> dict[str, Any]:
    """The fields a spec starts from: ``base``'s, or the catalog defaults for a GPU outside it."""
    if base is not None:
        return {"usable_memory_bytes": base.usable_memory_bytes, "peak_flops_per_s": dict(base.peak_flops_per_s),
                "hbm_bandwidth_bytes_per_s": base.hbm_bandwidth_bytes_per_s, "gpus_per_node": base.gpus_per_node,
                "intra_node_link": base.intra_node_link, "inter_node_link": base.inter_node_link,
                "usable_memory_measured": base.usable_memory_measured,
                "physical_memory_bytes": base.physical_memory_bytes,
                "runtime_overhead_bytes": base.runtime_overhead_bytes}
    overhead = int(catalog.defaults.get("runtime_overhead_bytes", 0))
    if "runtime_overhead_bytes" in catalog.defaults.get("sources", {}):
        sources["runtime_overhead_bytes"] = catalog.defaults["sources"]["runtime_overhead_bytes"]
    sources["inter_node_link"] = (f"ringplan default for a GPU outside the catalog: {SPEC_DEFAULT_INTER_LINK} "
                                  f"(one 400 Gb/s NIC per GPU); give inter-link= to change it")
    return {"peak_flops_per_s": {}, "inter_node_link": SPEC_DEFAULT_INTER_LINK, "runtime_overhead_bytes": overhead}


def _refuse_catalog_name(name: str, catalog: Catalog) -> None:
    try:
        known = catalog.gpu(name)
    except ValueError:
        return
    raise ValueError(f"--gpu-spec name {name!r} is the catalog's {known.name}: name the GPU outside the catalog "
                     f"differently (answers would claim {known.name}'s measurements)")


def user_source(path: str | Path, given: str | None) -> str:
    """The source of a number a user catalog file brings: "user-specified (<file>)", with the file's own note."""
    return f"user-specified ({path})" + (f": {given}" if given else "")


@functools.lru_cache(maxsize=8)
def catalog_with(path: str | Path, bundled: str | Path | None = None) -> Catalog:
    """The bundled catalog (``bundled``: its path, default ``profiles/gpus.json``) with a user file of the
    same schema merged over it: its links and GPUs replace those of the same name and add the rest,
    its ambiguous aliases and defaults join. Validated by the same loader; every number of the user's
    entries has the source "user-specified (<file>)" (the file's own source note kept after it), and
    each user GPU brings the user links it names (``own_links``). Bad data → ``ValueError`` naming the
    file and the entry or field."""
    from ringplan.jsonfile import read_json_file

    base_path = Path(bundled) if bundled is not None else default_catalog_path()
    user, data = read_json_file(Path(path), "GPU catalog"), read_json_file(base_path, "GPU catalog")
    if not isinstance(user, dict) or user.get("schema") != CATALOG_SCHEMA:
        raise ValueError(f"{path}: schema must be {CATALOG_SCHEMA!r}")
    unknown = sorted(set(user) - {"schema", "notes", "defaults", "ambiguous_aliases", "links", "gpus"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level field(s) {', '.join(unknown)}")
    try:
        user_links = [_user_entry(e, path, "links") for e in user.get("links", [])]
        user_gpus = [_user_entry(e, path, "gpus") for e in user.get("gpus", [])]
        merged = dict(data, defaults={**data.get("defaults", {}), **user.get("defaults", {})},
                      ambiguous_aliases={**data.get("ambiguous_aliases", {}), **user.get("ambiguous_aliases", {})},
                      links=_replaced(data["links"], user_links), gpus=_replaced(data["gpus"], user_gpus))
        catalog = _catalog_from_json(merged, str(path))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: malformed catalog entry ({exc})") from None
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    new_links = {normalise_name(e["name"]) for e in user_links}
    user_names = {normalise_name(e["name"]) for e in user_gpus}
    gpus = tuple(replace(g, own_links=tuple(catalog.link(n) for n in {g.intra_node_link, g.inter_node_link}
                                            if n in new_links)) if g.name in user_names else g for g in catalog.gpus)
    return replace(catalog, gpus=gpus)


def _user_entry(entry: Any, path: str | Path, section: str) -> dict[str, Any]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ValueError(f"{path}: every entry of {section!r} must be an object with a 'name', got {entry!r:.80}")
    notes = entry.get("sources", {})
    if not isinstance(notes, dict):
        raise ValueError(f"{path}: {section} {entry['name']!r}: sources must be an object")
    fields = [k for k in entry if k not in ("name", "aliases", "sources", "driver_name")]
    return {**entry, "name": normalise_name(entry["name"]),
            "sources": {k: user_source(path, notes.get(k)) for k in fields}}


def _replaced(entries: list[dict[str, Any]], extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = {e["name"] for e in extra}
    return [e for e in entries if normalise_name(e["name"]) not in names] + extra
