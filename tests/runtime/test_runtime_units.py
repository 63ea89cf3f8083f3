"""In-process pieces of the runtime: merge, layouts and schedule, backend choice, RingComm misuse,
Hilbert order, block kernels and dilated views (no process group needed)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ringplan_runtime import select_backend, shard_sequence, unshard_sequence
from ringplan_runtime.comm import RingBuffers, RingComm, kv_buffer_count
from ringplan_runtime.dilated import dilated_view, gather, scatter_add_
from ringplan_runtime.hilbert import hilbert_distance, hilbert_permutation
from ringplan_runtime.kernels import block_backward, block_forward
from ringplan_runtime.layouts import block_plan, half_slice, token_positions
from ringplan_runtime.merge import merge_, start_accumulator
from ringplan_runtime.reference import reference_attention, relative_error
from runtime.helpers import REL_TOL_FP32

EXACT = 1e-12  # float64 identities


def _lse_and_out(scores: torch.Tensor, values: torch.Tensor):
    lse = torch.logsumexp(scores, dim=-1)
    return torch.softmax(scores, dim=-1) @ values, lse


def test_merge_of_two_key_halves_equals_full_softmax():
    """Hand example: merging the results over keys [0, 4) and [4, 8) gives the softmax over all 8 keys."""
    gen = torch.Generator().manual_seed(0)
    scores, values = torch.randn(5, 8, generator=gen, dtype=torch.float64), torch.randn(8, 3, generator=gen,
                                                                                          dtype=torch.float64)
    full_out, full_lse = _lse_and_out(scores, values)
    out_a, lse_a = _lse_and_out(scores[:, :4], values[:4])
    out_b, lse_b = _lse_and_out(scores[:, 4:], values[4:])
    storage = out_a.data_ptr()
    merge_(out_a, lse_a, out_b, lse_b)
    assert out_a.data_ptr() == storage  # in place
    assert (out_a - full_out).abs().max() < EXACT and (lse_a - full_lse).abs().max() < EXACT


def test_merge_keeps_fully_masked_rows_at_zero_without_nan():
    """Rows with lse = -inf on both sides stay out = 0, lse = -inf; a finite side wins outright."""
    out_acc, lse_acc = torch.zeros(3, 2), torch.tensor([-math.inf, -math.inf, 0.5])
    out_blk, lse_blk = torch.ones(3, 2), torch.tensor([-math.inf, 1.0, -math.inf])
    merge_(out_acc, lse_acc, out_blk, lse_blk)
    assert not torch.isnan(out_acc).any() and not torch.isnan(lse_acc).any()
    assert out_acc[0].abs().max() == 0 and lse_acc[0] == -math.inf
    assert torch.allclose(out_acc[1], torch.ones(2)) and lse_acc[1] == 1.0
    assert out_acc[2].abs().max() == 0 and lse_acc[2] == 0.5


def test_merge_is_stable_for_large_lse():
    """No overflow for LSEs of 800 in float64, where exp(800) (and log(1 + exp(x))) would overflow."""
    out_acc, lse_acc = torch.full((1, 1), 2.0, dtype=torch.float64), torch.tensor([800.0], dtype=torch.float64)
    merge_(out_acc, lse_acc, torch.full((1, 1), 4.0, dtype=torch.float64), torch.tensor([800.0], dtype=torch.float64))
    assert abs(out_acc.item() - 3.0) < EXACT and abs(lse_acc.item() - (800.0 + math.log(2))) < EXACT


def test_start_accumulator_is_fp32_for_bf16_blocks():
    """The accumulators are fp32 even when the block is bf16 (LSE accumulators in bf16 are a known failure)."""
    block = torch.ones(1, 4, 2, 8, dtype=torch.bfloat16)
    out, lse = start_accumulator(block, torch.zeros(1, 2, 4), lse_shape=(1, 2, 4))
    assert out.dtype == torch.float32 and lse.dtype == torch.float32


@given(ring_size=st.integers(1, 6), layout=st.sampled_from(["contiguous", "zigzag"]), chunk=st.integers(1, 5),
       width=st.integers(1, 3))
def test_shard_unshard_round_trip(ring_size, layout, chunk, width):
    """unshard(shard(x) for every rank) == x, and the shards' positions cover 0..S-1 exactly once."""
    seq = ring_size * chunk * (2 if layout == "zigzag" else 1)
    x = torch.arange(seq * width).view(1, seq, width)
    parts = [shard_sequence(x, rank=r, ring_size=ring_size, layout=layout) for r in range(ring_size)]
    assert torch.equal(unshard_sequence(parts, layout=layout), x)
    positions = torch.cat([token_positions(rank=r, ring_size=ring_size, layout=layout, seq_len_tokens=seq)
                           for r in range(ring_size)])
    assert sorted(positions.tolist()) == list(range(seq))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("ring_size", [1, 2, 3, 4])
