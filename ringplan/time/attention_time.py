"""Step time of one attention layer on a ring: the one-call API (``step_time_prediction``).

It builds the passes the runtime runs (``ring_passes``: QKV projections (optional), one ring pass
per attention branch — dense: one; dilated: one per (segment, dilation) pair, ringing only inside
the segment's group of ranks, or local when the segment fits a rank's chunk — the backward passes
in training, the output projection, and the copies, merges and casts between them), costs every
(rank, step) with the compute model and every hop with the link models, and plays them in
``simulate.simulate_step`` after the host's call overhead (the time before the first kernel runs).

Where the numbers come from, best first: a measured profile of this GPU type
(``profiles/measured/timing``: ``ringplan.p2p/1`` and ``ringplan.kernels/1``), a profile of another
GPU scaled by the peak-FLOP/s ratio, ANCHORS.md measurements (H100), the catalog. The
prediction's ``provenance`` names the weakest source used; ``provenance_details`` lists each.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ringplan.time import links as cm
from ringplan.time import kernels as cp
from ringplan.time import ring_passes as rp
from ringplan.time.simulate import RingPass, SimulationResult, simulate_step
from ringplan.profiles.timing import KernelProfile, P2pProfile, timing_profiles_in
from ringplan.profiles.timing import timing_dir as default_timing_dir
from ringplan.workload import RingLayout, Workload, tokens_per_rank

# Per-exchange floor of batch_isend_irecv through torch.distributed on 2xH100 NVLink (ANCHORS.md):
# software, not the wire. Used as the latency of catalog links, whose latency_s is the hardware's.
TORCH_P2P_FLOOR_S = 0.14e-3
ANCHOR_GPU_DRIVER_NAME = "nvidia h100 80gb hbm3"
GRAD_BYTES_PER_ELEMENT = 4  # dK/dV travel as fp32 accumulators (ring-flash-attention's backward)
# Host time from the call to the first kernel running (Python checks, autograd, dispatch): the GPU
# is idle until then, so it adds to every step; later host work is queued while kernels run.
# FITTED on half of the H200 validation rows (the even-indexed rows of each series, by tokens;
# benchmarks/time_accuracy.py) and reported on the other half; no separate measurement exists.
DEFAULT_CALL_OVERHEAD_S = 150e-6
# κ: the fraction of a concurrent exchange's duration added to the block kernel it overlaps
# (ring_passes.with_interference). FITTED with the call overhead on the same half of the H200
# validation rows; ringplan has no direct measurement (a kernel timed with and without an exchange).
DEFAULT_EXCHANGE_INTERFERENCE = (1.0, 0.34)  # (forward, backward)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimingData:
    """Fitted timing data of ``profiles/measured/timing``: link models and kernel fits per GPU driver name."""

    links: dict[tuple[str, str], tuple[cm.LinkModel, cm.AffineFit]] = field(default_factory=dict)
    kernels: dict[str, cp.MeasuredKernels] = field(default_factory=dict)


def _latest(profiles: Sequence[P2pProfile | KernelProfile], key) -> dict:
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
        measured[name] = cp.MeasuredKernels(gpu_driver_name=prof.gpu_driver_name, peak_flops_per_s=peak or 1.0,
                                            fits=cp.fit_kernel_curves(prof.rows),
                                            merge_fit=cp.fit_merge_curve(prof.rows))
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
    spec = _catalog().link(name)
    link = cm.LinkModel(name=spec.name, latency_s=max(spec.latency_s, TORCH_P2P_FLOOR_S),
                        bandwidth_bytes_per_s=spec.bandwidth_bytes_per_s, source="catalog")
    return link, f"default: catalog {spec.name} with the 0.14 ms torch p2p floor"


def compute_model_for(gpu, dtype: str, timing: TimingData, step_overhead_s: float | None = None) -> cp.ComputeModel:
    """The GPU's compute model: its own kernel fits, other GPUs' as transferable, catalog peaks."""
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


@dataclass(frozen=True, slots=True, kw_only=True)
class StepTimePrediction:
    """Predicted time of one layer step (forward, or forward+backward in training) on every rank.

    ``call_overhead_s`` is the host time before the first kernel; ``compute_s`` the busiest rank's
    compute, ``exposed_comm_s`` = step − call overhead − compute (waiting on transfers or
    neighbours), ``ideal_s`` the mean compute (balanced, free communication, no overhead),
    ``efficiency`` = ideal / step. ``provenance`` is the weakest source used (see module doc).
    """

    step_time_s: float
    compute_s: float
    exposed_comm_s: float
    ideal_s: float
    imbalance_s: float
    efficiency: float
    backend: str
    kv_message_bytes: int
    nodes: int
    provenance: str
    provenance_details: tuple[tuple[str, str], ...]
    call_overhead_s: float = 0.0
    simulation: SimulationResult | None = field(default=None, repr=False, compare=False)


# Components too small to set a prediction's headline provenance (still listed in the details):
# the accumulator copies/casts/adds are a few % of a step.
MINOR_COMPONENTS = ("copies / casts / adds",)


def _overall_provenance(notes: dict[str, str]) -> str:
    """The weakest source among the components that carry the step (kernels, links, merge, GEMMs)."""
    worst = max((v for k, v in notes.items() if k not in MINOR_COMPONENTS), key=rp.provenance_rank,
                default="measured")
    rank = rp.provenance_rank(worst)
    if rank == 3:
        return "default (unmeasured): ANCHORS.md / catalog"
    if rank == 2:
        inner = worst[worst.find("fitted on"):].rstrip(")")
        return inner if "fitted on" in worst else "measured on this GPU at another shape (transferred)"
    if rank == 1:
        return "extrapolated outside measured range"
    return "measured on this GPU"


def layer_passes(c: rp.Costing, layout: RingLayout) -> list[RingPass]:
    """Every pass of one layer step in the runtime's order (forward; then backward in training)."""
    workload = c.workload
    n = tokens_per_rank(workload, layout)

    def attention(pass_name: str) -> list[RingPass]:
        if not workload.pattern.dilated:
            return rp.dense_passes(c, n, layout.layout, pass_name)
        return rp.dilated_forward_passes(c, n) if pass_name == "forward" else rp.dilated_backward_passes(c, n)

    passes = [rp.projection_pass(c, n, "qkv")] if workload.projections else []
    passes += attention("forward")
    passes += [rp.projection_pass(c, n, "output")] if workload.projections else []
    if workload.training:
        passes += [rp.projection_pass(c, n, "output", 2.0)] if workload.projections else []
        passes += attention("backward")
        passes += [rp.projection_pass(c, n, "qkv", 2.0)] if workload.projections else []
    return passes


