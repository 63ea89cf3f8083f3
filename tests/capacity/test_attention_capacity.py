"""Capacity search checked against brute force on small grids, plus its edge cases."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringplan.capacity.attention import (CapacityQuery, evaluate, max_tokens, min_world_size, splits, token_unit,
                               valid_world_sizes)
from ringplan.hardware import GpuSpec, load_catalog
from ringplan.memory.attention_model import MemoryModel
from ringplan.workload import AttentionShape, Workload
from tests.strategies import workload_templates

MIB = 2**20
UNFITTED = MemoryModel()  # no profiles: θ = 1, deterministic


def tiny_gpu(usable_bytes: int) -> GpuSpec:
    """A made-up GPU small enough that brute force over every length is cheap (no runtime overhead)."""
    return GpuSpec(name="tiny", driver_name="Tiny GPU", usable_memory_bytes=usable_bytes,
                   peak_flops_per_s={"bf16": 1e12}, hbm_bandwidth_bytes_per_s=1e12, intra_node_link="nvlink-4",
                   inter_node_link="infiniband-ndr-400", gpus_per_node=8, runtime_overhead_bytes=0)


def small_template(template: Workload) -> Workload:
    """Shrink the drawn shape so a few MiB hold hundreds to thousands of tokens."""
    shape = template.shape
    small = AttentionShape(n_heads=min(shape.n_heads, 8), n_kv_heads=min(shape.n_kv_heads, min(shape.n_heads, 8)),
                           head_dim=min(shape.head_dim, 64), batch=1, embed_dim=min(shape.embed_dim, 256),
                           dtype=shape.dtype)
    return Workload(seq_len_tokens=template.seq_len_tokens, shape=small, pattern=template.pattern,
                    training=template.training, projections=template.projections)


def query_for(template, usable_bytes, layout="contiguous", backend="auto", max_world_size=32, margin=0.05):
    if template.pattern.dilated:
        layout = "contiguous"
    return CapacityQuery(workload=small_template(template), layout=layout, backend=backend, gpu=tiny_gpu(usable_bytes),
                         safety_margin=margin, max_world_size=max_world_size, model=UNFITTED)


@settings(max_examples=40)
@given(workload_templates(), st.integers(1, 64), st.integers(1 * MIB, 64 * MIB),
       st.sampled_from(["contiguous", "zigzag"]), st.sampled_from(["auto", "math"]))
def test_min_world_size_matches_brute_force(template, m, usable, layout, backend):
    """The answer is feasible and no smaller valid ring is; with no answer, no valid ring up to the
    maximum is feasible. Every ring size 1..max is a candidate, not only powers of two."""
    query = query_for(template, usable, layout, backend)
    seq = m * max(template.pattern.segment_lengths_tokens, default=1) * 2 * 3 * 4 * 5
    try:
        result = min_world_size(query, seq)
    except ValueError:
        assert not any(splits(query, seq, p) for p in range(1, query.max_world_size + 1))
        return
    feasible = [p for p in range(1, query.max_world_size + 1)
                if splits(query, seq, p) and evaluate(query, seq, p).feasible]
    expected = feasible[0] if feasible else None
    assert (result.minimum.world_size if result.minimum else None) == expected
    assert all(row.seq_len_tokens == seq for row in result.rows)


def valid_lengths(query, world_size, limit_tokens_per_rank):
    """Every S = n·P with n ≤ limit that splits — found by trying every n (independent of token_unit)."""
    return [n * world_size for n in range(1, limit_tokens_per_rank + 1) if splits(query, n * world_size, world_size)]


@settings(max_examples=30)
@given(workload_templates(), st.integers(1, 8), st.integers(1 * MIB, 8 * MIB),
       st.sampled_from(["contiguous", "zigzag"]), st.sampled_from(["auto", "math"]))
def test_max_tokens_matches_brute_force(template, world_size, usable, layout, backend):
    """The answer is feasible, the next valid length is infeasible, every shorter valid length is
    feasible (where its segments stay on one rank, as at the answer) and every longer one (up to 2 units
    past it) is infeasible."""
    query = query_for(template, usable, layout, backend)
    result = max_tokens(query, world_size)
    unit = token_unit(query, world_size)
    best_n = result.best.tokens_per_rank if result.best else 0
    lengths = valid_lengths(query, world_size, best_n + 2 * unit)
    verdict = {s: evaluate(query, s, world_size).feasible for s in lengths}
    feasible = [s for s in lengths if verdict[s]]
    assert (result.best.seq_len_tokens if result.best else None) == (max(feasible) if feasible else None)
    # shorter lengths fit too - except where a segment spans ranks at the shorter length but not at the answer
    # (S = 256 on 2 GPUs with 256-token segments needs the ring's exchange buffers; S = 512 keeps every segment local)
    segment = max(template.pattern.segment_lengths_tokens or (0,))
    local = [s for s in lengths if s // world_size >= segment or segment == 0]
    assert all(verdict[s] for s in local if result.best and s <= result.best.seq_len_tokens)
    assert not result.next_infeasible.feasible
    following = [s for s in lengths if not result.best or s > result.best.seq_len_tokens]
    assert result.next_infeasible.seq_len_tokens == following[0]


@settings(max_examples=30)
@given(workload_templates(), st.integers(1, 8), st.integers(1 * MIB, 8 * MIB))
def test_feasibility_is_monotone_in_tokens(template, world_size, usable):
    """If a length fits on a ring, every shorter valid length fits on it too."""
    query = query_for(template, usable)
    lengths = valid_lengths(query, world_size, 4 * token_unit(query, world_size))
    verdicts = [evaluate(query, s, world_size).feasible for s in lengths]
    assert verdicts == sorted(verdicts, reverse=True)


def test_valid_world_sizes_are_all_integers_that_split():
    """1M tokens split over every divisor of 10^6 up to the maximum (5, 10, 1000 included); zigzag
    needs 2P to divide S."""
    workload = Workload(seq_len_tokens=8, shape=AttentionShape(n_heads=32, head_dim=128))
    gpu = load_catalog().gpu("a100-40gb")
    contiguous = CapacityQuery(workload=workload, gpu=gpu, model=UNFITTED)
    assert valid_world_sizes(contiguous, 1_000_000) == [p for p in range(1, 1025) if 1_000_000 % p == 0]
    zigzag = CapacityQuery(workload=workload, layout="zigzag", gpu=gpu, model=UNFITTED)
    assert valid_world_sizes(zigzag, 1_000_000) == [p for p in range(1, 1025) if 1_000_000 % (2 * p) == 0]
    with pytest.raises(ValueError, match="nearest valid lengths"):
        valid_world_sizes(zigzag, 1_000_001)


def test_bundled_question_has_an_answer():
    """`capacity --gpu a100-40gb --tokens 1M` with the default workload: a minimum exists and the
    table shows world sizes around it."""
    workload = Workload(seq_len_tokens=8, shape=AttentionShape(n_heads=32, head_dim=128))
    query = CapacityQuery(workload=workload, gpu=load_catalog().gpu("a100-40gb"))
    result = min_world_size(query, 1_000_000)
    assert result.minimum is not None and result.minimum.feasible
    assert result.minimum in result.rows


def test_step_time_hook_fills_rows():
    """The time model's hook (workload, layout, gpu) → (step_time_s, exposed_comm_s) lands in rows."""
    workload = Workload(seq_len_tokens=8, shape=AttentionShape(n_heads=32, head_dim=128))
    query = CapacityQuery(workload=workload, gpu=load_catalog().gpu("h100"), model=UNFITTED,
                          step_time=lambda w, layout, gpu: (w.seq_len_tokens * 1e-9, layout.ring_size * 1e-3))
    row = evaluate(query, 1_000_000, 4)
    assert (row.step_time_s, row.exposed_comm_s) == pytest.approx((1e-3, 4e-3))
    assert evaluate(CapacityQuery(workload=workload, gpu=query.gpu, model=UNFITTED), 1_000_000, 4).step_time_s is None


