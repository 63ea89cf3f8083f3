"""Exact ring attention over torch.distributed, forward and backward (contiguous and zigzag layouts).

Forward (per rank, ring of P): at step s the rank computes its queries against the K/V block of
source (i - s) mod P while that block is already on its way to the next rank
(``RingComm``: exchange committed BEFORE the kernel launch, waited after). Block results are
merged into fp32 accumulators by their LSE (``merge.merge_``); P = 1 runs one kernel, no
accumulator and no buffers (docs/CONTRACTS.md, "Runtime memory plan").

Backward: each step recomputes its block's gradients with the GLOBAL out and lse
(``kernels.block_backward``); dq accumulates locally in fp32; dK/dV accumulate in fp32 buffers that
travel the ring one hop behind their K/V, and the last hop returns them to their owner.
Outputs and gradients come back in the input dtypes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ringplan.workload import AttentionShape, RingLayout, Workload, check_layout_fits
from ringplan_runtime import _compat
from ringplan_runtime.backends import select_backend
from ringplan_runtime.comm import RingBuffers, RingComm, kv_buffer_count
from ringplan_runtime.consistency import checked_on_every_rank, tensor_description
from ringplan_runtime.kernels import block_backward, block_forward
from ringplan_runtime.layouts import block_plan, half_slice
from ringplan_runtime.merge import accumulator_dtype, merge_, start_accumulator

KV_TAGS = (0, 1)
DKV_TAGS = (2, 3)
PLANNER_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True, slots=True, kw_only=True)
class RingSpec:
    """One ring: its members (GLOBAL ranks, ring order), this rank's index, and how blocks are computed."""

    ranks: tuple[int, ...]
    index: int
    group: object | None
    layout: str
    causal: bool
    backend: str
    scale: float

    @property
    def size(self) -> int:
        return len(self.ranks)


def ring_members(group) -> tuple[tuple[int, ...], int]:
    """(global ranks of ``group`` in ring order, this rank's index); ``((0,), 0)`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialized")
        return (0,), 0
    ranks = tuple(_compat.group_ranks(group))
    return ranks, ranks.index(dist.get_rank())


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ``ValueError`` unless q ``[B, n, H, D]`` and k, v ``[B, n, H_kv, D]`` agree (H % H_kv == 0)
    and are real floating-point tensors of one dtype on one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, n, heads, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, tokens or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")
    if len({q.device, k.device, v.device}) > 1:
        raise ValueError(f"q, k, v must be on one device, got {q.device}/{k.device}/{v.device}")
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}/{k.dtype}/{v.dtype}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must be real floating point (fp32, fp64, fp16 or bf16), got {q.dtype}")


def planner_workload(q: torch.Tensor, k: torch.Tensor, ring_size: int, pattern=None) -> Workload:
    """The planner's view of this call (validation only; fp32/fp64 are both called 'fp32' there)."""
    shape = AttentionShape(n_heads=q.shape[2], head_dim=q.shape[3], n_kv_heads=k.shape[2], batch=q.shape[0],
                           dtype=PLANNER_DTYPE_NAMES.get(q.dtype, "fp32"))
    kwargs = {} if pattern is None else {"pattern": pattern}
    return Workload(seq_len_tokens=q.shape[1] * ring_size, shape=shape, **kwargs)


def qkv_description(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **flags) -> dict[str, object]:
    """What every rank of a ring must pass alike: q, k, v shapes, dtypes, device types, and ``flags``."""
    return {**tensor_description("q", q), **tensor_description("k", k), **tensor_description("v", v), **flags}


def make_spec(q, k, v, *, group, causal: bool, layout: str, backend: str, scale: float | None,
              check_consistency: bool = True) -> RingSpec:
    """Validate everything (before any communication; across the ring too, see
    ``consistency.checked_on_every_rank``) and describe the ring."""
    ranks, index = ring_members(group)

    def validate() -> RingSpec:
        check_qkv(q, k, v)
        check_layout_fits(planner_workload(q, k, len(ranks)), RingLayout(ring_size=len(ranks), layout=layout))
        chosen = select_backend(q.device, q.dtype, q.shape[3], backend)
        return RingSpec(ranks=ranks, index=index, group=group, layout=layout, causal=bool(causal), backend=chosen,
                        scale=float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[3]))

    description = qkv_description(q, k, v, causal=bool(causal), layout=layout, backend=backend, scale=scale)
    return checked_on_every_rank(validate, description=description, ranks=ranks, group=group,
                                 check=check_consistency)