def step_time_prediction(workload: Workload, layout: RingLayout, gpu: object, *, nodes: int | None = None,
                         gpus_per_node: int | None = None, intra_link: object = None, inter_link: object = None,
                         timing_dir: str | Path | None = None, step_overhead_s: float | None = None,
                         call_overhead_s: float | None = None,
                         exchange_interference: float | tuple[float, float] | None = None,
                         keep_simulation: bool = False) -> StepTimePrediction:
    """Predict one layer step of ``workload`` on ``layout.ring_size`` GPUs of type ``gpu``.

    ``gpu``: a catalog name or ``GpuSpec``. ``nodes`` / ``gpus_per_node`` place the ring on nodes
    (default: the catalog's GPUs per node, as few nodes as fit); ``intra_link`` / ``inter_link``
    override the links (LinkModel, LinkSpec or catalog link name); ``step_overhead_s`` the fixed
    GPU cost per ring step; ``call_overhead_s`` the host time before the first kernel (default
    ``DEFAULT_CALL_OVERHEAD_S``); ``exchange_interference`` κ in [0, 1] of the (forward, backward)
    block kernels, or one κ for both (default ``DEFAULT_EXCHANGE_INTERFERENCE``). Bad input
    (layout that does not split, unknown GPU/link, a ring that does not fit the nodes, dtype
    without data) raises ValueError.
    """
    spec = resolve_gpu(gpu)
    timing = load_timing_data(timing_dir)
    n = tokens_per_rank(workload, layout)
    placement = cm.node_layout(layout.ring_size, gpus_per_node or spec.gpus_per_node, nodes)
    intra, intra_label = resolve_link(spec, "intra_node", intra_link, timing)
    inter, inter_label = (resolve_link(spec, "inter_node", inter_link, timing) if placement.nodes > 1 else (None, ""))
    compute = compute_model_for(spec, workload.shape.dtype, timing, step_overhead_s)
    backend = compute.fastest_backend(workload.shape.head_dim, workload.shape.dtype) \
        if layout.backend == "auto" else layout.backend
    overhead = DEFAULT_CALL_OVERHEAD_S if call_overhead_s is None else float(call_overhead_s)
    if not np.isfinite(overhead) or overhead < 0:
        raise ValueError(f"call overhead must be >= 0 s, got {call_overhead_s!r}")
    kappa = exchange_interference if exchange_interference is not None else DEFAULT_EXCHANGE_INTERFERENCE
    kappa = (float(kappa),) * 2 if np.ndim(kappa) == 0 else tuple(float(k) for k in kappa)
    if len(kappa) != 2 or not all(0.0 <= k <= 1.0 for k in kappa):
        raise ValueError(f"exchange interference must be one or two (forward, backward) values in [0, 1], "
                         f"got {exchange_interference!r}")
    c = rp.Costing(workload=workload, ring_size=layout.ring_size, backend=backend, compute=compute, nodes=placement,
                   intra=intra, inter=inter, link_labels={"intra_node": intra_label, "inter_node": inter_label},
                   exchange_interference=kappa)
    result = simulate_step(layer_passes(c, layout), start_s=overhead)
    shape = workload.shape
    return StepTimePrediction(
        step_time_s=result.step_time_s, compute_s=result.compute_s, exposed_comm_s=result.exposed_comm_s,
        ideal_s=result.ideal_s, imbalance_s=result.imbalance_s, efficiency=result.efficiency, backend=backend,
        kv_message_bytes=2 * shape.batch * n * shape.n_kv_heads * shape.head_dim * shape.dtype_bytes,
        nodes=placement.nodes, provenance=_overall_provenance(c.notes),
        provenance_details=tuple(sorted(c.notes.items())), call_overhead_s=overhead,
        simulation=result if keep_simulation else None)


