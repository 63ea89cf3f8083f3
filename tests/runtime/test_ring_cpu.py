"""Ring attention on CPU (gloo, spawned ranks) against the dense float64 reference, fp32 inputs.

One spawned group per world size (1, 2, 4) runs every case (fresh seeded inputs per case);
each test then asserts one case. Output AND gradients of q, k, v (and of the module's
parameters and input, summed over ranks) must match within ``REL_TOL_FP32``.
"""

from __future__ import annotations

import pytest

from ringplan_runtime import spawn
from runtime.helpers import REL_TOL_FP32, Case, run_bad_inputs, run_cases, with_seed, worst_over_ranks

WORLD_SIZES = (1, 2, 4)
SPAWN_TIMEOUT_S = 240.0
LONG = dict(segment_lengths=(8, 32, 64), dilation_rates=(1, 2, 4))  # n = 16 at P = 4: shorter, 2 ranks, 4 ranks

CASES = with_seed([
    Case(name="dense"),
    Case(name="causal_contiguous", causal=True),
    Case(name="causal_zigzag", causal=True, layout="zigzag"),
    Case(name="noncausal_zigzag", layout="zigzag"),
    Case(name="gqa_causal_zigzag_batch2", causal=True, layout="zigzag", kv_heads=2, batch=2),
    Case(name="mqa_causal_contiguous", causal=True, kv_heads=1),
    Case(name="batch3_dense", batch=3, head_dim=16),
    Case(name="math_backend_gqa_zigzag", causal=True, layout="zigzag", kv_heads=2, backend="math"),
    Case(name="dilated_short_and_long", kind="dilated", **LONG),
    Case(name="dilated_causal", kind="dilated", causal=True, **LONG),
    Case(name="dilated_gqa_batch2", kind="dilated", kv_heads=2, batch=2, segment_lengths=(16, 64),
         dilation_rates=(2, 2)),
    Case(name="dilated_hilbert", kind="dilated", hilbert=True, **LONG),
    Case(name="dilated_math_backend", kind="dilated", backend="math", segment_lengths=(32, 64),
         dilation_rates=(2, 1)),
    Case(name="dilated_single_rate1", kind="dilated", causal=True, segment_lengths=(32,), dilation_rates=(1,)),
    Case(name="dilated_single_rate2_uncovered_rows", kind="dilated", segment_lengths=(64,), dilation_rates=(2,)),
    Case(name="hilbert_on_equals_off", kind="hilbert", kv_heads=2, segment_lengths=(16, 64), dilation_rates=(2, 2)),
    Case(name="module_causal_zigzag_gqa", kind="module", causal=True, layout="zigzag", kv_heads=2),
    Case(name="module_dense_no_bias", kind="module", extra={"bias": False}),
    Case(name="module_dilated_already_split", kind="module", segment_lengths=(8, 64), dilation_rates=(1, 2),
         extra={"already_split": True}),
])


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda p: f"P{p}")
def ring_results(request):
    """Worst error over ranks for every case, from one spawned group of ``request.param`` ranks."""
    per_rank = spawn(run_cases, world_size=request.param, backend="gloo", args=(CASES,), timeout_s=SPAWN_TIMEOUT_S)
    return worst_over_ranks(per_rank)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_dense_reference(ring_results, case):
    """Output and every gradient agree with the dense float64 reference within REL_TOL_FP32; dtypes kept."""
    errors = dict(ring_results[case.name])
    dtype_ok = errors.pop("dtype_ok", 1.0)
    assert dtype_ok == 1.0, f"{case.name}: output/gradient dtype differs from the input dtype"
    too_large = {name: value for name, value in errors.items() if not value <= REL_TOL_FP32}
    assert not too_large, f"{case.name}: relative errors above {REL_TOL_FP32}: {too_large}"


@pytest.fixture(scope="module")
def bad_input_outcomes():
    """Every bad call, on every rank of a 2-rank group: (label, exception, message, P2P batches started)."""
    return spawn(run_bad_inputs, world_size=2, backend="gloo", timeout_s=SPAWN_TIMEOUT_S)


def test_bad_inputs_raise_before_communication(bad_input_outcomes):
    """Each bad input raises ValueError (with a message) on every rank, and no P2P exchange was started."""
    for rank, outcomes in enumerate(bad_input_outcomes):
        assert len(outcomes) >= 18
        for label, kind, message, started in outcomes:
            assert kind == "ValueError", f"rank {rank}, {label}: raised {kind} ({message})"
            assert message, f"rank {rank}, {label}: empty error message"
            assert started == 0, f"rank {rank}, {label}: {started} P2P batches started before the error"


def test_bad_inputs_single_process():
    """The same checks without any process group (group=None, one device)."""
    outcomes = run_bad_inputs()
    assert outcomes
    assert all(kind == "ValueError" for _, kind, _, _ in outcomes), outcomes
