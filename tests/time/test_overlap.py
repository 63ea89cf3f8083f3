"""Overlap threshold (``ringplan.time.overlap``): the searched threshold against the closed-form root,
and the root itself by hand."""

import pytest

from ringplan.time import kernels as cp
from ringplan.time.links import LinkModel
from ringplan.time.overlap import hiding_threshold_tokens, overlap_threshold
from ringplan.workload import AttentionShape

EXACT = 1e-12


@pytest.mark.parametrize("causal, layout, phi", [(False, "contiguous", 1.0), (True, "zigzag", 0.5)])
def test_overlap_threshold_matches_closed_form(tmp_path, causal, layout, phi):
    """With affine curves the searched threshold is the closed-form root (within the even-token grid)."""
    shape = AttentionShape(n_heads=32, head_dim=128)
    link = LinkModel(name="user", latency_s=100e-6, bandwidth_bytes_per_s=50e9)
    got = overlap_threshold(shape, "h100", causal=causal, layout=layout, link=link, step_overhead_s=0.0,
                            timing_dir=tmp_path)
    a = 4 * 32 * 128 * phi / 598e12
    merge_per_token = cp.merge_bytes(batch=1, n_heads=32, head_dim=128, q_tokens=1, dtype_bytes=2)
    b = 2 * 32 * 128 * 2 / 50e9 - merge_per_token * cp.DEFAULT_MERGE_TRAFFIC_FACTOR / 3.35e12
    root = hiding_threshold_tokens(a, b, 100e-6)
    assert root <= got.min_tokens_per_rank <= root + 2
    assert got.paper_tokens == pytest.approx(598e12 / 50e9, rel=EXACT)


def test_hiding_threshold_hand_computed():
    """n² − 3n − 4 = 0 has root 4; a negative discriminant means every n hides."""
    assert hiding_threshold_tokens(1.0, 3.0, 4.0) == pytest.approx(4.0, rel=EXACT)
    assert hiding_threshold_tokens(1.0, -3.0, -4.0) == 0.0
    with pytest.raises(ValueError):
        hiding_threshold_tokens(0.0, 1.0, 1.0)
