"""When one ring step's compute hides its transfer: the overlap threshold in tokens per rank.

Ring Attention (Liu et al. 2023) states the condition as n ≥ F/B (peak FLOP/s over bandwidth,
bf16, MHA, full blocks, no latency); ``overlap_threshold`` solves this runtime's exact condition
per step — the busiest rank's block kernel, merge (or gradient adds) and fixed step overhead
against the K/V (and dK/dV) transfer over a given link — with the compute and link models of
``timing_data``. Both leave out the kernel slowdown during an exchange (κ,
``attention_time.step_time_prediction``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ringplan.time import kernels as cp
from ringplan.time import links as cm
from ringplan.time import ring_passes as rp
from ringplan.time.provenance import overall_provenance
from ringplan.time.timing_data import compute_model_for, load_timing_data, resolve_gpu, resolve_link
from ringplan.units import FP32_BYTES
from ringplan.workload import AttentionShape, Workload

GRAD_BYTES_PER_ELEMENT = FP32_BYTES  # dK/dV travel as fp32 accumulators (ring-flash-attention's backward)


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


def _first_hiding_n(gap_s: Callable[[int], float], n_max: int = 2**27) -> int:
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


def _step_gap_s(c: rp.Costing, link: cm.LinkModel, pass_name: str, half: bool) -> Callable[[int], float]:
    """gap(n) = the busiest rank's compute of one middle step − the transfer it must hide, in seconds.

    Compute: the block (n × n, or n × n/2 when ``half``), its merge (forward) or the fp32 gradient
    adds (backward), the fixed step overhead. Transfer: K/V of n tokens, + the fp32 dK/dV sharing
    the link in a backward step.
    """
    shape = c.workload.shape
    grad = GRAD_BYTES_PER_ELEMENT if pass_name == "backward" else 0
    bytes_per_token = 2 * shape.batch * shape.n_kv_heads * shape.head_dim * (shape.dtype_bytes + grad)

    def gap_s(n: int) -> float:
        kv = n // 2 if half else n
        if pass_name == "forward":
            local = rp.merge_s(c, n, shape.dtype_bytes)
        else:
            values = shape.batch * shape.head_dim * (n * shape.n_heads + 2 * kv * shape.n_kv_heads)
            local = rp.elementwise_s(c, cp.accumulation_bytes(values, accumulator_bytes=FP32_BYTES,
                                                              addend_bytes=shape.dtype_bytes))
        compute_s = rp.block_time_s(c, pass_name, False, n, kv) + local + c.compute.step_overhead_s
        return compute_s - float(link.transfer_time_s(bytes_per_token * n))

    return gap_s


def overlap_threshold(shape: AttentionShape, gpu: object, *, causal: bool = False, layout: str = "contiguous",
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
    minimum = _first_hiding_n(_step_gap_s(c, link_model, pass_name, half))
    model = compute.kernel(cp.KernelKey(backend=chosen, head_dim=shape.head_dim, causal=False,
                                        pass_name=pass_name, dtype=shape.dtype))
    flops_per_s = model.effective_flops_per_s
    c.note("link", link_label)
    return OverlapThreshold(scope=scope, pass_name=pass_name, backend=chosen, block="n x n/2" if half else "n x n",
                            effective_flops_per_s=flops_per_s, bandwidth_bytes_per_s=link_model.bandwidth_bytes_per_s,
                            latency_s=link_model.latency_s, paper_tokens=flops_per_s / link_model.bandwidth_bytes_per_s,
                            min_tokens_per_rank=minimum, provenance=overall_provenance(c.notes))
