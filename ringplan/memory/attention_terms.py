"""Named byte terms φ_j live at the per-rank memory peak of ring attention (fixed overhead excluded).

Notation (README): n tokens per rank, B batch, H query heads, H_kv KV heads, D head dim, E model
width, e bytes per element of the dtype; fp32 accumulators and log-sum-exps (LSE) are 4 bytes.
Each term is one tensor family with one formula (see its docstring); the fitted memory model
multiplies each by a non-negative coefficient θ_j (1 when the formula is exact).

**Peak instants.** Tensors are not all alive at once, so the peak is the largest of a few instants:

* ``attention`` — the last ring step, while a block result is merged: inputs, received K/V
  buffers, fp32 accumulators, one block result, the backend's workspace (plus, for dilated
  attention, the gathered Q/K/V of one branch).
* ``output`` — after attention returns: inputs, the final output, and the output projection.
* ``backward`` (training only) — the last backward ring step: saved activations, grad of the
  output, fp32 dQ and travelling dK/dV accumulators, received K/V again, one block's gradients.

``memory_terms`` evaluates every instant with θ = 1 and returns the terms of the largest one
(terms not alive at that instant are 0), so the key set is always ``TERM_NAMES``.

Dense attention is treated as one "branch" whose segment is the whole sequence; a dilated branch
(segment w, rate r) keeps n/r tokens per head. It is purely local when w ≤ n; otherwise its
w/n ranks form a ring and only the dilated K/V travel. Branches run one after another, so only
the largest branch's transient tensors count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ringplan.units import FP32_BYTES
from ringplan.workload import DTYPE_BYTES, RingLayout, Workload, tokens_per_rank

#: Every key ``memory_terms`` returns, in display order.
TERM_NAMES: tuple[str, ...] = (
    "x_local_bytes", "weights_bytes", "q_bytes", "kv_bytes", "kv_recv_bytes", "accumulator_bytes",
    "merge_temporaries_bytes", "block_result_bytes", "dilated_gather_bytes", "attention_workspace_bytes", "output_bytes",
    "projection_output_bytes", "saved_lse_bytes", "grad_output_bytes", "dq_accumulator_bytes",
    "dkv_accumulator_bytes", "block_grad_bytes", "weight_grad_bytes",
)
#: Backends whose local kernel tiles the score matrix in on-chip memory (no n×n buffer).
TILED_BACKENDS: tuple[str, ...] = ("auto", "cudnn", "flash", "efficient", "cpu")


@dataclass(frozen=True, slots=True, kw_only=True)
class TermInputs:
    """Everything the formulas read: the shape, the ring, and n tokens per rank.

    Built from a validated ``Workload`` + ``RingLayout`` by ``term_inputs``; profiles also build
    it directly for recorded runs whose lengths the runtime padded (n may then be fractional).
    """

    batch: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    embed_dim: int
    dtype_bytes: int
    tokens_per_rank: float
    ring_size: int
    backend: str = "auto"
    segment_lengths_tokens: tuple[int, ...] = ()
    dilation_rates: tuple[int, ...] = ()
    training: bool = False
    projections: bool = False
    # Read by the all-gather / Ulysses / hybrid terms only (``cp_terms``); the ring's do not depend on them.
    causal: bool = False
    layout: str = "contiguous"
    cp_scheme: str = "ring"
    ulysses_degree: int = 1

    def __post_init__(self) -> None:
        for name in ("batch", "n_heads", "n_kv_heads", "head_dim", "embed_dim", "dtype_bytes", "ring_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.tokens_per_rank, (int, float)) and math.isfinite(self.tokens_per_rank)
                and self.tokens_per_rank > 0):
            raise ValueError(f"tokens_per_rank must be a finite positive number, got {self.tokens_per_rank!r}")
        if len(self.segment_lengths_tokens) != len(self.dilation_rates):
            raise ValueError(f"segment lengths {list(self.segment_lengths_tokens)} and dilation rates "
                             f"{list(self.dilation_rates)} must have the same length")


@dataclass(frozen=True, slots=True, kw_only=True)
class Branch:
    """One attention branch on one rank: ``n_b`` query tokens per head, K/V of ``kv_heads`` heads,
    ``key_tokens`` keys per query block, run over a ring of ``group`` ranks (1 = purely local)."""

    n_b: float
    dilation: int
    kv_heads: int
    key_tokens: float
    group: int


def term_inputs(workload: Workload, layout: RingLayout) -> TermInputs:
    """Validated evaluation point (raises ``ValueError`` when S does not split over the ring)."""
    shape, pattern = workload.shape, workload.pattern
    return TermInputs(
        batch=shape.batch, n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads, head_dim=shape.head_dim,
        embed_dim=shape.embed_dim, dtype_bytes=DTYPE_BYTES[shape.dtype],
        tokens_per_rank=tokens_per_rank(workload, layout), ring_size=layout.ring_size, backend=layout.backend,
        segment_lengths_tokens=pattern.segment_lengths_tokens, dilation_rates=pattern.dilation_rates,
        training=workload.training, projections=workload.projections, causal=pattern.causal, layout=layout.layout,
        cp_scheme=layout.cp_scheme, ulysses_degree=layout.ulysses_size)


def memory_terms(workload: Workload, layout: RingLayout) -> dict[str, float]:
    """Per-rank bytes of each tensor family at the peak instant (θ = 1), keyed by ``TERM_NAMES`` (the ring
    scheme; ``cp_terms.memory_terms`` dispatches every scheme)."""
    return terms_at(term_inputs(workload, layout))


def terms_at(p: TermInputs) -> dict[str, float]:
    """``memory_terms`` for an explicit evaluation point: the largest instant's terms. The ring only: the
    all-gather, Ulysses and hybrid schemes' terms build on these (``cp_terms.memory_terms`` takes every scheme)."""
    if p.cp_scheme != "ring":
        raise ValueError(f"attention_terms models the ring scheme; the {p.cp_scheme} scheme's terms are "
                         f"ringplan.memory.cp_terms.memory_terms / terms_at")
    instants = [attention_instant(p), output_instant(p)]
    if p.training:
        instants.append(backward_instant(p))
    peak = max(instants, key=lambda terms: sum(terms.values()))
    return {name: float(peak.get(name, 0.0)) for name in TERM_NAMES}


