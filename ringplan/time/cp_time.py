"""Step time of one attention layer under the all-gather, Ulysses and hybrid context-parallel schemes
(issue 14): compute of the local work (the kernel-rate model) + exposed communication (α–β links).

Collectives, per rank, with ``links.LinkModel.transfer_time_s`` (α + m/β, interpolated where measured):

* all-gather K/V (``allgather_attention``): a ring all-gather, P−1 steps of this rank's K/V block
  (2·B·n·H_kv·D·e); in training the backward gathers K/V again and reduce-scatters the fp32 dK/dV
  (P−1 steps of 2·B·n·H_kv·D·4). The runtime issues each before (or after) its kernels, so every one
  is exposed: the forward's all-gather once per layer, the backward's gather and reduce-scatter once more.
* Ulysses (``ulysses_attention``): 4 all-to-alls forward (q, k, v, out) and 4 backward (dout, dq, dk,
  dv), of B·n·H·D·e (q, out) and B·n·r·H_kv·D·e (k, v; r K/V head copies when U does not divide H_kv).
  One all-to-all: α + (U−1)/U · m / β (pairwise exchanges at once over a switched fabric: each rank
  injects (U−1)/U of its tensor). Never overlapped: each waits for the previous kernel's result.
* hybrid: Ulysses over U (inside a node when U ≤ GPUs per node) + the ring's own simulated step over
  R = P/U ranks (``attention_time.step_time_prediction`` on the head shards, its exposed hops kept).

Compute: all-gather runs the ring's block kernels over the gathered K/V (``ring_passes.block_time_s``:
n × S fused when non-causal; per rank its causal blocks, the busiest rank counted); Ulysses one kernel
of S × S tokens on H/U heads (``step_time_prediction`` at ring size 1 on the head shards).
Link provenance: ``comm_provenance`` says "catalog link, not measured" when the link is a catalog
value. Ignores: merges and casts of the all-gather's causal blocks (a few % of a step), the
all-to-alls' local reordering copies, NCCL's algorithm choice (ring vs tree) and congestion across nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ringplan.memory.cp_terms import kv_replication
from ringplan.time import attention_time as atime
from ringplan.time import links as cm
from ringplan.time import ring_passes as rp
from ringplan.time.provenance import overall_provenance
from ringplan.time.timing_data import load_timing_data, resolve_gpu, resolve_link
from ringplan.units import FP32_BYTES
from ringplan.workload import AttentionShape, RingLayout, Workload, tokens_per_rank


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectiveCost:
    """One collective of a layer step on one rank: bytes this rank sends and seconds (all exposed)."""

    name: str
    sent_bytes: float
    time_s: float
    link: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CpStepTime:
    """Predicted time of one layer step under ``scheme``: ``step_time_s`` = ``call_overhead_s`` +
    ``compute_s`` + ``exposed_comm_s``; ``collectives`` itemises the all-gathers / all-to-alls;
    ``provenance`` is the weakest source of the whole step, ``comm_provenance`` that of its links."""

    scheme: str
    step_time_s: float
    compute_s: float
    exposed_comm_s: float
    call_overhead_s: float
    collectives: tuple[CollectiveCost, ...]
    provenance: str
    comm_provenance: str
    provenance_details: tuple[tuple[str, str], ...]


def link_provenance(label: str) -> str:
    """Plain words for a link's source label (``timing_data.resolve_link``)."""
    if label.startswith("default: catalog"):
        return "catalog link, not measured"
    if label.startswith("default"):
        return "ANCHORS.md link points, not measured on this machine"
    return "measured link" if label.startswith("measured") else label


def ring_collective_time_s(link: cm.LinkModel, chunk_bytes: float, group: int) -> float:
    """Ring all-gather or reduce-scatter over ``group`` ranks: (group − 1)·(α + chunk/β) (0 alone)."""
    return (group - 1) * float(link.transfer_time_s(chunk_bytes)) if group > 1 and chunk_bytes > 0 else 0.0