@pytest.mark.parametrize("kwargs, fragment", [
    ({"safety_margin": 1.0}, "safety margin"), ({"safety_margin": -0.1}, "safety margin"),
    ({"max_world_size": 0}, "max world size"), ({"layout": "spiral"}, "layout"), ({"backend": "tpu"}, "backend"),
])
def test_query_validation(kwargs, fragment):
    """Bad margins, sizes, layouts and backends raise ValueError naming the value."""
    workload = Workload(seq_len_tokens=8, shape=AttentionShape(n_heads=8, head_dim=64))
    with pytest.raises(ValueError, match=fragment):
        CapacityQuery(workload=workload, gpu=load_catalog().gpu("h100"), model=UNFITTED, **kwargs)


def test_step_time_only_for_rows_returned():
    """The searches evaluate memory alone: the step-time hook runs once per row an answer returns."""
    calls = []

    def hook(workload, layout, gpu):
        calls.append((workload.seq_len_tokens, layout.ring_size))
        return 1e-3, 0.0

    workload = Workload(seq_len_tokens=8, shape=AttentionShape(n_heads=32, head_dim=128))
    query = CapacityQuery(workload=workload, gpu=load_catalog().gpu("a100-40gb"), model=UNFITTED, step_time=hook)
    result = min_world_size(query, 1_000_000)
    assert len(calls) == len(result.rows) and all(row.step_time_s == 1e-3 for row in result.rows)
    assert result.minimum in result.rows and result.minimum.step_time_s == 1e-3
    calls.clear()
    best = max_tokens(query, 4).best
    assert calls == [(best.seq_len_tokens, 4)] and best.step_time_s == 1e-3