def _start_exchange(comm: RingComm, sends, receives, tags) -> None:
    """Queue one send/receive per (send, receive, tag) and start them as one batch."""
    for to_send, receive, tag in zip(sends, receives, tags):
        comm.send_recv(to_send, receive, tag=tag)
    comm.commit()


def _forward_block(q, k_now, v_now, plan, spec, acc):
    n = q.shape[1]
    rows, cols = half_slice(n, plan.query_half), half_slice(n, plan.key_half)
    out_blk, lse_blk = block_forward(q[:, rows], k_now[:, cols], v_now[:, cols], backend=spec.backend,
                                     causal=plan.causal, scale=spec.scale)
    if acc is None:
        return start_accumulator(out_blk, lse_blk, lse_shape=(q.shape[0], q.shape[2], n))
    out_acc, lse_acc = acc
    merge_(out_acc[:, rows], lse_acc[:, :, rows].transpose(1, 2), out_blk, lse_blk.transpose(1, 2))
    return acc


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 spec: RingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(out ``[B, n, H, D]``, lse ``[B, H, n]``) of the local queries against the whole ring's K/V.

    P = 1: the kernel's own out (q's dtype) and lse. P > 1: fp32 accumulators (fp64 for fp64).
    k and v must be contiguous (they are sent as they are).
    """
    if spec.size == 1:
        return block_forward(q, k, v, backend=spec.backend, causal=spec.causal, scale=spec.scale)
    comm = RingComm(spec.ranks, group=spec.group)
    buffers = RingBuffers((k, v), kv_buffer_count(spec.size))
    acc, k_now, v_now = None, k, v
    for step in range(spec.size):
        last = step == spec.size - 1
        if not last:
            k_next, v_next = buffers.next_set()
            _start_exchange(comm, (k_now, v_now), (k_next, v_next), KV_TAGS)
        source = (spec.index - step) % spec.size
        plan = block_plan(index=spec.index, source=source, layout=spec.layout, causal=spec.causal)
        if plan is not None:
            acc = _forward_block(q, k_now, v_now, plan, spec, acc)
        if not last:
            comm.wait()
            k_now, v_now = k_next, v_next
    del k_now, v_now
    buffers.release()
    return acc


def _backward_block(grads, dout, q, k_now, v_now, out, lse, plan, spec):
    """Add one block's dq into ``grads['dq']`` and return its (dk, dv) rows and their row range."""
    n = q.shape[1]
    rows, cols = half_slice(n, plan.query_half), half_slice(n, plan.key_half)
    dq, dk, dv = block_backward(dout[:, rows], q[:, rows], k_now[:, cols], v_now[:, cols], out[:, rows],
                                lse[:, :, rows], backend=spec.backend, causal=plan.causal, scale=spec.scale)
    if grads.get("dq") is None:
        grads["dq"] = torch.empty(q.shape, dtype=accumulator_dtype(q.dtype), device=q.device)
        grads["dq"].copy_(dq)
    else:
        grads["dq"][:, rows].add_(dq)
    return dk, dv, cols


def _dkv_hop(dk_acc, dv_acc, grad_dtype, dkv_buffers: RingBuffers, *, last: bool):
    """(send dK, send dV, receive dK, receive dV) of one dK/dV hop.

    The last hop carries finished gradients: they are cast to ``grad_dtype`` BEFORE sending (with k's
    dtype the owner would cast them anyway, so the result is identical) and, for bf16, half the bytes
    travel; the fp32 set that is no longer needed is released first, so the peak does not grow.
    """
    if not last:
        dk_next, dv_next = dkv_buffers.next_set()
        return dk_acc, dv_acc, dk_next, dv_next
    dkv_buffers.release()
    dk_send, dv_send = dk_acc.to(grad_dtype), dv_acc.to(grad_dtype)
    return dk_send, dv_send, torch.empty_like(dk_send), torch.empty_like(dv_send)