def capacity_step_time(workload: Workload, layout: RingLayout, gpu: object) -> tuple[float, float] | None:
    """Hook for ``ringplan.capacity.attention``: (step_time_s, exposed_comm_s) of one plan, or None when the
    time model cannot say (no kernel data for the dtype/backend, a ring that does not fill nodes)."""
    try:
        prediction = step_time_prediction(workload, layout, gpu)
    except ValueError:
        return None
    return prediction.step_time_s, prediction.exposed_comm_s


def _linear_overhead_fit(rows: Sequence[tuple[Workload, RingLayout, float]], gpu: object, name: str,
                         **kwargs: object) -> tuple[float, tuple[float, ...]]:
    """Least-squares ``name`` (≥ 0; a keyword of ``step_time_prediction``) minimising relative error.

    The prediction is close to linear in the overhead, so its slope is taken from two predictions
    (0 and 1 ms) per row. Returns the overhead and the relative errors it leaves.
    """
    if not rows:
        raise ValueError(f"need at least one measured step time to fit the {name.replace('_', ' ')}")
    base, slope, measured = [], [], []
    for workload, layout, seconds in rows:
        if not seconds > 0:
            raise ValueError(f"measured step time must be positive, got {seconds!r}")
        t0 = step_time_prediction(workload, layout, gpu, **{name: 0.0}, **kwargs).step_time_s
        t1 = step_time_prediction(workload, layout, gpu, **{name: 1e-3}, **kwargs).step_time_s
        base.append(t0 / seconds)
        slope.append((t1 - t0) / 1e-3 / seconds)
        measured.append(seconds)
    b, d = np.array(base), np.array(slope)
    overhead = float(max(0.0, np.dot(d, 1.0 - b) / np.dot(d, d))) if np.dot(d, d) > 0 else 0.0
    errors = tuple(step_time_prediction(w, l, gpu, **{name: overhead}, **kwargs).step_time_s / m - 1.0
                   for (w, l, _), m in zip(rows, measured))
    return overhead, errors


def fit_step_overhead_s(rows: Sequence[tuple[Workload, RingLayout, float]], gpu: object,
                        **kwargs: object) -> tuple[float, tuple[float, ...]]:
    """Least-squares fixed GPU cost per ring step (≥ 0) from measured step times, and the relative errors.

    rows: (workload, layout, measured step seconds).
    """
    return _linear_overhead_fit(rows, gpu, "step_overhead_s", **kwargs)


def fit_call_overhead_s(rows: Sequence[tuple[Workload, RingLayout, float]], gpu: object,
                        **kwargs: object) -> tuple[float, tuple[float, ...]]:
    """Least-squares host call overhead (≥ 0) from measured step times, and the relative errors.

    rows: (workload, layout, measured step seconds). Fit it on rows you do not report on.
    """
    return _linear_overhead_fit(rows, gpu, "call_overhead_s", **kwargs)


@dataclass(frozen=True, slots=True, kw_only=True)
class OverlapThreshold:
    """Smallest tokens per rank n for which one ring step's compute hides its transfer.

    ``paper_tokens`` is Ring Attention's F/B (Liu et al. 2023: bf16, MHA, full blocks, no
    latency) for comparison; ``min_tokens_per_rank`` is this runtime's exact condition. Both leave
    out the kernel slowdown during an exchange (κ, ``step_time_prediction``): above the threshold
    the link is never the bottleneck, but a step still pays κ × the transfer.
    """

    scope: str
    pass_name: str
    backend: str
    block: str
    effective_flops_per_s: float
    bandwidth_bytes_per_s: float
    latency_s: float
    paper_tokens: float
    min_tokens_per_rank: int
    provenance: str


