"""Ring dilated attention with LongNet semantics (microsoft/torchscale ``DilatedAttention``).

Branch (w, r): the sequence is cut into segments of w tokens; the H heads split into r equal
groups and head group g keeps positions g, g+r, g+2r, ... of every segment; attention is dense
(causal optional, on positions inside the segment) within each sparse segment. A (head,
position) a branch does not cover gets out = 0, lse = -inf from it. Branches are merged by their
LSEs (torchscale's ``gathering``): one softmax over the union of the branches' keys.

Gather: one strided view per branch -- split n into (segments, w/r, r), heads into (r, H/r),
take the diagonal of the two r axes -- and ONE copy into ``[B·segments, w/r, H, D]`` (segments
batched into the batch dimension), so kernel time is proportional to the attended pairs
(S·w·H/r² per branch). Outputs merge in place into the same diagonal view of an fp32
accumulator.

Segments no longer than the local chunk (w <= n) are purely local. A longer segment spans
m = w/n ranks: only those m ranks form a ring (P2P with global ranks), and only the dilated
K/V (n/r tokens per head) travel. Requires: contiguous layout, S a multiple of every segment,
segments and n nested, n and both head counts multiples of every rate (torchscale pads heads
instead; here that is a ``ValueError``).

Backward: per branch, the block (or ring) backward with the GLOBAL merged out and lse gathered
the same way, scattered back with ``add_`` into the diagonal views of fp32 gradient buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ringplan.workload import AttentionPattern, RingLayout, check_layout_fits
from ringplan_runtime.backends import select_backend
from ringplan_runtime.consistency import checked_on_every_rank
from ringplan_runtime.hilbert import hilbert_permutation
from ringplan_runtime.kernels import block_backward, block_forward
from ringplan_runtime.merge import accumulator_dtype, merge_
from ringplan_runtime.ring_attention import (RingSpec, check_qkv, planner_workload, qkv_description, ring_backward,
                                             ring_forward, ring_members)


@dataclass(frozen=True, slots=True, kw_only=True)
class DilatedBranch:
    """One (segment, rate) branch as this rank runs it: ``local_segment`` = min(w, n); ``ring`` when w > n."""

    segment_tokens: int
    rate: int
    local_segment_tokens: int
    ring: RingSpec | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DilatedSpec:
    branches: tuple[DilatedBranch, ...]
    backend: str
    causal: bool
    scale: float
    hilbert: bool


def _branch(w: int, r: int, n: int, ranks: tuple[int, ...], index: int, group, causal: bool,
            backend: str, scale: float) -> DilatedBranch:
    if w <= n:
        return DilatedBranch(segment_tokens=w, rate=r, local_segment_tokens=w, ring=None)
    span = w // n
    first = (index // span) * span
    ring = RingSpec(ranks=ranks[first:first + span], index=index - first, group=group, layout="contiguous",
                    causal=causal, backend=backend, scale=scale)
    return DilatedBranch(segment_tokens=w, rate=r, local_segment_tokens=n, ring=ring)


def make_dilated_spec(q, k, v, *, segment_lengths, dilation_rates, group, causal: bool, backend: str,
                      hilbert: bool, scale: float | None, check_consistency: bool = True) -> DilatedSpec:
    """Validate everything (before any communication; across the ring too, see
    ``consistency.checked_on_every_rank``) and plan each branch for this rank."""
    ranks, index = ring_members(group)

    def validate() -> DilatedSpec:
        check_qkv(q, k, v)
        pattern = AttentionPattern(causal=bool(causal), segment_lengths_tokens=tuple(segment_lengths),
                                   dilation_rates=tuple(dilation_rates))
        if not pattern.dilated:
            raise ValueError("segment_lengths is empty: use ring_attention for dense attention")
        if hilbert and causal:
            raise ValueError("hilbert ordering with causal attention would need a permuted mask; use causal=False "
                             "or hilbert=False")
        check_layout_fits(planner_workload(q, k, len(ranks), pattern), RingLayout(ring_size=len(ranks)))
        for r in pattern.dilation_rates:
            if q.shape[2] % r or k.shape[2] % r:
                raise ValueError(f"dilation rate {r} must divide the query heads ({q.shape[2]}) and the KV heads "
                                 f"({k.shape[2]}): each rate splits the heads into equal groups")
        chosen = select_backend(q.device, q.dtype, q.shape[3], backend)
        scale_ = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[3])
        branches = tuple(_branch(w, r, q.shape[1], ranks, index, group, bool(causal), chosen, scale_)
                         for w, r in zip(pattern.segment_lengths_tokens, pattern.dilation_rates))
        return DilatedSpec(branches=branches, backend=chosen, causal=bool(causal), scale=scale_,
                           hilbert=bool(hilbert))

    description = qkv_description(q, k, v, segment_lengths=tuple(segment_lengths),
                                  dilation_rates=tuple(dilation_rates), causal=bool(causal), backend=backend,
                                  hilbert=bool(hilbert), scale=scale)
    return checked_on_every_rank(validate, description=description, ranks=ranks, group=group,
                                 check=check_consistency)


def dilated_view(x: torch.Tensor, segment: int, rate: int) -> torch.Tensor:
    """View ``[B, n/seg, seg/rate, rate, heads/rate, D]`` of ``x`` ``[B, n, heads, D]``: head group g at offset g."""
    batch, n, heads, _ = x.shape
    split = x.unflatten(1, (n // segment, segment // rate, rate)).unflatten(4, (rate, heads // rate))
    return torch.diagonal(split, dim1=3, dim2=4).movedim(-1, 3)


def dilated_lse_view(lse: torch.Tensor, segment: int, rate: int) -> torch.Tensor:
    """View of ``lse`` ``[B, H, n]`` shaped like ``dilated_view(out)[..., 0]``.

    Shape ``[B, n/seg, seg/rate, rate, H/rate]``.
    """
    batch, heads, n = lse.shape
    split = lse.unflatten(1, (rate, heads // rate)).unflatten(3, (n // segment, segment // rate, rate))
    return torch.diagonal(split, dim1=1, dim2=5).permute(0, 2, 3, 4, 1)


def sparse_lse_view(lse_sparse: torch.Tensor, batch: int, rate: int) -> torch.Tensor:
    """``[B·segs, H, l]`` -> ``[B, segs, l, rate, H/rate]`` (matches ``dilated_lse_view``)."""
    segs_total, heads, length = lse_sparse.shape
    return lse_sparse.reshape(batch, segs_total // batch, rate, heads // rate, length).permute(0, 1, 4, 2, 3)


def gather(x: torch.Tensor, segment: int, rate: int, perm: torch.Tensor | None) -> torch.Tensor:
    """The dilated tokens of ``x`` as ``[B·n/seg, seg/rate, heads, D]``, contiguous (they may travel the ring).