def all_to_all_time_s(link: cm.LinkModel, tensor_bytes: float, group: int) -> float:
    """One all-to-all of a ``tensor_bytes`` tensor per rank over ``group`` ranks: α + (group−1)/group · m / β."""
    return float(link.transfer_time_s((group - 1) / group * tensor_bytes)) if group > 1 else 0.0


def kv_block_bytes(shape: AttentionShape, tokens: float, element_bytes: int, kv_copies: int = 1) -> float:
    """K and V of ``tokens`` tokens: 2·B·tokens·copies·H_kv·D·element_bytes."""
    return 2 * shape.batch * tokens * kv_copies * shape.n_kv_heads * shape.head_dim * element_bytes


def allgather_blocks_of_rank(rank: int, ring_size: int, n: int, layout: str,
                             causal: bool) -> list[tuple[int, int, bool]]:
    """(query rows, key rows, causal) of the kernel calls rank ``rank`` makes over the gathered K/V
    (``allgather_attention.gathered_blocks``: adjacent non-causal blocks fused)."""
    p = ring_size
    if not causal:
        return [(n, p * n, False)]
    if layout == "zigzag":
        later = [(n // 2, (p - 1 - rank) * n, False)] if rank < p - 1 else []
        return [(n, n // 2, False)] * rank + [(n, n, True)] + later
    return ([(n, rank * n, False)] if rank else []) + [(n, n, True)]


def allgather_compute_s(c: rp.Costing, layout: RingLayout, n: int) -> float:
    """The busiest rank's block kernels, forward (+ backward in training)."""
    passes = ("forward", "backward") if c.workload.training else ("forward",)
    causal = c.workload.pattern.causal
    seconds: dict[tuple, float] = {}  # one kernel time per distinct block (ranks repeat the same few)

    def block_s(name: str, block_causal: bool, q: int, k: int) -> float:
        key = (name, block_causal, q, k)
        if key not in seconds:
            seconds[key] = rp.block_time_s(c, name, block_causal, q, k)
        return seconds[key]

    return max(sum(block_s(name, block_causal, q, k) for name in passes
                   for q, k, block_causal in allgather_blocks_of_rank(rank, layout.ring_size, n, layout.layout, causal))
               for rank in range(layout.ring_size))


def allgather_step_time(workload: Workload, layout: RingLayout, gpu: object, **kw) -> CpStepTime:
    """All-gather K/V: block kernels + exposed all-gather(s) and (training) the fp32 dK/dV reduce-scatter."""
    spec = resolve_gpu(gpu)
    n, p = tokens_per_rank(workload, layout), layout.ring_size
    c = atime.layer_costing(workload, layout, spec, **kw)
    scope = "inter_node" if c.nodes.nodes > 1 else "intra_node"
    link = c.inter if scope == "inter_node" else c.intra
    c.note(f"link {scope}", c.link_labels[scope])
    kv = kv_block_bytes(workload.shape, n, workload.shape.dtype_bytes)
    gathers = [("all-gather K/V (forward)", kv)] + ([("all-gather K/V (backward)", kv)] if workload.training else [])
    collectives = [CollectiveCost(name=name, sent_bytes=(p - 1) * chunk, link=link.name,
                                  time_s=ring_collective_time_s(link, chunk, p)) for name, chunk in gathers]
    if workload.training:
        dkv = kv_block_bytes(workload.shape, n, FP32_BYTES)
        collectives.append(CollectiveCost(name="reduce-scatter fp32 dK/dV", sent_bytes=(p - 1) * dkv, link=link.name,
                                          time_s=ring_collective_time_s(link, dkv, p)))
    overhead = atime.call_overhead_or_default(None)
    return _step("allgather", overhead, allgather_compute_s(c, layout, n), 0.0, collectives, c.notes,
                 link_provenance(c.link_labels[scope]))


def head_shard_workload(workload: Workload, ulysses_degree: int) -> Workload:
    """The workload one Ulysses member's inner attention sees: H/U heads, r·H_kv/U KV heads, the whole S."""
    shape, u = workload.shape, ulysses_degree
    r = kv_replication(shape.n_heads, shape.n_kv_heads, u)
    inner = replace(shape, n_heads=shape.n_heads // u, n_kv_heads=shape.n_kv_heads * r // u,
                    embed_dim=shape.n_heads // u * shape.head_dim)
    return Workload(seq_len_tokens=workload.seq_len_tokens, shape=inner, pattern=workload.pattern,
                    training=workload.training)


def ulysses_step_time(workload: Workload, layout: RingLayout, gpu: object, *, gpus_per_node: int | None = None,
                      **kw) -> CpStepTime:
    """Ulysses (R = 1) or hybrid (R > 1): the inner ring's predicted step on head shards + exposed all-to-alls."""
    spec = resolve_gpu(gpu)
    u, r_ring = layout.ulysses_size, layout.ring_degree
    n, shape = tokens_per_rank(workload, layout), workload.shape
    per_node = gpus_per_node or spec.gpus_per_node
    inner_layout = RingLayout(ring_size=r_ring, layout=layout.layout, backend=layout.backend)
    inner = atime.step_time_prediction(head_shard_workload(workload, u), inner_layout, spec,
                                       gpus_per_node=max(1, per_node // u), **kw)
    scope = "intra_node" if u <= per_node else "inter_node"
    link, label = resolve_link(spec, scope, None, load_timing_data())
    r = kv_replication(shape.n_heads, shape.n_kv_heads, u)
    q_bytes = shape.batch * n * shape.n_heads * shape.head_dim * shape.dtype_bytes
    kv_bytes = kv_block_bytes(shape, n, shape.dtype_bytes, r) / 2
    sizes = [("q", q_bytes), ("k", kv_bytes), ("v", kv_bytes), ("out", q_bytes)]
    if workload.training:
        sizes += [("dout", q_bytes), ("dq", q_bytes), ("dk", kv_bytes), ("dv", kv_bytes)]
    collectives = [CollectiveCost(name=f"all-to-all {name}", sent_bytes=(u - 1) / u * m, link=link.name,
                                  time_s=all_to_all_time_s(link, m, u)) for name, m in sizes]
    notes = dict(inner.provenance_details)
    notes[f"link {scope} (all-to-all)"] = label
    return _step(layout.cp_scheme, inner.call_overhead_s, inner.compute_s, inner.exposed_comm_s, collectives, notes,
                 link_provenance(label))


def _step(scheme: str, overhead_s: float, compute_s: float, ring_exposed_s: float,
          collectives: list[CollectiveCost], notes: dict[str, str], comm_provenance: str) -> CpStepTime:
    exposed = ring_exposed_s + sum(col.time_s for col in collectives)
    return CpStepTime(scheme=scheme, step_time_s=overhead_s + compute_s + exposed, compute_s=compute_s,
                      exposed_comm_s=exposed, call_overhead_s=overhead_s, collectives=tuple(collectives),
                      provenance=overall_provenance(notes), comm_provenance=comm_provenance,
                      provenance_details=tuple(sorted(notes.items())))


def cp_step_time(workload: Workload, layout: RingLayout, gpu: object, **kw) -> CpStepTime:
    """Step time of ``workload`` under ``layout.cp_scheme`` (allgather, ulysses or hybrid) on GPUs ``gpu``
    (catalog name or ``GpuSpec``); ``kw``: ``gpus_per_node``. Bad input raises ValueError."""
    if layout.cp_scheme == "allgather":
        return allgather_step_time(workload, layout, gpu, **kw)
    if layout.cp_scheme in ("ulysses", "hybrid"):
        return ulysses_step_time(workload, layout, gpu, **kw)
    raise ValueError(f"cp_step_time covers allgather, ulysses and hybrid; the ring is "
                     f"attention_time.step_time_prediction (got {layout.cp_scheme!r})")


def capacity_cp_step_time(workload: Workload, layout: RingLayout, gpu: object) -> tuple[float, float] | None:
    """Hook for ``ringplan.capacity.attention`` (as ``attention_time.capacity_step_time``) for every scheme:
    (step_time_s, exposed_comm_s), or None when the time model cannot say."""
    if layout.cp_scheme == "ring":
        return atime.capacity_step_time(workload, layout, gpu)
    try:
        step = cp_step_time(workload, layout, gpu)
    except ValueError:
        return None
    return step.step_time_s, step.exposed_comm_s
