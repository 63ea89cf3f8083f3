"""When one ring step's compute hides its transfer: the overlap threshold in tokens per rank.

Ring Attention (Liu et al. 2023, arXiv:2310.01889, section 3 and Table 2) states the condition as a
block of c ≥ F/B tokens (F peak FLOP/s, B one-way bandwidth in bytes/s; bf16, MHA, full blocks, no
latency) and asks each device to hold s ≥ 6·c tokens (``paper_rule``). ``overlap_threshold`` solves
this runtime's exact condition per step (``rule="runtime"``) — the busiest rank's block kernel,
merge (or gradient adds) and fixed step overhead against the K/V (and dK/dV) transfer over a given
link — with the compute and link models of ``timing_data``, or gives the paper's rule
(``rule="paper"``). A stated F (``flops_per_s``) replaces the kernel's rate in either. Both leave
out the kernel slowdown during an exchange (κ, ``attention_time.step_time_prediction``).
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
#: Ring Attention's per-device requirement: s ≥ 6·c tokens (Liu et al. 2023, section 3: "sequence length s = 6c",
#: the "Minimal Sequence Len" column of Table 2).
PAPER_SEQ_PER_BLOCK = 6
RULES: tuple[str, ...] = ("runtime", "paper")


@dataclass(frozen=True, slots=True, kw_only=True)
class OverlapThreshold:
    """Smallest tokens per rank n for which one ring step's compute hides its transfer.

    ``paper_tokens`` is Ring Attention's minimal block c = F/B (Liu et al. 2023: bf16, MHA, full
    blocks, no latency; ``paper_block_tokens``) and ``paper_seq_tokens`` its per-device 6·c;
    ``min_tokens_per_rank`` is this runtime's exact condition (``rule`` "runtime") or 6·c rounded up
    (``rule`` "paper"). ``flops_source``: "fitted" (the kernel model), "stated" (``flops_per_s``) or
    "catalog peak" (the paper's rule without a stated F, as the paper does). Both rules leave out the
    kernel slowdown during an exchange (κ, ``step_time_prediction``): above the threshold the link is
    never the bottleneck, but a step still pays κ × the transfer.
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
    rule: str = "runtime"
    paper_seq_tokens: float = 0.0
    flops_source: str = "fitted"


def paper_block_tokens(flops_per_s: float, bandwidth_bytes_per_s: float, *, dtype_bytes: int = 2,
                       kv_head_share: float = 1.0) -> float:
    """Ring Attention's minimal block in tokens: c = F/B for bf16 MHA (Liu et al. 2023, section 3).

    From one step's compute 4·d·c² FLOPs at F against its K/V transfer 2·c·d·e bytes at B (d = H·D,
    e bytes per element): c ≥ (e/2)·(H_kv/H)·F/B, which is F/B at the paper's bf16 (e = 2) and MHA
    (``kv_head_share`` = H_kv/H = 1); fp32 doubles it, GQA shrinks it. Ignores latency, the merge
    and the step overhead (``overlap_threshold``'s runtime rule counts them).
    """
    for name, value in (("F", flops_per_s), ("B", bandwidth_bytes_per_s), ("dtype_bytes", dtype_bytes),
                        ("kv_head_share", kv_head_share)):
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return dtype_bytes / 2 * kv_head_share * flops_per_s / bandwidth_bytes_per_s


def paper_rule(flops_per_s: float, bandwidth_bytes_per_s: float, *, dtype_bytes: int = 2,
               kv_head_share: float = 1.0) -> tuple[float, float]:
    """(minimal block c, minimal tokens per device 6·c) of Ring Attention (Liu et al. 2023, Table 2), tokens."""
    block = paper_block_tokens(flops_per_s, bandwidth_bytes_per_s, dtype_bytes=dtype_bytes,
                               kv_head_share=kv_head_share)
    return block, PAPER_SEQ_PER_BLOCK * block


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


def _step_gap_s(c: rp.Costing, link: cm.LinkModel, pass_name: str, half: bool,
                flops_per_s: float | None = None) -> Callable[[int], float]:
    """gap(n) = the busiest rank's compute of one middle step − the transfer it must hide, in seconds.

    Compute: the block (n × n, or n × n/2 when ``half``; at ``flops_per_s`` when stated, else the kernel
    model), its merge (forward) or the fp32 gradient adds (backward), the fixed step overhead. Transfer:
    K/V of n tokens, + the fp32 dK/dV sharing the link in a backward step.
    """
    shape = c.workload.shape
    grad = GRAD_BYTES_PER_ELEMENT if pass_name == "backward" else 0
    bytes_per_token = 2 * shape.batch * shape.n_kv_heads * shape.head_dim * (shape.dtype_bytes + grad)

    def block_s(n: int, kv: int) -> float:
        if flops_per_s is None:
            return rp.block_time_s(c, pass_name, False, n, kv)
        return cp.attention_pass_flops(pass_name, batch=shape.batch, n_heads=shape.n_heads, head_dim=shape.head_dim,
                                       q_tokens=n, kv_tokens=kv) / flops_per_s

    def gap_s(n: int) -> float:
        kv = n // 2 if half else n
        if pass_name == "forward":
            local = rp.merge_s(c, n, shape.dtype_bytes)
        else:
            values = shape.batch * shape.head_dim * (n * shape.n_heads + 2 * kv * shape.n_kv_heads)
            local = rp.elementwise_s(c, cp.accumulation_bytes(values, accumulator_bytes=FP32_BYTES,
                                                              addend_bytes=shape.dtype_bytes))
        compute_s = block_s(n, kv) + local + c.compute.step_overhead_s
        return compute_s - float(link.transfer_time_s(bytes_per_token * n))

    return gap_s


def overlap_threshold(shape: AttentionShape, gpu: object, *, causal: bool = False, layout: str = "contiguous",
                      backend: str = "auto", scope: str = "intra_node", pass_name: str = "forward",
                      link: object = None, timing_dir: str | Path | None = None,
                      step_overhead_s: float | None = None, flops_per_s: float | None = None,
                      rule: str = "runtime") -> OverlapThreshold:
    """Minimum tokens per rank for which ``scope``'s link hides the ring transfer of one step.

    ``rule="runtime"``: compute side — the block the busiest rank computes every step — full n×n
    (non-causal, and causal contiguous whose last rank computes full blocks), n×n/2 for causal zigzag —
    plus its merge (forward) or gradient adds (backward) and the fixed step overhead; transfer side:
    α + K/V of n tokens (+ the fp32 dK/dV sharing the link in a backward middle step) over β.
    ``rule="paper"``: Ring Attention's per-device 6·c with c = F/B (``paper_rule``), F the stated
    ``flops_per_s`` else the catalog peak for the dtype (as the paper's Table 2), B the link's bandwidth.
    ``flops_per_s`` (FLOP/s) replaces the block kernel's fitted rate (and its per-call overhead).
    Every dtype the catalog has a peak for (bf16, fp16, fp32).
    """
    if rule not in RULES:
        raise ValueError(f"rule {rule!r} is not one of {list(RULES)}")
    if flops_per_s is not None and not (np.isfinite(flops_per_s) and flops_per_s > 0):
        raise ValueError(f"--flops-per-s must be a positive FLOP/s, got {flops_per_s!r}")
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
    if flops_per_s is not None:
        rate, source = flops_per_s, "stated"
        c.note("kernel", f"override: stated F = {flops_per_s / 1e12:,.1f} TFLOP/s")
    elif rule == "paper":
        rate, source = compute.peak_flops_per_s, "catalog peak"
        c.note("kernel", f"default: catalog peak {shape.dtype} FLOP/s of {spec.name}")
    else:
        model = compute.kernel(cp.KernelKey(backend=chosen, head_dim=shape.head_dim, causal=False,
                                            pass_name=pass_name, dtype=shape.dtype,
                                            gqa_ratio=shape.n_heads // shape.n_kv_heads))
        rate, source = model.effective_flops_per_s, "fitted"
    block, per_device = paper_rule(rate, link_model.bandwidth_bytes_per_s, dtype_bytes=shape.dtype_bytes,
                                   kv_head_share=shape.n_kv_heads / shape.n_heads)
    if rule == "paper":
        minimum = int(np.ceil(per_device))
    else:
        minimum = _first_hiding_n(_step_gap_s(c, link_model, pass_name, half,
                                              flops_per_s if source == "stated" else None))
    c.note("link", link_label)
    return OverlapThreshold(scope=scope, pass_name=pass_name, backend=chosen, block="n x n/2" if half else "n x n",
                            effective_flops_per_s=rate, bandwidth_bytes_per_s=link_model.bandwidth_bytes_per_s,
                            latency_s=link_model.latency_s, paper_tokens=block, min_tokens_per_rank=minimum,
                            provenance=overall_provenance(c.notes), rule=rule, paper_seq_tokens=per_device,
                            flops_source=source)
