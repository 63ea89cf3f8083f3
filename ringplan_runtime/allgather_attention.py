"""Exact all-gather context-parallel attention, forward and backward (contiguous and zigzag layouts).

Same call as ``ring_attention``: q ``[B, n, H, D]``, k/v ``[B, n, H_kv, D]`` are this rank's chunk
(``shard_sequence``), the result is this rank's rows of the attention over the whole sequence.

Forward (W ranks in ``group``): the K/V of the whole sequence are all-gathered once (only the H_kv
heads: small under GQA) into one sequence-major buffer, and the local queries attend to it in the
ring's blocks (``layouts.block_plan`` for every source rank, with the causal mask of the global
positions), adjacent full blocks fused into one kernel call: non-causal is one call, causal
contiguous two, causal zigzag at most W. Blocks merge by their LSE in fp32 (``merge``).

Memory: the gathered K/V (2·B·S·H_kv·D elements, input dtype) live during the forward only and are
freed after it; autograd saves the LOCAL q, k, v, the output and the LSE, and the backward gathers
K/V again (as torch's ``context_parallel`` all-gather rotation and Megatron CP do). The backward
also holds dK/dV of the whole sequence in fp32 (fp64 for fp64) while it runs; these are
reduce-scattered IN fp32 (exact sums; twice the bytes of bf16) so each rank receives the sum of
its own chunk's dK/dV, cast to k's dtype at the end.

torchrun (one node, 2 processes; gloo on a CPU-only machine)::

    torchrun --standalone --nproc_per_node=2 your_script.py   # calls allgather_attention(q, k, v, ...)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ringplan_runtime.cp_collectives import gather_sequence, scatter_sequence_sum, sequence_major_zeros
from ringplan_runtime.kernels import block_backward, block_forward
from ringplan_runtime.layouts import block_plan, half_slice
from ringplan_runtime.merge import accumulator_dtype, merge_, start_accumulator
from ringplan_runtime.ring_attention import RingSpec, make_spec


@dataclass(frozen=True, slots=True, kw_only=True)
class GatheredBlock:
    """One kernel call: local query rows against rows of the gathered (member-major) K/V."""

    query_rows: slice
    key_rows: slice
    causal: bool


def gathered_blocks(*, index: int, size: int, tokens_per_rank: int, layout: str,
                    causal: bool) -> list[GatheredBlock]:
    """The blocks rank ``index`` computes over the gathered K/V, in source order; the first covers
    every query row. Adjacent non-causal blocks over the same query rows are fused into one."""
    n, blocks = tokens_per_rank, []
    for source in range(size):
        plan = block_plan(index=index, source=source, layout=layout, causal=causal)
        if plan is None:
            continue
        cols = half_slice(n, plan.key_half)
        block = GatheredBlock(query_rows=half_slice(n, plan.query_half), causal=plan.causal,
                              key_rows=slice(source * n + cols.start, source * n + cols.stop))
        last = blocks[-1] if blocks else None
        if (last is not None and not last.causal and not block.causal and last.query_rows == block.query_rows
                and last.key_rows.stop == block.key_rows.start):
            blocks[-1] = GatheredBlock(query_rows=block.query_rows, causal=False,
                                       key_rows=slice(last.key_rows.start, block.key_rows.stop))
        else:
            blocks.append(block)
    return blocks


def spec_blocks(q: torch.Tensor, spec: RingSpec) -> list[GatheredBlock]:
    return gathered_blocks(index=spec.index, size=spec.size, tokens_per_rank=q.shape[1], layout=spec.layout,
                           causal=spec.causal)


def allgather_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      spec: RingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(out ``[B, n, H, D]``, lse ``[B, H, n]``) of the local queries against the gathered K/V.

    One block: the kernel's own out (q's dtype) and lse; several: fp32 accumulators (fp64 for fp64).
    """
    k_all = gather_sequence(k, group=spec.group, size=spec.size)
    v_all = gather_sequence(v, group=spec.group, size=spec.size)
    blocks = spec_blocks(q, spec)
    acc = None
    for block in blocks:
        rows, keys = block.query_rows, block.key_rows
        out_blk, lse_blk = block_forward(q[:, rows], k_all[:, keys], v_all[:, keys], backend=spec.backend,
                                         causal=block.causal, scale=spec.scale)
        if len(blocks) == 1:
            return out_blk, lse_blk
        if acc is None:  # the first block covers every query row (gathered_blocks)
            acc = start_accumulator(out_blk, lse_blk, lse_shape=(q.shape[0], q.shape[2], q.shape[1]))
        else:
            merge_(acc[0][:, rows], acc[1][:, :, rows].transpose(1, 2), out_blk, lse_blk.transpose(1, 2))
    return acc