def branches(p: TermInputs) -> list[Branch]:
    """The attention branches of one rank (dense attention: one branch over the whole ring).

    Dilated branch (w, r): n/r query tokens per head; K/V gathered for max(H_kv, min(r, H)) heads
    (with GQA, KV heads shared by head groups of different offsets are gathered once per offset);
    local (group 1) when w ≤ n with w/r keys per query, else a ring of ⌈w/n⌉ ranks with n/r keys per
    block. Ignores: padding of a last partial segment (lengths are assumed to divide).
    """
    n = p.tokens_per_rank
    if not p.segment_lengths_tokens:
        return [Branch(n_b=n, dilation=1, kv_heads=p.n_kv_heads, key_tokens=n, group=p.ring_size)]
    result = []
    for w, r in zip(p.segment_lengths_tokens, p.dilation_rates):
        kv_heads = p.n_kv_heads if r == 1 else max(p.n_kv_heads, min(r, p.n_heads))
        local = w <= n
        result.append(Branch(n_b=n / r, dilation=r, kv_heads=kv_heads, key_tokens=(w if local else n) / r,
                             group=1 if local else max(2, math.ceil(w / n))))
    return result


# ----------------------------------------------------------------------------- common inputs


def x_local_bytes(p: TermInputs) -> float:
    """Local slice of the layer input: B·n·E·e bytes (only with projections; the caller's tensor)."""
    return p.batch * p.tokens_per_rank * p.embed_dim * p.dtype_bytes if p.projections else 0.0


def weights_bytes(p: TermInputs) -> float:
    """QKV and output projection weights and biases: (E·(H + 2·H_kv)·D + H·D·E + (H + 2·H_kv)·D + E)·e
    bytes (``RingDilatedAttention`` has biases by default; without them this overcounts by < 1/E)."""
    if not p.projections:
        return 0.0
    qkv = (p.embed_dim + 1) * (p.n_heads + 2 * p.n_kv_heads) * p.head_dim
    return float((qkv + out_projection_elements(p)) * p.dtype_bytes)


