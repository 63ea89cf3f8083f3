"""``ringplan_runtime.calibrate``'s plan and budget arithmetic: the attention plan gives every part the fit
needs (``memory.calibration``), rings are cut at the deadline, phases share what is left."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("torch")

from ringplan.memory.attention_fits import kernel_family, workload_family  # noqa: E402
from ringplan_runtime.calibrate import PHASE_SHARES, attention_points, share_s  # noqa: E402
from ringplan_runtime.points import ring_timeout_s  # noqa: E402


@pytest.mark.parametrize("cpu", [False, True])
def test_plan_covers_the_fitted_families(cpu):
    """Each kernel family the plan measures has >= 2 token counts (a constant and a per-row slope can both be
    fitted); forward and training, GQA and projections are there (the GQA workspace term and the
    projections' outside-allocator indicator need them)."""
    points = attention_points(cpu=cpu)
    lengths: dict[str, set[int]] = {}
    for p in points:
        lengths.setdefault(kernel_family(workload_family(p.workload, p.layout)), set()).add(p.workload.seq_len_tokens)
    assert {"dense/forward/no-projections/tiled", "dense/training/no-projections/tiled",
            "dense/forward/projections/tiled"} <= set(lengths)
    assert len(lengths["dense/forward/no-projections/tiled"]) >= 2
    assert len(lengths["dense/training/no-projections/tiled"]) >= 2
    assert any(p.workload.shape.n_kv_heads < p.workload.shape.n_heads for p in points)
    assert all(p.layout.ring_size == 1 for p in points)


def test_two_gpus_add_ring_points_at_the_same_tokens_per_rank():
    """With two GPUs the plan adds W = 2 points (NCCL communicator, P2P buffers) of the first families at
    the W = 1 tokens per rank."""
    points = attention_points(cpu=False, ring_sizes=(1, 2))
    single = {(p.workload.training, p.workload.seq_len_tokens) for p in points if p.layout.ring_size == 1}
    ring = [p for p in points if p.layout.ring_size == 2]
    assert ring and all((p.workload.training, p.workload.seq_len_tokens // 2) in single for p in ring)


def test_ring_timeout_is_cut_at_the_deadline():
    """No deadline: the timeout as given; a deadline ahead: the time left, at most the timeout; past: None."""
    now = time.monotonic()
    assert ring_timeout_s(60.0, None) == 60.0
    assert 9.0 < ring_timeout_s(60.0, now + 10.0) <= 10.0
    assert ring_timeout_s(5.0, now + 100.0) == 5.0
    assert ring_timeout_s(60.0, now - 1.0) is None


def test_phases_share_what_is_left():
    """A phase gets its share of the seconds left before the deadline, and nothing once it has passed."""
    now = time.monotonic()
    assert share_s(now + 100.0, "attention") == pytest.approx(100.0 * PHASE_SHARES["attention"], abs=0.5)
    assert share_s(now - 5.0, "gemm") == 0.0