def test_causal_schedule_covers_exactly_the_causal_pairs(layout, ring_size):
    """Summed over ranks and steps, the planned blocks attend exactly the S(S+1)/2 causal (query, key) pairs."""
    n = 8
    seq = n * ring_size
    pairs = torch.zeros(seq, seq, dtype=torch.int64)
    work = []
    for index in range(ring_size):
        qpos = token_positions(rank=index, ring_size=ring_size, layout=layout, seq_len_tokens=seq)
        done = 0
        for step in range(ring_size):
            source = (index - step) % ring_size
            plan = block_plan(index=index, source=source, layout=layout, causal=True)
            if plan is None:
                continue
            kpos = token_positions(rank=source, ring_size=ring_size, layout=layout, seq_len_tokens=seq)
            rows, cols = qpos[half_slice(n, plan.query_half)], kpos[half_slice(n, plan.key_half)]
            below = rows[:, None] >= cols[None, :]
            assert plan.causal or bool(below.all()), "a non-causal block crosses the diagonal"
            allowed = below if plan.causal else torch.ones_like(below)
            pairs[rows[:, None], cols[None, :]] += allowed.long()
            done += int(allowed.sum())
        work.append(done)
    assert torch.equal(pairs, torch.ones(seq, seq, dtype=torch.int64).tril())
    if layout == "zigzag":
        assert max(work) == min(work), f"zigzag should balance causal work, got {work}"


def test_select_backend_on_cpu():
    """CPU picks the CPU flash op; math is allowed; forced CUDA kernels and unknown names raise ValueError."""
    assert select_backend("cpu", torch.float32, 64) == "cpu"
    assert select_backend("cpu", torch.float32, 64, "math") == "math"
    for forced in ("cudnn", "flash", "efficient"):
        with pytest.raises(ValueError, match=forced):
            select_backend("cpu", torch.bfloat16, 64, forced)
    with pytest.raises(ValueError):
        select_backend("cpu", torch.float32, 64, "triton")
    with pytest.raises(ValueError):
        select_backend("cpu", torch.int32, 64, "math")


def test_ring_comm_misuse_raises():
    """wait without commit, commit with nothing queued, mismatched buffers, and a ring of one all raise."""
    comm = RingComm([0, 1], rank=0)
    assert (comm.next_rank, comm.prev_rank) == (1, 1)
    with pytest.raises(RuntimeError):
        comm.wait()
    with pytest.raises(RuntimeError):
        comm.commit()
    with pytest.raises(ValueError):
        comm.send_recv(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError):
        comm.send_recv(torch.zeros(4, 2).t(), torch.zeros(2, 4))
    buffer = torch.zeros(2)
    with pytest.raises(ValueError):
        comm.send_recv(buffer, buffer)
    with pytest.raises(RuntimeError):
        RingComm([0], rank=0).send_recv(torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError):
        RingComm([1, 2], rank=0)