def out_projection_elements(p: TermInputs) -> int:
    """Elements of the output projection: weight H·D·E plus bias E."""
    return (p.n_heads * p.head_dim + 1) * p.embed_dim


def q_bytes(p: TermInputs) -> float:
    """Local queries: B·n·H·D·e bytes (with projections: the projected Q, counted once)."""
    return p.batch * p.tokens_per_rank * p.n_heads * p.head_dim * p.dtype_bytes


def kv_bytes(p: TermInputs) -> float:
    """Local keys and values: 2·B·n·H_kv·D·e bytes (GQA: only the KV heads exist)."""
    return 2 * p.batch * p.tokens_per_rank * p.n_kv_heads * p.head_dim * p.dtype_bytes


def common_terms(p: TermInputs) -> dict[str, float]:
    """Tensors alive at every instant: input slice, weights, Q, K, V."""
    return {"x_local_bytes": x_local_bytes(p), "weights_bytes": weights_bytes(p),
            "q_bytes": q_bytes(p), "kv_bytes": kv_bytes(p)}


# ----------------------------------------------------------------------------- one branch, forward


def ring_buffer_pairs(group: int) -> int:
    """Received K/V pairs alive on a ring of ``group`` ranks: 0 alone, 1 for two ranks, else 2
    (the block being computed on plus the block arriving; what is sent is the block computed on)."""
    return 0 if group <= 1 else (1 if group == 2 else 2)


def kv_recv_bytes(p: TermInputs, b: Branch) -> float:
    """Received K/V buffers: pairs(P)·2·B·n_b·H_kv·D·e bytes (dilated: only the dilated K/V travel)."""
    return ring_buffer_pairs(b.group) * 2 * p.batch * b.n_b * b.kv_heads * p.head_dim * p.dtype_bytes


def accumulator_bytes(p: TermInputs, b: Branch) -> float:
    """fp32 output and LSE accumulators: B·n_b·H·D·4 + B·H·n_b·4 on a ring (group > 1), plus the
    same over all n local tokens when several dilated branches are merged. Merged in place."""
    per_token = p.batch * p.n_heads * (p.head_dim + 1) * FP32_BYTES
    ring = per_token * b.n_b if b.group > 1 else 0.0
    merge = per_token * p.tokens_per_rank if len(p.segment_lengths_tokens) > 1 else 0.0
    return ring + merge


#: LSE-sized fp32 temporaries alive together inside one in-place merge (runtime ``merge.merge_``):
#: the new LSE, its -inf-safe shift, the two weights, and one difference being exponentiated.
MERGE_TEMPORARIES = 5


def merge_temporaries_bytes(p: TermInputs, b: Branch) -> float:
    """Temporaries of one LSE merge: 5·B·H·n_b·4 bytes when a merge happens (a ring of ≥ 2 ranks, or
    several dilated branches). Source: the runtime's ``merge_`` as the live-tensor tracker sees it.
    Ignores: the bool mask of -inf rows (1 byte per row, freed before the weights exist)."""
    if b.group <= 1 and len(p.segment_lengths_tokens) <= 1:
        return 0.0
    return MERGE_TEMPORARIES * p.batch * p.n_heads * b.n_b * FP32_BYTES


def block_result_bytes(p: TermInputs, b: Branch) -> float:
    """One block's output and LSE, as the local kernel returns them: B·n_b·H·D·e + B·H·n_b·4.
    With one rank and dense attention this is the final output itself."""
    return p.batch * b.n_b * p.n_heads * (p.head_dim * p.dtype_bytes + FP32_BYTES)