At most one copy (Hilbert order if ``perm``); none when rate 1 leaves a contiguous ``x`` as it is.
"""
    view = dilated_view(x, segment, rate)
    if perm is not None:
        view = view.index_select(2, perm)
    batch, segs, length, _, _, dim = view.shape
    return view.reshape(batch * segs, length, x.shape[2], dim).contiguous()  # a no-op when reshape copied


def gather_lse(lse: torch.Tensor, segment: int, rate: int, perm: torch.Tensor | None) -> torch.Tensor:
    """The dilated rows of ``lse`` ``[B, H, n]`` as contiguous ``[B·n/seg, H, seg/rate]``."""
    view = dilated_lse_view(lse, segment, rate)  # [B, segs, l, rate, H/rate]
    if perm is not None:
        view = view.index_select(2, perm)
    batch, segs, length = view.shape[:3]
    return view.permute(0, 1, 3, 4, 2).reshape(batch * segs, lse.shape[1], length)


def scatter_add_(target: torch.Tensor, sparse: torch.Tensor, segment: int, rate: int) -> None:
    """``target`` ``[B, n, heads, D]`` += ``sparse`` ``[B·n/seg, seg/rate, heads, D]`` at the dilated positions."""
    view = dilated_view(target, segment, rate)
    view.add_(sparse.reshape(view.shape))


def _permutations(branch: DilatedBranch, spec: DilatedSpec, device):
    if not spec.hilbert:
        return None, None
    return hilbert_permutation(branch.local_segment_tokens // branch.rate, device)


def _branch_forward(q, k, v, branch: DilatedBranch, spec: DilatedSpec):
    """(out, lse) of one branch on its sparse segments: ``[B·segs, l, H, D]`` and ``[B·segs, H, l]``."""
    perm, inverse = _permutations(branch, spec, q.device)
    seg, rate = branch.local_segment_tokens, branch.rate
    q_s, k_s, v_s = (gather(t, seg, rate, perm) for t in (q, k, v))
    if branch.ring is None:
        out_s, lse_s = block_forward(q_s, k_s, v_s, backend=spec.backend, causal=spec.causal, scale=spec.scale)
    else:
        out_s, lse_s = ring_forward(q_s, k_s, v_s, branch.ring)
    if inverse is not None:
        out_s, lse_s = out_s.index_select(1, inverse), lse_s.index_select(2, inverse)
    return out_s, lse_s


def _full_cover_start(q, out_s, lse_s, acc_dtype, alone: bool):
    """Accumulators from a rate-1 branch (it covers every head and position): no zero fill, no merge."""
    batch, n, heads, _ = q.shape
    out = out_s.reshape(q.shape)
    lse = lse_s.reshape(batch, n // lse_s.shape[2], heads, lse_s.shape[2]).transpose(1, 2).reshape(batch, heads, n)
    if alone:
        return out, lse.to(acc_dtype)
    return out.to(acc_dtype), lse.to(acc_dtype)


def dilated_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    spec: DilatedSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(out ``[B, n, H, D]`` in q's dtype, lse ``[B, H, n]`` fp32): every branch merged by its LSE.

    A rate-1 branch, if any, runs first and becomes the accumulator (alone: the result itself).
    """
    batch, n, heads, _ = q.shape
    acc_dtype = accumulator_dtype(q.dtype)
    branches = sorted(spec.branches, key=lambda b: b.rate != 1)  # stable: same order on every rank
    if branches[0].rate == 1:
        out_s, lse_s = _branch_forward(q, k, v, branches[0], spec)
        out_acc, lse_acc = _full_cover_start(q, out_s, lse_s, acc_dtype, alone=len(branches) == 1)
        del out_s, lse_s  # with a narrower dtype the accumulator is a copy: free the block result now
        branches = branches[1:]
    else:
        out_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        lse_acc = torch.full((batch, heads, n), -math.inf, dtype=acc_dtype, device=q.device)
    for branch in branches:
        out_s, lse_s = _branch_forward(q, k, v, branch, spec)
        seg, rate = branch.local_segment_tokens, branch.rate
        target = dilated_view(out_acc, seg, rate)
        merge_(target, dilated_lse_view(lse_acc, seg, rate), out_s.reshape(target.shape),
               sparse_lse_view(lse_s, batch, rate))
        del out_s, lse_s
    return out_acc.to(q.dtype), lse_acc