def test_buffer_counts_follow_the_memory_plan():
    """Receive buffer sets: 0 for P = 1, 1 for P = 2, 2 for P >= 3 (docs/CONTRACTS.md); sets alternate."""
    assert [kv_buffer_count(p) for p in (1, 2, 3, 8)] == [0, 1, 2, 2]
    buffers = RingBuffers([torch.zeros(2)], 2)
    first, second, third = buffers.next_set(), buffers.next_set(), buffers.next_set()
    assert first[0] is third[0] and first[0] is not second[0]
    with pytest.raises(RuntimeError):
        RingBuffers([torch.zeros(2)], 0).next_set()


def test_hilbert_order_is_a_permutation_of_grid_neighbours():
    """On a 4x4 and 8x8 grid, consecutive positions in Hilbert order are grid neighbours; perm[inv] = id."""
    for side in (4, 8):
        perm, inverse = hilbert_permutation(side * side)
        assert sorted(perm.tolist()) == list(range(side * side))
        assert torch.equal(perm[inverse], torch.arange(side * side))
        steps = (perm[1:] % side - perm[:-1] % side).abs() + (perm[1:] // side - perm[:-1] // side).abs()
        assert steps.max().item() == 1
    with pytest.raises(ValueError):
        hilbert_distance(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 6)


@pytest.mark.parametrize("backend", ["cpu", "math"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_block_kernels_match_reference(backend, causal, kv_heads):
    """One block, forward and backward, equals the dense reference (GQA included), fp32 within REL_TOL_FP32."""
    gen = torch.Generator().manual_seed(kv_heads + 10 * causal)
    q, dout = torch.randn(2, 12, 4, 8, generator=gen), torch.randn(2, 12, 4, 8, generator=gen)
    k, v = torch.randn(2, 12, kv_heads, 8, generator=gen), torch.randn(2, 12, kv_heads, 8, generator=gen)
    out, lse = block_forward(q, k, v, backend=backend, causal=causal, scale=8 ** -0.5)
    grads = block_backward(dout, q, k, v, out, lse, backend=backend, causal=causal, scale=8 ** -0.5)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, causal=causal)
    ref.backward(dout.double())
    assert relative_error(out, ref) <= REL_TOL_FP32
    for grad, tensor in zip(grads, ref_in):
        assert grad.shape == tensor.shape and relative_error(grad, tensor.grad) <= REL_TOL_FP32


@pytest.mark.parametrize("segment,rate", [(8, 1), (8, 2), (16, 4), (4, 4)])
def test_dilated_gather_scatter_cover_each_head_group_offset(segment, rate):
    """Scattering ones through the dilated view marks, per head group g, exactly the positions ≡ g (mod rate)
    inside each segment; gather returns those tokens in order."""
    x = torch.arange(1 * 16 * 4 * 1, dtype=torch.float64).view(1, 16, 4, 1)
    target = torch.zeros_like(x)
    scatter_add_(target, torch.ones_like(gather(x, segment, rate, None)), segment, rate)
    pos = torch.arange(16)
    group = torch.arange(4) // (4 // rate)
    expected = ((pos % segment) % rate)[:, None] == group[None, :]
    assert torch.equal(target[0, :, :, 0].bool(), expected)
    sparse = gather(x, segment, rate, None)
    assert sparse.shape == (16 // segment, segment // rate, 4, 1) and sparse.is_contiguous()
    assert torch.equal(sparse.reshape(dilated_view(x, segment, rate).shape), dilated_view(x, segment, rate))


def test_library_allocation_failures_count_as_out_of_memory():
    """A cuBLAS handle that cannot be made at the edge of the GPU is an OOM (a result), not a crash;
    other runtime errors are not."""
    from ringplan_runtime.measure import is_out_of_memory

    assert is_out_of_memory(RuntimeError(
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("CUBLAS_STATUS_INVALID_VALUE when calling cublasGemmEx"))
    assert not is_out_of_memory(ValueError("out of memory"))