def dilated_gather_bytes(p: TermInputs, b: Branch, *, backward: bool = False) -> float:
    """Gathered (strided, so copied) tensors of one dilated branch. Forward: Q, K, V,
    B·n_b·(H + 2·H_kv')·D·e. Backward adds dO and O (2·B·n_b·H·D·e) and the LSE rows (B·H·n_b·4,
    copied whenever the branch has several segments per rank). 0 for rate 1 apart from that LSE
    copy: its segments are views of contiguous tokens."""
    if not p.segment_lengths_tokens:
        return 0.0
    heads = p.n_heads + 2 * b.kv_heads + (2 * p.n_heads if backward else 0)
    tensors = p.batch * b.n_b * heads * p.head_dim * p.dtype_bytes if b.dilation > 1 else 0.0
    several_segments = b.group == 1 and b.key_tokens * b.dilation < p.tokens_per_rank
    lse = p.batch * p.n_heads * b.n_b * FP32_BYTES if backward and (b.dilation > 1 or several_segments) else 0.0
    return tensors + lse


def attention_workspace_bytes(p: TermInputs, b: Branch, *, backward: bool = False) -> float:
    """Backend workspace of one block. Tiled kernels (cudnn/flash/efficient/auto/cpu): 0 here; their
    small tile buffers go into the fitted constant. ``math`` (the runtime's ``_math_forward`` /
    ``_math_backward``, fp32 whatever the input dtype), with S = B·H·n_b·k·4 for k keys per query:
    forward max(3·S − O, 2·S) — scores, shifted scores and probabilities before the block output O
    (B·n_b·H·D·e, counted in ``block_result_bytes``) exists, scores and probabilities after;
    backward 4·S (scores, probabilities, dO·Vᵀ − δ, dS) plus dO cast to fp32 when the dtype is narrower
    (B·n_b·H·D·4). Plus K/V expanded to H heads under GQA, 2·B·n_b·(H − H_kv)·D·e. Ignores: in
    backward, dQ and dK are formed after the scores are freed, so ``block_grad_bytes`` overcounts the
    math backend by up to B·n_b·(H + H_kv)·D·e."""
    if p.backend in TILED_BACKENDS:
        return 0.0
    scores = p.batch * p.n_heads * b.n_b * b.key_tokens * FP32_BYTES
    expanded_kv = 2 * p.batch * b.n_b * (p.n_heads - b.kv_heads) * p.head_dim * p.dtype_bytes
    if backward:
        dout_fp32 = p.batch * b.n_b * p.n_heads * p.head_dim * FP32_BYTES if p.dtype_bytes < FP32_BYTES else 0.0
        return 4 * scores + dout_fp32 + expanded_kv
    block_out = p.batch * b.n_b * p.n_heads * p.head_dim * p.dtype_bytes
    return max(3 * scores - block_out, 2 * scores) + expanded_kv


# ----------------------------------------------------------------------------- output and backward


def output_bytes(p: TermInputs) -> float:
    """Final attention output of the rank: B·n·H·D·e (cast once from the fp32 accumulator)."""
    return p.batch * p.tokens_per_rank * p.n_heads * p.head_dim * p.dtype_bytes


def projection_output_bytes(p: TermInputs) -> float:
    """Output projection result: B·n·E·e (only with projections)."""
    return p.batch * p.tokens_per_rank * p.embed_dim * p.dtype_bytes if p.projections else 0.0


def saved_lse_bytes(p: TermInputs) -> float:
    """LSE saved for backward: B·H·n·4 (training only). Dilated branches save one merged LSE, as
    the backward of every branch uses the global out and LSE."""
    return p.batch * p.n_heads * p.tokens_per_rank * FP32_BYTES


def grad_output_bytes(p: TermInputs) -> float:
    """Gradient arriving at the attention output: B·n·H·D·e (training only)."""
    return output_bytes(p)


def dq_accumulator_bytes(p: TermInputs, b: Branch) -> float:
    """fp32 dQ accumulator: B·n_b·H·D·4 on a ring, plus B·n·H·D·4 when dilated branches are summed.
    A single device writes dQ directly (counted in ``block_grad_bytes``)."""
    per_token = p.batch * p.n_heads * p.head_dim * FP32_BYTES
    ring = per_token * b.n_b if b.group > 1 else 0.0
    merge = per_token * p.tokens_per_rank if len(p.segment_lengths_tokens) > 1 else 0.0
    return ring + merge


