"""Step time of one attention layer on a ring: the one-call API (``step_time_prediction``).

It builds the passes the runtime runs (``ring_passes``: QKV projections (optional), one ring pass
per attention branch — dense: one; dilated: one per (segment, dilation) pair, ringing only inside
the segment's group of ranks, or local when the segment fits a rank's chunk — the backward passes
in training, the output projection, and the copies, merges and casts between them), costs every
(rank, step) with the compute model and every hop with the link models (``timing_data``), and
plays them in ``simulate.simulate_step`` after the host's call overhead (the time before the first
kernel runs).

The prediction's ``provenance`` names the weakest source used (``provenance.overall_provenance``);
``provenance_details`` lists each. The overheads are fitted by ``overhead_fits``; when a ring
step's compute hides its transfer is ``overlap``'s question.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ringplan.time import links as cm
from ringplan.time import ring_passes as rp
from ringplan.time.provenance import overall_provenance
from ringplan.time.simulate import RingPass, SimulationResult, simulate_step
from ringplan.time.timing_data import compute_model_for, load_timing_data, resolve_gpu, resolve_link
from ringplan.workload import AttentionShape, RingLayout, Workload, tokens_per_rank

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


def kv_message_bytes(shape: AttentionShape, tokens: int) -> int:
    """Bytes of one ring hop's K/V block of ``tokens`` tokens: 2·B·n·H_kv·D·e (K and V, e bytes a value).

    Ignores the LSE-sized tensors and the dK/dV of the backward (``ring_passes`` costs those)."""
    return 2 * shape.batch * tokens * shape.n_kv_heads * shape.head_dim * shape.dtype_bytes


def call_overhead_or_default(call_overhead_s: float | None) -> float:
    """The host call overhead in seconds: ``DEFAULT_CALL_OVERHEAD_S`` when None; negative or not finite: ValueError."""
    overhead = DEFAULT_CALL_OVERHEAD_S if call_overhead_s is None else float(call_overhead_s)
    if not np.isfinite(overhead) or overhead < 0:
        raise ValueError(f"call overhead must be >= 0 s, got {call_overhead_s!r}")
    return overhead


def exchange_interference_pair(exchange_interference: float | tuple[float, float] | None) -> tuple[float, float]:
    """κ of the (forward, backward) block kernels from one κ, a pair, or None (``DEFAULT_EXCHANGE_INTERFERENCE``).

    Each κ must lie in [0, 1] (0: the exchange is free, 1: its whole duration adds); else ValueError."""
    kappa = exchange_interference if exchange_interference is not None else DEFAULT_EXCHANGE_INTERFERENCE
    kappa = (float(kappa),) * 2 if np.ndim(kappa) == 0 else tuple(float(k) for k in kappa)
    if len(kappa) != 2 or not all(0.0 <= k <= 1.0 for k in kappa):
        raise ValueError(f"exchange interference must be one or two (forward, backward) values in [0, 1], "
                         f"got {exchange_interference!r}")
    return kappa


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


def layer_costing(workload: Workload, layout: RingLayout, spec, *, nodes: int | None = None,
                  gpus_per_node: int | None = None, intra_link: object = None, inter_link: object = None,
                  timing_dir: str | Path | None = None, step_overhead_s: float | None = None,
                  exchange_interference: float | tuple[float, float] | None = None) -> rp.Costing:
    """What costing one layer step of ``workload`` on GPUs ``spec`` needs: placement on nodes, links,
    compute model, backend (``auto``: the fastest) and κ. Arguments as ``step_time_prediction``."""
    timing = load_timing_data(timing_dir)
    placement = cm.node_layout(layout.ring_size, gpus_per_node or spec.gpus_per_node, nodes)
    intra, intra_label = resolve_link(spec, "intra_node", intra_link, timing)
    inter, inter_label = (resolve_link(spec, "inter_node", inter_link, timing) if placement.nodes > 1 else (None, ""))
    compute = compute_model_for(spec, workload.shape.dtype, timing, step_overhead_s)
    backend = compute.fastest_backend(workload.shape.head_dim, workload.shape.dtype) \
        if layout.backend == "auto" else layout.backend
    return rp.Costing(workload=workload, ring_size=layout.ring_size, backend=backend, compute=compute, nodes=placement,
                      intra=intra, inter=inter, link_labels={"intra_node": intra_label, "inter_node": inter_label},
                      exchange_interference=exchange_interference_pair(exchange_interference))


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
    n = tokens_per_rank(workload, layout)
    c = layer_costing(workload, layout, spec, nodes=nodes, gpus_per_node=gpus_per_node, intra_link=intra_link,
                      inter_link=inter_link, timing_dir=timing_dir, step_overhead_s=step_overhead_s,
                      exchange_interference=exchange_interference)
    overhead = call_overhead_or_default(call_overhead_s)
    result = simulate_step(layer_passes(c, layout), start_s=overhead)
    return StepTimePrediction(
        step_time_s=result.step_time_s, compute_s=result.compute_s, exposed_comm_s=result.exposed_comm_s,
        ideal_s=result.ideal_s, imbalance_s=result.imbalance_s, efficiency=result.efficiency, backend=c.backend,
        kv_message_bytes=kv_message_bytes(workload.shape, n), nodes=c.nodes.nodes,
        provenance=overall_provenance(c.notes), provenance_details=tuple(sorted(c.notes.items())),
        call_overhead_s=overhead, simulation=result if keep_simulation else None)


def capacity_step_time(workload: Workload, layout: RingLayout, gpu: object) -> tuple[float, float] | None:
    """Hook for ``ringplan.capacity.attention``: (step_time_s, exposed_comm_s) of one plan, or None when the
    time model cannot say (no kernel data for the dtype/backend, a ring that does not fill nodes)."""
    try:
        prediction = step_time_prediction(workload, layout, gpu)
    except ValueError:
        return None
    return prediction.step_time_s, prediction.exposed_comm_s
