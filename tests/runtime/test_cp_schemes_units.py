"""Single-process pieces of the all-gather, Ulysses and hybrid schemes: hand-computed block lists,
head checks and K/V replication, the zigzag reordering round trip, and W = 1 reductions."""

from __future__ import annotations

import pytest
import torch

from ringplan_runtime import allgather_attention, shard_sequence, ulysses_attention, unshard_sequence
from ringplan_runtime.allgather_attention import GatheredBlock, gathered_blocks
from ringplan_runtime.cp_collectives import (check_heads_split, kv_replication, member_major_to_sequence,
                                             nearest_divisors, sequence_to_member_major)
from ringplan_runtime.hybrid_attention import hybrid_shard_sequence
from ringplan_runtime.reference import reference_attention, relative_error
from runtime.helpers import REL_TOL_FP32


def test_gathered_blocks_by_hand():
    """n = 8 per rank, W = 4: non-causal is one call; causal contiguous rank 2 is keys [0, 16) + its
    diagonal; causal zigzag rank 1 is keys of rank 0's first half, its diagonal, and its second half of
    queries against ranks 2 and 3 fused into one call."""
    n = 8
    assert gathered_blocks(index=2, size=4, tokens_per_rank=n, layout="zigzag", causal=False) == [
        GatheredBlock(query_rows=slice(0, 8), key_rows=slice(0, 32), causal=False)]
    assert gathered_blocks(index=2, size=4, tokens_per_rank=n, layout="contiguous", causal=True) == [
        GatheredBlock(query_rows=slice(0, 8), key_rows=slice(0, 16), causal=False),
        GatheredBlock(query_rows=slice(0, 8), key_rows=slice(16, 24), causal=True)]
    assert gathered_blocks(index=1, size=4, tokens_per_rank=n, layout="zigzag", causal=True) == [
        GatheredBlock(query_rows=slice(0, 8), key_rows=slice(0, 4), causal=False),
        GatheredBlock(query_rows=slice(0, 8), key_rows=slice(8, 16), causal=True),
        GatheredBlock(query_rows=slice(4, 8), key_rows=slice(16, 32), causal=False)]


@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_gathered_blocks_cover_exactly_the_causal_pairs(size, layout):
    """Causal: every (query, key) pair with key position <= query position is covered exactly once
    (diagonal blocks by their causal mask), and no other pair."""
    n, total = 4, 4 * size
    positions = [shard_sequence(torch.arange(total), rank=r, ring_size=size, layout=layout, dim=0)
                 for r in range(size)]
    keys = torch.cat(positions)
    for rank in range(size):
        count = torch.zeros(n, total, dtype=torch.int64)
        for block in gathered_blocks(index=rank, size=size, tokens_per_rank=n, layout=layout, causal=True):
            rows, cols = block.query_rows, block.key_rows
            mask = torch.ones(rows.stop - rows.start, cols.stop - cols.start, dtype=torch.int64)
            count[rows, cols] += mask.tril() if block.causal else mask
        expected = (keys[None, :] <= positions[rank][:, None]).to(torch.int64)
        assert torch.equal(count, expected), (rank, count, expected)


def test_head_split_errors_name_valid_values():
    """12 heads over U = 5: nearest degrees 4 and 6; nearest head counts for U = 5: 10 and 15."""
    assert nearest_divisors(12, 5) == [4, 6]
    with pytest.raises(ValueError, match=r"degrees for 12 heads: \[4, 6\].*head counts for degree 5: \[10, 15\]"):
        check_heads_split(12, 5)
    check_heads_split(12, 4)


@pytest.mark.parametrize(("heads", "kv_heads", "degree", "copies"),
                         [(8, 8, 4, 1), (8, 2, 4, 2), (8, 1, 4, 4), (8, 1, 8, 8), (12, 3, 2, 2), (16, 4, 8, 2)])
def test_kv_replication_is_deepspeeds_rule(heads, kv_heads, degree, copies):
    """r = 1 when U | H_kv, U / H_kv when H_kv | U (DeepSpeed-Ulysses), else the smallest r with U | r·H_kv."""
    assert kv_replication(heads, kv_heads, degree) == copies


@pytest.mark.parametrize("size", [1, 2, 3])
def test_zigzag_reordering_round_trip(size):
    """The member-major received chunks of a zigzag sharding come out in global order, and back."""
    total = 4 * size
    x = torch.arange(2 * total, dtype=torch.float32).view(2, total, 1, 1)  # [B, S, h, D]
    received = torch.stack([shard_sequence(x, rank=r, ring_size=size, layout="zigzag") for r in range(size)])
    ordered = member_major_to_sequence(received, zigzag=True)
    assert torch.equal(ordered, x)
    assert torch.equal(sequence_to_member_major(ordered, size=size, zigzag=True), received)
    plain = member_major_to_sequence(received, zigzag=False)
    assert torch.equal(plain, unshard_sequence(list(received), layout="contiguous"))


def test_hybrid_shard_sequence_pieces_the_ring_chunk():
    """U = 2 × R = 2, zigzag, S = 16: ring index 1 holds chunks 1 and 2 ([4, 8) and [8, 12)), cut in two."""
    x = torch.arange(16)
    pieces = [hybrid_shard_sequence(x, ring_index=1, ring_size=2, ulysses_index=u, ulysses_size=2, layout="zigzag",
                                    dim=0).tolist() for u in range(2)]
    assert pieces == [[4, 5, 6, 7], [8, 9, 10, 11]]


@pytest.mark.parametrize("attention", [allgather_attention, ulysses_attention])
def test_single_device_equals_the_reference(attention):
    """Without a process group (W = 1) each scheme is plain exact attention (GQA, causal)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(2, 16, h, 8, generator=gen) for h in (4, 2, 2, 4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, causal=True)
    out.backward(dout)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, causal=True)
    ref.backward(dout.double())
    assert relative_error(out, ref) <= REL_TOL_FP32
    for tensor, expected in zip((q, k, v), ref_in):
        assert relative_error(tensor.grad, expected.grad) <= REL_TOL_FP32
