"""``ringplan.capacity.answers``: the rows and the answer each capacity question gives, checked against
the searches they are built on (hand-checked reductions on tiny made-up GPUs, no fitted profiles)."""

import pytest

from ringplan.capacity import attention, stack
from ringplan.capacity.answers import (ROUND_TOKENS, SHOWN_RING_SIZES, attention_capacity, rounder_length,
                                       stack_capacity)
from ringplan.hardware import GpuSpec
from ringplan.memory.attention_model import MemoryModel
from ringplan.memory.stack_model import StackMemoryModel
from ringplan.models import ModelSpec
from ringplan.workload import AttentionShape, Workload

MIB = 2**20
TINY = ModelSpec(name="tiny", n_layers=2, embed_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                 ffn_type="swiglu", vocab_size=256, norm="rmsnorm")


def tiny_gpu(usable_bytes: int) -> GpuSpec:
    return GpuSpec(name="tiny", driver_name="Tiny GPU", usable_memory_bytes=usable_bytes,
                   peak_flops_per_s={"bf16": 1e12}, hbm_bandwidth_bytes_per_s=1e12, intra_node_link="nvlink-4",
                   inter_node_link="infiniband-ndr-400", gpus_per_node=8, runtime_overhead_bytes=0)


def attention_query(usable_bytes: int = 64 * MIB, max_world_size: int = 64) -> attention.CapacityQuery:
    shape = AttentionShape(n_heads=4, n_kv_heads=4, head_dim=32, batch=1, dtype="bf16")
    return attention.CapacityQuery(workload=Workload(seq_len_tokens=1024, shape=shape), layout="contiguous",
                                   backend="auto", gpu=tiny_gpu(usable_bytes), safety_margin=0.05,
                                   max_world_size=max_world_size, model=MemoryModel())


def stack_query(usable_bytes: int = 256 * MIB, max_world_size: int = 64) -> stack.StackQuery:
    return stack.StackQuery(model=TINY, gpu=tiny_gpu(usable_bytes), max_world_size=max_world_size,
                            memory=StackMemoryModel(attention=MemoryModel()))


def test_attention_check_is_the_evaluated_row():
    """S on W: the one row ``evaluate`` gives, feasible as it says."""
    query = attention_query()
    answer = attention_capacity(query, 4096, 2)
    row = attention.evaluate(query, 4096, 2)
    assert answer.kind == "check" and answer.rows == (row,) and answer.best == row and answer.feasible == row.feasible


def test_attention_fewest_gpus_is_the_search():
    """Fewest GPUs for S: the search's minimum and table, unchanged."""
    query = attention_query()
    result = attention.min_world_size(query, 1_048_576)
    answer = attention_capacity(query, 1_048_576, None)
    assert answer.best == result.minimum and answer.rows == result.rows
    assert answer.feasible == (result.minimum is not None)


@pytest.mark.parametrize("world_size", [1, 3, 8, 12])
def test_attention_most_tokens_shows_smaller_power_of_two_rings(world_size):
    """Most tokens on W: the largest S of each power-of-two ring below W, then W's own answer."""
    query = attention_query()
    answer = attention_capacity(query, None, world_size)
    best = attention.max_tokens(query, world_size)
    assert answer.kind == "max_tokens" and answer.best == best.best and answer.next_infeasible == best.next_infeasible
    assert [r.world_size for r in answer.rows] == [p for p in SHOWN_RING_SIZES if p < world_size] + [world_size]
    assert [r.seq_len_tokens for r in answer.rows[:-1]] == \
        [attention.max_tokens(query, r.world_size).best.seq_len_tokens for r in answer.rows[:-1]]


def test_neither_tokens_nor_gpus_is_an_error():
    """A question needs S, W or both."""
    with pytest.raises(ValueError, match="--tokens"):
        attention_capacity(attention_query(), None, None)
    with pytest.raises(ValueError, match="--tokens"):
        stack_capacity(stack_query(), None, None)


def test_stack_check_fits_or_names_the_most_frugal_setting():
    """A check that fits answers with the chosen setting; one that does not, with the most frugal."""
    query = stack_query()
    fits = stack_capacity(query, 1024, 1)
    assert fits.feasible and fits.best.feasible and fits.rows == (fits.best,)
    huge = stack_capacity(query, 2**24, 1)
    assert not huge.feasible and not huge.best.feasible
    frugal = stack.frugal_row(query, stack.scan(query, 2**24, 1, first_only=True))
    assert huge.best.prediction.upper_bytes == pytest.approx(frugal.prediction.upper_bytes)


def test_stack_most_tokens_shows_the_answer_or_the_next_length():
    """Most tokens on W: one row, the best length, or the next length when nothing fits."""
    query = stack_query()
    answer = stack_capacity(query, None, 2)
    result = stack.max_tokens(query, 2)
    assert answer.best == result.best and answer.rows == (result.best,) and answer.feasible


def test_rounded_length_hint():
    """No hint for a length that is already a multiple of ROUND_TOKENS or answered by a power of
    two; otherwise the hint needs fewer GPUs than the answer."""
    query = stack_query(usable_bytes=96 * MIB, max_world_size=1024)
    assert rounder_length(query, 64 * ROUND_TOKENS, None) == (None, None)
    seq = 101 * 9901  # 1,000,001: splits over 1, 101, 9901 … only
    best = stack.min_world_size(query, seq).minimum
    rounded, other = rounder_length(query, seq, best)
    assert best.world_size == 101 and rounded == 999_424 and other.world_size == 32
    answer = stack_capacity(query, seq, None)
    assert (answer.rounded_seq_len_tokens, answer.rounded_minimum) == (rounded, other)


def test_learned_positions_bound_the_length():
    """GPT-2's 1,024 learned positions: a longer --tokens is bad input (ValueError → exit 2), and the
    most tokens K GPUs hold stops at 1,024 whatever the memory would allow."""
    from ringplan.capacity.answers import plan_answer, stack_capacity
    from ringplan.capacity.stack import StackQuery
    from ringplan.hardware import load_catalog
    from ringplan.models import load_model_catalog

    query = StackQuery(model=load_model_catalog().model("gpt2"), gpu=load_catalog().gpu("h100"))
    with pytest.raises(ValueError, match="1,024 learned positions"):
        stack_capacity(query, 128_000, None)
    with pytest.raises(ValueError, match="learned positions"):
        plan_answer(query, 1_000_000, 8)
    assert stack_capacity(query, None, 8).best.seq_len_tokens == 1024
    assert stack_capacity(query, 1024, None).feasible
