"""Capacity answers under the all-gather, Ulysses and hybrid schemes (``CapacityQuery.cp_scheme``)."""

from __future__ import annotations

import pytest

from ringplan.capacity.attention import CapacityQuery, max_tokens, min_world_size, valid_world_sizes
from ringplan.hardware import load_catalog
from ringplan.workload import AttentionShape, Workload

GPU = load_catalog().gpu("h100")
WORKLOAD = Workload(seq_len_tokens=1 << 20, shape=AttentionShape(n_heads=32, n_kv_heads=8, head_dim=128),
                    training=True)


def test_ulysses_sizes_divide_the_heads():
    """Ulysses runs over every GPU: only world sizes dividing H are plans."""
    query = CapacityQuery(workload=WORKLOAD, gpu=GPU, cp_scheme="ulysses", max_world_size=64)
    assert valid_world_sizes(query, 1 << 20) == [1, 2, 4, 8, 16, 32]


def test_hybrid_sizes_are_u_times_r():
    """Hybrid plans are W = U·R with R > 1."""
    query = CapacityQuery(workload=WORKLOAD, gpu=GPU, cp_scheme="hybrid", ulysses_degree=4, max_world_size=64)
    sizes = valid_world_sizes(query, 1 << 20)
    assert sizes and all(w % 4 == 0 and w // 4 > 1 for w in sizes)


@pytest.mark.parametrize("scheme, u", [("allgather", None), ("ulysses", None), ("hybrid", 2)])
def test_min_world_size_is_the_first_feasible(scheme, u):
    """The answer is the smallest valid size that fits (brute force over the valid sizes)."""
    query = CapacityQuery(workload=WORKLOAD.with_seq_len(4 << 20), gpu=GPU, cp_scheme=scheme, ulysses_degree=u,
                          max_world_size=64)
    answer = min_world_size(query, 4 << 20)
    from ringplan.capacity.attention import memory_row

    feasible = [w for w in valid_world_sizes(query, 4 << 20) if memory_row(query, 4 << 20, w).feasible]
    assert answer.minimum is not None and answer.minimum.world_size == feasible[0]


def test_max_tokens_is_maximal():
    """The longest sequence fits and the next valid one does not."""
    query = CapacityQuery(workload=WORKLOAD, gpu=GPU, cp_scheme="allgather")
    answer = max_tokens(query, 8)
    assert answer.best.feasible and not answer.next_infeasible.feasible


@pytest.mark.parametrize("kwargs, message", [
    (dict(cp_scheme="hybrid"), "U > 1"),
    (dict(cp_scheme="hybrid", ulysses_degree=3), r"nearest valid degrees for 32 heads: \[2, 4\]"),
    (dict(cp_scheme="ulysses", ulysses_degree=4), "give --cp hybrid"),
    (dict(cp_scheme="allgather", ulysses_degree=4), "not to allgather"),
])
def test_bad_scheme_queries(kwargs, message):
    """A query the scheme cannot answer raises ValueError with the offending values."""
    with pytest.raises(ValueError, match=message):
        CapacityQuery(workload=WORKLOAD, gpu=GPU, **kwargs)