def _branch_backward(dout, q, k, v, out, lse, branch: DilatedBranch, spec: DilatedSpec):
    perm, inverse = _permutations(branch, spec, q.device)
    seg, rate = branch.local_segment_tokens, branch.rate
    dout_s, q_s, k_s, v_s, out_s = (gather(t, seg, rate, perm) for t in (dout, q, k, v, out))
    lse_s = gather_lse(lse, seg, rate, perm)
    if branch.ring is None:
        grads = block_backward(dout_s, q_s, k_s, v_s, out_s, lse_s, backend=spec.backend, causal=spec.causal,
                               scale=spec.scale)
    else:
        grads = ring_backward(dout_s, q_s, k_s, v_s, out_s, lse_s, branch.ring,
                              grad_dtype=accumulator_dtype(k.dtype))  # summed over branches in fp32
    if inverse is not None:
        grads = tuple(g.index_select(1, inverse) for g in grads)
    return grads


def dilated_backward(dout, q, k, v, out, lse, spec: DilatedSpec):
    """(dq, dk, dv) in fp32 (fp64): every branch's block/ring backward with the global out and lse."""
    dout = dout.contiguous()
    acc_dtype = accumulator_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc_dtype, device=t.device) for t in (q, k, v))
    for branch in spec.branches:
        grads = _branch_backward(dout, q, k, v, out, lse, branch, spec)
        for target, sparse in zip((dq, dk, dv), grads):
            scatter_add_(target, sparse, branch.local_segment_tokens, branch.rate)
        del grads, target, sparse  # free this branch's gradients before the next branch runs
    return dq, dk, dv


class _DilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec):
        out, lse = dilated_forward(q, k, v, spec)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = dilated_backward(dout, q, k, v, out, lse, ctx.spec)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def ring_dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, segment_lengths, dilation_rates,
                           group=None, causal: bool = False, backend: str = "auto", hilbert: bool = False,
                           scale: float | None = None, check_consistency: bool = True) -> torch.Tensor:
    """LongNet dilated attention of this rank's chunk (contiguous layout) over the ring.

    q ``[B, n, H, D]``, k/v ``[B, n, H_kv, D]``; ``segment_lengths`` / ``dilation_rates`` one pair per
    branch. Returns ``[B, n, H, D]`` in q's dtype, differentiable w.r.t. q, k, v. ``hilbert=True``
    visits each sparse segment in Hilbert-curve order (same result up to rounding; refused with
    ``causal``). Bad inputs raise ``ValueError`` before any exchange, inputs that differ between
    the ranks too, on every rank (``check_consistency=False`` skips that all-gather).
    """
    spec = make_dilated_spec(q, k, v, segment_lengths=segment_lengths, dilation_rates=dilation_rates, group=group,
                             causal=causal, backend=backend, hilbert=hilbert, scale=scale,
                             check_consistency=check_consistency)
    return _DilatedAttention.apply(q, k, v, spec)