def allgather_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, spec: RingSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the local chunk, given the global ``out`` ``[B, n, H, D]`` and ``lse`` ``[B, H, n]``.

    K/V are gathered again; dK/dV of the whole sequence accumulate in fp32 (fp64) and are
    reduce-scattered to their owners. One block: the kernel's gradients. The caller casts.
    """
    dout = dout.contiguous()
    blocks = spec_blocks(q, spec)
    if len(blocks) == 1 and spec.size == 1:
        return block_backward(dout, q, k, v, out, lse, backend=spec.backend, causal=spec.causal, scale=spec.scale)
    k_all = gather_sequence(k, group=spec.group, size=spec.size)
    v_all = gather_sequence(v, group=spec.group, size=spec.size)
    dtype = accumulator_dtype(k.dtype)
    dq = torch.zeros(q.shape, dtype=accumulator_dtype(q.dtype), device=q.device)
    dk_all = sequence_major_zeros(k, tokens=k_all.shape[1], dtype=dtype)
    dv_all = sequence_major_zeros(v, tokens=v_all.shape[1], dtype=dtype)
    for block in blocks:
        rows, keys = block.query_rows, block.key_rows
        dq_blk, dk_blk, dv_blk = block_backward(dout[:, rows], q[:, rows], k_all[:, keys], v_all[:, keys],
                                                out[:, rows], lse[:, :, rows], backend=spec.backend,
                                                causal=block.causal, scale=spec.scale)
        dq[:, rows].add_(dq_blk)
        dk_all[:, keys].add_(dk_blk)
        dv_all[:, keys].add_(dv_blk)
        del dq_blk, dk_blk, dv_blk
    del k_all, v_all
    dk = scatter_sequence_sum(dk_all, group=spec.group, size=spec.size)
    del dk_all
    dv = scatter_sequence_sum(dv_all, group=spec.group, size=spec.size)
    return dq, dk, dv


class _AllGatherAttention(torch.autograd.Function):
    """Autograd wrapper: saves the local q, k, v, the output and the LSE (K/V are gathered again in backward)."""

    @staticmethod
    def forward(ctx, q, k, v, spec):
        out, lse = allgather_forward(q, k, v, spec)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = allgather_backward(dout, q, k, v, out, lse, ctx.spec)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, causal: bool = False,
                        layout: str = "contiguous", backend: str = "auto", scale: float | None = None,
                        check_consistency: bool = True) -> torch.Tensor:
    """Exact attention of this rank's queries over the whole sequence, by all-gathering K/V.

    Arguments, result, validation and errors as ``ring_attention`` (the same layouts: ``contiguous``,
    or ``zigzag`` as torch's ``context_parallel`` shards for causal load balance); ``ValueError``
    before any communication. Differentiable w.r.t. q, k, v; results in the input dtypes.
    """
    spec = make_spec(q, k, v, group=group, causal=causal, layout=layout, backend=backend, scale=scale,
                     check_consistency=check_consistency)
    return _AllGatherAttention.apply(q, k, v, spec)
