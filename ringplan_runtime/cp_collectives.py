"""What the all-gather, Ulysses and hybrid context-parallel schemes share: collectives, the
all-to-all as an autograd pair, one local attention call with autograd, and the head checks.

Collectives (any process group; one member: no communication, the input comes back):

- ``gather_sequence`` -- every member's ``[B, n, H, D]`` chunk, all-gathered SEQUENCE-MAJOR into one
  ``[S·B·H·D]`` buffer (``S = W·n``, member order) and returned as a ``[B, S, H, D]`` strided view; the
  local block kernels take any strides with a unit last-dim stride, so no reordering copy is made.
- ``scatter_sequence_sum`` -- the inverse for gradients: a full-sequence ``[B, S, H, D]`` of partial
  sums (stored sequence-major, ``sequence_major_zeros``), reduce-scattered so each member receives the
  sum over all members of its own chunk.
- ``SequenceToHeads`` / ``HeadsToSequence`` -- Ulysses' all-to-all: ``[B, n, H, D]`` sequence shards
  <-> ``[B, W·n, H/W, D]`` head shards (member u keeps head group u); the sequence in member order,
  or in global order for a zigzag sharding (the reordering is folded into the copy out of the
  receive buffer, so no second copy of the sequence is made); each one's backward is the other.

Version shims: torch 2.13 renames ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` to
``all_gather_single`` / ``reduce_scatter_single`` (the old names warn); the lent GPU machines run
2.11, which has only the old ones. ``collective`` picks whichever exists.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ringplan_runtime.kernels import block_backward, block_forward


def collective(new_name: str, old_name: str):
    """``torch.distributed.<new_name>`` when this torch has it, else ``<old_name>`` (looked up per call)."""
    return getattr(dist, new_name, None) or getattr(dist, old_name)


def gather_sequence(x: torch.Tensor, *, group, size: int) -> torch.Tensor:
    """``[B, size·n, H, D]`` (member order along the sequence) from every member's ``x`` ``[B, n, H, D]``.

    A strided view of one sequence-major buffer; ``size == 1`` returns ``x``.
    """
    if size == 1:
        return x
    send = x.transpose(0, 1).contiguous()
    gathered = send.new_empty((size * send.shape[0],) + tuple(send.shape[1:]))
    collective("all_gather_single", "all_gather_into_tensor")(gathered, send, group=group)
    return gathered.transpose(0, 1)


def sequence_major_zeros(like: torch.Tensor, *, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Zeros ``[B, tokens, H, D]`` (``like``'s B, H, D) stored sequence-major, for ``scatter_sequence_sum``."""
    batch, _, heads, head_dim = like.shape
    return torch.zeros(tokens, batch, heads, head_dim, dtype=dtype, device=like.device).transpose(0, 1)


