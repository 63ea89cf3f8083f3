"""Ring simulation (``ringplan.time.simulate``): hand-computed schedules, reductions, invariants."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringplan.time import simulate as sim

EXACT = 1e-12
D, S, F, HQ, HK = sim.DIAGONAL, sim.SKIP, sim.FULL, sim.HALF_QUERIES, sim.HALF_KEYS


def _uniform_pass(ring_size, compute, hop, grad_hop=None, group=None):
    group = group or ring_size
    return sim.RingPass(name="p", compute_s=np.full((ring_size, group), compute), kv_hop_s=np.full(ring_size, hop),
                        grad_hop_s=None if grad_hop is None else np.full(ring_size, grad_hop), group_size=group)


# ---- block kinds -------------------------------------------------------------------------------------------

def test_block_kinds_hand_tables():
    """P = 4: contiguous causal is a staircase, zigzag is a diagonal then half blocks, non-causal all full."""
    assert sim.block_kinds(4, 4, causal=True, layout="contiguous").tolist() == [
        [D, S, S, S], [D, F, S, S], [D, F, F, S], [D, F, F, F]]
    assert sim.block_kinds(4, 4, causal=True, layout="zigzag").tolist() == [
        [D, HQ, HQ, HQ], [D, HK, HQ, HQ], [D, HK, HK, HQ], [D, HK, HK, HK]]
    assert (sim.block_kinds(3, 3, causal=False, layout="zigzag") == F).all()
    assert sim.block_kinds(4, 2, causal=True, layout="contiguous").tolist() == [[D, S], [D, F], [D, S], [D, F]]


@given(ring_size=st.integers(1, 64))
def test_causal_work_is_triangular(ring_size):
    """Contiguous causal: rank i computes i full blocks; zigzag: every rank P−1 half blocks (balanced)."""
    contiguous = sim.block_kinds(ring_size, ring_size, causal=True, layout="contiguous")
    assert ((contiguous == F).sum(axis=1) == np.arange(ring_size)).all()
    zigzag = sim.block_kinds(ring_size, ring_size, causal=True, layout="zigzag")
    assert (((zigzag == HK) | (zigzag == HQ)).sum(axis=1) == ring_size - 1).all()


def test_block_kinds_reject_bad_layout():
    with pytest.raises(ValueError, match="layout"):
        sim.block_kinds(4, 4, causal=True, layout="striped")
    with pytest.raises(ValueError, match="divide"):
        sim.block_kinds(6, 4, causal=True, layout="contiguous")


# ---- the schedule ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compute, hop", [(1.0, 0.3), (0.3, 1.0), (1.0, 1.0)])
def test_forward_two_ranks_hand_computed(compute, hop):
    """P = 2: step 0 lasts max(compute, hop) (overlapped), step 1 only computes: max(c, h) + c."""
    result = sim.simulate_step([_uniform_pass(2, compute, hop)])
    assert result.step_time_s == pytest.approx(max(compute, hop) + compute, rel=EXACT)
    assert result.compute_s == pytest.approx(2 * compute, rel=EXACT)
    assert result.exposed_comm_s == pytest.approx(max(0.0, hop - compute), abs=EXACT)


@pytest.mark.parametrize("c, h, g", [(1.0, 0.3, 0.5), (0.2, 0.3, 0.5), (1.0, 2.0, 0.1)])
def test_backward_two_ranks_hand_computed(c, h, g):
    """P = 2 backward: max(c, h) + max(c, g) + g — dK/dV of step 0 overlaps step 1, the last hop does not."""
    result = sim.simulate_step([_uniform_pass(2, c, h, grad_hop=g)])
    assert result.step_time_s == pytest.approx(max(c, h) + max(c, g) + g, rel=EXACT)


@given(ring_size=st.integers(2, 64), compute=st.floats(0.01, 10), hop=st.floats(0.0, 10))
def test_uniform_ring_closed_form(ring_size, compute, hop):
    """Uniform forward ring: (P − 1)·max(c, h) + c; efficiency = P·c / that."""
    result = sim.simulate_step([_uniform_pass(ring_size, compute, hop)])
    expected = (ring_size - 1) * max(compute, hop) + compute
    assert result.step_time_s == pytest.approx(expected, rel=1e-9)
    assert result.efficiency == pytest.approx(ring_size * compute / expected, rel=1e-9)


def test_ring_of_one_is_the_block():
    """Reduction: one rank, one step, no communication — the step is the compute time."""
    result = sim.simulate_step([_uniform_pass(1, 0.7, 5.0)])
    assert result.step_time_s == pytest.approx(0.7, rel=EXACT) and result.exposed_comm_s == 0.0


@given(per_node=st.sampled_from([2, 4, 8]), nodes=st.integers(2, 4), slow=st.floats(1.0, 5.0))
@settings(max_examples=20)
def test_slowest_hop_bounds_every_step(per_node, nodes, slow):
    """Hierarchical ring without compute: each of the P − 1 steps waits for the slow inter-node hop."""
    ring_size, fast = per_node * nodes, 0.01
    hops = np.full(ring_size, fast)
    hops[::per_node] = slow
    p = sim.RingPass(name="p", compute_s=np.zeros((ring_size, ring_size)), kv_hop_s=hops, group_size=ring_size)
    step = sim.simulate_step([p]).step_time_s
    assert (ring_size - 1) * slow * (1 - EXACT) <= step <= (ring_size - 1) * (slow + fast) * (1 + EXACT)


def test_passes_chain_per_rank_and_validate():
    """Passes run back to back per rank; a wrong compute shape or negative time is a ValueError."""
    a, b = _uniform_pass(4, 1.0, 0.1), _uniform_pass(4, 2.0, 0.1)
    assert sim.simulate_step([a, b]).step_time_s == pytest.approx(4 * 1.0 + 4 * 2.0, rel=EXACT)
    with pytest.raises(ValueError, match="compute_s"):
        sim.RingPass(name="x", compute_s=np.zeros((4, 3)), kv_hop_s=np.zeros(4), group_size=4)
    with pytest.raises(ValueError, match=">= 0"):
        sim.RingPass(name="x", compute_s=-np.ones((4, 4)), kv_hop_s=np.zeros(4), group_size=4)
    with pytest.raises(ValueError, match="no passes"):
        sim.simulate_step([])


def test_text_timeline_shape():
    """One line per drawn rank, all of the same width; the busiest rank is all compute."""
    kinds = sim.block_kinds(8, 8, causal=True, layout="contiguous")
    p = sim.RingPass(name="p", compute_s=np.where(kinds == F, 1.0, np.where(kinds == D, 0.5, 0.0)),
                     kv_hop_s=np.full(8, 0.1), group_size=8)
    lines = sim.text_timeline(sim.simulate_step([p]), width=40)
    assert len(lines) == 8 and len({len(line) for line in lines}) == 1
    assert lines[-1].endswith("|" + "#" * 40 + "|")
    with pytest.raises(ValueError):
        sim.text_timeline(sim.simulate_step([p]), ranks=[9])


# ---- shortcuts, per-step hops, start offset ------------------------------------------------------------

@pytest.mark.parametrize("grad", [None, 0.4])
def test_symmetric_shortcut_equals_full_play(monkeypatch, grad):
    """The lockstep shortcut for identical ranks gives exactly the rank-by-rank result."""
    passes = [_uniform_pass(16, 0.3, 0.5, grad_hop=grad)]
    fast = sim.simulate_step(passes)
    monkeypatch.setattr(sim, "_symmetric", lambda p, start: False)
    slow = sim.simulate_step(passes)
    assert fast.step_time_s == pytest.approx(slow.step_time_s, rel=EXACT)
    np.testing.assert_allclose(fast.timelines[0].step_end_s, slow.timelines[0].step_end_s, rtol=EXACT)


def test_per_step_hops_hand_computed():
    """Hops given per (rank, step): forward P = 2 uses column 0; backward's last dK/dV column is the return hop."""
    fwd = sim.RingPass(name="f", compute_s=np.full((2, 2), 1.0), kv_hop_s=np.array([[3.0, 99.0], [3.0, 99.0]]),
                       group_size=2)
    assert sim.simulate_step([fwd]).step_time_s == pytest.approx(3.0 + 1.0, rel=EXACT)
    bwd = sim.RingPass(name="b", compute_s=np.full((2, 2), 1.0), kv_hop_s=np.full(2, 0.5),
                       grad_hop_s=np.array([[2.0, 0.25], [2.0, 0.25]]), group_size=2)
    assert sim.simulate_step([bwd]).step_time_s == pytest.approx(1.0 + max(1.0, 2.0) + 0.25, rel=EXACT)
    with pytest.raises(ValueError, match="shape"):
        sim.RingPass(name="x", compute_s=np.ones((2, 2)), kv_hop_s=np.ones((2, 3)), group_size=2)


def test_start_offset_is_not_exposed_communication():
    """Starting every rank late shifts the step by exactly that and leaves exposed communication unchanged."""
    passes = [_uniform_pass(4, 1.0, 0.3)]
    base, late = sim.simulate_step(passes), sim.simulate_step(passes, start_s=0.5)
    assert late.step_time_s == pytest.approx(base.step_time_s + 0.5, rel=EXACT)
    assert late.exposed_comm_s == pytest.approx(base.exposed_comm_s, abs=EXACT)
    with pytest.raises(ValueError, match="start"):
        sim.simulate_step(passes, start_s=-1.0)