def _add_block_dkv(step: int, block, dk_acc, dv_acc, dkv_comm: RingComm) -> None:
    """Fold this rank's dK/dV of the K/V block it holds into the travelling accumulator."""
    if step == 0:  # the diagonal block: the accumulator starts as its (full) dK/dV
        dk_acc.copy_(block[0])
        dv_acc.copy_(block[1])
        return
    dkv_comm.wait()  # dK/dV of this K/V block, accumulated by the previous ranks
    if block is not None:
        dk_acc[:, block[2]].add_(block[0])
        dv_acc[:, block[2]].add_(block[1])


def ring_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, spec: RingSpec, *,
                  grad_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the local chunk, given the global ``out`` ``[B, n, H, D]`` and ``lse`` ``[B, H, n]``.

    P = 1: the kernel's gradients. P > 1: dq as an fp32 (fp64) accumulator; dk/dv in ``grad_dtype``
    (default: k's dtype), the dtype their last hop travels in. The caller casts.
    """
    dout = dout.contiguous()
    if spec.size == 1:
        return block_backward(dout, q, k, v, out, lse, backend=spec.backend, causal=spec.causal, scale=spec.scale)
    kv_comm, dkv_comm = RingComm(spec.ranks, group=spec.group), RingComm(spec.ranks, group=spec.group)
    kv_buffers = RingBuffers((k, v), kv_buffer_count(spec.size))
    dkv_buffers = RingBuffers((k, v), 2, dtype=accumulator_dtype(k.dtype))
    grads: dict[str, torch.Tensor | None] = {"dq": None}
    dk_acc, dv_acc = dkv_buffers.next_set()
    k_now, v_now = k, v
    for step in range(spec.size):
        last = step == spec.size - 1
        if not last:
            k_next, v_next = kv_buffers.next_set()
            _start_exchange(kv_comm, (k_now, v_now), (k_next, v_next), KV_TAGS)
        source = (spec.index - step) % spec.size
        plan = block_plan(index=spec.index, source=source, layout=spec.layout, causal=spec.causal)
        block = None if plan is None else _backward_block(grads, dout, q, k_now, v_now, out, lse, plan, spec)
        _add_block_dkv(step, block, dk_acc, dv_acc, dkv_comm)
        block = dk_send = dv_send = None  # the previous hop is complete (waited above): let its set be freed
        dk_send, dv_send, dk_acc, dv_acc = _dkv_hop(dk_acc, dv_acc, grad_dtype or k.dtype, dkv_buffers, last=last)
        _start_exchange(dkv_comm, (dk_send, dv_send), (dk_acc, dv_acc), DKV_TAGS)
        if not last:
            kv_comm.wait()
            k_now, v_now = k_next, v_next
    dkv_comm.wait()  # the last hop: this rank's own dK/dV, complete
    del k_now, v_now
    kv_buffers.release()
    return grads["dq"], dk_acc, dv_acc


class _RingAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, the output and the fp32 LSE (the ring runs again in backward)."""

    @staticmethod
    def forward(ctx, q, k, v, spec):
        out, lse = ring_forward(q, k, v, spec)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.spec)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, causal: bool = False,
                   layout: str = "contiguous", backend: str = "auto", scale: float | None = None,
                   check_consistency: bool = True) -> torch.Tensor:
    """Exact attention of this rank's queries over the whole ring's keys/values.

    q ``[B, n, H, D]``, k/v ``[B, n, H_kv, D]``: the rank's local chunk, laid out per ``layout``
    (``shard_sequence``). Returns ``[B, n, H, D]`` in q's dtype; differentiable w.r.t. q, k, v.
    ``group=None``: the default process group, or a single device when torch.distributed is not
    initialized. Bad shapes, dtypes, layouts or a forced backend that cannot run raise ``ValueError``
    before any exchange; so do inputs that differ between the ranks (shapes, dtypes, flags), on every
    rank, unless ``check_consistency=False`` skips that comparison (a small all-gather per call).
    Non-contiguous k/v are copied once (they are sent as they are).
    """
    spec = make_spec(q, k, v, group=group, causal=causal, layout=layout, backend=backend, scale=scale,
                     check_consistency=check_consistency)
    return _RingAttention.apply(q, k.contiguous(), v.contiguous(), spec)