def scatter_sequence_sum(full: torch.Tensor, *, group, size: int) -> torch.Tensor:
    """This member's chunk ``[B, S/size, H, D]`` of ``full`` summed over the members (reduce-scatter).

    ``full`` must be sequence-major (``sequence_major_zeros``); ``size == 1`` returns it unchanged.
    """
    if size == 1:
        return full
    storage = full.transpose(0, 1)
    if not storage.is_contiguous():
        raise ValueError("scatter_sequence_sum needs a sequence-major tensor (sequence_major_zeros)")
    own = storage.new_empty((storage.shape[0] // size,) + tuple(storage.shape[1:]))
    collective("reduce_scatter_single", "reduce_scatter_tensor")(own, storage, group=group)
    return own.transpose(0, 1)


def member_major_to_sequence(received: torch.Tensor, *, zigzag: bool) -> torch.Tensor:
    """``[U, B, n, h, D]`` (member p's chunk at p) -> ``[B, U·n, h, D]``: member order, or, with ``zigzag``,
    the global order of a zigzag sharding (member p holds chunks p and 2U-1-p). One copy at most."""
    size, batch, n, heads, head_dim = received.shape
    if not zigzag:
        return received.permute(1, 0, 2, 3, 4).reshape(batch, size * n, heads, head_dim)
    ordered = received.new_empty(batch, 2 * size, n // 2, heads, head_dim)
    halves = received.view(size, batch, 2, n // 2, heads, head_dim)
    for member in range(size):
        ordered[:, member].copy_(halves[member, :, 0])
        ordered[:, 2 * size - 1 - member].copy_(halves[member, :, 1])
    return ordered.view(batch, size * n, heads, head_dim)


def sequence_to_member_major(y: torch.Tensor, *, size: int, zigzag: bool) -> torch.Tensor:
    """The inverse of ``member_major_to_sequence``: ``[B, U·n, h, D]`` -> contiguous ``[U, B, n, h, D]``."""
    batch, tokens, heads, head_dim = y.shape
    n = tokens // size
    if not zigzag:
        return y.reshape(batch, size, n, heads, head_dim).transpose(0, 1).contiguous()
    out = y.new_empty(size, batch, n, heads, head_dim)
    halves = out.view(size, batch, 2, n // 2, heads, head_dim)
    chunks = y.reshape(batch, 2 * size, n // 2, heads, head_dim)
    for member in range(size):
        halves[member, :, 0].copy_(chunks[:, member])
        halves[member, :, 1].copy_(chunks[:, 2 * size - 1 - member])
    return out


def sequence_to_heads(x: torch.Tensor, *, group, size: int, zigzag: bool = False) -> torch.Tensor:
    """All-to-all ``[B, n, H, D]`` -> ``[B, size·n, H/size, D]``: member u gets head group u of every chunk,
    in member order (``zigzag``: in the global order of a zigzag sharding over the members)."""
    if size == 1:
        return x
    batch, n, heads, head_dim = x.shape
    send = x.reshape(batch, n, size, heads // size, head_dim).permute(2, 0, 1, 3, 4).contiguous()
    received = torch.empty_like(send)  # [source member, B, n, H/size, D]
    dist.all_to_all_single(received, send, group=group)
    del send
    return member_major_to_sequence(received, zigzag=zigzag)


def heads_to_sequence(y: torch.Tensor, *, group, size: int, zigzag: bool = False) -> torch.Tensor:
    """All-to-all ``[B, size·n, H/size, D]`` (any strides) -> ``[B, n, H, D]``; the inverse of
    ``sequence_to_heads``. The send buffer is the one copy of ``y`` made."""
    if size == 1:
        return y
    batch, tokens, local_heads, head_dim = y.shape
    send = sequence_to_member_major(y, size=size, zigzag=zigzag)
    received = torch.empty_like(send)  # [source member = head group, B, n, H/size, D]
    dist.all_to_all_single(received, send, group=group)
    del send
    return received.permute(1, 2, 0, 3, 4).reshape(batch, tokens // size, size * local_heads, head_dim)


class SequenceToHeads(torch.autograd.Function):
    """``sequence_to_heads`` with ``heads_to_sequence`` of the gradient as its backward."""

    @staticmethod
    def forward(ctx, x, group, size, zigzag):
        ctx.settings = dict(group=group, size=size, zigzag=zigzag)
        return sequence_to_heads(x, group=group, size=size, zigzag=zigzag)

    @staticmethod
    def backward(ctx, grad):
        return heads_to_sequence(grad, **ctx.settings), None, None, None


class HeadsToSequence(torch.autograd.Function):
    """``heads_to_sequence`` with ``sequence_to_heads`` of the gradient as its backward."""

    @staticmethod
    def forward(ctx, y, group, size, zigzag):
        ctx.settings = dict(group=group, size=size, zigzag=zigzag)
        return heads_to_sequence(y, group=group, size=size, zigzag=zigzag)

    @staticmethod
    def backward(ctx, grad):
        return sequence_to_heads(grad, **ctx.settings), None, None, None


class LocalAttention(torch.autograd.Function):
    """One local block kernel call with autograd: saves q, k, v, out and the LSE (``kernels``)."""

    @staticmethod
    def forward(ctx, q, k, v, backend, causal, scale):
        out, lse = block_forward(q, k, v, backend=backend, causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = (backend, causal, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        backend, causal, scale = ctx.settings
        dq, dk, dv = block_backward(dout, q, k, v, out, lse, backend=backend, causal=causal, scale=scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def nearest_divisors(value: int, target: int) -> list[int]:
    """The divisors of ``value`` closest to ``target`` (one below and one above when both exist)."""
    divisors = [d for d in range(1, value + 1) if value % d == 0]
    below = [d for d in divisors if d < target]
    above = [d for d in divisors if d > target]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def check_heads_split(heads: int, degree: int) -> None:
    """Raise ``ValueError`` naming the nearest valid degrees and head counts unless ``degree`` divides ``heads``."""
    if heads % degree:
        multiples = sorted({max(degree, heads // degree * degree), (heads // degree + 1) * degree})
        raise ValueError(f"{heads} query heads do not split over a Ulysses degree of {degree}: nearest valid "
                         f"degrees for {heads} heads: {nearest_divisors(heads, degree)}; nearest head counts "
                         f"for degree {degree}: {multiples}")


def kv_replication(heads: int, kv_heads: int, degree: int) -> int:
    """Smallest r with ``kv_heads·r`` a multiple of ``degree`` and a divisor of ``heads`` (r = 1: no copies).

    DeepSpeed-Ulysses' rule for H_kv < degree is r = degree / H_kv (each member then holds one KV
    head); this is the same r there, and also covers H_kv that neither divides nor is divided by the
    degree. Needs ``heads % degree == 0`` and ``heads % kv_heads == 0`` (then r = H / H_kv always works).
    """
    group = heads // kv_heads
    return next(r for r in range(1, group + 1) if group % r == 0 and (kv_heads * r) % degree == 0)
