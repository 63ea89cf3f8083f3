"""Overhead fits (``ringplan.time.overhead_fits``): round trips — step times synthesised with a known
overhead, the fit recovers it — and bad input."""

import pytest

from ringplan.time.attention_time import step_time_prediction
from ringplan.time.overhead_fits import fit_call_overhead_s, fit_step_overhead_s
from ringplan.workload import RingLayout
from timing_cases import attention_workload, write_timing_profiles


def test_step_overhead_fit_round_trip(tmp_path):
    """Step times synthesised with a 50 µs per-step overhead: the fit returns 50 µs and ~0 error."""
    write_timing_profiles(tmp_path)
    cases = [(attention_workload(p * n, causal=c), RingLayout(ring_size=p, layout=lay))
             for p, n, c, lay in [(2, 4096, False, "contiguous"), (4, 8192, True, "zigzag"), (8, 4096, True, "zigzag")]]
    rows = [(w, l, step_time_prediction(w, l, "h100", timing_dir=tmp_path, step_overhead_s=50e-6).step_time_s)
            for w, l in cases]
    overhead, errors = fit_step_overhead_s(rows, "h100", timing_dir=tmp_path)
    assert overhead == pytest.approx(50e-6, rel=1e-3)
    assert max(abs(e) for e in errors) < 1e-4


def test_call_overhead_fit_round_trip(tmp_path):
    """Step times synthesised with a 200 µs call overhead: the fit returns 200 µs and ~0 error."""
    write_timing_profiles(tmp_path)
    cases = [(attention_workload(p * n), RingLayout(ring_size=p)) for p, n in [(1, 4096), (2, 8192), (4, 4096)]]
    rows = [(w, l, step_time_prediction(w, l, "h100", timing_dir=tmp_path, call_overhead_s=200e-6).step_time_s)
            for w, l in cases]
    overhead, errors = fit_call_overhead_s(rows, "h100", timing_dir=tmp_path)
    assert overhead == pytest.approx(200e-6, rel=1e-6)
    assert max(abs(e) for e in errors) < 1e-9


def test_fits_reject_empty_and_non_positive_rows():
    """No rows, or a measured step time ≤ 0, is an error naming what is wrong."""
    with pytest.raises(ValueError, match="at least one"):
        fit_call_overhead_s([], "h100")
    with pytest.raises(ValueError, match="positive"):
        fit_step_overhead_s([(attention_workload(4096), RingLayout(ring_size=1), 0.0)], "h100")
