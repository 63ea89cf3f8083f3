"""The passes of one layer step as ``ringplan_runtime`` runs them, costed op by op for ``simulate_step``.

Mirrors ``ringplan_runtime`` (ring_attention.py, dilated.py, module.py), per rank of n local tokens
(H heads, H_kv KV heads, D head dim, e bytes per value, fp32 accumulators):

- dense ring forward, step s: block kernel; s = 0 starts the fp32 accumulator (a copy), later
  steps merge by the LSE; after the ring the accumulator is cast back (ring of one: one kernel).
- dense ring backward, step s: block backward; dq and the travelling dK/dV start as fp32 copies
  at s = 0 and are added to later; the K/V hop of step s shares the link with the dK/dV hop of
  step s − 1; the last dK/dV hop carries them cast to e (fp32 in a dilated branch), then dq is cast.
- dilated (LongNet): per (segment w, rate r) branch, q/k/v gathered (a copy unless r = 1), one
  batched kernel over the n/w segments (or a ring of w/n ranks over n/r tokens when w > n), merged
  into the accumulator (the first rate-1 branch becomes it); backward gathers dO, q, k, v, out and
  scatter-adds into fp32 dq/dK/dV buffers, cast at the end.
- projections (the seed's module): Q/K/V GEMMs before, the output GEMM after; backward 2× each.

Costs: kernels from ``kernels.ComputeModel`` (measured curves), merges at the merge's fitted rate,
copies/casts/adds as bytes at the elementwise bandwidth, GEMMs at an assumed efficiency, hops from
the link models. Ignores: GQA K/V expansion in kernels without native GQA, the LSE-sized tensors
(≤ 1/D of the values), the host's dispatch time (``attention_time`` adds one call overhead).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ringplan.time import links as cm
from ringplan.time import kernels as cp
from ringplan.time.provenance import note_weakest
from ringplan.time.simulate import DIAGONAL, FULL, HALF_KEYS, HALF_QUERIES, SKIP, RingPass, block_kinds
from ringplan.units import FP32_BYTES
from ringplan.workload import Workload


@dataclass(slots=True, kw_only=True)
class Costing:
    """What every pass needs to be costed, and the provenance notes gathered on the way."""

    workload: Workload
    ring_size: int
    backend: str
    compute: cp.ComputeModel
    nodes: cm.NodeLayout
    intra: cm.LinkModel
    inter: cm.LinkModel | None
    link_labels: dict[str, str]
    exchange_interference: tuple[float, float] = (0.0, 0.0)  # κ of (forward, backward) block kernels
    notes: dict[str, str] = field(default_factory=dict)

    def note(self, component: str, label: str, outside: bool = False) -> None:
        """Keep the weakest label per component (``outside``: the number is extrapolated from ``label``'s source)."""
        if outside and not label.startswith(("default", "override")):
            label = f"extrapolated outside measured range ({label})"
        note_weakest(self.notes, component, label)


def block_time_s(c: Costing, pass_name: str, causal: bool, q_tokens: int, kv_tokens: int, segments: int = 1) -> float:
    """Seconds of one block kernel call (``segments`` blocks batched into the batch dimension)."""
    shape = c.workload.shape
    flops = cp.attention_pass_flops(pass_name, batch=shape.batch * segments, n_heads=shape.n_heads,
                                    head_dim=shape.head_dim, q_tokens=q_tokens, kv_tokens=kv_tokens, causal=causal)
    model = c.compute.kernel(cp.KernelKey(backend=c.backend, head_dim=shape.head_dim, causal=causal,
                                          pass_name=pass_name, dtype=shape.dtype,
                                          gqa_ratio=shape.n_heads // shape.n_kv_heads))
    tokens = cp.block_tokens(q_tokens, kv_tokens)
    c.note(f"kernel {c.backend} {pass_name} {'causal' if causal else 'non-causal'}", model.label_at(flops, tokens),
           model.outside_measured_range(flops, tokens))
    return float(model.time_s(flops, tokens))


def elementwise_s(c: Costing, moved_bytes: float) -> float:
    """Seconds of contiguous copies/casts/adds (catalog HBM bandwidth × assumed efficiency)."""
    if moved_bytes > 0:
        c.note("copies / casts / adds", f"default: {cp.ELEMENTWISE_HBM_EFFICIENCY:.0%} of catalog HBM bandwidth")
    return c.compute.elementwise_s(moved_bytes)


def merge_s(c: Costing, q_tokens: int, block_bytes: int) -> float:
    """Seconds of one LSE merge of ``q_tokens`` query rows (all heads) into the fp32 accumulator."""
    shape = c.workload.shape
    seconds, label = c.compute.merge_s(cp.merge_bytes(batch=shape.batch, n_heads=shape.n_heads,
                                                      head_dim=shape.head_dim, q_tokens=q_tokens,
                                                      dtype_bytes=block_bytes))
    c.note("merge", label)
    return seconds


def _values(c: Costing, tokens: int, heads: int) -> float:
    """Values in a [B, tokens, heads, D] tensor."""
    return float(c.workload.shape.batch * tokens * heads * c.workload.shape.head_dim)


def hop_s(c: Costing, message_bytes: float, group_size: int) -> np.ndarray:
    """Seconds of the hop into each rank carrying ``message_bytes`` (0 bytes: 0 s)."""
    if message_bytes <= 0:
        return np.zeros(c.ring_size)
    for scope, link in (("intra_node", c.intra), ("inter_node", c.inter)):
        if link is not None:
            span = link.curve.measured_range
            c.note(f"link {scope}", c.link_labels[scope], span is not None and not span[0] <= message_bytes <= span[1])
    return cm.hop_times_s(message_bytes, c.nodes, group_size, intra=c.intra, inter=c.inter)


def local_pass(c: Costing, name: str, seconds: float) -> RingPass:
    """The same local compute on every rank, no communication."""
    return RingPass(name=name, compute_s=np.full((c.ring_size, 1), seconds), kv_hop_s=np.zeros(c.ring_size),
                    group_size=1)


def with_interference(c: Costing, pass_name: str, compute: np.ndarray, link_busy: np.ndarray) -> np.ndarray:
    """Compute [ranks, steps] slowed by a concurrent exchange: + κ·min(compute, link busy time).

    While NCCL moves a block it holds SMs and HBM bandwidth, so the block kernel of that step runs
    slower; κ (``exchange_interference`` of the pass, 0 = free overlap, 1 = the exchange's whole
    duration is added) is fitted (attention_time.DEFAULT_EXCHANGE_INTERFERENCE). ``link_busy``
    [ranks, steps]: how long the link into each rank is busy during each step.
    """
    kappa = c.exchange_interference[0 if pass_name == "forward" else 1]
    return compute + kappa * np.minimum(compute, link_busy)


def _block_shapes(n: int) -> dict[int, tuple[int, int, bool]]:
    """(query rows, key rows, causal) of each block kind of an n-token chunk."""
    return {FULL: (n, n, False), DIAGONAL: (n, n, True), HALF_KEYS: (n, n // 2, False), HALF_QUERIES: (n // 2, n, False)}


def _kind_costs(c: Costing, kinds: np.ndarray, n: int, cost) -> np.ndarray:
    """Cost of each block kind present in ``kinds`` (index = kind), ``cost(q, k, causal)``; SKIP costs 0."""
    costs = np.zeros(5)
    for kind in np.unique(kinds).tolist():
        if kind != SKIP:
            costs[kind] = cost(*_block_shapes(n)[kind])
    return costs


def ring_forward_pass(c: Costing, name: str, n: int, group_size: int, layout: str, out_bytes: int) -> list[RingPass]:
    """The ring forward over blocks of n tokens in groups of ``group_size`` ranks (+ the final cast when
    ``out_bytes`` is the input dtype; a dilated branch keeps the fp32 accumulator: ``out_bytes`` = 4)."""
    shape, causal = c.workload.shape, c.workload.pattern.causal
    kinds = block_kinds(c.ring_size, group_size, causal=causal, layout=layout)
    kernel = _kind_costs(c, kinds, n, lambda q, k, causal_block: block_time_s(c, "forward", causal_block, q, k))
    if group_size == 1:
        return [RingPass(name=name, compute_s=kernel[kinds], kv_hop_s=np.zeros(c.ring_size), group_size=1)]
    merge = _kind_costs(c, kinds, n, lambda q, k, _: merge_s(c, q, shape.dtype_bytes))
    overhead = np.where(np.arange(5) == SKIP, 0.0, c.compute.step_overhead_s)
    compute = kernel[kinds] + merge[kinds] + overhead[kinds]
    start = cp.conversion_bytes(_values(c, n, shape.n_heads), from_bytes=shape.dtype_bytes, to_bytes=FP32_BYTES)
    compute[:, 0] += elementwise_s(c, start) - merge[kinds[:, 0]]  # step 0 starts the accumulator
    kv_hop = np.broadcast_to(hop_s(c, 2 * _values(c, n, shape.n_kv_heads) * shape.dtype_bytes, group_size)[:, None],
                             compute.shape).copy()
    kv_hop[:, -1] = 0.0  # no exchange during the last step
    passes = [RingPass(name=name, compute_s=with_interference(c, "forward", compute, kv_hop), kv_hop_s=kv_hop,
                       group_size=group_size)]
    if out_bytes != FP32_BYTES:
        cast = cp.conversion_bytes(_values(c, n, shape.n_heads), from_bytes=FP32_BYTES, to_bytes=out_bytes)
        passes.append(local_pass(c, f"{name}: cast output", elementwise_s(c, cast)))
    return passes


def _backward_accumulate_s(c: Costing, kinds: np.ndarray, n: int, grad_bytes: int) -> np.ndarray:
    """Per (rank, step): dq and dK/dV accumulator traffic (fp32 copies at step 0, adds later, the
    dK/dV cast before the last hop when they return in ``grad_bytes`` < 4)."""
    shape = c.workload.shape
    e, h, h_kv = shape.dtype_bytes, shape.n_heads, shape.n_kv_heads

    def added(q: int, k: int, _: bool) -> float:
        return elementwise_s(c, cp.accumulation_bytes(_values(c, q, h) + 2 * _values(c, k, h_kv),
                                                      accumulator_bytes=FP32_BYTES, addend_bytes=e))

    seconds = _kind_costs(c, kinds, n, added)[kinds]
    seconds[:, 0] = elementwise_s(c, cp.conversion_bytes(_values(c, n, h) + 2 * _values(c, n, h_kv),
                                                         from_bytes=e, to_bytes=FP32_BYTES))
    if grad_bytes != FP32_BYTES:
        seconds[:, -1] += elementwise_s(c, cp.conversion_bytes(2 * _values(c, n, h_kv), from_bytes=FP32_BYTES,
                                                               to_bytes=grad_bytes))
    return seconds


def ring_backward_pass(c: Costing, name: str, n: int, group_size: int, layout: str, grad_bytes: int) -> list[RingPass]:
    """The ring backward; dK/dV return in ``grad_bytes`` per value (e dense, 4 in a dilated branch),
    and a dense ring casts dq afterwards."""
    shape, causal = c.workload.shape, c.workload.pattern.causal
    kinds = block_kinds(c.ring_size, group_size, causal=causal, layout=layout)
    kernel = _kind_costs(c, kinds, n, lambda q, k, causal_block: block_time_s(c, "backward", causal_block, q, k))
    if group_size == 1:
        return [RingPass(name=name, compute_s=kernel[kinds], kv_hop_s=np.zeros(c.ring_size), group_size=1)]
    overhead = np.where(np.arange(5) == SKIP, 0.0, c.compute.step_overhead_s)
    compute = kernel[kinds] + overhead[kinds] + _backward_accumulate_s(c, kinds, n, grad_bytes)
    kv_bytes = 2 * _values(c, n, shape.n_kv_heads) * shape.dtype_bytes
    dkv_bytes = 2 * _values(c, n, shape.n_kv_heads) * FP32_BYTES
    alone_kv, alone_dkv, shared = (hop_s(c, b, group_size) for b in (kv_bytes, dkv_bytes, kv_bytes + dkv_bytes))
    kv_hop, grad_hop = np.zeros((c.ring_size, group_size)), np.zeros((c.ring_size, group_size))
    # K/V of step s (s ≤ k−2) share the link with dK/dV of step s − 1; dK/dV of step s with K/V of s + 1.
    kv_hop[:, :group_size - 1] = shared[:, None]
    kv_hop[:, 0] = alone_kv
    grad_hop[:, :group_size - 2] = shared[:, None]
    grad_hop[:, group_size - 2] = alone_dkv
    grad_hop[:, -1] = hop_s(c, 2 * _values(c, n, shape.n_kv_heads) * grad_bytes, group_size)
    busy = kv_hop.copy()  # during step s: K/V of step s and dK/dV of step s − 1 (sharing the link)
    busy[:, 1:] = np.maximum(busy[:, 1:], grad_hop[:, :-1])
    passes = [RingPass(name=name, compute_s=with_interference(c, "backward", compute, busy), kv_hop_s=kv_hop,
                       grad_hop_s=grad_hop, group_size=group_size)]
    if grad_bytes != FP32_BYTES:
        cast = cp.conversion_bytes(_values(c, n, shape.n_heads), from_bytes=FP32_BYTES, to_bytes=shape.dtype_bytes)
        passes.append(local_pass(c, f"{name}: cast dq", elementwise_s(c, cast)))
    return passes


def projection_pass(c: Costing, n: int, which: str, factor: float = 1.0) -> RingPass:
    """GEMMs of the ``which`` ('qkv' | 'output') projection of n tokens; ``factor`` 2 for their backward
    (input and weight gradients)."""
    shape = c.workload.shape
    dims = {"batch": shape.batch, "tokens": n, "embed_dim": shape.embed_dim, "n_heads": shape.n_heads,
            "head_dim": shape.head_dim}
    flops = cp.qkv_projection_flops(n_kv_heads=shape.n_kv_heads, **dims) if which == "qkv" else \
        cp.output_projection_flops(**dims)
    c.note("projections", f"default: assumed GEMM efficiency {cp.GEMM_EFFICIENCY} of catalog peak")
    label = f"{which} projection" + (" backward" if factor != 1.0 else "")
    return local_pass(c, label, c.compute.gemm_s(factor * flops))


def dense_passes(c: Costing, n: int, layout: str, pass_name: str) -> list[RingPass]:
    """Dense ring attention over the whole ring (P = 1: one kernel call)."""
    e = c.workload.shape.dtype_bytes
    if pass_name == "forward":
        return ring_forward_pass(c, "attention forward", n, c.ring_size, layout, e)
    return ring_backward_pass(c, "attention backward", n, c.ring_size, layout, e)


def _branches_forward_order(c: Costing) -> list[tuple[int, int]]:
    """(segment, rate) pairs as the runtime's forward runs them: a rate-1 branch first (stable)."""
    pattern = c.workload.pattern
    return sorted(zip(pattern.segment_lengths_tokens, pattern.dilation_rates), key=lambda b: b[1] != 1)


def dilated_forward_passes(c: Costing, n: int) -> list[RingPass]:
    """Every branch's gather, kernel (or ring over n/r tokens of w/n ranks) and merge, then the cast."""
    shape, causal = c.workload.shape, c.workload.pattern.causal
    e, all_heads = shape.dtype_bytes, shape.n_heads + 2 * shape.n_kv_heads
    branches = _branches_forward_order(c)
    passes: list[RingPass] = []
    for i, (w, r) in enumerate(branches):
        name = f"branch w={w} r={r} forward"
        gather = elementwise_s(c, cp.conversion_bytes(_values(c, n // r, all_heads), from_bytes=e, to_bytes=e)) \
            if r > 1 else 0.0
        out_bytes = e if w <= n else FP32_BYTES
        if i == 0 and r == 1:  # becomes the accumulator: a copy unless alone or already fp32
            copy = len(branches) > 1 and out_bytes != FP32_BYTES
            fold = elementwise_s(c, cp.conversion_bytes(_values(c, n, shape.n_heads), from_bytes=out_bytes,
                                                        to_bytes=FP32_BYTES)) if copy else 0.0
        else:
            zeros = elementwise_s(c, _values(c, n, shape.n_heads) * FP32_BYTES) if i == 0 else 0.0
            fold = zeros + merge_s(c, n // r, out_bytes)
        if w <= n:
            kernel = block_time_s(c, "forward", causal, w // r, w // r, segments=n // w)
            passes.append(local_pass(c, name, gather + kernel + fold))
        else:
            passes.append(local_pass(c, f"{name}: gather", gather))
            passes += ring_forward_pass(c, name, n // r, w // n, "contiguous", FP32_BYTES)
            passes.append(local_pass(c, f"{name}: merge", fold))
    w0, r0 = branches[0]
    if len(branches) > 1 or r0 != 1 or w0 > n:  # the fp32 accumulator is cast to the input dtype
        cast = cp.conversion_bytes(_values(c, n, shape.n_heads), from_bytes=FP32_BYTES, to_bytes=e)
        passes.append(local_pass(c, "dilated: cast output", elementwise_s(c, cast)))
    return passes


def dilated_backward_passes(c: Costing, n: int) -> list[RingPass]:
    """fp32 gradient buffers, every branch's gather + backward (or ring backward) + scatter-add, the casts."""
    shape, pattern = c.workload.shape, c.workload.pattern
    e, all_heads = shape.dtype_bytes, shape.n_heads + 2 * shape.n_kv_heads
    passes = [local_pass(c, "dilated: zero gradient buffers", elementwise_s(c, _values(c, n, all_heads) * FP32_BYTES))]
    for w, r in zip(pattern.segment_lengths_tokens, pattern.dilation_rates):
        name = f"branch w={w} r={r} backward"
        gathered = _values(c, n // r, 3 * shape.n_heads + 2 * shape.n_kv_heads)  # dO, q, out + k, v
        gather = elementwise_s(c, cp.conversion_bytes(gathered, from_bytes=e, to_bytes=e)) if r > 1 else 0.0
        grad_bytes = e if w <= n else FP32_BYTES
        scatter = elementwise_s(c, cp.accumulation_bytes(_values(c, n // r, all_heads), accumulator_bytes=FP32_BYTES,
                                                         addend_bytes=grad_bytes))
        if w <= n:
            kernel = block_time_s(c, "backward", pattern.causal, w // r, w // r, segments=n // w)
            passes.append(local_pass(c, name, gather + kernel + scatter))
        else:
            passes.append(local_pass(c, f"{name}: gather", gather))
            passes += ring_backward_pass(c, name, n // r, w // n, "contiguous", FP32_BYTES)
            passes.append(local_pass(c, f"{name}: scatter-add", scatter))
    cast = cp.conversion_bytes(_values(c, n, all_heads), from_bytes=FP32_BYTES, to_bytes=e)
    passes.append(local_pass(c, "dilated: cast gradients", elementwise_s(c, cast)))
    return passes