def dkv_accumulator_bytes(p: TermInputs, b: Branch) -> float:
    """fp32 dK/dV accumulators. On a ring they travel with their K/V block back to the owner:
    the pair being accumulated plus the pair arriving, 2·(2·B·n_b·H_kv·D·4); plus 2·B·n·H_kv·D·4
    when dilated branches are summed."""
    pair = 2 * p.batch * b.kv_heads * p.head_dim * FP32_BYTES
    ring = 2 * pair * b.n_b if b.group > 1 else 0.0
    merge = 2 * p.batch * p.n_kv_heads * p.head_dim * FP32_BYTES * p.tokens_per_rank \
        if len(p.segment_lengths_tokens) > 1 else 0.0
    return ring + merge


def block_grad_bytes(p: TermInputs, b: Branch) -> float:
    """One block's dQ, dK, dV as the local kernel returns them: B·n_b·(H + 2·H_kv)·D·e."""
    return p.batch * b.n_b * (p.n_heads + 2 * b.kv_heads) * p.head_dim * p.dtype_bytes


def weight_grad_bytes(p: TermInputs) -> float:
    """Weight gradients alive during the ring backward: the output projection's (H·D·E + E)·e, whose
    backward runs first (training with projections). The Q/K/V projections' gradients are formed
    after the ring backward has freed its buffers. Ignores optimizer state: this is one layer's
    activation memory, not a training job's."""
    return float(out_projection_elements(p) * p.dtype_bytes) if p.training and p.projections else 0.0


# ----------------------------------------------------------------------------- instants


def attention_instant(p: TermInputs) -> dict[str, float]:
    """Forward peak inside the ring loop, for the branch whose transient tensors are largest."""
    def for_branch(b: Branch) -> dict[str, float]:
        held = {"kv_recv_bytes": kv_recv_bytes(p, b), "accumulator_bytes": accumulator_bytes(p, b),
                "block_result_bytes": block_result_bytes(p, b)}
        kernel = {**held, "dilated_gather_bytes": dilated_gather_bytes(p, b),
                  "attention_workspace_bytes": attention_workspace_bytes(p, b)}
        merge = {**held, "merge_temporaries_bytes": merge_temporaries_bytes(p, b)}
        if b.group > 1:  # a ring merges block by block while the gathered tensors are held
            return {**kernel, "merge_temporaries_bytes": merge["merge_temporaries_bytes"]}
        return _largest([kernel, merge])  # a local branch merges after its gathers are freed
    return {**common_terms(p), **_largest(for_branch(b) for b in branches(p))}


def output_instant(p: TermInputs) -> dict[str, float]:
    """After attention returns: inputs, final output and (with projections) the projected output.
    Ignores: the grad-free caller's next layer."""
    return {**common_terms(p), "output_bytes": output_bytes(p),
            "projection_output_bytes": projection_output_bytes(p)}


def backward_instant(p: TermInputs) -> dict[str, float]:
    """Backward peak inside the ring loop: saved activations (inputs, output, LSE), grad of the
    output, accumulators, received K/V again, one block's gradients, workspace. Ignores: the grad of
    the layer input (formed after the ring backward, smaller than the ring buffers)."""
    def for_branch(b: Branch) -> dict[str, float]:
        return {"kv_recv_bytes": kv_recv_bytes(p, b), "dq_accumulator_bytes": dq_accumulator_bytes(p, b),
                "dkv_accumulator_bytes": dkv_accumulator_bytes(p, b), "block_grad_bytes": block_grad_bytes(p, b),
                "dilated_gather_bytes": dilated_gather_bytes(p, b, backward=True),
                "attention_workspace_bytes": attention_workspace_bytes(p, b, backward=True)}
    return {**common_terms(p), "output_bytes": output_bytes(p), "saved_lse_bytes": saved_lse_bytes(p),
            "grad_output_bytes": grad_output_bytes(p), "weight_grad_bytes": weight_grad_bytes(p),
            **_largest(for_branch(b) for b in branches(p))}


def _largest(candidates) -> dict[str, float]:
    return max(candidates, key=lambda terms: sum(terms.values()))
