"""Step time of the all-gather, Ulysses and hybrid schemes (``ringplan.time.cp_time``): which collectives,
how many bytes, exposed in full, and the ring's own model where the scheme reduces to it."""

from __future__ import annotations

import pytest

from ringplan.time.attention_time import capacity_step_time, step_time_prediction
from ringplan.time.cp_time import capacity_cp_step_time, cp_step_time, head_shard_workload
from ringplan.workload import AttentionPattern, AttentionShape, RingLayout, Workload

SHAPE = AttentionShape(n_heads=32, n_kv_heads=2, head_dim=128)
S = 131_072


def workload(training: bool = False, causal: bool = True) -> Workload:
    return Workload(seq_len_tokens=S, shape=SHAPE, pattern=AttentionPattern(causal=causal), training=training)


@pytest.mark.parametrize("training, count", [(False, 1), (True, 3)])
def test_allgather_collectives(training, count):
    """Forward: one all-gather of P−1 K/V blocks; training adds the backward's gather and the fp32 dK/dV
    reduce-scatter; every one is exposed (exposed comm = their sum)."""
    p = 8
    step = cp_step_time(workload(training), RingLayout(ring_size=p, layout="zigzag", cp_scheme="allgather"), "h100")
    kv_block = 2 * (S // p) * 2 * 128 * 2
    assert len(step.collectives) == count
    assert step.collectives[0].sent_bytes == (p - 1) * kv_block
    if training:
        assert step.collectives[2].sent_bytes == (p - 1) * kv_block * 2  # fp32
    assert step.exposed_comm_s == pytest.approx(sum(c.time_s for c in step.collectives))
    assert step.step_time_s == pytest.approx(step.call_overhead_s + step.compute_s + step.exposed_comm_s)


@pytest.mark.parametrize("training, count", [(False, 4), (True, 8)])
def test_ulysses_all_to_alls(training, count):
    """4 all-to-alls forward (+4 backward); K/V sent r = U/H_kv times (2 KV heads over U = 8: r = 4)."""
    u = 8
    step = cp_step_time(workload(training), RingLayout(ring_size=u, cp_scheme="ulysses"), "h100")
    q = (S // u) * 32 * 128 * 2
    sent = {c.name: c.sent_bytes for c in step.collectives}
    assert len(sent) == count
    assert sent["all-to-all q"] == pytest.approx((u - 1) / u * q)
    assert sent["all-to-all k"] == pytest.approx((u - 1) / u * (S // u) * 4 * 2 * 128 * 2)
    assert step.exposed_comm_s == pytest.approx(sum(c.time_s for c in step.collectives))


def test_ulysses_compute_is_one_kernel_on_head_shards():
    """Ulysses' compute is the single-GPU prediction of the head-shard workload (S tokens, H/U heads)."""
    lay = RingLayout(ring_size=8, cp_scheme="ulysses")
    inner = step_time_prediction(head_shard_workload(workload(), 8), RingLayout(ring_size=1), "h100")
    assert cp_step_time(workload(), lay, "h100").compute_s == pytest.approx(inner.compute_s)


def test_hybrid_adds_the_inner_ring():
    """Hybrid = the inner ring's step on head shards (its exposed hops kept) + the all-to-alls."""
    lay = RingLayout(ring_size=16, layout="zigzag", cp_scheme="hybrid", ulysses_degree=8)
    step = cp_step_time(workload(True), lay, "h100")
    inner = step_time_prediction(head_shard_workload(workload(True), 8), RingLayout(ring_size=2, layout="zigzag"),
                                 "h100", gpus_per_node=1)
    assert step.compute_s == pytest.approx(inner.compute_s)
    assert step.exposed_comm_s == pytest.approx(inner.exposed_comm_s + sum(c.time_s for c in step.collectives))


def test_catalog_link_is_labelled():
    """A link taken from the catalog says so."""
    step = cp_step_time(workload(), RingLayout(ring_size=4, cp_scheme="allgather"), "a100-40gb")
    assert step.comm_provenance == "catalog link, not measured"


def test_ring_hook_unchanged():
    """The capacity hook answers the ring exactly as attention_time does."""
    lay = RingLayout(ring_size=4, layout="zigzag")
    assert capacity_cp_step_time(workload(), lay, "h100") == capacity_step_time(workload(), lay, "h100")


def test_one_gpu_sends_nothing():
    """At P = 1 there is nothing to gather."""
    step = cp_step_time(workload(True), RingLayout(ring_size=1, cp_scheme="allgather"), "h100")
    assert step.exposed_comm_s == 0.0