class _BoundedModel:
    """A stand-in memory model: 1 MiB per token per rank, with a fixed residual bound."""

    def __init__(self, bound_bytes: float) -> None:
        self.bound_bytes = bound_bytes

    def predict(self, workload, layout, gpu):
        from ringplan.memory.attention_model import MemoryPrediction
        from ringplan.workload import tokens_per_rank

        n = tokens_per_rank(workload, layout)
        return MemoryPrediction(terms_bytes={"q_bytes": n * MIB}, total_bytes=n * MIB, tokens_per_rank=n,
                                fitted_figure="device_used_bytes", peak_allocated_bytes=None, peak_reserved_bytes=None,
                                relative_uncertainty=0.0, provenance="test", provenance_kind="measured",
                                residual_bound_bytes=self.bound_bytes)


def test_feasibility_includes_the_residual_bound():
    """A plan is feasible only when the prediction plus the fits' worst residual fits the budget:
    100 MiB usable holds 100 tokens with no bound and 97 with a 3 MiB bound; headroom counts it."""
    workload = Workload(seq_len_tokens=1, shape=AttentionShape(n_heads=1, head_dim=16))
    for bound, expected in ((0.0, 100), (3 * MIB, 97)):
        query = CapacityQuery(workload=workload, gpu=tiny_gpu(100 * MIB), safety_margin=0.0, model=_BoundedModel(bound))
        best = max_tokens(query, 1).best
        assert best.seq_len_tokens == expected
        assert best.headroom_bytes == pytest.approx(100 * MIB - expected * MIB - bound)


def test_unit_divisors_match_trial_division():
    """The unit's divisors from its parts' factors are exactly the integers that divide it (checked
    by brute force on dilated patterns whose lcm mixes primes)."""
    from ringplan.capacity.attention import token_unit, unit_divisors
    from ringplan.workload import AttentionPattern

    for segments, rates in [((4096, 8192), (1, 2)), ((3 * 1024, 5 * 512), (3, 5)), ((7 * 9 * 64,), (7,))]:
        workload = Workload(seq_len_tokens=8 * 3 * 5 * 7 * 9 * 4096, shape=AttentionShape(n_heads=8, head_dim=64),
                            pattern=AttentionPattern(segment_lengths_tokens=segments, dilation_rates=rates))
        query = CapacityQuery(workload=workload, gpu=load_catalog().gpu("h100"))
        unit = token_unit(query, 1)
        assert unit_divisors(query, 1) == [d for d in range(1, unit + 1) if unit % d == 0]
