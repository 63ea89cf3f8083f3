"""Exact hybrid context-parallel attention: Ulysses of degree U inside, a ring of R across (USP).

Ranks form a U × R grid: ``ulysses_group`` (U members) and ``ring_group`` (R members) through
this rank; every Ulysses group holds one ring chunk. Sharding (``hybrid_shard_sequence``): the
sequence is split over the ring per ``layout`` (contiguous, or zigzag: ring index j holds chunks
j and 2R-1-j), and each ring chunk, in its local order, into U consecutive pieces: Ulysses member
u holds piece u. So after Ulysses' all-to-all every member of a Ulysses group holds its ring chunk
(in the ring's local order, no reordering) for H/U heads, and ``ring_attention`` over
``ring_group`` computes it exactly; the output goes back through the inverse all-to-all.
Backward: autograd through the all-to-all pair and the ring's own backward.

K/V heads are replicated for the Ulysses step as in ``ulysses_attention`` (module docstring there).
All checks (shapes, U | H, the ring layout on S = U·R·n tokens, backend) run on every rank and are
compared over the Ulysses group and then over the ring group, so every rank of the grid raises the
same ``ValueError`` before any all-to-all or ring exchange.

torchrun (one node, 4 processes, U = 2 inside × R = 2 across)::

    torchrun --standalone --nproc_per_node=4 your_script.py
    # in your_script.py, on every rank (global rank g = j·U + u):
    #   uly = [dist.new_group([j * 2 + u for u in range(2)]) for j in range(2)][rank // 2]
    #   ring = [dist.new_group([j * 2 + u for j in range(2)]) for u in range(2)][rank % 2]
    #   out = hybrid_attention(q, k, v, ulysses_group=uly, ring_group=ring, causal=True, layout="zigzag")
"""

from __future__ import annotations

import torch

from ringplan_runtime.consistency import checked_on_every_rank
from ringplan_runtime.layouts import shard_sequence
from ringplan_runtime.ring_attention import qkv_description, ring_attention, ring_members
from ringplan_runtime.ulysses_attention import UlyssesSpec, ulysses_around, validated_ulysses_spec


def hybrid_shard_sequence(x: torch.Tensor, *, ring_index: int, ring_size: int, ulysses_index: int,
                          ulysses_size: int, layout: str, dim: int = 1) -> torch.Tensor:
    """The part of the full sequence ``x`` that Ulysses member ``ulysses_index`` of ring index ``ring_index``
    holds: piece ``ulysses_index`` of U consecutive pieces of the ring chunk (``shard_sequence``)."""
    ring_chunk = shard_sequence(x, rank=ring_index, ring_size=ring_size, layout=layout, dim=dim)
    return shard_sequence(ring_chunk, rank=ulysses_index, ring_size=ulysses_size, layout="contiguous", dim=dim)


def make_hybrid_spec(q, k, v, *, ulysses_group, ring_group, causal: bool, layout: str, backend: str,
                     scale: float | None, replicate_kv_heads: bool, check_consistency: bool = True) -> UlyssesSpec:
    """Validate (this rank, then alike over the Ulysses group, then over the ring group) and describe
    the Ulysses step. A rejection reaches the whole grid: after the first comparison a Ulysses group
    fails as a whole, and every ring group holds one member of each Ulysses group."""
    ulysses_ranks, _ = ring_members(ulysses_group)
    ring_ranks, _ = ring_members(ring_group)
    description = qkv_description(q, k, v, causal=bool(causal), layout=layout, backend=backend, scale=scale,
                                  replicate_kv_heads=bool(replicate_kv_heads), ulysses_size=len(ulysses_ranks),
                                  ring_size=len(ring_ranks))

    def validate() -> UlyssesSpec:
        return validated_ulysses_spec(q, k, v, group=ulysses_group, causal=causal, layout=layout, backend=backend,
                                      scale=scale, replicate_kv_heads=replicate_kv_heads,
                                      ring_size=len(ring_ranks))

    def within_ulysses() -> UlyssesSpec:
        return checked_on_every_rank(validate, description=description, ranks=ulysses_ranks, group=ulysses_group,
                                     check=check_consistency)

    return checked_on_every_rank(within_ulysses, description=description, ranks=ring_ranks, group=ring_group,
                                 check=check_consistency)


def hybrid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ulysses_group, ring_group,
                     causal: bool = False, layout: str = "contiguous", backend: str = "auto",
                     scale: float | None = None, replicate_kv_heads: bool = True,
                     check_consistency: bool = True) -> torch.Tensor:
    """Exact attention of this rank's queries over the whole sequence: Ulysses over ``ulysses_group``
    (U must divide H), then ``ring_attention`` over ``ring_group`` with ``layout``.

    q ``[B, n, H, D]``, k/v ``[B, n, H_kv, D]``: this rank's part (``hybrid_shard_sequence``).
    Returns ``[B, n, H, D]`` in q's dtype; differentiable w.r.t. q, k, v. Bad inputs raise
    ``ValueError`` on every rank before any communication (module docstring).
    """
    spec = make_hybrid_spec(q, k, v, ulysses_group=ulysses_group, ring_group=ring_group, causal=causal,
                            layout=layout, backend=backend, scale=scale, replicate_kv_heads=replicate_kv_heads,
                            check_consistency=check_consistency)

    def ring(q_h, k_h, v_h):
        return ring_attention(q_h, k_h, v_h, group=ring_group, causal=spec.causal, layout=spec.layout,
                              backend=spec.backend, scale=spec.scale, check_consistency=False)

    return ulysses_around(q, k, v, spec, ring)
