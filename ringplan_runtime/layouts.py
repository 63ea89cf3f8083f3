"""How a sequence is spread over a ring, and which block each ring step computes.

Layouts (``ringplan.workload.RingLayout``): ``contiguous`` -- rank p holds tokens
[p·S/P, (p+1)·S/P); ``zigzag`` -- the sequence is cut into 2P chunks and rank p holds chunks
p and 2P-1-p (in that order), which balances causal work.

Schedule: at ring step s, the rank at ring index i holds the K/V of source j = (i - s) mod P.
Causal contiguous: j == i diagonal (causal), j < i full, j > i skipped (the K/V still travel).
Causal zigzag: j == i one causal call on the 2-chunk local sequence (global order is kept, so
the causal mask is exact); j < i all local queries x first half of K/V; j > i second half of
queries x all K/V. Every non-diagonal zigzag step costs half a full block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ringplan.workload import LAYOUTS


def _check_layout(seq_len_tokens: int, ring_size: int, layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {list(LAYOUTS)}")
    if ring_size <= 0:
        raise ValueError(f"ring_size must be positive, got {ring_size}")
    chunks = ring_size * (2 if layout == "zigzag" else 1)
    if seq_len_tokens % chunks:
        raise ValueError(f"sequence of {seq_len_tokens} tokens does not split into {chunks} equal chunks "
                         f"({layout} layout over {ring_size} ranks)")
    return seq_len_tokens // chunks


def shard_sequence(x: torch.Tensor, *, rank: int, ring_size: int, layout: str, dim: int = 1) -> torch.Tensor:
    """This rank's part of the full sequence ``x`` along ``dim`` (contiguous: a view; zigzag: a copy)."""
    if not 0 <= rank < ring_size:
        raise ValueError(f"rank {rank} is outside a ring of {ring_size}")
    chunk = _check_layout(x.shape[dim], ring_size, layout)
    if layout == "contiguous":
        return x.narrow(dim, rank * chunk, chunk)
    mirror = 2 * ring_size - 1 - rank
    return torch.cat([x.narrow(dim, rank * chunk, chunk), x.narrow(dim, mirror * chunk, chunk)], dim=dim)


def unshard_sequence(chunks: list[torch.Tensor], *, layout: str, dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's part (``chunks[p]`` from rank p); inverse of ``shard_sequence``."""
    ring_size = len(chunks)
    if ring_size == 0:
        raise ValueError("no chunks to unshard")
    _check_layout(sum(c.shape[dim] for c in chunks), ring_size, layout)
    if layout == "contiguous":
        return torch.cat(chunks, dim=dim)
    halves = [c.chunk(2, dim=dim) for c in chunks]
    ordered = [h[0] for h in halves] + [h[1] for h in reversed(halves)]
    return torch.cat(ordered, dim=dim)


def token_positions(*, rank: int, ring_size: int, layout: str, seq_len_tokens: int) -> torch.Tensor:
    """Global positions of this rank's tokens, in local order (int64)."""
    positions = torch.arange(seq_len_tokens)
    return shard_sequence(positions, rank=rank, ring_size=ring_size, layout=layout, dim=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockPlan:
    """One ring step's block: the query rows and key rows it covers (half = 'first'/'second'/None)."""

    query_half: str | None
    key_half: str | None
    causal: bool


def block_plan(*, index: int, source: int, layout: str, causal: bool) -> BlockPlan | None:
    """The block computed at ring index ``index`` on K/V from ``source``; ``None`` when skipped."""
    if not causal:
        return BlockPlan(query_half=None, key_half=None, causal=False)
    if source == index:
        return BlockPlan(query_half=None, key_half=None, causal=True)
    if layout == "contiguous":
        return BlockPlan(query_half=None, key_half=None, causal=False) if source < index else None
    if source < index:
        return BlockPlan(query_half=None, key_half="first", causal=False)
    return BlockPlan(query_half="second", key_half=None, causal=False)


def half_slice(length: int, half: str | None) -> slice:
    """Row range of ``half`` ('first', 'second' or None = all) in a local chunk of ``length`` tokens."""
    if half is None:
        return slice(0, length)
    mid = length // 2
    return slice(0, mid) if half == "first" else slice(mid, length)
