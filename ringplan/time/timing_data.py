"""Measured timing data, fitted, and the GPU, links and compute model a prediction runs on.

Where the numbers come from, best first: a measured profile of this GPU type
(``profiles/measured/timing``: ``ringplan.p2p/1`` and ``ringplan.kernels/1``, read by
``ringplan.profiles.timing``), a profile of another GPU scaled by the peak-FLOP/s ratio,
ANCHORS.md measurements (H100), the catalog. Each resolver returns its provenance label
(``ringplan.time.provenance``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ringplan.profiles.timing import KernelProfile, P2pProfile, timing_profiles_in
from ringplan.paths import timing_dir as default_timing_dir
from ringplan.time import kernels as cp
from ringplan.time import links as cm

# Per-exchange floor of batch_isend_irecv through torch.distributed on 2xH100 NVLink (ANCHORS.md):
# software, not the wire. Used as the latency of catalog links, whose latency_s is the hardware's.
TORCH_P2P_FLOOR_S = 0.14e-3
#: The driver name of the GPU the ANCHORS.md link points were measured on.
ANCHOR_GPU_DRIVER_NAME = "nvidia h100 80gb hbm3"


@dataclass(frozen=True, slots=True, kw_only=True)
class TimingData:
    """Fitted timing data of ``profiles/measured/timing``: link models and kernel fits per GPU driver name."""

    links: dict[tuple[str, str], tuple[cm.LinkModel, cm.AffineFit]] = field(default_factory=dict)
    kernels: dict[str, cp.MeasuredKernels] = field(default_factory=dict)


def _latest(profiles: Sequence[P2pProfile | KernelProfile], key: Callable) -> dict:
    """``key(profile)`` → the profile with the latest provenance date."""
    chosen: dict = {}
    for profile in sorted(profiles, key=lambda p: str(p.provenance.get("date", ""))):
        chosen[key(profile)] = profile  # later dates win
    return chosen


def load_timing_data(directory: str | Path | None = None) -> TimingData:
    """Read and fit every timing profile under ``directory`` (default ``profiles/measured/timing``), cached per path.

    One profile per (GPU, link scope) and per GPU for kernels: the most recent by provenance date.
    Peak FLOP/s of a kernel profile's GPU comes from the catalog (by driver name); unknown GPUs are
    kept with their own data only.
    """
    return _load_timing_data(str(Path(directory).resolve() if directory is not None else default_timing_dir()))


@functools.lru_cache(maxsize=8)
def _load_timing_data(directory: str) -> TimingData:
    p2p, kernels = timing_profiles_in(directory)
    links = {}
    for (name, scope), prof in _latest(p2p, lambda p: (p.gpu_driver_name.lower(), p.scope)).items():
        fit = cm.fit_time_curve([r.message_bytes for r in prof.rows], [r.seconds for r in prof.rows])
        link = cm.link_model_from_fit(f"{scope} measured", fit, source=prof.path)
        links[(name, scope)] = (link, fit)
    measured = {}
    for name, prof in _latest(kernels, lambda p: p.gpu_driver_name.lower()).items():
        spec = _catalog().gpu_by_driver_name(prof.gpu_driver_name)
        peak = spec.peak_flops_per_s.get("bf16", 0.0) if spec is not None else 0.0
        # every kernel sweep of this GPU together (a long-block sweep complements the main one)
        rows = tuple(r for p in kernels if p.gpu_driver_name.lower() == name for r in p.rows)
        measured[name] = cp.MeasuredKernels(gpu_driver_name=prof.gpu_driver_name, peak_flops_per_s=peak or 1.0,
                                            fits=cp.fit_kernel_curves(rows),
                                            merge_fit=cp.fit_merge_curve(rows), rates=cp.fit_kernel_rates(rows),
                                            peaks_flops_per_s=dict(spec.peak_flops_per_s) if spec is not None else {})
    return TimingData(links=links, kernels=measured)


def _catalog():
    from ringplan.hardware import load_catalog

    return load_catalog()


def resolve_gpu(gpu: object):
    """A ``GpuSpec`` from a spec or a catalog name (unknown names: ValueError with close names)."""
    return _catalog().gpu(gpu) if isinstance(gpu, str) else gpu


def resolve_link(gpu, scope: str, override: object, timing: TimingData) -> tuple[cm.LinkModel, str]:
    """The link model for ``scope`` (intra_node | inter_node) and its provenance label.

    ``override``: a LinkModel, a LinkSpec-like object, or a catalog link name. Otherwise a measured
    sweep of this GPU, the ANCHORS.md 2xH100 NVLink points (intra-node H100 SXM), or the catalog
    link of the GPU with the 0.14 ms torch p2p floor as latency.
    """
    if isinstance(override, cm.LinkModel):
        return override, f"override: {override.name}"
    if override is not None and not isinstance(override, str):
        return cm.link_model_from_spec(override), f"override: {override.name}"
    if override is None and (gpu.driver_name.lower(), scope) in timing.links:
        return timing.links[(gpu.driver_name.lower(), scope)][0], "measured on this GPU"
    name = override or (gpu.intra_node_link if scope == "intra_node" else gpu.inter_node_link)
    if override is None and scope == "intra_node" and gpu.driver_name.lower() == ANCHOR_GPU_DRIVER_NAME:
        return cm.h100_nvlink_anchor_link(), "default: ANCHORS.md 2xH100 NVLink exchange"
    from ringplan.hardware import gpu_link

    spec = gpu_link(gpu, name, _catalog())  # a link the GPU brings (--gpu-spec, --catalog), else the catalog's
    link = cm.LinkModel(name=spec.name, latency_s=max(spec.latency_s, TORCH_P2P_FLOOR_S),
                        bandwidth_bytes_per_s=spec.bandwidth_bytes_per_s, source="catalog")
    where = "user-specified link" if spec in getattr(gpu, "own_links", ()) else "catalog"
    return link, f"default: {where} {spec.name} with the 0.14 ms torch p2p floor"


def compute_model_for(gpu, dtype: str, timing: TimingData, step_overhead_s: float | None = None) -> cp.ComputeModel:
    """The GPU's compute model: its own kernel fits, other GPUs' as transferable, catalog peaks.

    ``step_overhead_s``: the fixed GPU cost per ring step (default ``kernels.DEFAULT_STEP_OVERHEAD_S``).
    fp16 without a catalog peak of its own uses the bf16 peak; no peak for ``dtype``: ValueError.
    """
    peak = gpu.peak_flops_per_s.get(dtype) or (gpu.peak_flops_per_s.get("bf16") if dtype == "fp16" else None)
    if not peak:
        raise ValueError(f"{gpu.name}: no peak FLOP/s for {dtype} in the catalog (has {sorted(gpu.peak_flops_per_s)})")
    own = timing.kernels.get(gpu.driver_name.lower())
    others = tuple(m for name, m in timing.kernels.items()
                   if name != gpu.driver_name.lower() and m.peak_flops_per_s > 1)
    return cp.ComputeModel(gpu_name=gpu.name, peak_flops_per_s=peak,
                           hbm_bandwidth_bytes_per_s=gpu.hbm_bandwidth_bytes_per_s,
                           this_gpu=own, other_gpus=others,
                           step_overhead_s=cp.DEFAULT_STEP_OVERHEAD_S if step_overhead_s is None else step_overhead_s)