def hiding_threshold_tokens(quadratic_s: float, linear_s: float, constant_s: float) -> float:
    """Largest root of a·n² − b·n − d = 0: per-step compute a·n² (+ fixed) ≥ transfer b·n + α.

    a = 4·B·H·D·φ/F (φ = 1 full block, ½ zigzag half block), b = 2·B·H_kv·D·e/β − merge
    bytes-per-token/merge rate, d = α − kernel overhead − fixed step overhead. Derived from
    T_compute(n) = t0 + o + a·n² ≥ T_transfer(n) = α + b·n. Returns 0 when every n hides.
    """
    if quadratic_s <= 0:
        raise ValueError(f"compute per token² must be positive, got {quadratic_s!r}")
    disc = linear_s**2 + 4 * quadratic_s * constant_s
    if disc < 0:
        return 0.0
    return max(0.0, (linear_s + np.sqrt(disc)) / (2 * quadratic_s))


def _first_hiding_n(gap_s, n_max: int = 2**27) -> int:
    """Smallest even n ≥ 2 with gap(n') ≥ 0 for every grid n' ≥ n (gap = compute − transfer)."""
    grid = np.unique(np.geomspace(2, n_max, 1024).astype(np.int64) // 2 * 2)
    ok = np.array([gap_s(int(n)) >= 0 for n in grid])
    if not ok[-1]:
        raise ValueError(f"communication is not hidden even at {n_max:,} tokens per rank")
    failing = np.nonzero(~ok)[0]
    if not len(failing):
        return 2
    lo, hi = int(grid[failing[-1]]), int(grid[failing[-1] + 1])
    while hi - lo > 2:
        mid = (lo + hi) // 4 * 2
        lo, hi = (mid, hi) if gap_s(mid) < 0 else (lo, mid)
    return hi


def overlap_threshold(shape, gpu: object, *, causal: bool = False, layout: str = "contiguous",
                      backend: str = "auto", scope: str = "intra_node", pass_name: str = "forward",
                      link: object = None, timing_dir: str | Path | None = None,
                      step_overhead_s: float | None = None) -> OverlapThreshold:
    """Minimum tokens per rank for which ``scope``'s link hides the ring transfer of one step.

    Compute side: the block the busiest rank computes every step — full n×n (non-causal, and
    causal contiguous whose last rank computes full blocks), n×n/2 for causal zigzag — plus its
    merge (forward) or gradient adds (backward) and the fixed step overhead. Transfer side: K/V of
    n tokens (+ the fp32 dK/dV sharing the link in a backward middle step).
    """
    spec = resolve_gpu(gpu)
    timing = load_timing_data(timing_dir)
    link_model, link_label = resolve_link(spec, scope, link, timing)
    compute = compute_model_for(spec, shape.dtype, timing, step_overhead_s)
    chosen = compute.fastest_backend(shape.head_dim, shape.dtype) if backend == "auto" else backend
    nodes = cm.node_layout(2, 2 if scope == "intra_node" else 1)
    c = rp.Costing(workload=Workload(seq_len_tokens=2, shape=shape), ring_size=2, backend=chosen, compute=compute,
                   nodes=nodes, intra=link_model, inter=link_model,
                   link_labels={"intra_node": link_label, "inter_node": link_label})
    half = causal and layout == "zigzag"
    grad = GRAD_BYTES_PER_ELEMENT if pass_name == "backward" else 0
    bytes_per_token = 2 * shape.batch * shape.n_kv_heads * shape.head_dim * (shape.dtype_bytes + grad)

    def gap_s(n: int) -> float:
        kv = n // 2 if half else n
        if pass_name == "forward":
            local = rp.merge_s(c, n, shape.dtype_bytes)
        else:
            values = shape.batch * shape.head_dim * (n * shape.n_heads + 2 * kv * shape.n_kv_heads)
            local = rp.elementwise_s(c, cp.accumulation_bytes(values, accumulator_bytes=4,
                                                              addend_bytes=shape.dtype_bytes))
        compute_s = rp.block_time_s(c, pass_name, False, n, kv) + local + compute.step_overhead_s
        return compute_s - float(link_model.transfer_time_s(bytes_per_token * n))

    minimum = _first_hiding_n(gap_s)
    model = compute.kernel(cp.KernelKey(backend=chosen, head_dim=shape.head_dim, causal=False,
                                        pass_name=pass_name, dtype=shape.dtype))
    flops_per_s = model.effective_flops_per_s
    c.note("link", link_label)
    return OverlapThreshold(scope=scope, pass_name=pass_name, backend=chosen, block="n x n/2" if half else "n x n",
                            effective_flops_per_s=flops_per_s, bandwidth_bytes_per_s=link_model.bandwidth_bytes_per_s,
                            latency_s=link_model.latency_s, paper_tokens=flops_per_s / link_model.bandwidth_bytes_per_s,
                            min_tokens_per_rank=minimum, provenance=_overall_provenance(c.notes))
