"""Exact Ulysses context-parallel attention (DeepSpeed-Ulysses), forward and backward.

Same call as ``ring_attention``: q ``[B, n, H, D]``, k/v ``[B, n, H_kv, D]`` are this rank's chunk
of a sequence sharded over the U ranks of ``group`` (``shard_sequence``, contiguous or zigzag).

Forward: one all-to-all per q, k, v turns sequence shards into head shards ``[B, S, H/U, D]``
(S = U·n: the whole sequence, H/U heads); one local kernel call runs full-sequence attention on
those heads; one all-to-all turns the output back into ``[B, n, H, D]``. Causal with the zigzag
layout: the gathered sequence is put in global order before the kernel and the output back in
member order after it, both folded into the all-to-all's own copies (non-causal attention needs
no reordering). Backward: autograd through the all-to-all pair
(``cp_collectives.SequenceToHeads``/``HeadsToSequence``, each the other's backward) and the
kernel's backward with its own out and LSE.

Heads: U must divide H (else ``ValueError`` naming the nearest valid degrees). K/V heads: when U
does not divide H_kv (H_kv < U, e.g. MQA), the K/V heads are REPLICATED before the all-to-all,
as DeepSpeed-Ulysses does: each KV head is repeated r times (``cp_collectives.kv_replication``:
the smallest r with U | r·H_kv, r = U/H_kv when H_kv divides U), and the gradients of the copies
are summed back by autograd. That sends r× the K/V bytes; ``replicate_kv_heads=False`` refuses
instead (``ValueError``).

Memory per rank: head-sharded q, k, v and output of the whole sequence (B·S·(H + 2·r·H_kv)/U·D
plus B·S·H/U·D elements) and the all-to-all send/receive copies; autograd saves the head-sharded
q, k, v, output and the fp32 LSE ``[B, H/U, S]``.

torchrun (one node, 2 processes; gloo on a CPU-only machine)::

    torchrun --standalone --nproc_per_node=2 your_script.py   # calls ulysses_attention(q, k, v, ...)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ringplan.workload import RingLayout, check_layout_fits
from ringplan_runtime.backends import select_backend
from ringplan_runtime.consistency import checked_on_every_rank
from ringplan_runtime.cp_collectives import (HeadsToSequence, LocalAttention, SequenceToHeads, check_heads_split,
                                             kv_replication)
from ringplan_runtime.ring_attention import check_qkv, planner_workload, qkv_description, ring_members


@dataclass(frozen=True, slots=True, kw_only=True)
class UlyssesSpec:
    """One Ulysses group: its members (GLOBAL ranks), this rank's index, the kernel and the K/V copies."""

    ranks: tuple[int, ...]
    index: int
    group: object | None
    layout: str
    causal: bool
    backend: str
    scale: float
    kv_replication: int

    @property
    def size(self) -> int:
        return len(self.ranks)


def validated_ulysses_spec(q, k, v, *, group, causal: bool, layout: str, backend: str, scale: float | None,
                           replicate_kv_heads: bool, ring_size: int = 1) -> UlyssesSpec:
    """This rank's own checks (no communication) and the spec. ``ring_size`` > 1 (hybrid): the layout
    applies to a ring of that many Ulysses groups, each holding U·n consecutive tokens of its ring chunk."""
    ranks, index = ring_members(group)
    degree = len(ranks)
    check_qkv(q, k, v)
    check_layout_fits(planner_workload(q, k, degree * ring_size),
                      RingLayout(ring_size=degree if ring_size == 1 else ring_size, layout=layout))
    heads, kv_heads = q.shape[2], k.shape[2]
    check_heads_split(heads, degree)
    copies = kv_replication(heads, kv_heads, degree)
    if copies > 1 and not replicate_kv_heads:
        raise ValueError(f"{kv_heads} KV heads do not split over a Ulysses degree of {degree} and "
                         f"replicate_kv_heads=False: it needs {kv_heads * copies} KV heads ({copies} copies of each)")
    chosen = select_backend(q.device, q.dtype, q.shape[3], backend)
    return UlyssesSpec(ranks=ranks, index=index, group=group, layout=layout, causal=bool(causal), backend=chosen,
                       scale=float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[3]),
                       kv_replication=copies)


def make_ulysses_spec(q, k, v, *, group, causal: bool, layout: str, backend: str, scale: float | None,
                      replicate_kv_heads: bool, check_consistency: bool = True) -> UlyssesSpec:
    """Validate everything, on every rank of the group alike (``consistency``), and describe the group."""
    ranks, _ = ring_members(group)
    description = qkv_description(q, k, v, causal=bool(causal), layout=layout, backend=backend, scale=scale,
                                  replicate_kv_heads=bool(replicate_kv_heads))
    return checked_on_every_rank(
        lambda: validated_ulysses_spec(q, k, v, group=group, causal=causal, layout=layout, backend=backend,
                                       scale=scale, replicate_kv_heads=replicate_kv_heads),
        description=description, ranks=ranks, group=group, check=check_consistency)


def ulysses_around(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: UlyssesSpec,
                   attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], *,
                   zigzag_order: bool = False) -> torch.Tensor:
    """``attend`` on head shards: replicate K/V heads if needed, all-to-all q, k, v to ``[B, U·n, H/U, D]``
    (member order, or the global order of a zigzag sharding with ``zigzag_order``), call
    ``attend(q, k, v)``, all-to-all its output back to ``[B, n, H, D]``."""
    if spec.kv_replication > 1:
        k, v = (t.repeat_interleave(spec.kv_replication, dim=2) for t in (k, v))
    q_h, k_h, v_h = (SequenceToHeads.apply(t, spec.group, spec.size, zigzag_order) for t in (q, k, v))
    return HeadsToSequence.apply(attend(q_h, k_h, v_h), spec.group, spec.size, zigzag_order)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, causal: bool = False,
                      layout: str = "contiguous", backend: str = "auto", scale: float | None = None,
                      replicate_kv_heads: bool = True, check_consistency: bool = True) -> torch.Tensor:
    """Exact attention of this rank's queries over the whole sequence, by head-sharding all-to-alls.

    Arguments, result and errors as ``ring_attention``; U = ``group``'s size must divide H (a
    ``ValueError`` names the nearest valid degrees); K/V heads are replicated when U does not
    divide H_kv (module docstring) unless ``replicate_kv_heads=False``, which raises instead. Every
    ``ValueError`` comes before any all-to-all. Differentiable w.r.t. q, k, v; input dtypes kept.
    """
    spec = make_ulysses_spec(q, k, v, group=group, causal=causal, layout=layout, backend=backend, scale=scale,
                             replicate_kv_heads=replicate_kv_heads, check_consistency=check_consistency)

    def attend(q_h, k_h, v_h):
        return LocalAttention.apply(q_h, k_h, v_h, spec.backend, spec.causal, spec.scale)

    zigzag_order = spec.causal and spec.layout == "zigzag"
    return ulysses_around(q, k, v, spec, attend, zigzag_order=zigzag_order)
